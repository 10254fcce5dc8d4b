//! `ProxyError` and the single place where an error becomes a status code,
//! a `WWW-Authenticate` header and a JSON body.

use http::{header, HeaderValue, Response, StatusCode};

use crate::auth::AuthError;
use crate::body::{error_body, Body};
use crate::forward::ForwardError;
use crate::session::endpoints::EndpointError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches")]
    NoRoute,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error(transparent)]
    RateLimited(#[from] crate::ratelimit::Limited),
    /// A back-channel logout the proxy refused (SPEC §4 "Back-channel logout").
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
}

impl From<EndpointError> for ProxyError {
    fn from(e: EndpointError) -> Self {
        match e {
            EndpointError::Auth(a) => ProxyError::Auth(a),
            EndpointError::BadRequest(m) => ProxyError::BadRequest(m),
            EndpointError::InvalidRequest(m) => ProxyError::InvalidRequest(m),
        }
    }
}

impl ProxyError {
    /// The `error` code of SPEC §4, also the `reason` label of rejection metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::RateLimited(_) => "rate_limited",
            ProxyError::InvalidRequest(_) => "invalid_request",
            ProxyError::Auth(e) => e.code(),
            ProxyError::Forward(e) => match e {
                ForwardError::Connect { .. } | ForwardError::Upstream { .. } => "bad_gateway",
                ForwardError::ConnectTimeout { .. } | ForwardError::Timeout { .. } => "gateway_timeout",
                ForwardError::BodyTooLarge { .. } => "body_too_large",
            },
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let code = self.code();
        let (status, description, www) = self.answer();
        let mut resp = error_body(status, code, &description);
        if let Some(www) = www.and_then(|w| HeaderValue::try_from(w).ok()) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, www);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if let ProxyError::RateLimited(l) = &self {
            let secs = l.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }

    /// The answer to a gRPC request: HTTP 200, trailers-only, with the gRPC status
    /// for the HTTP one (SPEC §4 "HTTP/2 upstreams and gRPC") and the description.
    pub fn into_grpc_response(self) -> Response<Body> {
        let (status, description, www) = self.answer();
        let grpc_status: u16 = match status.as_u16() {
            400 => 3,
            401 => 16,
            403 => 7,
            404 => 12,
            413 => 8,
            _ => 14,
        };
        let mut resp = Response::new(crate::body::empty());
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(grpc_status));
        if let Ok(v) = HeaderValue::try_from(grpc_message(&format!("{}: {description}", self.code()))) {
            h.insert("grpc-message", v);
        }
        if let Some(www) = www.and_then(|w| HeaderValue::try_from(w).ok()) {
            h.insert(header::WWW_AUTHENTICATE, www);
        }
        resp
    }

    /// The status, description and `WWW-Authenticate` challenge of the answer.
    fn answer(&self) -> (StatusCode, String, Option<String>) {
        match self {
            ProxyError::NoRoute => {
                (StatusCode::NOT_FOUND, "no route matches this host and path".to_owned(), None)
            }
            ProxyError::BadRequest(m) => (StatusCode::BAD_REQUEST, (*m).to_owned(), None),
            ProxyError::RateLimited(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "too many requests; retry later".to_owned(), None)
            }
            ProxyError::InvalidRequest(m) => (StatusCode::BAD_REQUEST, (*m).to_owned(), None),
            ProxyError::Forward(e) => match e {
                ForwardError::Connect { .. } => {
                    (StatusCode::BAD_GATEWAY, "the upstream refused the connection".to_owned(), None)
                }
                ForwardError::Upstream { .. } => {
                    (StatusCode::BAD_GATEWAY, "the upstream failed the exchange".to_owned(), None)
                }
                ForwardError::ConnectTimeout { .. } => (
                    StatusCode::GATEWAY_TIMEOUT,
                    "the upstream did not accept the connection in time".to_owned(),
                    None,
                ),
                ForwardError::Timeout { .. } => {
                    (StatusCode::GATEWAY_TIMEOUT, "the upstream did not answer in time".to_owned(), None)
                }
                ForwardError::BodyTooLarge { limit, .. } => {
                    (StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over {limit} bytes"), None)
                }
            },
            ProxyError::Auth(e) => match e {
                AuthError::Missing => (
                    StatusCode::UNAUTHORIZED,
                    "an access token is required".to_owned(),
                    Some("Bearer realm=\"portcullis\"".to_owned()),
                ),
                AuthError::Invalid(reason) => (
                    StatusCode::UNAUTHORIZED,
                    reason.description().to_owned(),
                    Some(format!(
                        "Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\"{}\"",
                        reason.description()
                    )),
                ),
                AuthError::InsufficientScope { scope } => (
                    StatusCode::FORBIDDEN,
                    format!("the token lacks scope {scope}"),
                    Some(format!(
                        "Bearer realm=\"portcullis\", error=\"insufficient_scope\", scope=\"{scope}\""
                    )),
                ),
                AuthError::Csrf => (
                    StatusCode::FORBIDDEN,
                    "cookie-authenticated request from a foreign origin".to_owned(),
                    None,
                ),
                AuthError::SessionOver => (
                    StatusCode::UNAUTHORIZED,
                    "the session has ended; log in again".to_owned(),
                    Some("Bearer realm=\"portcullis\", error=\"invalid_token\"".to_owned()),
                ),
                AuthError::AuthServerDown => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the authorization server is unavailable; retry shortly".to_owned(),
                    None,
                ),
                AuthError::KeysUnavailable { .. } => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the token issuer's keys are not loaded yet, or it cannot introspect tokens now"
                        .to_owned(),
                    None,
                ),
                AuthError::Forbidden { token_checked, .. } => (
                    StatusCode::FORBIDDEN,
                    "this request is not allowed".to_owned(),
                    token_checked.then(|| "Bearer realm=\"portcullis\"".to_owned()),
                ),
            },
        }
    }
}

