//! Who is calling: a presented credential checked against a route's policy.
//! `authenticate` knows no cookies and no upstream: it takes the token the
//! request presented (from the `Authorization` header, or one the session stage
//! already verified from the access cookie) and returns the `Admitted` value
//! without which nothing is forwarded.

pub mod bearer;
pub mod cache;
pub mod introspect;
pub mod jwks;
pub mod jwt;
/// Verification keys are parsed at load by `config`, which `auth` depends on.
pub(crate) use crate::keys;
pub mod revocation;
pub mod rules;

use std::sync::Arc;

use http::HeaderValue;

use crate::clock::unix_now;
use crate::config::{AuthMode, RuleAction, RuleSettings};
use cache::TokenCache;
use introspect::Introspector;
use jwks::IssuerKeys;
use revocation::Revocations;

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
    #[error("issuer {issuer}: no keys loaded or introspection unavailable")]
    KeysUnavailable { issuer: String },
    /// A rule's claims are not met, or a `deny` rule matched.
    #[error("forbidden by rule {rule}")]
    Forbidden { rule: usize, token_checked: bool },
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
            AuthError::Forbidden { .. } => "forbidden",
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
    Inactive,
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
            InvalidReason::Inactive => "the token is not active",
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
    /// `sub` as a header value, made on first use: the default identity header
    /// of a cached token costs no copy per request.
    pub sub_header: std::sync::OnceLock<Option<HeaderValue>>,
}

/// Spans carry `sub` and nothing else of the claims.
impl crate::trace::Text for Claims {
    fn text(&self) -> Option<&str> {
        self.sub.as_deref()
    }
}

impl Claims {
    /// A claim as header text: strings as-is, numbers and booleans as text, arrays joined with `,`.
    pub fn header_value(&self, claim: &str) -> Option<HeaderValue> {
        if claim == "sub" {
            return self.sub_header.get_or_init(|| self.made_header_value(claim)).clone();
        }
        self.made_header_value(claim)
    }

    fn made_header_value(&self, claim: &str) -> Option<HeaderValue> {
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

/// An issuer as one configuration sees it: its policy, its (shared) keys and,
/// for opaque tokens, its introspection endpoint.
pub struct Issuer {
    /// Unique per built configuration, so verified-token cache entries never
    /// outlive the policy (algorithms, `iss`, leeway) they were checked against.
    pub id: usize,
    pub policy: jwt::Policy,
    pub keys: Arc<IssuerKeys>,
    pub introspection: Option<Arc<Introspector>>,
}

impl Issuer {
    pub fn new(policy: jwt::Policy, keys: Arc<IssuerKeys>, introspection: Option<Arc<Introspector>>) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
        Self { id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed), policy, keys, introspection }
    }
}

/// What a route demands of a caller.
pub struct RoutePolicy {
    pub mode: AuthMode,
    /// A JWT goes to the one whose `issuer` is its `iss`; an opaque token to the one that introspects.
    pub issuers: Vec<Arc<Issuer>>,
    pub audiences: Vec<String>,
    pub scopes: Vec<String>,
    pub rules: Vec<RuleSettings>,
    /// A CORS preflight passes without a token.
    pub cors_preflight: bool,
}

impl RoutePolicy {
    /// The first rule matching the request, if any.
    pub fn rule(&self, method: &http::Method, path: &str) -> Option<&RuleSettings> {
        rules::decide(&self.rules, method, path)
    }

