//! The HTTPS listener: certificates made with rcgen under a test CA, ALPN `h2` and
//! `http/1.1`, the certificate chosen by SNI, and a listener that survives junk.

use crate::kit::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

struct TlsSite {
    proxy: Proxy,
    ca: TestCa,
    default_leaf: Leaf,
    legacy_leaf: Leaf,
    wild_leaf: Leaf,
    up: Upstream,
    _dir: TempDir,
}

async fn tls_site() -> TlsSite {
    let ca = TestCa::new();
    let dir = TempDir::new();
    // The default certificate also covers names no SNI entry lists, so a client can
    // verify it was the one chosen for them.
    let default_leaf =
        ca.issue(&["api.example.com", "fallback.example.net", "a.b.wild.example.org", "127.0.0.1"]);
    let legacy_leaf = ca.issue(&["legacy.example.com"]);
    let wild_leaf = ca.issue(&["*.wild.example.org"]);
    let (cert, key) = default_leaf.write_to(&dir, "default");
    let (legacy_cert, legacy_key) = legacy_leaf.write_to(&dir, "legacy");
    let (wild_cert, wild_key) = wild_leaf.write_to(&dir, "wild");
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        r#"
        [listen]
        https = "127.0.0.1:0"
        admin = "127.0.0.1:0"

        [tls]
        cert = "{cert}"
        key = "{key}"

        [[tls.certificates]]
        server_names = ["legacy.example.com"]
        cert = "{legacy_cert}"
        key = "{legacy_key}"

        [[tls.certificates]]
        server_names = ["*.wild.example.org"]
        cert = "{wild_cert}"
        key = "{wild_key}"

        [[routes]]
        name = "api"
        upstream = "{}"
        "#,
        up.url()
    ))
    .await;
    TlsSite { proxy, ca, default_leaf, legacy_leaf, wild_leaf, up, _dir: dir }
}

fn https_get(authority: &str, path: &str) -> http::Request<Body> {
    get(format!("https://{authority}{path}")).into_request()
}

#[tokio::test]
async fn http2_is_negotiated_with_alpn_and_proxied() {
    let s = tls_site().await;
    let stream =
        tls_connect(s.proxy.https_addr(), "api.example.com", s.ca.client_config(&["h2", "http/1.1"]))
            .await
            .expect("TLS handshake");
    assert_eq!(alpn(&stream).as_deref(), Some("h2"));
    let reply = send_over(stream, https_get("api.example.com", "/orders?id=1")).await;
    let echo = reply.echo();
    assert_eq!(echo.path, "/orders?id=1");
    assert_eq!(echo.header("x-forwarded-proto"), Some("https"));
    assert_eq!(echo.header("x-forwarded-host"), Some("api.example.com"));
    assert_eq!(echo.header("host"), Some(s.up.addr().to_string().as_str()));
    assert!(reply.header("x-request-id").is_some());
}

#[tokio::test]
async fn http1_is_used_when_the_client_offers_only_http1_or_no_alpn() {
    let s = tls_site().await;
    for offer in [&["http/1.1"][..], &[][..]] {
        let stream = tls_connect(s.proxy.https_addr(), "api.example.com", s.ca.client_config(offer))
            .await
            .expect("TLS handshake");
        let chosen = alpn(&stream);
        assert!(
            chosen.is_none() || chosen.as_deref() == Some("http/1.1"),
            "offered {offer:?}, got {chosen:?}"
        );
        let echo = send_over(stream, https_get("api.example.com", "/h1")).await.echo();
        assert_eq!(echo.path, "/h1");
        assert_eq!(echo.header("x-forwarded-proto"), Some("https"));
    }
}

#[tokio::test]
async fn sni_picks_the_matching_certificate() {
    let s = tls_site().await;
    let cases = [
        ("legacy.example.com", &s.legacy_leaf),
        ("LEGACY.Example.COM", &s.legacy_leaf),
        ("api.example.com", &s.default_leaf),
        ("a.wild.example.org", &s.wild_leaf),
    ];
    for (sni, want) in cases {
        let stream = tls_connect(s.proxy.https_addr(), sni, s.ca.client_config(&["h2"]))
            .await
            .unwrap_or_else(|e| panic!("handshake for {sni}: {e}"));
        assert!(presented_leaf(&stream) == want.der, "SNI {sni}: wrong certificate presented");
    }
}

#[tokio::test]
async fn unknown_or_missing_sni_gets_the_default_certificate() {
    let s = tls_site().await;
    // No SNI entry for this name; two labels under `*.wild.example.org` do not match
    // the wildcard (it covers exactly one); an IP address sends no SNI at all.
    for sni in ["fallback.example.net", "a.b.wild.example.org", "127.0.0.1"] {
        let stream = tls_connect(s.proxy.https_addr(), sni, s.ca.client_config(&[]))
            .await
            .unwrap_or_else(|e| panic!("handshake for {sni}: {e}"));
        assert!(presented_leaf(&stream) == s.default_leaf.der, "SNI {sni}: expected the default certificate");
    }
}

#[tokio::test]
async fn websocket_over_tls_is_tunnelled() {
    let s = tls_site().await;
    let stream = tls_connect(s.proxy.https_addr(), "api.example.com", s.ca.client_config(&["http/1.1"]))
        .await
        .expect("TLS handshake");
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://api.example.com/ws", stream)
        .await
        .expect("WebSocket handshake over TLS");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("over tls")).await.expect("send");
    let back = tokio::time::timeout(DEADLINE, ws.next()).await.expect("in time").expect("open").expect("ok");
    assert_eq!(back, Message::text("over tls"));
}

#[tokio::test]
async fn junk_on_the_tls_port_is_dropped_and_the_listener_keeps_serving() {
    let s = tls_site().await;
    let plain = raw_exchange(s.proxy.https_addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", DEADLINE).await;
    assert!(plain.closed, "plain HTTP on the TLS port must be dropped");
    assert!(!plain.text().contains("200 OK"), "{}", plain.text());
    let junk =
        raw_exchange(s.proxy.https_addr(), &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3], DEADLINE).await;
    assert!(junk.closed);
    assert!(s.up.seen().is_empty());
    let stream = tls_connect(s.proxy.https_addr(), "api.example.com", s.ca.client_config(&["h2"]))
        .await
        .expect("TLS still works");
    assert_eq!(send_over(stream, https_get("api.example.com", "/ok")).await.echo().path, "/ok");
}
