//! Opaque access tokens, checked by RFC 7662 introspection.
//!
//! ```text
//! token ─► cached answer? ── active, before exp ─► its claims
//!            │              └ inactive (10 s) ──► 401 invalid_token
//!            └ no ─► in flight for this token? ── yes ─► wait for that call
//!                      └ no ─► POST token=…&token_type_hint=access_token (client auth)
//!                               ├ active   → claims from the answer, cached ≤ `cache`, never past exp
//!                               ├ inactive → cached 10 s
//!                               └ down, slow, 5xx, garbage → 503 keys_unavailable (not cached;
//!                                 tokens cached earlier keep working)
//! ```
//!
//! Keys are SHA-256 of the token; the token is never logged. The call runs in its
//! own task and is shared, so concurrent requests with one new token make one call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http_body_util::Full;
use serde_json::{Map, Value};

use super::cache::{hash, TokenHash};
use super::{jwt, AuthError, Claims, InvalidReason};
use crate::clock::unix_now;
use crate::config::IntrospectionSettings;
use crate::metrics::Metrics;
use crate::oauth::{ClientCredentials, GrantError, HttpsClient};

/// How long an inactive answer is remembered, so a flood of garbage cannot hammer the endpoint.
const NEGATIVE_TTL: Duration = Duration::from_secs(10);
const MAX_ANSWER: usize = 64 * 1024;
const MAX_CACHED: usize = 100_000;

#[derive(Clone)]
enum Answer {
    Active(Arc<Claims>),
    Inactive,
}

/// Why an introspection call gave no answer (the server's problem, never the token's).
#[derive(Debug, Clone, thiserror::Error)]
pub enum IntrospectError {
    #[error("introspection call failed: {0}")]
    Call(Arc<GrantError>),
    #[error("introspection answered {0}")]
    Status(http::StatusCode),
    #[error("introspection answer is not a JSON object with `active`")]
    Answer,
}

pub struct Introspector {
    /// The issuer's `name` (for metrics and errors) and `issuer` (the required `iss`).
    name: String,
    issuer: String,
    url: http::Uri,
    credentials: ClientCredentials,
    cache_for: Duration,
    timeout: Duration,
    client: HttpsClient<Full<Bytes>>,
    cache: DashMap<TokenHash, (Answer, Instant)>,
    inflight: DashMap<TokenHash, Shared<BoxFuture<'static, Result<Answer, IntrospectError>>>>,
    metrics: Arc<Metrics>,
}