    /// Checks `token` (signature and issuer claims, or introspection) against the
    /// issuer it belongs to among the route's.
    pub async fn check(&self, token: &str, verifier: &Verifier) -> Result<Arc<Claims>, AuthError> {
        if !jwt::looks_like_jwt(token) {
            return match self.issuers.iter().find_map(|i| i.introspection.as_ref()) {
                Some(introspector) => introspector.introspect(token).await,
                None => Err(AuthError::Invalid(InvalidReason::Malformed)),
            };
        }
        let issuer = match self.issuers.as_slice() {
            [] => return Err(AuthError::Missing),
            // One issuer: no need to read `iss` first (a wrong one is refused by the check).
            [only] => only,
            several => {
                let iss = jwt::peek_issuer(token);
                let found = several.iter().find(|i| Some(i.policy.issuer.as_str()) == iss.as_deref());
                found.ok_or(AuthError::Invalid(InvalidReason::WrongIssuer))?
            }
        };
        verifier.verify(token, issuer).await
    }
}

/// The credential a request presented.
pub enum Credential<'a> {
    /// None at all (or another scheme, e.g. `Basic`).
    None,
    /// `Authorization: Bearer` with nothing usable after it, or two headers.
    Malformed,
    /// `Authorization: Bearer <token>`, not yet verified.
    Header(&'a str),
    /// The session's access token, already verified against the route's issuer.
    Session { token: String, claims: Arc<Claims>, session: SessionBinding },
}

impl<'a> Credential<'a> {
    /// The credential of the `Authorization` header, if it holds one.
    pub fn from_header(headers: &'a http::HeaderMap) -> Self {
        match bearer::read(headers) {
            bearer::Bearer::Absent => Credential::None,
            bearer::Bearer::Empty => Credential::Malformed,
            bearer::Bearer::Token(t) => Credential::Header(t),
        }
    }
}

/// Where an admitted token came from; a header token reaches the upstream as the
/// client sent it, a cookie token is written as `Authorization` when asked.
pub enum TokenSource {
    Header,
    Cookie(String, SessionBinding),
}

/// The browser session a cookie token belongs to, as what ends it sees it.
#[derive(Debug, Clone, Default)]
pub struct SessionBinding {
    /// This proxy's session id.
    pub id: String,
    pub sub: Option<String>,
    pub sid: Option<String>,
    pub login: i64,
    /// `absolute_timeout` from the login.
    pub ends_at: i64,
}

/// Proof that the route's policy was applied: `forward::send` takes one, so no
/// request reaches an upstream before identity was decided.
pub struct Admitted {
    verified: Option<(Arc<Claims>, TokenSource)>,
}

impl Admitted {
    /// For `auth = "none"` routes and rules, CORS preflights, and `optional` routes without a token.
    pub fn anonymous() -> Self {
        Self { verified: None }
    }

    /// The verified claims, shared (for identity headers and the access log).
    pub fn claims(&self) -> Option<&Arc<Claims>> {
        self.verified.as_ref().map(|(c, _)| c)
    }

    pub fn source(&self) -> Option<&TokenSource> {
        self.verified.as_ref().map(|(_, s)| s)
    }

    /// The claims, for what outlives the request's checks (the access log).
    pub fn into_claims(self) -> Option<Arc<Claims>> {
        self.verified.map(|(c, _)| c)
    }
}

/// The verified-token cache and the deny list: what every check consults.
pub struct Verifier {
    pub cache: TokenCache,
    pub revocations: Arc<Revocations>,
}

impl Verifier {
    pub fn new(cache_entries: usize, revocations: Arc<Revocations>) -> Self {
        Self { cache: TokenCache::new(cache_entries), revocations }
    }

