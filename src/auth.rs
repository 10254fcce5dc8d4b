//! Who is calling: the token source (Authorization header, then access cookie),
//! verification against the route's issuer and policy, and the `Admitted` value
//! without which nothing is forwarded.

pub mod cache;
pub mod jwks;
pub mod jwt;
pub mod keys;
pub mod revocation;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::{AuthMode, RouteSettings};
use crate::state::{Route, Shared};
use jwks::KeyStore;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no access token")]
    Missing,
    #[error("invalid token: {}", .0.description())]
    Invalid(InvalidReason),
    #[error("token lacks scope {scope}")]
    InsufficientScope { scope: String },
    #[error("cookie-authenticated unsafe request from a foreign origin")]
    Csrf,
    #[error("session over")]
    SessionOver,
    #[error("authorization server unavailable")]
    AuthServerDown,
    #[error("issuer {issuer}: no keys loaded")]
    KeysUnavailable { issuer: String },
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Invalid(_) => "invalid_token",
            AuthError::InsufficientScope { .. } => "insufficient_scope",
            AuthError::Csrf => "csrf",
            AuthError::SessionOver => "session_expired",
            AuthError::AuthServerDown => "auth_server_unavailable",
            AuthError::KeysUnavailable { .. } => "keys_unavailable",
        }
    }
}

/// Why a token was refused; the description is safe for clients and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    Malformed,
    TooLarge,
    AlgorithmNotAllowed,
    UnknownKey,
    BadSignature,
    WrongIssuer,
    NoExpiry,
    Expired,
    NotYetValid,
    IssuedInFuture,
    WrongAudience,
    Revoked,
    WrongType,
    UnsupportedCritical,
}

impl InvalidReason {
    pub fn description(self) -> &'static str {
        match self {
            InvalidReason::Malformed => "the token is malformed",
            InvalidReason::TooLarge => "the token is too large",
            InvalidReason::AlgorithmNotAllowed => "the token's algorithm is not allowed",
            InvalidReason::UnknownKey => "the token was signed by an unknown key",
            InvalidReason::BadSignature => "the token's signature is invalid",
            InvalidReason::WrongIssuer => "the token has the wrong issuer",
            InvalidReason::NoExpiry => "the token has no expiry",
            InvalidReason::Expired => "the token has expired",
            InvalidReason::NotYetValid => "the token is not valid yet",
            InvalidReason::IssuedInFuture => "the token was issued in the future",
            InvalidReason::WrongAudience => "the token is not meant for this API",
            InvalidReason::Revoked => "the token has been revoked",
            InvalidReason::WrongType => "the token is not an access token",
            InvalidReason::UnsupportedCritical => "the token requires an unsupported header extension",
        }
    }
}

/// Claims of a verified token that the proxy reads, plus the rest for identity headers.
#[derive(Debug, Default)]
pub struct Claims {
    pub sub: Option<String>,
    pub jti: Option<String>,
    pub exp: i64,
    pub iat: Option<i64>,
    pub aud: Vec<String>,
    pub scopes: Vec<String>,
    pub all: serde_json::Map<String, serde_json::Value>,
}

impl Claims {
    /// A claim as header text: strings as-is, numbers and booleans as text, arrays joined with `,`.
    pub fn header_value(&self, claim: &str) -> Option<HeaderValue> {
        use serde_json::Value;
        let text = match self.all.get(claim)? {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            Value::Null | Value::Object(_) => return None,
        };
        HeaderValue::try_from(text).ok()
    }
}

/// Where a verified token came from; a header token is forwarded as the client sent it.
pub enum TokenSource {
    Header,
    Cookie(String),
}

/// A verified access token.
pub struct Verified {
    pub claims: Arc<Claims>,
    pub source: TokenSource,
}

/// An issuer as one configuration sees it: its policy and its (shared) key store.
pub struct Issuer {
    /// Unique per built configuration, so verified-token cache entries never
    /// outlive the policy (algorithms, `iss`, leeway) they were checked against.
    pub id: usize,
    pub policy: jwt::Policy,
    pub store: Arc<KeyStore>,
}

