//! The upstream request's headers that are not about identity: hop-by-hop
//! removal, `Upgrade` (never `h2c`), `X-Forwarded-*` and `Forwarded`, the
//! `Cookie` header joined and scrubbed of the proxy's own cookies.

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

/// RFC 9110 §7.6.1's hop-by-hop fields, `Upgrade` among them (an upgrade is
/// re-added by the forwarder when it is one). `connection` first.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "http2-settings",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn hop_by_hop_index(name: &str) -> Option<usize> {
    HOP_BY_HOP.iter().position(|h| *h == name)
}

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
    // One pass over the names; most requests carry none, or `Connection:
    // keep-alive` only, and are done without allocating.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name.as_str()) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Other names `Connection` lists (rare): collected, as removing needs the map.
    // `close` is a connection option, and a field name only if a request has one.
    let has_close = headers.contains_key("close");
    let listed = |t: &&str| {
        !HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(t))
            && (has_close || !t.eq_ignore_ascii_case("close"))
    };
    let others: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && listed(t))
        .map(str::to_owned)
        .collect();
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
    for name in others {
        headers.remove(name.as_str());
    }
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

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// `X-Forwarded-For` (appended), `-Proto`, `-Host`, and RFC 7239 `Forwarded`,
/// which replaces whatever the client sent.
pub fn set_forwarded(headers: &mut HeaderMap, conn: &Conn, host: Option<HeaderValue>) {
    // One lookup whether or not earlier hops are there.
    match headers.entry(&X_FORWARDED_FOR) {
        header::Entry::Vacant(v) => {
            v.insert(conn.peer_ip.clone());
        }
        header::Entry::Occupied(mut o) => {
            // Every earlier hop, however many header lines carried them.
            let mut value = String::new();
            for prev in o.iter().filter_map(|v| v.to_str().ok()) {
                let prev = prev.trim();
                if !prev.is_empty() {
                    value.push_str(prev);
                    value.push_str(", ");
                }
            }
            value.push_str(conn.peer_ip.to_str().unwrap_or(""));
            if let Ok(v) = HeaderValue::try_from(value) {
                o.insert(v);
            }
        }
    }
    let proto = conn.scheme();
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    let forwarded = match &host {
        Some(h) => conn.forwarded_with_host(h, || forwarded_value(conn, h)),
        None => Some(conn.forwarded_for.clone()),
    };
    match forwarded {
        Some(v) => headers.insert(header::FORWARDED, v),
        None => headers.remove(header::FORWARDED),
    };
    match host {
        Some(v) => {
            headers.insert(X_FORWARDED_HOST.clone(), v);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

/// `Forwarded: for=…;host=…`.
fn forwarded_value(conn: &Conn, host: &HeaderValue) -> Option<HeaderValue> {
    let h = host.to_str().ok()?;
    // A port's colon is not a token character: quote it.
    let q = if h.contains(':') { "\"" } else { "" };
    let mut f = String::with_capacity(conn.forwarded_for.len() + h.len() + 8);
    for part in [conn.forwarded_for.to_str().unwrap_or(""), ";host=", q, h, q] {
        f.push_str(part);
    }
    HeaderValue::try_from(f).ok()
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
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret-Hop,, close"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("close", HeaderValue::from_static("named by the close option"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
        // Each one alone is seen by the first pass too.
        for name in HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static("1"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            remove_hop_by_hop(&mut h);
            assert!(!h.contains_key(name), "{name}");
            assert!(h.contains_key("x-kept"));
        }
    }

    #[test]
    fn forwarded_headers_name_the_peer() {
        let v4 = Conn::new("10.1.2.3:5000".parse().unwrap(), false);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        set_forwarded(&mut h, &v4, Some(HeaderValue::from_static("api.example:8443")));
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 10.1.2.3");
        assert_eq!(h["forwarded"], "for=10.1.2.3;proto=http;host=\"api.example:8443\"");
        assert_eq!(h["x-forwarded-host"], "api.example:8443");
        let v6 = Conn::new("[2001:db8::1]:5000".parse().unwrap(), true);
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, &v6, None);
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=https");
        assert!(!h.contains_key("x-forwarded-host"));
    }

    #[test]
    fn forwarded_follows_each_requests_host_on_one_connection() {
        let c = Conn::new("10.1.2.3:5000".parse().unwrap(), false);
        for host in ["a.example", "b.example:8080", "a.example", "b.example:8080"] {
            let mut h = HeaderMap::new();
            h.append("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
            h.append("x-forwarded-for", HeaderValue::from_static(" 192.0.2.2 "));
            set_forwarded(&mut h, &c, Some(HeaderValue::from_static(host)));
            let quoted = if host.contains(':') { format!("\"{host}\"") } else { host.to_owned() };
            assert_eq!(h["forwarded"], format!("for=10.1.2.3;proto=http;host={quoted}"));
            assert_eq!(h["x-forwarded-host"], host);
            assert_eq!(
                h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
                ["192.0.2.1, 192.0.2.2, 10.1.2.3"]
            );
        }
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
