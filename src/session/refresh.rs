//! The refresh decision and its machine, used by the cookie path and by
//! `POST refresh_path` alike: one call to `token_url` per refresh token.
//!
//! ```text
//! renew(refresh cookie)
//!   past absolute_timeout? ── yes ─► cookies cleared, 401 session_expired
//!   └ no ─► broker.refresh
//!            ┌──────────── grace hit (old token seen within refresh_grace) ──► new pair
//! request ───┤
//!            └─ in flight? ── yes ─► wait on the leader's call ─────────────► its outcome
//!                           └ no ──► become leader: spawn the call ──► outcome
//!                                     (with a fleet: the call runs under a Redis lock,
//!                                      or another instance's sealed outcome is used)
//!                                     ├ tokens        → grace[old] = pair   (rotated | ok)
//!                                     ├ invalid_grant → grace[old] = over   (session ends)
//!                                     └ unavailable   → not remembered      (503, cookies kept)
//!   outcome ─► tokens: Set-Cookie for the new pair │ over: cookies cleared, 401 │ unavailable: 503
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
use http::header::HeaderValue;
use serde::{Deserialize, Serialize};

use super::cookies::{RefreshCookie, RequestCookies};
use super::seal::Sealer;
use super::Sessions;
use crate::auth::cache::{hash, TokenHash};
use crate::auth::AuthError;
use crate::clock::unix_now;
use crate::fleet::{Coordinated, Fleet, Publish};
use crate::metrics::Metrics;
use crate::oauth::GrantError;

/// How long an auth-server error outcome is shared across the fleet: long
/// enough for the waiters, short enough that the next attempt calls again.
const ERROR_TTL: Duration = Duration::from_secs(2);
const OUTCOME_CONTEXT: &str = "portcullis-refresh-outcome";

/// A new pair from the authorization server.
pub struct Fresh {
    pub access_token: String,
    pub refresh: RefreshCookie,
    pub expires_in: Option<u64>,
}

#[derive(Clone)]
pub enum RefreshOutcome {
    Tokens(Arc<Fresh>),
    SessionOver,
    Unavailable,
}

/// Refreshes the session of `rc`, writing the cookies the answer must carry:
/// the new pair, or their deletion when the session is over.
pub async fn renew(
    rc: &RefreshCookie,
    jar: &RequestCookies,
    sessions: &Arc<Sessions>,
    cx: &super::SessionCtx<'_>,
    set_cookies: &mut Vec<HeaderValue>,
) -> Result<Arc<Fresh>, AuthError> {
    let cookies = &sessions.cookies;
    let now = unix_now();
    let past_absolute = now > rc.login.saturating_add(sessions.settings.absolute_timeout.as_secs() as i64);
    // Over (too old, or logged out): no call to the authorization server.
    if past_absolute || super::ended(&cx.verifier.revocations, rc) {
        set_cookies.extend(cookies.clear_session(jar));
        return Err(AuthError::SessionOver);
    }
    match cx.broker.refresh(rc, sessions).await {
        RefreshOutcome::Tokens(fresh) => {
            set_cookies.extend(cookies.set_session(&fresh.access_token, &fresh.refresh, now, jar));
            Ok(fresh)
        }
        RefreshOutcome::SessionOver => {
            set_cookies.extend(cookies.clear_session(jar));
            Err(AuthError::SessionOver)
        }
        RefreshOutcome::Unavailable => Err(AuthError::AuthServerDown),
    }
}

pub struct RefreshBroker {
    inflight: DashMap<TokenHash, Shared<BoxFuture<'static, RefreshOutcome>>>,
    grace: DashMap<TokenHash, (RefreshOutcome, Instant)>,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
}

impl RefreshBroker {
    pub fn new(fleet: Arc<Fleet>, metrics: Arc<Metrics>) -> Self {
        Self { inflight: DashMap::new(), grace: DashMap::new(), fleet, metrics }
    }

    fn grace_get(&self, key: &TokenHash) -> Option<RefreshOutcome> {
        let e = self.grace.get(key)?;
        if e.1 > Instant::now() {
            return Some(e.0.clone());
        }
        drop(e);
        self.grace.remove(key);
        None
    }