impl Issuer {
    pub fn new(policy: jwt::Policy, store: Arc<KeyStore>) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
        Self { id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed), policy, store }
    }
}

/// Proof that the route's policy was applied: `forward::send` takes one, so no
/// request reaches an upstream before identity was decided.
pub struct Admitted {
    verified: Option<Verified>,
}

impl Admitted {
    /// For `auth = "none"` routes, and `optional` routes without a token.
    pub(crate) fn anonymous() -> Self {
        Self { verified: None }
    }

    pub(crate) fn verified(v: Verified) -> Self {
        Self { verified: Some(v) }
    }

    /// The verified claims, shared (for the access log).
    pub fn claims(&self) -> Option<Arc<Claims>> {
        self.verified.as_ref().map(|v| v.claims.clone())
    }

    /// Writes identity headers and the bearer token for the upstream. Inbound
    /// identity headers were already stripped by `strip_inbound_identity`.
    pub fn apply(&self, headers: &mut HeaderMap, route: &RouteSettings) {
        match &self.verified {
            Some(v) => {
                for (name, claim) in &route.identity_headers {
                    match v.claims.header_value(claim) {
                        Some(value) => headers.insert(name.clone(), value),
                        None => headers.remove(name),
                    };
                }
                if route.forward_token {
                    if let TokenSource::Cookie(token) = &v.source {
                        if let Ok(value) = HeaderValue::try_from(format!("Bearer {token}")) {
                            headers.insert(header::AUTHORIZATION, value);
                        }
                    }
                } else {
                    headers.remove(header::AUTHORIZATION);
                }
            }
            None if route.auth != AuthMode::None && !route.forward_token => {
                headers.remove(header::AUTHORIZATION);
            }
            None => {}
        }
    }
}

/// Names the proxy writes itself besides the identity headers: a client copy
/// spelled with `_` would reach CGI-style stacks as the same variable.
const PROXY_SET: [&str; 4] = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"];

/// `a` equals `b` with `_` read as `-` (header names are already lower-case).
fn eq_folded(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y || (*x == b'_' && *y == b'-'))
}

/// Whether a client header is one the proxy alone may set: a configured identity
/// header or any `X-Auth-*`, comparing names with `_` read as `-`.
fn is_identity_name(name: &[u8], configured: &[HeaderName]) -> bool {
    const PREFIX: &[u8] = b"x-auth-";
    (name.len() >= PREFIX.len() && eq_folded(&name[..PREFIX.len()], PREFIX))
        || configured.iter().any(|c| eq_folded(name, c.as_str().as_bytes()))
        || (name.contains(&b'_') && PROXY_SET.iter().any(|p| eq_folded(name, p.as_bytes())))
}

