//! Who is calling: the token source (Authorization header, then access cookie),
//! verification against the route's issuer and policy, and the `Admitted` value
//! without which nothing is forwarded.

pub mod keys;

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::{AuthMode, RouteSettings};

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
        }
    }

    /// Short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            InvalidReason::Malformed => "malformed",
            InvalidReason::TooLarge => "too_large",
            InvalidReason::AlgorithmNotAllowed => "algorithm",
            InvalidReason::UnknownKey => "unknown_key",
            InvalidReason::BadSignature => "signature",
            InvalidReason::WrongIssuer => "issuer",
            InvalidReason::NoExpiry => "no_exp",
            InvalidReason::Expired => "expired",
            InvalidReason::NotYetValid => "nbf",
            InvalidReason::IssuedInFuture => "iat",
            InvalidReason::WrongAudience => "audience",
            InvalidReason::Revoked => "revoked",
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

/// A verified access token.
pub struct Verified {
    pub claims: Arc<Claims>,
    pub token: Arc<str>,
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

    #[allow(dead_code)]
    pub(crate) fn verified(v: Verified) -> Self {
        Self { verified: Some(v) }
    }

    pub fn subject(&self) -> Option<&str> {
        self.verified.as_ref().and_then(|v| v.claims.sub.as_deref())
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
                    if let Ok(value) = HeaderValue::try_from(format!("Bearer {}", v.token)) {
                        headers.insert(header::AUTHORIZATION, value);
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

/// Removes every configured identity header and every `X-Auth-*` header a client sent.
pub fn strip_inbound_identity(headers: &mut HeaderMap, configured: &[HeaderName]) {
    for name in configured {
        if headers.remove(name).is_some() {
            tracing::debug!(header = %name, "dropped a client-supplied identity header");
        }
    }
    let spoofed: Vec<HeaderName> =
        headers.keys().filter(|k| k.as_str().starts_with("x-auth-")).cloned().collect();
    for name in spoofed {
        headers.remove(&name);
        tracing::debug!(header = %name, "dropped a client-supplied identity header");
    }
}