/// gRPC's `grpc-message` encoding: percent-encoded outside printable ASCII, and `%`.
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::InvalidReason;

    fn status_of(e: impl Into<ProxyError>) -> (u16, String, Option<String>) {
        let e = e.into();
        let code = e.code().to_owned();
        let r = e.into_response();
        let www = r.headers().get(header::WWW_AUTHENTICATE).map(|v| v.to_str().unwrap().to_owned());
        (r.status().as_u16(), code, www)
    }

    #[test]
    fn rate_limited_maps_to_429_with_retry_after() {
        let e = ProxyError::RateLimited(crate::ratelimit::Limited {
            limit: "l".into(),
            retry_after: std::time::Duration::from_millis(1500),
        });
        assert_eq!(e.code(), "rate_limited");
        let r = e.into_response();
        assert_eq!(r.status().as_u16(), 429);
        assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "2");
    }

    #[test]
    fn no_route_maps_to_404() {
        assert_eq!(status_of(ProxyError::NoRoute).0, 404);
    }

    #[test]
    fn bad_request_maps_to_400() {
        assert_eq!(status_of(ProxyError::BadRequest("x")).0, 400);
    }

    #[test]
    fn missing_token_maps_to_401_without_error_attribute() {
        let (s, c, w) = status_of(AuthError::Missing);
        assert_eq!(
            (s, c.as_str(), w.as_deref()),
            (401, "missing_token", Some("Bearer realm=\"portcullis\""))
        );
    }

    #[test]
    fn invalid_token_maps_to_401_with_error() {
        let (s, c, w) = status_of(AuthError::Invalid(InvalidReason::Expired));
        assert_eq!((s, c.as_str()), (401, "invalid_token"));
        assert!(w.unwrap().contains("error=\"invalid_token\""));
    }

    #[test]
    fn insufficient_scope_maps_to_403() {
        let (s, c, w) = status_of(AuthError::InsufficientScope { scope: "a:b".into() });
        assert_eq!((s, c.as_str()), (403, "insufficient_scope"));
        assert!(w.unwrap().contains("scope=\"a:b\""));
    }

    #[test]
    fn session_over_maps_to_401() {
        let (s, c, w) = status_of(AuthError::SessionOver);
        assert_eq!((s, c.as_str()), (401, "session_expired"));
        assert_eq!(w.as_deref(), Some("Bearer realm=\"portcullis\", error=\"invalid_token\""));
    }

    #[test]
    fn auth_server_down_maps_to_503() {
        assert_eq!(status_of(AuthError::AuthServerDown).0, 503);
        assert_eq!(status_of(AuthError::KeysUnavailable { issuer: "x".into() }).1, "keys_unavailable");
        assert_eq!(status_of(AuthError::Csrf).0, 403);
    }

    #[test]
    fn forbidden_maps_to_403_with_a_challenge_only_after_a_token_check() {
        let (s, c, w) = status_of(AuthError::Forbidden { rule: 1, token_checked: false });
        assert_eq!((s, c.as_str(), w), (403, "forbidden", None));
        let (_, _, w) = status_of(AuthError::Forbidden { rule: 1, token_checked: true });
        assert_eq!(w.as_deref(), Some("Bearer realm=\"portcullis\""));
    }

    #[test]
    fn upstream_failures_map_to_502_504_413() {
        let r = || "r".to_owned();
        let a = || "a".to_owned();
        assert_eq!(
            status_of(ForwardError::Connect { route: r(), authority: a(), source: "x".into() }).0,
            502
        );
        assert_eq!(
            status_of(ForwardError::Upstream { route: r(), authority: a(), source: "x".into() }).0,
            502
        );
        assert_eq!(status_of(ForwardError::ConnectTimeout { route: r(), authority: a() }).0, 504);
        let t =
            ForwardError::Timeout { route: r(), authority: a(), timeout: std::time::Duration::from_secs(1) };
        assert_eq!(status_of(t).0, 504);
        assert_eq!(status_of(ForwardError::BodyTooLarge { route: r(), limit: 1 }).0, 413);
    }
}
