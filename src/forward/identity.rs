//! Identity headers: strip every inbound copy, then write the verified claims.
//! Never conditional (linkerd's `set_identity_header`): a header is set from a
//! verified claim or removed, whatever the client sent.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::auth::{Admitted, TokenSource};
use crate::config::AuthMode;

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
pub fn strip_inbound(headers: &mut HeaderMap, configured: &[HeaderName]) {
    let spoofed: Vec<HeaderName> =
        headers.keys().filter(|k| is_identity_name(k.as_str().as_bytes(), configured)).cloned().collect();
    for name in spoofed {
        headers.remove(&name);
        tracing::debug!(header = %name, "dropped a client-supplied identity header");
    }
}

/// What a route writes for the upstream about the caller.
pub struct IdentityHeaders {
    /// `(header, claim)`.
    pub headers: Vec<(HeaderName, String)>,
    pub forward_token: bool,
    pub mode: AuthMode,
}

impl IdentityHeaders {
    pub fn new(route: &crate::config::RouteSettings) -> Self {
        Self { headers: route.identity_headers.clone(), forward_token: route.forward_token, mode: route.auth }
    }

    /// Writes identity headers (and the bearer token) for the upstream; inbound
    /// copies were already stripped by `strip_inbound`.
    pub fn write(&self, headers: &mut HeaderMap, admitted: &Admitted) {
        match (admitted.claims(), admitted.source()) {
            (Some(claims), Some(source)) => {
                for (name, claim) in &self.headers {
                    match claims.header_value(claim) {
                        Some(value) => headers.insert(name.clone(), value),
                        None => headers.remove(name),
                    };
                }
                if !self.forward_token {
                    headers.remove(header::AUTHORIZATION);
                } else if let TokenSource::Cookie(token, _) = source {
                    if let Ok(value) = HeaderValue::try_from(format!("Bearer {token}")) {
                        headers.insert(header::AUTHORIZATION, value);
                    }
                }
            }
            // A route that checks tokens never passes an unchecked one upstream.
            _ if self.mode != AuthMode::None && !self.forward_token => {
                headers.remove(header::AUTHORIZATION);
            }
            _ => {}
        }
    }
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
        strip_inbound(&mut h, &configured);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["x-forwarded-for", "x-user", "x_user_emails"]);
    }
}