impl Introspector {
    pub fn new(
        name: &str,
        issuer: &str,
        s: &IntrospectionSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, rustls::Error> {
        Ok(Arc::new(Self {
            name: name.to_owned(),
            issuer: issuer.to_owned(),
            url: s.url.clone(),
            credentials: ClientCredentials {
                client_id: s.client_id.clone(),
                secret: s.client_secret.as_ref().map(|x| x.expose().clone()),
                auth: s.client_auth,
            },
            cache_for: s.cache,
            timeout: s.timeout,
            client: crate::oauth::outbound_client(s.timeout)?,
            cache: DashMap::new(),
            inflight: DashMap::new(),
            metrics,
        }))
    }

    fn cached(&self, key: &TokenHash) -> Option<Answer> {
        let e = self.cache.get(key)?;
        if e.1 > Instant::now() {
            return Some(e.0.clone());
        }
        drop(e);
        self.cache.remove(key);
        None
    }

    fn remember(&self, key: TokenHash, answer: &Answer) {
        let ttl = match answer {
            Answer::Inactive => NEGATIVE_TTL,
            Answer::Active(c) => {
                let left = u64::try_from(c.exp.saturating_sub(unix_now())).unwrap_or(0);
                self.cache_for.min(Duration::from_secs(left))
            }
        };
        if ttl.is_zero() {
            return;
        }
        if self.cache.len() >= MAX_CACHED {
            let now = Instant::now();
            self.cache.retain(|_, (_, until)| *until > now);
            if self.cache.len() >= MAX_CACHED {
                self.cache.clear();
            }
        }
        self.cache.insert(key, (answer.clone(), Instant::now() + ttl));
    }

    /// The token's claims if the authorization server says it is active.
    pub async fn introspect(self: &Arc<Self>, token: &str) -> Result<Arc<Claims>, AuthError> {
        let key = hash(token);
        let answer = match self.cached(&key) {
            Some(a) => Ok(a),
            // Boxed: a cache hit's future does not carry the call's state.
            None => Box::pin(self.call_shared(key, token)).await,
        };
        match answer {
            Ok(Answer::Active(c)) if c.exp >= unix_now() => Ok(c),
            Ok(Answer::Active(_)) => Err(AuthError::Invalid(InvalidReason::Expired)),
            Ok(Answer::Inactive) => Err(AuthError::Invalid(InvalidReason::Inactive)),
            Err(e) => {
                tracing::warn!(issuer = %self.name, error = %e, "introspection failed; answering keys_unavailable");
                Err(AuthError::KeysUnavailable { issuer: self.name.clone() })
            }
        }
    }

    async fn call_shared(self: &Arc<Self>, key: TokenHash, token: &str) -> Result<Answer, IntrospectError> {
        let call = match self.inflight.entry(key) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(v) => {
                // A call that just ended cached its answer before leaving the map.
                if let Some(a) = self.cached(&key) {
                    return Ok(a);
                }
                let me = self.clone();
                let token = token.to_owned();
                // Its own task: a client that goes away cannot cancel the call others wait for.
                let trace = crate::trace::current();
                let task = tokio::spawn(crate::trace::in_scope(trace, async move {
                    let result = me.call(&token).await;
                    if let Ok(a) = &result {
                        me.remember(key, a);
                    }
                    me.inflight.remove(&key);
                    result
                }));
                let shared =
                    async move { task.await.unwrap_or(Err(IntrospectError::Answer)) }.boxed().shared();
                v.insert(shared.clone());
                shared
            }
        };
        tokio::time::timeout(self.timeout + Duration::from_secs(1), call).await.unwrap_or(Err(
            IntrospectError::Call(Arc::new(GrantError::Call(crate::outbound::CallError::Timeout(
                self.timeout,
            )))),
        ))
    }

    async fn call(&self, token: &str) -> Result<Answer, IntrospectError> {
        let span = crate::trace::Child::start("introspection");
        let form = [("token", token), ("token_type_hint", "access_token")];
        let result = async {
            let req = self
                .credentials
                .form_post(self.url.clone(), &form)
                .map_err(|e| IntrospectError::Call(Arc::new(e)))?;
            let (status, _, body) = crate::oauth::exchange(&self.client, req, self.timeout, MAX_ANSWER)
                .await
                .map_err(|e| IntrospectError::Call(Arc::new(e)))?;
            if !status.is_success() {
                return Err(IntrospectError::Status(status));
            }
            let map: Map<String, Value> =
                serde_json::from_slice(&body).map_err(|_| IntrospectError::Answer)?;
            Ok(self.answer(map))
        }
        .await;
        let outcome = match &result {
            Ok(Answer::Active(_)) => "active",
            Ok(Answer::Inactive) => "inactive",
            Err(_) => "error",
        };
        self.metrics.introspection(&self.name, outcome);
        if let Some(span) = span {
            use crate::trace::Attr;
            let attrs = vec![
                Attr::Owned("portcullis.issuer", self.name.clone()),
                Attr::Str("portcullis.outcome", outcome),
            ];
            span.end(outcome == "error", attrs);
        }
        result
    }

    /// An RFC 7662 answer as claims: every member, like a JWT's; `iss`, when
    /// present, must be the issuer's; no `exp` counts as expiring after `cache`.
    fn answer(&self, mut all: Map<String, Value>) -> Answer {
        if all.get("active") != Some(&Value::Bool(true)) {
            return Answer::Inactive;
        }
        if let Some(iss) = all.get("iss") {
            if iss.as_str() != Some(self.issuer.as_str()) {
                return Answer::Inactive;
            }
        }
        let now = unix_now();
        let exp = match all.get("exp").and_then(Value::as_f64) {
            Some(e) => e as i64,
            None => now + self.cache_for.as_secs() as i64,
        };
        all.remove("active");
        let mut claims = jwt::claims_from(all, exp);
        if claims.exp < now {
            return Answer::Inactive;
        }
        claims.exp = exp;
        Answer::Active(Arc::new(claims))
    }
}
