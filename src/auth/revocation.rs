//! The deny list: by `jti` (until that token's `exp`) or by `sub` for tokens
//! issued before a time. Checked on every request with two hash lookups; entries
//! are swept once the tokens they deny would have expired anyway.

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
    Sub {
        sub: String,
        issued_before: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exp: Option<i64>,
    },
}

impl Revocation {
    /// When the entry may be forgotten.
    pub fn expires_at(&self) -> i64 {
        match self {
            Revocation::Jti { exp, .. } => *exp,
            Revocation::Sub { issued_before, exp, .. } => {
                exp.unwrap_or(issued_before + DEFAULT_SUB_RETENTION)
            }
        }
    }

    pub fn validate(&self) -> Result<(), &'static str> {
        match self {
            Revocation::Jti { jti, .. } if jti.is_empty() => Err("jti must not be empty"),
            Revocation::Sub { sub, .. } if sub.is_empty() => Err("sub must not be empty"),
            _ => Ok(()),
        }
    }
}

#[derive(Default)]
pub struct Revocations {
    by_jti: DashMap<String, i64>,
    /// sub → (issued_before, forget_at)
    by_sub: DashMap<String, (i64, i64)>,
}

impl Revocations {
    pub fn insert(&self, r: &Revocation) {
        let until = r.expires_at();
        match r {
            Revocation::Jti { jti, exp } => {
                self.by_jti.insert(jti.clone(), *exp);
            }
            Revocation::Sub { sub, issued_before, .. } => {
                // A later cut-off denies more; keep the widest one.
                let mut e = self.by_sub.entry(sub.clone()).or_insert((*issued_before, until));
                e.0 = e.0.max(*issued_before);
                e.1 = e.1.max(until);
            }
        }
    }

    pub fn is_revoked(&self, jti: Option<&str>, sub: Option<&str>, iat: Option<i64>) -> bool {
        if !self.by_jti.is_empty() {
            if let Some(jti) = jti {
                if self.by_jti.contains_key(jti) {
                    return true;
                }
            }
        }
        if !self.by_sub.is_empty() {
            if let Some(sub) = sub {
                if let Some(e) = self.by_sub.get(sub) {
                    // A token without `iat` cannot prove it is newer: deny it.
                    return iat.is_none_or(|iat| iat < e.0);
                }
            }
        }
        false
    }

    pub fn list(&self) -> Vec<Revocation> {
        let mut out: Vec<Revocation> =
            self.by_jti.iter().map(|e| Revocation::Jti { jti: e.key().clone(), exp: *e.value() }).collect();
        out.extend(self.by_sub.iter().map(|e| Revocation::Sub {
            sub: e.key().clone(),
            issued_before: e.value().0,
            exp: Some(e.value().1),
        }));
        out
    }

    /// Forgets entries whose tokens have expired by `now`.
    pub fn sweep(&self, now: i64) {
        self.by_jti.retain(|_, exp| *exp >= now);
        self.by_sub.retain(|_, (_, until)| *until >= now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jti_and_sub() {
        let r = Revocations::default();
        r.insert(&Revocation::Jti { jti: "a".into(), exp: 100 });
        r.insert(&Revocation::Sub { sub: "alice".into(), issued_before: 50, exp: None });
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
    fn json_shapes() {
        let j: Revocation = serde_json::from_str(r#"{"jti":"x","exp":5}"#).unwrap();
        assert_eq!(j, Revocation::Jti { jti: "x".into(), exp: 5 });
        let s: Revocation = serde_json::from_str(r#"{"sub":"u","issued_before":7}"#).unwrap();
        assert_eq!(s, Revocation::Sub { sub: "u".into(), issued_before: 7, exp: None });
        assert!(serde_json::from_str::<Revocation>(r#"{"jti":"x"}"#).is_err());
    }
}
