//! Verified-token cache: the result of a signature check, keyed by SHA-256 of the
//! whole token, bounded in entries, never used past the token's `exp` nor across
//! a change of the issuer's keys. Revocation, audience and scopes are still
//! checked on every request by the caller.
//!
//! One map per worker: a hit takes only the worker's own lock and counts its own
//! copy of the claims, so a token every worker sees costs no contended cache
//! line. A token is verified once per worker that sees it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::Claims;

pub type TokenHash = [u8; 32];

pub fn hash(token: &str) -> TokenHash {
    hash_bytes(token.as_bytes())
}

pub fn hash_bytes(bytes: &[u8]) -> TokenHash {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

struct Entry {
    claims: Arc<Claims>,
    /// Identity of the issuer's key store and its key generation at verification.
    issuer: usize,
    generation: u64,
}

/// Keys are already uniform SHA-256 digests: use their first 8 bytes as the hash.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 |= u64::from(*b) << (8 * i);
        }
    }
    fn write_usize(&mut self, _: usize) {}
}

type Map = HashMap<TokenHash, Entry, BuildHasherDefault<DigestHasher>>;

/// A worker's map and its share of the bound, on cache lines of its own.
#[repr(align(128))]
struct Shard {
    map: Mutex<Map>,
    max: usize,
}

pub struct TokenCache {
    shards: Box<[Shard]>,
    max: usize,
}

impl TokenCache {
    pub fn new(max: usize) -> Self {
        Self::with_shards(max, crate::worker::shards())
    }

    /// The bound split between `n` workers, adding up to exactly `max`.
    fn with_shards(max: usize, n: usize) -> Self {
        let share = |i: usize| max / n + usize::from(i < max % n);
        let shards = (0..n).map(|i| Shard { map: Mutex::new(Map::default()), max: share(i) }).collect();
        Self { shards, max }
    }

    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    fn shard(&self) -> (MutexGuard<'_, Map>, usize) {
        let s = &self.shards[crate::worker::shard(self.shards.len())];
        (s.map.lock().unwrap_or_else(PoisonError::into_inner), s.max)
    }

    pub fn get(&self, key: &TokenHash, issuer: usize, generation: u64, now: i64) -> Option<Arc<Claims>> {
        let (mut map, _) = self.shard();
        let e = map.get(key)?;
        if e.issuer == issuer && e.generation == generation && now <= e.claims.exp {
            return Some(e.claims.clone());
        }
        map.remove(key);
        None
    }

    pub fn insert(&self, key: TokenHash, issuer: usize, generation: u64, claims: Arc<Claims>, now: i64) {
        if self.max == 0 || claims.exp < now {
            return;
        }
        let (mut map, max) = self.shard();
        if max == 0 {
            return;
        }
        if map.len() >= max {
            map.retain(|_, e| e.claims.exp >= now);
            if map.len() >= max {
                // Still full of live tokens: start over rather than track recency on every hit.
                map.clear();
            }
        }
        map.insert(key, Entry { claims, issuer, generation });
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.map.lock().unwrap().len()).sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Arc<Claims> {
        Arc::new(Claims { exp, ..Default::default() })
    }

    #[test]
    fn hits_only_for_same_token_issuer_generation_and_before_exp() {
        let c = TokenCache::new(10);
        let a = hash("token-a");
        let b = hash("token-b");
        c.insert(a, 1, 7, claims(100), 50);
        assert!(c.get(&a, 1, 7, 60).is_some());
        assert!(c.get(&b, 1, 7, 60).is_none(), "another token never hits");
        assert!(c.get(&a, 2, 7, 60).is_none(), "another issuer never hits");
        c.insert(a, 1, 7, claims(100), 50);
        assert!(c.get(&a, 1, 8, 60).is_none(), "new keys invalidate");
        c.insert(a, 1, 7, claims(100), 50);
        assert!(c.get(&a, 1, 7, 101).is_none(), "never past exp");
    }

    #[test]
    fn bounded() {
        let c = TokenCache::with_shards(3, 1);
        for i in 0..10 {
            c.insert(hash(&format!("t{i}")), 1, 1, claims(100), 0);
            assert!(c.len() <= 3);
        }
        let off = TokenCache::new(0);
        off.insert(hash("x"), 1, 1, claims(100), 0);
        assert!(off.is_empty());
    }

    #[test]
    fn each_worker_has_its_own_map_within_the_bound() {
        let c = Arc::new(TokenCache::with_shards(4, 2));
        let a = hash("token-a");
        let on = |n: usize, f: Box<dyn FnOnce(&TokenCache) + Send>| {
            let c = c.clone();
            std::thread::spawn(move || {
                crate::worker::set(n);
                f(&c)
            })
            .join()
            .unwrap()
        };
        on(0, Box::new(move |c| c.insert(a, 1, 1, claims(100), 0)));
        on(
            0,
            Box::new(move |c| assert!(c.get(&a, 1, 1, 1).is_some(), "a hit on the worker that verified it")),
        );
        on(1, Box::new(move |c| assert!(c.get(&a, 1, 1, 1).is_none(), "another worker verifies it itself")));
        on(
            1,
            Box::new(|c| {
                for i in 0..10 {
                    c.insert(hash(&format!("t{i}")), 1, 1, claims(100), 0);
                }
            }),
        );
        assert!(c.len() <= 1 + 2, "each shard holds at most 4 / 2 entries: {}", c.len());
        let odd = TokenCache::with_shards(5, 3);
        assert_eq!(
            odd.shards.iter().map(|s| s.max).collect::<Vec<_>>(),
            [2, 2, 1],
            "exactly the bound in all"
        );
    }
}
