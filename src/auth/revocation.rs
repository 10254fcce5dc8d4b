//! The deny list: by `jti` (until that token's `exp`) or by `sub` for tokens
//! issued before a time. Checked on every request with two hash lookups; entries
//! are swept once the tokens they deny would have expired anyway.

use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

/// How long a `sub` entry lives when no `exp` is given: no access token of that
/// subject issued before `issued_before` is expected to outlive this.
pub const DEFAULT_SUB_RETENTION: i64 = 86_400;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Revocation {
    Jti {
        jti: String,
        exp: i64,
    },
    /// Tokens of the subject issued before the time, and its sessions established before it.
    Sub {
        sub: String,
        issued_before: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exp: Option<i64>,
        /// Sent by a back-channel logout, not an administrator: only names why
        /// open tunnels close.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        logout: bool,
    },
    /// The provider's session `sid` (back-channel logout): sessions established
    /// before the time, and access tokens carrying that `sid` issued before it.
    Sid {
        sid: String,
        issued_before: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exp: Option<i64>,
    },
    /// One session of this proxy, by its own id (a logout).
    Session {
        session: String,
        exp: i64,
    },
}

impl Revocation {
    /// When the entry may be forgotten.
    pub fn expires_at(&self) -> i64 {
        match self {
            Revocation::Jti { exp, .. } | Revocation::Session { exp, .. } => *exp,
            Revocation::Sub { issued_before, exp, .. } | Revocation::Sid { issued_before, exp, .. } => {
                exp.unwrap_or(issued_before + DEFAULT_SUB_RETENTION)
            }
        }
    }

    pub fn validate(&self) -> Result<(), &'static str> {
        match self {
            Revocation::Jti { jti, .. } if jti.is_empty() => Err("jti must not be empty"),
            Revocation::Sub { sub, .. } if sub.is_empty() => Err("sub must not be empty"),
            Revocation::Sid { sid, .. } if sid.is_empty() => Err("sid must not be empty"),
            Revocation::Session { session, .. } if session.is_empty() => Err("session must not be empty"),
            _ => Ok(()),
        }
    }

    /// What it is keyed by, for logs and storage keys: `(kind, id)`.
    pub fn key(&self) -> (&'static str, &str) {
        match self {
            Revocation::Jti { jti, .. } => ("jti", jti),
            Revocation::Sub { sub, .. } => ("sub", sub),
            Revocation::Sid { sid, .. } => ("sid", sid),
            Revocation::Session { session, .. } => ("session", session),
        }
    }
}

/// Who a token or a session is, as revocations see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Subject<'a> {
    pub jti: Option<&'a str>,
    pub sub: Option<&'a str>,
    pub sid: Option<&'a str>,
    /// The token's `iat`, or the session's login time.
    pub since: Option<i64>,
    /// This proxy's session id.
    pub session: Option<&'a str>,
}

/// One kind of entry, with a count that a request reads without a lock:
/// `DashMap::is_empty` read-locks every shard, and every worker's requests
/// would take those locks on every request.
struct List<V> {
    map: DashMap<String, V>,
    /// Never below the number of entries: raised before an insert, lowered
    /// after a removal.
    len: AtomicUsize,
}

impl<V> List<V> {
    fn new() -> Self {
        Self { map: DashMap::new(), len: AtomicUsize::new(0) }
    }

    fn is_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }

    /// Inserts or updates `key` (`update` learns whether it is new); whether it was new.
    fn upsert(&self, key: &str, new: impl FnOnce() -> V, update: impl FnOnce(&mut V, bool)) -> bool {
        self.len.fetch_add(1, Ordering::AcqRel);
        let mut fresh = false;
        let mut e = self.map.entry(key.to_owned()).or_insert_with(|| {
            fresh = true;
            new()
        });
        update(&mut e, fresh);
        drop(e);
        if !fresh {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
        fresh
    }

    fn retain(&self, mut keep: impl FnMut(&V) -> bool) {
        let mut removed = 0;
        self.map.retain(|_, v| {
            let k = keep(v);
            removed += usize::from(!k);
            k
        });
        self.len.fetch_sub(removed, Ordering::AcqRel);
    }
}