/// Removes every configured identity header and every `X-Auth-*` header a client
/// sent, also when spelled with underscores (`X_Auth_Subject`).
pub fn strip_inbound_identity(headers: &mut HeaderMap, configured: &[HeaderName]) {
    let spoofed: Vec<HeaderName> =
        headers.keys().filter(|k| is_identity_name(k.as_str().as_bytes(), configured)).cloned().collect();
    for name in spoofed {
        headers.remove(&name);
        tracing::debug!(header = %name, "dropped a client-supplied identity header");
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// What the `Authorization` header holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Bearer<'a> {
    /// No header, or another scheme (e.g. `Basic`): counts as no token.
    Absent,
    /// `Bearer` with nothing usable after it.
    Empty,
    Token(&'a str),
}

pub fn bearer(headers: &HeaderMap) -> Bearer<'_> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = all.next() else { return Bearer::Absent };
    // Two credentials: which one would the upstream read? Refuse to guess.
    if all.next().is_some() {
        return Bearer::Empty;
    }
    let bytes = value.as_bytes();
    if bytes.len() < 6 || !bytes[..6].eq_ignore_ascii_case(b"bearer") {
        return Bearer::Absent;
    }
    if bytes.len() > 6 && bytes[6] != b' ' {
        return Bearer::Absent;
    }
    match value.to_str() {
        Ok(v) => match v[6..].trim() {
            "" => Bearer::Empty,
            t => Bearer::Token(t),
        },
        Err(_) => Bearer::Empty,
    }
}

/// Applies the route's policy to the request's token: the `Authorization`
/// header first, else the session cookies (refreshing when the access token
/// has expired, is about to, or is missing). Cookies to set go to `set_cookies`.
pub async fn authenticate(
    req: &http::Request<hyper::body::Incoming>,
    conn: &crate::state::Conn,
    target: &crate::target::Target,
    route: &Route,
    sessions: Option<&Arc<crate::session::Sessions>>,
    shared: &Shared,
    set_cookies: &mut Vec<HeaderValue>,
) -> Result<Admitted, AuthError> {
    let s = &route.settings;
    if s.auth == AuthMode::None {
        return Ok(Admitted::anonymous());
    }
    let none =
        || if s.auth == AuthMode::Optional { Ok(Admitted::anonymous()) } else { Err(AuthError::Missing) };
    let token = match bearer(req.headers()) {
        Bearer::Token(t) => t,
        Bearer::Empty => return Err(AuthError::Invalid(InvalidReason::Malformed)),
        Bearer::Absent => match sessions {
            Some(sessions) => {
                return from_cookies(req, conn, target, route, sessions, shared, set_cookies).await
            }
            None => return none(),
        },
    };
    let Some(issuer) = &route.issuer else { return Err(AuthError::Missing) };
    let claims = verify_cached(token, issuer, shared).await?;
    admit(claims, TokenSource::Header, s, shared)
}

async fn from_cookies(
    req: &http::Request<hyper::body::Incoming>,
    conn: &crate::state::Conn,
    target: &crate::target::Target,
    route: &Route,
    sessions: &Arc<crate::session::Sessions>,
    shared: &Shared,
    set_cookies: &mut Vec<HeaderValue>,
) -> Result<Admitted, AuthError> {
    use crate::session::refresh::Outcome;
    let s = &route.settings;
    let jar = sessions.cookies(req.headers());
    let access = sessions.open_access(&jar);
    let refresh = sessions.open_refresh(&jar);
    if access.is_none() && refresh.is_none() {
        return if s.auth == AuthMode::Optional {
            Ok(Admitted::anonymous())
        } else {
            Err(AuthError::Missing)
        };
    }
    let own = crate::session::csrf::Own { tls: conn.tls, authority: target.authority_str() };
    crate::session::csrf::check(req.method(), req.headers(), own, &sessions.settings.allowed_origins)
        .map_err(|_| AuthError::Csrf)?;
    let Some(issuer) = &route.issuer else { return Err(AuthError::Missing) };
    let now = unix_now();
    let ahead = sessions.settings.refresh_ahead.as_secs() as i64;
    let mut current = None;
    let mut needs_refresh = access.is_none();
    if let Some(at) = access {
        match verify_cached(&at, issuer, shared).await {
            Ok(c) => {
                needs_refresh = refresh.is_some() && c.exp - now <= ahead;
                current = Some((c, at));
            }
            // Our own cookie cannot be forged, so an invalid token in it is stale: refresh.
            Err(AuthError::Invalid(_)) if refresh.is_some() => needs_refresh = true,
            Err(e) => return Err(e),
        }
    }
    if needs_refresh {
        let Some(rc) = refresh else { return Err(AuthError::Missing) };
        if now > rc.login.saturating_add(sessions.settings.absolute_timeout.as_secs() as i64) {
            set_cookies.extend(sessions.clear_session(&jar));
            return Err(AuthError::SessionOver);
        }
        match shared.refresh.refresh(&rc, sessions, &shared.metrics, &shared.store).await {
            Outcome::Tokens(fresh) => {
                set_cookies.extend(sessions.set_session(&fresh.access_token, &fresh.refresh, now, &jar));
                let claims = verify_cached(&fresh.access_token, issuer, shared).await?;
                current = Some((claims, fresh.access_token.clone()));
            }
            Outcome::SessionOver => {
                set_cookies.extend(sessions.clear_session(&jar));
                return Err(AuthError::SessionOver);
            }
            // An outage must not end the session: a still-valid token carries on.
            Outcome::Unavailable if current.is_some() => {}
            Outcome::Unavailable => return Err(AuthError::AuthServerDown),
        }
    }
    let Some((claims, token)) = current else { return Err(AuthError::Missing) };
    admit(claims, TokenSource::Cookie(token), s, shared)
}

/// Per-request checks that are never cached: revocation, audience, scopes.
pub fn admit(
    claims: Arc<Claims>,
    source: TokenSource,
    route: &RouteSettings,
    shared: &Shared,
) -> Result<Admitted, AuthError> {
    if shared.revocations.is_revoked(claims.jti.as_deref(), claims.sub.as_deref(), claims.iat) {
        return Err(AuthError::Invalid(InvalidReason::Revoked));
    }
    jwt::check_route(&claims, &route.audiences, &route.scopes)?;
    Ok(Admitted::verified(Verified { claims, source }))
}

/// Verifies a token, from the cache when it was verified before with the same keys.
pub async fn verify_cached(token: &str, issuer: &Issuer, shared: &Shared) -> Result<Arc<Claims>, AuthError> {
    let now = unix_now();
    let store = &issuer.store;
    let id = issuer.id;
    let key = shared.token_cache.enabled().then(|| cache::hash(token));
    if let Some(k) = &key {
        if let Some(c) = shared.token_cache.get(k, id, store.generation(), now) {
            return Ok(c);
        }
    }
    let unavailable = || AuthError::KeysUnavailable { issuer: store.name().to_owned() };
    let mut generation = store.generation();
    let mut keys = store.keys().ok_or_else(unavailable)?;
    let mut result = jwt::verify(token, &issuer.policy, &keys, now);
    if matches!(result, Err(jwt::Rejected::UnknownKid)) {
        let kid = jwt::header(token).ok().and_then(|h| h.kid).unwrap_or_default();
        if store.refetch_for(&kid).await {
            generation = store.generation();
            keys = store.keys().ok_or_else(unavailable)?;
            result = jwt::verify(token, &issuer.policy, &keys, now);
        }
    }
    let claims = match result {
        Ok(c) => Arc::new(c),
        Err(jwt::Rejected::UnknownKid) => return Err(AuthError::Invalid(InvalidReason::UnknownKey)),
        Err(jwt::Rejected::Invalid(r)) => return Err(AuthError::Invalid(r)),
    };
    if let Some(k) = key {
        shared.token_cache.insert(k, id, generation, claims.clone(), now);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_headers_are_stripped_whatever_the_spelling() {
        let configured = [HeaderName::from_static("x-user-email")];
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-auth-subject", "a"),
            ("x_auth_subject", "b"),
            ("x-auth_role", "c"),
            ("x_user_email", "d"),
            ("x-user-email", "e"),
            ("x_forwarded_host", "f"),
            ("x_request_id", "g"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-user", "kept"),
            ("x_user_emails", "kept"),
        ] {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_static(v));
        }
        strip_inbound_identity(&mut h, &configured);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["x-forwarded-for", "x-user", "x_user_emails"]);
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Bearer::Absent);
        let cases = [
            ("Bearer abc.def.ghi", Bearer::Token("abc.def.ghi")),
            ("bearer   abc ", Bearer::Token("abc")),
            ("Bearer", Bearer::Empty),
            ("Bearer    ", Bearer::Empty),
            ("Basic dXNlcjpwYXNz", Bearer::Absent),
            ("Bearerish x", Bearer::Absent),
        ];
        for (v, want) in cases {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(v));
            assert_eq!(bearer(&h), want, "{v}");
        }
    }

    #[test]
    fn claims_as_header_values() {
        let all = serde_json::json!({"s": "x", "n": 42, "b": true, "a": ["r1", "r2"], "o": {"k": 1}});
        let c = Claims { all: all.as_object().unwrap().clone(), ..Default::default() };
        assert_eq!(c.header_value("s").unwrap(), "x");
        assert_eq!(c.header_value("n").unwrap(), "42");
        assert_eq!(c.header_value("b").unwrap(), "true");
        assert_eq!(c.header_value("a").unwrap(), "r1,r2");
        assert!(c.header_value("o").is_none());
        assert!(c.header_value("missing").is_none());
    }
}
