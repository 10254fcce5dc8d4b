//! Refresh brokering: one call to `token_url` per refresh token.
//!
//! ```text
//!            ┌──────────── grace hit (old token seen within refresh_grace) ──► new pair
//! request ───┤
//!            └─ in flight? ── yes ─► wait on the leader's cell ─────────────► its outcome
//!                           └ no ──► become leader: spawn the call ──► outcome
//!                                     ├ tokens        → grace[old] = pair   (rotated | ok)
//!                                     ├ invalid_grant → grace[old] = over   (session ends)
//!                                     └ unavailable   → not remembered      (503, cookies kept)
//! ```
//!
//! The call runs in its own task, so a client that disconnects cannot cancel a
//! refresh half-way (the server would have rotated the token and we would have
//! lost the new one), and the flight is shared until that task ends: a waiter
//! that gives up never starts a second call. Each caller waits at most the
//! authorization server's timeout plus one second. The key is a SHA-256 of the
//! refresh token; tokens are never logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt, Shared};

use super::{RefreshCookie, Sessions};
use crate::auth::cache::{hash, TokenHash};
use crate::metrics::Metrics;
use crate::oauth::GrantError;
use crate::store::Store;

#[derive(Clone)]
pub struct Fresh {
    pub access_token: String,
    pub refresh: RefreshCookie,
    pub expires_in: Option<u64>,
}

#[derive(Clone)]
pub enum Outcome {
    Tokens(Arc<Fresh>),
    SessionOver,
    Unavailable,
}

#[derive(Default)]
pub struct RefreshBroker {
    inflight: DashMap<TokenHash, Shared<BoxFuture<'static, Outcome>>>,
    grace: DashMap<TokenHash, (Outcome, Instant)>,
}

impl RefreshBroker {
    fn grace_get(&self, key: &TokenHash) -> Option<Outcome> {
        let e = self.grace.get(key)?;
        if e.1 > Instant::now() {
            return Some(e.0.clone());
        }
        drop(e);
        self.grace.remove(key);
        None
    }

    fn remember(&self, key: TokenHash, outcome: Outcome, grace: Duration) {
        if self.grace.len() > 10_000 {
            let now = Instant::now();
            self.grace.retain(|_, (_, until)| *until > now);
        }
        self.grace.insert(key, (outcome, Instant::now() + grace));
    }

    /// Ends the session of `rt` in this process: the token, and any pair a
    /// rotation handed out for it, now answer `SessionOver` for the grace window.
    pub fn end(&self, rt: &str) {
        let until = Instant::now() + Duration::from_secs(3600);
        for mut e in self.grace.iter_mut() {
            if let Outcome::Tokens(f) = &e.value().0 {
                if f.refresh.rt == rt {
                    *e.value_mut() = (Outcome::SessionOver, until);
                }
            }
        }
        self.grace.insert(hash(rt), (Outcome::SessionOver, until));
    }

    /// Refreshes `rc`, sharing the call with every concurrent holder of the same
    /// token in this process and, through `store`, across the fleet. A caller waits
    /// at most the authorization server's timeout plus one second.
    pub async fn refresh(
        self: &Arc<Self>,
        rc: &RefreshCookie,
        sessions: &Arc<Sessions>,
        metrics: &Arc<Metrics>,
        store: &Arc<Store>,
    ) -> Outcome {
        let key = hash(&rc.rt);
        if let Some(o) = self.grace_get(&key) {
            metrics.refresh("grace");
            return o;
        }
        let (call, led) = match self.inflight.entry(key) {
            Entry::Occupied(e) => (e.get().clone(), false),
            Entry::Vacant(v) => {
                // A flight that just ended records its outcome before it leaves the
                // map, so a vacant entry after a grace miss may still have one.
                if let Some(o) = self.grace_get(&key) {
                    drop(v);
                    metrics.refresh("grace");
                    return o;
                }
                // The call is spawned once, here, and shared: no waiter's
                // cancellation can stop it or start a second one.
                let broker = self.clone();
                let sessions = sessions.clone();
                let metrics = metrics.clone();
                let store = store.clone();
                let rc = rc.clone();
                let task = tokio::spawn(async move {
                    let s = &sessions.settings;
                    let bound = sessions.oauth.timeout();
                    let grant = || grant(&sessions, &metrics, rc);
                    let o = store.coordinate(&key, &sessions.sealer, bound, s.refresh_grace, grant).await;
                    if !matches!(o, Outcome::Unavailable) {
                        broker.remember(key, o.clone(), s.refresh_grace);
                    }
                    // Grace first, then forget the flight: late arrivals find one or the other.
                    broker.inflight.remove(&key);
                    o
                });
                let shared = async move { task.await.unwrap_or(Outcome::Unavailable) }.boxed().shared();
                v.insert(shared.clone());
                (shared, true)
            }
        };
        let bound = sessions.oauth.timeout() + Duration::from_secs(1);
        let outcome = tokio::time::timeout(bound, call).await.unwrap_or(Outcome::Unavailable);
        if !led && !matches!(outcome, Outcome::Unavailable) {
            metrics.refresh("grace");
        }
        outcome
    }
}

/// The call to `token_url` itself.
async fn grant(sessions: &Sessions, metrics: &Metrics, rc: RefreshCookie) -> Outcome {
    match sessions.oauth.refresh(&rc.rt).await {
        Ok(t) => {
            let rotated = t.refresh_token.is_some();
            metrics.refresh(if rotated { "rotated" } else { "ok" });
            let refresh = RefreshCookie { rt: t.refresh_token.unwrap_or(rc.rt), login: rc.login };
            Outcome::Tokens(Arc::new(Fresh {
                access_token: t.access_token,
                refresh,
                expires_in: t.expires_in,
            }))
        }
        Err(GrantError::InvalidGrant) => {
            metrics.refresh("invalid_grant");
            tracing::info!("refresh refused with invalid_grant; session ended");
            Outcome::SessionOver
        }
        Err(GrantError::Unavailable(why)) => {
            metrics.refresh("auth_server_error");
            tracing::warn!(reason = %why, "refresh failed; authorization server unavailable, session kept");
            Outcome::Unavailable
        }
    }
}