pub struct Revocations {
    by_jti: List<i64>,
    /// sub → (issued_before, forget_at)
    by_sub: List<(i64, i64)>,
    by_sid: List<(i64, i64)>,
    by_session: List<i64>,
    /// Every entry as it arrives (locally, from the admin API or the fleet), for
    /// the tunnels opened by what it revokes.
    added: tokio::sync::broadcast::Sender<Revocation>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self {
            by_jti: List::new(),
            by_sub: List::new(),
            by_sid: List::new(),
            by_session: List::new(),
            added: tokio::sync::broadcast::channel(256).0,
        }
    }
}

impl Revocations {
    pub fn insert(&self, r: &Revocation) {
        let until = r.expires_at();
        // A later cut-off denies more; keep the widest one. Whether it denies
        // more than before decides if open tunnels hear of it.
        let widen = |list: &List<(i64, i64)>, id: &str, before: i64| {
            let mut wider = false;
            list.upsert(
                id,
                || (before, until),
                |e, fresh| {
                    wider = fresh || before > e.0;
                    e.0 = e.0.max(before);
                    e.1 = e.1.max(until);
                },
            );
            wider
        };
        let replace = |list: &List<i64>, id: &str, exp: i64| list.upsert(id, || exp, |e, _| *e = exp);
        let news = match r {
            Revocation::Jti { jti, exp } => replace(&self.by_jti, jti, *exp),
            Revocation::Sub { sub, issued_before, .. } => widen(&self.by_sub, sub, *issued_before),
            Revocation::Sid { sid, issued_before, .. } => widen(&self.by_sid, sid, *issued_before),
            Revocation::Session { session, exp } => replace(&self.by_session, session, *exp),
        };
        // The fleet's periodic resync re-inserts every entry: only news wakes tunnels.
        if news {
            let _ = self.added.send(r.clone());
        }
    }