    /// Checks a token's signature and issuer-level claims, from the cache when it
    /// was verified before with the same keys and policy.
    pub async fn verify(&self, token: &str, issuer: &Issuer) -> Result<Arc<Claims>, AuthError> {
        let now = unix_now();
        let keys = &issuer.keys;
        let key = self.cache.enabled().then(|| cache::hash(token));
        if let Some(k) = &key {
            if let Some(c) = self.cache.get(k, issuer.id, keys.generation(), now) {
                return Ok(c);
            }
        }
        let unavailable = || AuthError::KeysUnavailable { issuer: keys.name().to_owned() };
        let mut generation = keys.generation();
        let mut set = keys.current().ok_or_else(unavailable)?;
        let mut result = jwt::verify(token, &issuer.policy, &set, now);
        if matches!(result, Err(jwt::Rejected::UnknownKid)) {
            let kid = jwt::header(token).ok().and_then(|h| h.kid).unwrap_or_default();
            // Boxed: only an unknown `kid` pays for the fetch's state.
            if Box::pin(keys.refetch_for(&kid)).await {
                generation = keys.generation();
                set = keys.current().ok_or_else(unavailable)?;
                result = jwt::verify(token, &issuer.policy, &set, now);
            }
        }
        let claims = match result {
            Ok(c) => Arc::new(c),
            Err(jwt::Rejected::UnknownKid) => return Err(AuthError::Invalid(InvalidReason::UnknownKey)),
            Err(jwt::Rejected::Invalid(r)) => return Err(AuthError::Invalid(r)),
        };
        if let Some(k) = key {
            self.cache.insert(k, issuer.id, generation, claims.clone(), now);
        }
        Ok(claims)
    }

    /// The per-request checks that are never cached: revocation, audience, scopes
    /// (the rule's, when it names them, else the route's) and the rule's claims.
    fn admit(
        &self,
        claims: Arc<Claims>,
        source: TokenSource,
        policy: &RoutePolicy,
        rule: Option<&RuleSettings>,
    ) -> Result<Admitted, AuthError> {
        let subject = revocation::Subject {
            jti: claims.jti.as_deref(),
            sub: claims.sub.as_deref(),
            sid: claims.all.get("sid").and_then(serde_json::Value::as_str),
            since: claims.iat,
            session: None,
        };
        if self.revocations.denies(&subject) {
            return Err(AuthError::Invalid(InvalidReason::Revoked));
        }
        let (scopes, conditions) = match rule.map(|r| &r.action) {
            Some(RuleAction::Require { scopes, claims }) => {
                (scopes.as_deref().unwrap_or(&policy.scopes), &claims[..])
            }
            _ => (&policy.scopes[..], &[][..]),
        };
        jwt::check_route(&claims, &policy.audiences, scopes)?;
        if !rules::claims_match(&claims, conditions) {
            let rule = rule.map_or(0, |r| r.number);
            return Err(AuthError::Forbidden { rule, token_checked: true });
        }
        Ok(Admitted { verified: Some((claims, source)) })
    }
}

/// Applies the route's policy, refined by the deciding rule (a `Require` one:
/// `Deny` and `Public` rules are settled before any credential is looked at), to
/// the presented credential.
pub async fn authenticate(
    credential: Credential<'_>,
    policy: &RoutePolicy,
    rule: Option<&RuleSettings>,
    verifier: &Verifier,
) -> Result<Admitted, AuthError> {
    if policy.mode == AuthMode::None {
        return Ok(Admitted::anonymous());
    }
    // A rule with requirements needs a token even on an `optional` route.
    let required = policy.mode == AuthMode::Required || rule.is_some();
    match credential {
        Credential::None if !required => Ok(Admitted::anonymous()),
        Credential::None => Err(AuthError::Missing),
        Credential::Malformed => Err(AuthError::Invalid(InvalidReason::Malformed)),
        Credential::Header(token) => {
            let claims = policy.check(token, verifier).await?;
            verifier.admit(claims, TokenSource::Header, policy, rule)
        }
        Credential::Session { token, claims, session } => {
            verifier.admit(claims, TokenSource::Cookie(token, session), policy, rule)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(c.header_value("sub").is_none() && c.header_value("sub").is_none(), "no sub, twice");
        let with_sub = serde_json::json!({"sub": 7});
        let c = Claims { all: with_sub.as_object().unwrap().clone(), ..Default::default() };
        assert_eq!(c.header_value("sub").unwrap(), "7");
        assert_eq!(c.header_value("sub").unwrap(), "7", "the second time from the memo");
    }
}