    fn remember(&self, key: TokenHash, outcome: RefreshOutcome, grace: Duration) {
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
            if let RefreshOutcome::Tokens(f) = &e.value().0 {
                if f.refresh.rt == rt {
                    *e.value_mut() = (RefreshOutcome::SessionOver, until);
                }
            }
        }
        self.grace.insert(hash(rt), (RefreshOutcome::SessionOver, until));
    }

    /// Refreshes `rc`, sharing the call with every concurrent holder of the same
    /// token in this process and, through the fleet, across instances.
    pub async fn refresh(self: &Arc<Self>, rc: &RefreshCookie, sessions: &Arc<Sessions>) -> RefreshOutcome {
        let key = hash(&rc.rt);
        if let Some(o) = self.grace_get(&key) {
            self.metrics.refresh("grace");
            return o;
        }
        let (call, led) = match self.inflight.entry(key) {
            Entry::Occupied(e) => (e.get().clone(), false),
            Entry::Vacant(v) => {
                // A flight that just ended records its outcome before it leaves the
                // map, so a vacant entry after a grace miss may still have one.
                if let Some(o) = self.grace_get(&key) {
                    drop(v);
                    self.metrics.refresh("grace");
                    return o;
                }
                // The call is spawned once, here, and shared: no waiter's
                // cancellation can stop it or start a second one.
                let broker = self.clone();
                let sessions = sessions.clone();
                let rc = rc.clone();
                // The call is a child span of the request that leads it.
                let trace = crate::trace::current();
                let task = tokio::spawn(crate::trace::in_scope(trace, async move {
                    let o = broker.call_once(key, rc, &sessions).await;
                    if !matches!(o, RefreshOutcome::Unavailable) {
                        broker.remember(key, o.clone(), sessions.settings.refresh_grace);
                    }
                    // Grace first, then forget the flight: late arrivals find one or the other.
                    broker.inflight.remove(&key);
                    o
                }));
                let shared =
                    async move { task.await.unwrap_or(RefreshOutcome::Unavailable) }.boxed().shared();
                v.insert(shared.clone());
                (shared, true)
            }
        };
        let bound = sessions.oauth.timeout() + Duration::from_secs(1);
        let outcome = tokio::time::timeout(bound, call).await.unwrap_or(RefreshOutcome::Unavailable);
        if !led && !matches!(outcome, RefreshOutcome::Unavailable) {
            self.metrics.refresh("grace");
        }
        outcome
    }

    /// The one call for this token across the fleet, or the outcome another
    /// instance published for it.
    async fn call_once(&self, key: TokenHash, rc: RefreshCookie, sessions: &Sessions) -> RefreshOutcome {
        let sealer = &sessions.cookies.sealer;
        let grace = sessions.settings.refresh_grace;
        let metrics = &self.metrics;
        let call = || async move {
            let outcome = grant(sessions, metrics, rc).await;
            let publish = seal_outcome(sealer, &outcome, grace);
            (outcome, publish)
        };
        match self.fleet.coordinate(&key, sessions.oauth.timeout(), call).await {
            Coordinated::Called(o) => o,
            Coordinated::Published(sealed) => {
                self.metrics.refresh("grace");
                open_outcome(sealer, &sealed).unwrap_or(RefreshOutcome::Unavailable)
            }
            Coordinated::TimedOut => RefreshOutcome::Unavailable,
        }
    }
}

/// The call to `token_url` itself.
async fn grant(sessions: &Sessions, metrics: &Metrics, rc: RefreshCookie) -> RefreshOutcome {
    match sessions.oauth.refresh(&rc.rt).await {
        Ok(t) => {
            let rotated = t.refresh_token.is_some();
            metrics.refresh(if rotated { "rotated" } else { "ok" });
            let refresh = match t.refresh_token {
                Some(rt) => rc.rotated(rt),
                None => rc,
            }
            .with_access(&t.access_token, t.expires_in, crate::clock::unix_now());
            RefreshOutcome::Tokens(Arc::new(Fresh {
                access_token: t.access_token,
                refresh,
                expires_in: t.expires_in,
            }))
        }
        Err(GrantError::InvalidGrant) => {
            metrics.refresh("invalid_grant");
            tracing::info!("refresh refused with invalid_grant; session ended");
            RefreshOutcome::SessionOver
        }
        Err(e) => {
            metrics.refresh("auth_server_error");
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            tracing::warn!(error = %e, cause, "refresh failed; authorization server unavailable, session kept");
            RefreshOutcome::Unavailable
        }
    }
}

/// A refresh outcome as another instance reads it, sealed with the cookie key.
#[derive(Serialize, Deserialize)]
#[serde(tag = "k")]
enum Stored {
    Tokens { at: String, rc: RefreshCookie, exp: Option<u64> },
    Over,
    Error,
}

fn seal_outcome(sealer: &Sealer, outcome: &RefreshOutcome, grace: Duration) -> Option<Publish> {
    let (stored, ttl) = match outcome {
        RefreshOutcome::Tokens(f) => {
            (Stored::Tokens { at: f.access_token.clone(), rc: f.refresh.clone(), exp: f.expires_in }, grace)
        }
        RefreshOutcome::SessionOver => (Stored::Over, grace),
        RefreshOutcome::Unavailable => (Stored::Error, ERROR_TTL),
    };
    let sealed = sealer.seal(OUTCOME_CONTEXT, &serde_json::to_vec(&stored).ok()?)?;
    Some(Publish { value: sealed.into_bytes(), ttl })
}

fn open_outcome(sealer: &Sealer, sealed: &[u8]) -> Option<RefreshOutcome> {
    let plain = sealer.open(OUTCOME_CONTEXT, std::str::from_utf8(sealed).ok()?)?;
    Some(match serde_json::from_slice(&plain).ok()? {
        Stored::Tokens { at, rc, exp } => {
            RefreshOutcome::Tokens(Arc::new(Fresh { access_token: at, refresh: rc, expires_in: exp }))
        }
        Stored::Over => RefreshOutcome::SessionOver,
        Stored::Error => RefreshOutcome::Unavailable,
    })
}
