//! CSRF gate for cookie-authenticated requests: an unsafe method must come from
//! an allowed origin or the proxy's own (scheme + `:authority` on HTTP/2, + `Host`
//! on HTTP/1.1). `Origin` first, then `Referer`; a request with neither is refused
//! (fail closed). An `Upgrade` (WebSocket) handshake is a `GET` but opens a
//! two-way channel with the user's session: it needs an allowed `Origin`
//! (browsers always send one), which closes cross-site WebSocket hijacking.
//! Requests that carry an `Authorization` header never reach this check.

use http::{header, HeaderMap, Method, Uri};

pub fn is_unsafe(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
}

/// `scheme://host[:port]`, lower-case, default port dropped.
pub fn normalise(scheme: &str, authority: &str) -> String {
    let scheme = scheme.to_ascii_lowercase();
    let authority = authority.to_ascii_lowercase();
    let default = match scheme.as_str() {
        "https" => ":443",
        "http" => ":80",
        _ => "",
    };
    let authority =
        if !default.is_empty() { authority.strip_suffix(default).unwrap_or(&authority) } else { &authority };
    format!("{scheme}://{authority}")
}

fn origin_of(value: &str) -> Option<String> {
    let uri: Uri = value.trim().parse().ok()?;
    Some(normalise(uri.scheme_str()?, uri.authority()?.as_str()))
}

/// A cookie-authenticated unsafe request from an origin that is neither allowed nor the proxy's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cross-origin cookie-authenticated request")]
pub struct ForeignOrigin;

/// The proxy's own origin for this request: its scheme and validated authority.
#[derive(Debug, Clone, Copy)]
pub struct Own<'a> {
    pub tls: bool,
    pub authority: Option<&'a str>,
}

/// Whether the request asks for a protocol upgrade (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// `Ok` when the request may proceed.
pub fn check(
    method: &Method,
    headers: &HeaderMap,
    own: Own<'_>,
    allowed: &[String],
) -> Result<(), ForeignOrigin> {
    let upgrade = is_upgrade(headers);
    if !is_unsafe(method) && !upgrade {
        return Ok(());
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let claimed = match origin {
        Some(o) => origin_of(o),
        None if upgrade => None,
        None => headers.get(header::REFERER).and_then(|v| v.to_str().ok()).and_then(origin_of),
    };
    let Some(claimed) = claimed else { return Err(ForeignOrigin) };
    let own = own.authority.map(|h| normalise(if own.tls { "https" } else { "http" }, h));
    if own.as_deref() == Some(claimed.as_str()) || allowed.iter().any(|a| normalise_allowed(a) == claimed) {
        Ok(())
    } else {
        Err(ForeignOrigin)
    }
}

fn normalise_allowed(a: &str) -> String {
    origin_of(a).unwrap_or_else(|| a.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn table() {
        let allowed = vec!["https://app.example.com".to_string()];
        let post = Method::POST;
        type Case = (Method, Vec<(&'static str, &'static str)>, bool, bool);
        let cases: Vec<Case> = vec![
            (Method::GET, vec![], true, true),
            (
                post.clone(),
                vec![("host", "api.example.com"), ("origin", "https://app.example.com")],
                true,
                true,
            ),
            (
                post.clone(),
                vec![("host", "api.example.com"), ("origin", "https://APP.example.com:443")],
                true,
                true,
            ),
            (
                post.clone(),
                vec![("host", "api.example.com"), ("origin", "https://api.example.com")],
                true,
                true,
            ),
            (
                post.clone(),
                vec![("host", "api.example.com"), ("origin", "http://api.example.com")],
                true,
                false,
            ),
            (
                post.clone(),
                vec![("host", "api.example.com"), ("origin", "https://evil.example")],
                true,
                false,
            ),
            (post.clone(), vec![("host", "api.example.com"), ("origin", "null")], true, false),
            (post.clone(), vec![("host", "api.example.com")], true, false),
            (
                post.clone(),
                vec![("host", "api.example.com"), ("referer", "https://app.example.com/page?x=1")],
                true,
                true,
            ),
            (
                post.clone(),
                vec![("host", "api.example.com"), ("referer", "https://evil.example/app.example.com")],
                true,
                false,
            ),
            (
                Method::DELETE,
                vec![("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8080")],
                false,
                true,
            ),
            (
                Method::PUT,
                vec![("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8081")],
                false,
                false,
            ),
        ];
        for (m, h, tls, ok) in cases {
            let hm = headers(&h);
            let own = Own { tls, authority: hm.get("host").map(|v| v.to_str().unwrap()) };
            assert_eq!(check(&m, &hm, own, &allowed).is_ok(), ok, "{m} {h:?}");
        }
    }

    #[test]
    fn upgrades_need_an_allowed_origin() {
        let allowed = vec!["https://app.example.com".to_string()];
        let own = Own { tls: true, authority: Some("api.example.com") };
        let ws = |origin: Option<&'static str>| {
            let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
            if let Some(o) = origin {
                h.insert(header::ORIGIN, o.parse().unwrap());
            }
            check(&Method::GET, &h, own, &allowed).is_ok()
        };
        assert!(ws(Some("https://app.example.com")));
        assert!(ws(Some("https://api.example.com")));
        assert!(!ws(Some("https://evil.example")));
        assert!(!ws(None), "no Origin, no upgrade (a Referer does not stand in)");
        let own_h2 = Own { tls: true, authority: Some("api.example.com:8443") };
        let post = headers(&[("origin", "https://api.example.com:8443")]);
        assert!(check(&Method::POST, &post, own_h2, &[]).is_ok(), "HTTP/2: the origin is :authority");
    }
}
