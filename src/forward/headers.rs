//! The upstream request's headers that are not about identity: hop-by-hop
//! removal, `Upgrade` (never `h2c`), `X-Forwarded-*` and `Forwarded`, the
//! `Cookie` header joined and scrubbed of the proxy's own cookies.

use std::fmt::Write as _;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::conn::Conn;

/// The `Upgrade` protocol of an HTTP/1.1 upgrade request, if it is one. An
/// `h2c` upgrade is never one: an upstream accepting it would hand the client a
/// raw HTTP/2 connection past routing and authentication.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let value = headers.get(header::UPGRADE)?;
    let h2c = value.to_str().map_or(true, |v| {
        v.split(',').any(|p| p.trim().split('/').next().unwrap_or("").eq_ignore_ascii_case("h2c"))
    });
    if h2c {
        None
    } else {
        Some(value.clone())
    }
}

static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("http2-settings"),
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether the client accepts trailers (`TE: trailers`, as gRPC clients send).
pub fn asks_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers")))
}

/// Removes RFC 9110 §7.6.1 hop-by-hop headers, including those named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// RFC 9113 §8.2.3: an HTTP/2 client may split `cookie` into several fields; an
/// HTTP/1.1 upstream must see one `Cookie` header.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(header::COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers.get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

/// `X-Forwarded-For` (appended), `-Proto`, `-Host`, and RFC 7239 `Forwarded`,
/// which replaces whatever the client sent.
pub fn set_forwarded(headers: &mut HeaderMap, conn: &Conn, host: Option<HeaderValue>) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let ip = conn.peer.ip().to_string();
    // Every earlier hop, however many header lines carried them.
    let mut value = String::new();
    for prev in headers.get_all(&xff).iter().filter_map(|v| v.to_str().ok()) {
        let prev = prev.trim();
        if !prev.is_empty() {
            value.push_str(prev);
            value.push_str(", ");
        }
    }
    value.push_str(&ip);
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(xff, v);
    }
    let proto = conn.scheme();
    headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static(proto));
    let mut forwarded = String::with_capacity(64);
    match conn.peer.ip() {
        std::net::IpAddr::V4(ip) => {
            let _ = write!(forwarded, "for={ip}");
        }
        std::net::IpAddr::V6(ip) => {
            let _ = write!(forwarded, "for=\"[{ip}]\"");
        }
    }
    forwarded.push_str(";proto=");
    forwarded.push_str(proto);
    if let Some(h) = host.as_ref().and_then(|h| h.to_str().ok()) {
        // A port's colon is not a token character: quote it.
        if h.contains(':') {
            let _ = write!(forwarded, ";host=\"{h}\"");
        } else {
            let _ = write!(forwarded, ";host={h}");
        }
    }
    match HeaderValue::try_from(forwarded) {
        Ok(v) => headers.insert(header::FORWARDED, v),
        Err(_) => headers.remove(header::FORWARDED),
    };
    let xfh = HeaderName::from_static("x-forwarded-host");
    match host {
        Some(v) => {
            headers.insert(xfh, v);
        }
        None => {
            headers.remove(xfh);
        }
    }
}

/// Removes the proxy's own cookies (and their chunks `NAME.0`, `NAME.1`, …) from the
/// `Cookie` header sent upstream; other cookies pass.
pub fn scrub_cookies(headers: &mut HeaderMap, ours: &[String]) {
    // Most requests carry none of our cookies: leave their header untouched, allocation-free.
    let mentions_ours = headers.get_all(header::COOKIE).iter().any(|v| {
        let b = v.as_bytes();
        ours.iter().any(|o| b.windows(o.len()).any(|w| w == o.as_bytes()))
    });
    if !mentions_ours {
        return;
    }
    let is_ours = |name: &str| {
        ours.iter().any(|o| {
            name == o.as_str()
                || name
                    .strip_prefix(o.as_str())
                    .and_then(|r| r.strip_prefix('.'))
                    .is_some_and(|n| n.parse::<usize>().is_ok())
        })
    };
    let mut kept: Vec<String> = Vec::new();
    for h in headers.get_all(header::COOKIE) {
        let Ok(s) = h.to_str() else { continue };
        for part in s.split(';') {
            let part = part.trim();
            let name = part.split('=').next().unwrap_or("").trim();
            if !part.is_empty() && !is_ours(name) {
                kept.push(part.to_owned());
            }
        }
    }
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::try_from(kept.join("; ")) {
            headers.insert(header::COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret-Hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_protocol(&h), Some(HeaderValue::from_static("websocket")));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade, HTTP2-Settings"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert_eq!(upgrade_protocol(&h), None, "h2c is never an upgrade");
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket, H2C"));
        assert_eq!(upgrade_protocol(&h), None);
        h.remove(header::CONNECTION);
        assert_eq!(upgrade_protocol(&h), None);
    }

    #[test]
    fn proxy_cookies_never_go_upstream() {
        let ours: Vec<String> =
            ["__Host-access", "__Host-refresh", "__Host-portcullis-login"].map(String::from).to_vec();
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; __Host-access=x; __Host-refresh.0=y; __Host-refresh.1=z; __Host-portcullis-login=s; b=2; __Host-accessory=keep"));
        scrub_cookies(&mut h, &ours);
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2; __Host-accessory=keep");
        let mut only = HeaderMap::new();
        only.insert(header::COOKIE, HeaderValue::from_static("__Host-refresh=y"));
        scrub_cookies(&mut only, &ours);
        assert!(only.get(header::COOKIE).is_none());
    }

    #[test]
    fn split_cookie_fields_are_joined() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1; b=2"]);
    }
}