    /// New entries from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Revocation> {
        self.added.subscribe()
    }

    /// Whether an access token with these claims is denied.
    #[cfg(test)]
    pub fn is_revoked(&self, jti: Option<&str>, sub: Option<&str>, iat: Option<i64>) -> bool {
        self.denies(&Subject { jti, sub, sid: None, since: iat, session: None })
    }

    /// Whether anything denies this token or session. A subject without a time
    /// cannot prove it is newer than a cut-off: it is denied.
    pub fn denies(&self, s: &Subject<'_>) -> bool {
        let before = |list: &List<(i64, i64)>, id: Option<&str>| {
            !list.is_empty()
                && id.and_then(|id| list.map.get(id)).is_some_and(|e| s.since.is_none_or(|t| t < e.0))
        };
        (!self.by_jti.is_empty() && s.jti.is_some_and(|j| self.by_jti.map.contains_key(j)))
            || (!self.by_session.is_empty()
                && s.session.is_some_and(|id| self.by_session.map.contains_key(id)))
            || before(&self.by_sub, s.sub)
            || before(&self.by_sid, s.sid)
    }

    pub fn list(&self) -> Vec<Revocation> {
        let mut out: Vec<Revocation> = self
            .by_jti
            .map
            .iter()
            .map(|e| Revocation::Jti { jti: e.key().clone(), exp: *e.value() })
            .collect();
        out.extend(self.by_sub.map.iter().map(|e| Revocation::Sub {
            sub: e.key().clone(),
            issued_before: e.value().0,
            exp: Some(e.value().1),
            logout: false,
        }));
        out.extend(self.by_sid.map.iter().map(|e| Revocation::Sid {
            sid: e.key().clone(),
            issued_before: e.value().0,
            exp: Some(e.value().1),
        }));
        out.extend(
            self.by_session
                .map
                .iter()
                .map(|e| Revocation::Session { session: e.key().clone(), exp: *e.value() }),
        );
        out
    }

    /// Forgets entries whose tokens (or sessions) have expired by `now`.
    pub fn sweep(&self, now: i64) {
        self.by_jti.retain(|exp| *exp >= now);
        self.by_sub.retain(|(_, until)| *until >= now);
        self.by_sid.retain(|(_, until)| *until >= now);
        self.by_session.retain(|exp| *exp >= now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jti_and_sub() {
        let r = Revocations::default();
        r.insert(&Revocation::Jti { jti: "a".into(), exp: 100 });
        r.insert(&Revocation::Sub { sub: "alice".into(), issued_before: 50, exp: None, logout: false });
        assert!(r.is_revoked(Some("a"), None, None));
        assert!(!r.is_revoked(Some("b"), None, None));
        assert!(r.is_revoked(None, Some("alice"), Some(49)));
        assert!(!r.is_revoked(None, Some("alice"), Some(50)));
        assert!(r.is_revoked(None, Some("alice"), None));
        assert!(!r.is_revoked(None, Some("bob"), Some(1)));
        r.sweep(101);
        assert!(!r.is_revoked(Some("a"), None, None));
        assert!(r.is_revoked(None, Some("alice"), Some(1)));
        r.sweep(50 + DEFAULT_SUB_RETENTION + 1);
        assert!(!r.is_revoked(None, Some("alice"), Some(1)));
    }

    #[test]
    fn the_lock_free_count_follows_inserts_and_sweeps() {
        let r = Revocations::default();
        assert!(r.by_jti.is_empty() && r.by_sub.is_empty());
        for _ in 0..2 {
            r.insert(&Revocation::Jti { jti: "a".into(), exp: 100 });
            r.insert(&Revocation::Sub {
                sub: "alice".into(),
                issued_before: 50,
                exp: Some(100),
                logout: false,
            });
        }
        r.insert(&Revocation::Jti { jti: "b".into(), exp: 200 });
        assert_eq!((r.by_jti.len.load(Ordering::Relaxed), r.by_sub.len.load(Ordering::Relaxed)), (2, 1));
        r.sweep(150);
        assert_eq!(r.by_jti.len.load(Ordering::Relaxed), 1);
        assert!(r.by_sub.is_empty() && r.is_revoked(Some("b"), None, None));
        r.sweep(201);
        assert!(r.by_jti.is_empty() && !r.is_revoked(Some("b"), None, None));
        // Empty lists are skipped, never stuck empty.
        r.insert(&Revocation::Jti { jti: "c".into(), exp: 300 });
        assert!(r.is_revoked(Some("c"), None, None));
    }

    #[test]
    fn only_entries_that_deny_more_reach_the_tunnels() {
        let r = Revocations::default();
        let mut heard = r.subscribe();
        let sub =
            |before| Revocation::Sub { sub: "alice".into(), issued_before: before, exp: None, logout: false };
        for entry in [Revocation::Jti { jti: "a".into(), exp: 100 }, sub(50), sub(60)] {
            r.insert(&entry);
            assert_eq!(heard.try_recv().ok(), Some(entry));
        }
        // A resync inserts what is known again, or narrower.
        r.insert(&Revocation::Jti { jti: "a".into(), exp: 100 });
        r.insert(&sub(60));
        r.insert(&sub(55));
        assert!(heard.try_recv().is_err());
    }

    #[test]
    fn json_shapes() {
        let j: Revocation = serde_json::from_str(r#"{"jti":"x","exp":5}"#).unwrap();
        assert_eq!(j, Revocation::Jti { jti: "x".into(), exp: 5 });
        let s: Revocation = serde_json::from_str(r#"{"sub":"u","issued_before":7}"#).unwrap();
        assert_eq!(s, Revocation::Sub { sub: "u".into(), issued_before: 7, exp: None, logout: false });
        assert!(serde_json::from_str::<Revocation>(r#"{"jti":"x"}"#).is_err());
    }
}
