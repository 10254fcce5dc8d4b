//! `[[rate_limits]]`: token buckets per key value (governor's GCRA), kept in
//! memory by each instance. `client_ip` and `header:` keys are checked before
//! authentication (so a login flood never reaches the authorization server),
//! `sub` and `claim:` keys once the token is known; a request without the key's
//! value is not limited by that entry. Key values are hashed (with a per-process
//! random key) so checking allocates nothing; idle buckets are dropped, so a
//! flood of distinct keys cannot exhaust memory.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use http::HeaderMap;

use crate::auth::Claims;
use crate::config::{LimitKey, RateLimitSettings};

/// Buckets kept per entry before idle ones are swept out of turn.
const MAX_KEYS: usize = 100_000;

/// A request over a limit: the entry's name and when a token is next free.
#[derive(Debug, thiserror::Error)]
#[error("rate limit {limit} exceeded")]
pub struct Limited {
    pub limit: String,
    pub retry_after: Duration,
}

pub struct RateLimit {
    settings: RateLimitSettings,
    limiter: DefaultKeyedRateLimiter<u64>,
    hasher: std::collections::hash_map::RandomState,
    /// Seconds (of the limiter's clock) of the last out-of-turn sweep.
    swept: AtomicU64,
    checks: AtomicU64,
}

impl RateLimit {
    fn new(settings: RateLimitSettings) -> Self {
        let quota = Quota::with_period(settings.period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(settings.burst);
        Self {
            limiter: DefaultKeyedRateLimiter::dashmap(quota),
            settings,
            hasher: Default::default(),
            swept: AtomicU64::new(0),
            checks: AtomicU64::new(0),
        }
    }

    fn applies(&self, route: Option<&str>, login: bool) -> bool {
        match &self.settings.routes {
            None => true,
            Some(list) => list.iter().any(|r| if r == "@login" { login } else { Some(r.as_str()) == route }),
        }
    }

    fn check(&self, value: &[u8]) -> Result<(), Limited> {
        let key = self.hasher.hash_one(value);
        let result = self.limiter.check_key(&key);
        // Counting the buckets visits every shard: every 1,024th check is enough
        // to keep them bounded (at most that many over MAX_KEYS in between).
        if self.checks.fetch_add(1, Ordering::Relaxed).is_multiple_of(1024) && self.limiter.len() > MAX_KEYS {
            self.sweep_out_of_turn();
        }
        result.map_err(|not_until| Limited {
            limit: self.settings.name.clone(),
            retry_after: not_until.wait_time_from(DefaultClock::default().now()),
        })
    }

    /// Drops buckets that have refilled (at most once a second, when over `MAX_KEYS`).
    fn sweep_out_of_turn(&self) {
        let now = crate::clock::unix_now() as u64;
        if self.swept.swap(now, Ordering::Relaxed) != now {
            self.sweep();
        }
    }

    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    #[cfg(test)]
    pub fn buckets(&self) -> usize {
        self.limiter.len()
    }
}

/// One configuration's limits.
#[derive(Default)]
pub struct RateLimits(Vec<Arc<RateLimit>>);

impl RateLimits {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The limits keyed by what the client sends (`client_ip`, `header:`).
    pub fn before_auth(
        &self,
        route: Option<&str>,
        login: bool,
        peer: IpAddr,
        headers: &HeaderMap,
    ) -> Result<(), Limited> {
        for l in self.0.iter().filter(|l| l.applies(route, login)) {
            match &l.settings.key {
                LimitKey::ClientIp => match peer {
                    IpAddr::V4(ip) => l.check(&ip.octets())?,
                    IpAddr::V6(ip) => l.check(&ip.octets())?,
                },
                LimitKey::Header(name) => {
                    if let Some(v) = headers.get(name) {
                        l.check(v.as_bytes())?;
                    }
                }
                LimitKey::Sub | LimitKey::Claim(_) => {}
            }
        }
        Ok(())
    }

    /// The limits keyed by the verified token's claims (`sub`, `claim:`).
    pub fn after_auth(&self, route: &str, claims: Option<&Claims>) -> Result<(), Limited> {
        let Some(claims) = claims else { return Ok(()) };
        for l in self.0.iter().filter(|l| l.applies(Some(route), false)) {
            match &l.settings.key {
                LimitKey::Sub => {
                    if let Some(sub) = &claims.sub {
                        l.check(sub.as_bytes())?;
                    }
                }
                LimitKey::Claim(name) => match claims.all.get(name) {
                    Some(serde_json::Value::String(s)) => l.check(s.as_bytes())?,
                    Some(serde_json::Value::Null) | None => {}
                    Some(other) => l.check(other.to_string().as_bytes())?,
                },
                LimitKey::ClientIp | LimitKey::Header(_) => {}
            }
        }
        Ok(())
    }

    pub fn sweep(&self) {
        for l in &self.0 {
            l.sweep();
        }
    }
}

/// Limits by their settings, so a reload that keeps an entry keeps its buckets.
#[derive(Default)]
pub struct Registry(Mutex<HashMap<String, Weak<RateLimit>>>);

impl Registry {
    pub fn build(&self, settings: &[RateLimitSettings]) -> RateLimits {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        RateLimits(
            settings
                .iter()
                .map(|s| {
                    let id = format!("{s:?}");
                    if let Some(l) = map.get(&id).and_then(Weak::upgrade) {
                        return l;
                    }
                    let l = Arc::new(RateLimit::new(s.clone()));
                    map.insert(id, Arc::downgrade(&l));
                    l
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(key: LimitKey, per: Duration, burst: u32) -> RateLimit {
        RateLimit::new(RateLimitSettings {
            name: "t".into(),
            key,
            period: per,
            burst: NonZeroU32::new(burst).unwrap(),
            routes: None,
        })
    }

    #[test]
    fn a_burst_then_refusals_with_a_retry_time() {
        let l = limit(LimitKey::Sub, Duration::from_secs(10), 3);
        for _ in 0..3 {
            assert!(l.check(b"alice").is_ok());
        }
        let refused = l.check(b"alice").unwrap_err();
        assert!(
            refused.retry_after > Duration::from_secs(5) && refused.retry_after <= Duration::from_secs(10)
        );
        assert!(l.check(b"bob").is_ok(), "buckets are per key value");
    }

    #[test]
    fn many_distinct_keys_stay_bounded() {
        let l = limit(LimitKey::ClientIp, Duration::from_millis(1), 1);
        for i in 0..(MAX_KEYS as u64 + 20_000) {
            let _ = l.check(&i.to_le_bytes());
        }
        std::thread::sleep(Duration::from_millis(5));
        l.sweep();
        assert!(l.buckets() < 1000, "{} buckets left after the sweep", l.buckets());
    }
}
