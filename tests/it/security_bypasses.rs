#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Bypasses found by an attack pass against a typical edge layout (SPEC §4 "Paths and
//! hosts are read once", "Identity headers", "CSRF", "JWKS", "WebSocket and long-lived
//! streams", §3 `header_read_timeout`): a public catch-all `/` next to a protected
//! `/api` on the same upstream, a host-only protected site, an upstream with a base
//! path. Each test is named after the attack it stops.
//!
//! Requests whose spelling matters are written by hand on a raw socket, so the proxy
//! sees exactly what an attacker sends (HTTP clients normalise or refuse some of it).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::kit::idp::{b64, encoding_key, now, sign, TestIdp};
use crate::kit::session as kit;
use crate::kit::upstream::Echo;
use crate::kit::*;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

// === raw HTTP/1.1 ===

/// One HTTP/1.1 response read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// Names lower-case, in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// What the echo upstream received; fails if the answer is not from it.
    fn echo(&self, what: &str) -> Echo {
        assert_eq!(self.status, 200, "{what}: expected the upstream's echo, got: {}", self.text());
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{what}: not an echo ({e}): {}", self.text()))
    }

    /// A proxy-made error: status and JSON `error` code.
    fn assert_error(&self, status: u16, code: &str, what: &str) {
        assert_eq!(self.status, status, "{what}: {}", self.text());
        let ct = self.header("content-type").unwrap_or_default();
        assert!(ct.starts_with("application/json"), "{what}: content-type {ct:?}");
        let json: Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {}", self.text()));
        assert_eq!(json["error"], code, "{what}: {json}");
    }
}

/// `METHOD TARGET HTTP/1.1` with exactly these header lines (no Host unless given).
fn raw_request(method: &str, target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut text = format!("{method} {target} HTTP/1.1\r\n");
    for (n, v) in headers {
        text.push_str(&format!("{n}: {v}\r\n"));
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// One request on a new connection, one response back.
async fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the proxy");
    exchange_on(&mut stream, request).await
}

/// `GET target` with `Host: edge.example.test` and `extra` header lines.
async fn raw_get(addr: SocketAddr, target: &str, extra: &[(&str, &str)]) -> RawResponse {
    let mut headers = vec![("Host", "edge.example.test")];
    headers.extend_from_slice(extra);
    raw(addr, &raw_request("GET", target, &headers)).await
}

async fn exchange_on(stream: &mut TcpStream, request: &[u8]) -> RawResponse {
    stream.write_all(request).await.expect("write the request");
    tokio::time::timeout(DEADLINE, read_response(stream)).await.expect("an answer within the deadline")
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await.unwrap_or(0);
    buf.extend_from_slice(&chunk[..n]);
    n
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response: the head, then a body framed by Content-Length or chunked
/// encoding (none for 1xx, 204 and 304), else until the connection closes.
async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = read_more(stream, &mut buf).await;
        assert!(n > 0, "closed before a whole response head: {:?}", String::from_utf8_lossy(&buf));
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut rest = buf.split_off(head_end);
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        Vec::new()
    } else if header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&rest, b"\r\n") {
                    break i;
                }
                assert!(read_more(stream, &mut rest).await > 0, "closed inside a chunk size line");
            };
            let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
            let size_hex = size_text.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {size_text:?}"));
            if size == 0 {
                break body;
            }
            while rest.len() < line_end + 2 + size + 2 {
                assert!(read_more(stream, &mut rest).await > 0, "closed inside a chunk");
            }
            body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest.drain(..line_end + 2 + size + 2);
        }
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().unwrap_or_else(|_| panic!("bad Content-Length {len:?}"));
        while rest.len() < len {
            assert!(read_more(stream, &mut rest).await > 0, "closed before the whole body");
        }
        rest.truncate(len);
        rest
    } else {
        while read_more(stream, &mut rest).await > 0 {}
        rest
    };
    RawResponse { status, headers, body }
}

// === HTTP/2 ===

/// One request over HTTP/2 with prior knowledge on a plain connection (h2c).
async fn h2c_send(addr: SocketAddr, req: Request<Body>) -> Reply {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2c handshake with prior knowledge");
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.expect("h2c request");
        Reply::read(resp).await.expect("read the h2c answer")
    };
    tokio::time::timeout(DEADLINE, exchange).await.expect("h2c exchange within the deadline")
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/2 frame: 9-byte header (length, type, flags, stream id) and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame").to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

// === the edge layout ===

struct Edge {
    idp: TestIdp,
    /// Behind `/`, `/open`, `/api` and `/api/admin`.
    up: Upstream,
    /// Behind `/pub`, with the base path `/v1/public`.
    based: Upstream,
    proxy: Proxy,
}

/// `/` and `/open` public, `/api` (scope `read`, X-Auth-Subject = sub, X-User-Email =
/// email) and `/api/admin` (scope `admin`) on the same upstream; `/pub` public with
/// `strip_prefix` to an upstream with the base path `/v1/public`.
async fn edge() -> Edge {
    let idp = TestIdp::start().await;
    let up = Upstream::named("app").await;
    let based = Upstream::named("based").await;
    let proxy = Proxy::start(&format!(
        r#"
[[issuers]]
name = "main"
issuer = "{iss}"
jwks_url = "{jwks}"
algorithms = ["RS256", "ES256", "EdDSA"]
jwks_refresh = "1h"

[[routes]]
name = "site"
path_prefix = "/"
upstream = "{up}"
auth = "none"

[[routes]]
name = "open"
path_prefix = "/open"
upstream = "{up}"
auth = "none"

[[routes]]
name = "api"
path_prefix = "/api"
upstream = "{up}"
auth = "required"
issuer = "main"
audiences = ["orders-api"]
scopes = ["read"]
[routes.identity_headers]
"X-Auth-Subject" = "sub"
"X-User-Email" = "email"

[[routes]]
name = "admin"
path_prefix = "/api/admin"
upstream = "{up}"
auth = "required"
issuer = "main"
audiences = ["orders-api"]
scopes = ["admin"]

[[routes]]
name = "pub"
path_prefix = "/pub"
upstream = "{based}/v1/public"
strip_prefix = true
auth = "none"
"#,
        iss = idp.issuer(),
        jwks = idp.jwks_url(),
        up = up.url(),
        based = based.url(),
    ))
    .await;
    wait_ready(&proxy).await;
    Edge { idp, up, based, proxy }
}

impl Edge {
    fn addr(&self) -> SocketAddr {
        self.proxy.http_addr()
    }

    /// Claims of a normal token for `sub` with exactly the scope `scope`.
    fn claims(&self, sub: &str, scope: &str) -> Value {
        let mut c = self.idp.claims(sub, 300);
        c["scope"] = json!(scope);
        c
    }

    fn token(&self, sub: &str, scope: &str) -> String {
        sign("rsa1", &self.claims(sub, scope))
    }

    async fn bearer(&self, path: &str, token: &str) -> Reply {
        get(self.proxy.url(path)).header("authorization", format!("Bearer {token}")).send().await
    }

    async fn revoke(&self, entry: &Value) {
        let reply = post(format!("{}/revocations", self.proxy.admin_url()), entry.to_string())
            .header("content-type", "application/json")
            .send()
            .await;
        assert_eq!(reply.status, 201, "revocation {entry}: {}", reply.text());
    }
}

async fn wait_ready(proxy: &Proxy) {
    let url = format!("{}/readyz", proxy.admin_url());
    let url = &url;
    eventually("the issuer's keys are loaded (/readyz 200)", DEADLINE, || async move {
        get(url).send().await.status == 200
    })
    .await;
}

/// Every spelling is answered `401 missing_token` and nothing reaches the upstream.
async fn assert_all_missing_token(env: &Edge, spellings: &[&str]) {
    for path in spellings {
        let before = env.up.seen().len();
        let reply = raw_get(env.addr(), path, &[]).await;
        let arrived = env.up.seen().into_iter().skip(before).collect::<Vec<_>>();
        assert!(arrived.is_empty(), "GET {path} without a token reached the upstream as {arrived:?}");
        reply.assert_error(401, "missing_token", &format!("GET {path} without a token"));
    }
}

// === 1. one reading of the path ===

#[tokio::test]
async fn dot_segments_after_a_public_prefix_do_not_reach_a_protected_route() {
    let env = edge().await;
    assert_all_missing_token(
        &env,
        &[
            "/open/../api/x",
            "/open/%2e%2e/api/x",
            "/open/%2E%2E/api/x",
            "/open/.%2e/api/x",
            "/open/%2e./api/x",
            "/open/deep/../../api/x",
        ],
    )
    .await;
}

#[tokio::test]
async fn path_spellings_under_a_public_catch_all_do_not_reach_a_protected_route() {
    let env = edge().await;
    assert_all_missing_token(
        &env,
        &["/./api/x", "/%2e/api/x", "/%61pi/x", "/%61%70%69/x", "/x/../api/x", "//api/x"],
    )
    .await;
}

#[tokio::test]
async fn encoded_spellings_do_not_escalate_a_read_token_to_the_admin_route() {
    let env = edge().await;
    let token = env.token("reader", "read");
    let bearer = format!("Bearer {token}");
    let control = raw_get(env.addr(), "/api/x", &[("Authorization", &bearer)]).await;
    assert_eq!(control.echo("a read token on /api").header("x-auth-subject"), Some("reader"));
    for path in ["/api/admin/x", "/api/%61dmin/x", "/api/./admin/x", "/api//admin/x", "/api/x/../admin/x"] {
        let before = env.up.seen().len();
        let reply = raw_get(env.addr(), path, &[("Authorization", &bearer)]).await;
        let arrived = env.up.seen().into_iter().skip(before).collect::<Vec<_>>();
        assert!(arrived.is_empty(), "a read token on {path} reached the upstream as {arrived:?}");
        reply.assert_error(403, "insufficient_scope", &format!("a read token on {path}"));
    }
}

#[tokio::test]
async fn dot_segments_cannot_escape_the_upstream_base_path() {
    let env = edge().await;
    for path in
        ["/pub/../../internal/secret", "/pub/%2e%2e/%2e%2e/internal/secret", "/pub/../../../etc/passwd"]
    {
        let reply = raw_get(env.addr(), path, &[]).await;
        let escaped: Vec<String> =
            env.based.seen().into_iter().map(|(_, p)| p).filter(|p| !p.starts_with("/v1/public/")).collect();
        assert!(
            escaped.is_empty(),
            "GET {path}: the upstream received paths outside /v1/public: {escaped:?}"
        );
        reply.assert_error(400, "bad_request", &format!("GET {path}"));
    }
    assert!(env.based.seen().is_empty(), "forwarded: {:?}", env.based.seen());
    assert!(
        env.up.seen().is_empty(),
        "a path climbing above the root was routed elsewhere: {:?}",
        env.up.seen()
    );
    let inside = raw_get(env.addr(), "/pub/a/../b", &[]).await;
    assert_eq!(inside.echo("/pub/a/../b").path, "/v1/public/b");
}

#[tokio::test]
async fn encoded_slash_backslash_and_nul_in_a_path_are_400() {
    let env = edge().await;
    for path in [
        "/open/a%2Fb",
        "/open/a%2fb",
        "/open/..%2F..%2Fapi/x",
        "/open/a%5Cb",
        "/open/a%5cb",
        "/open/..%5C..%5Capi/x",
        "/open/a%00b",
        "/api%00/x",
        "/pub/..%2F..%2Finternal",
    ] {
        let reply = raw_get(env.addr(), path, &[]).await;
        reply.assert_error(400, "bad_request", &format!("GET {path}"));
    }
    assert!(env.up.seen().is_empty(), "refused paths reached the upstream: {:?}", env.up.seen());
    assert!(env.based.seen().is_empty(), "refused paths reached the upstream: {:?}", env.based.seen());
}

#[tokio::test]
async fn the_upstream_receives_the_normalised_path_and_the_query_unchanged() {
    let env = edge().await;
    for (sent, received) in [
        ("/open/a/./b/%7Euser", "/open/a/b/~user"),
        ("/open/a/./b/%7euser?x=%2e%2e/../y&z=%61", "/open/a/b/~user?x=%2e%2e/../y&z=%61"),
        ("/open//a///b", "/open/a/b"),
        ("/open/a/b/..", "/open/a/"),
        ("/open/a/.", "/open/a/"),
        ("/open/x/../y?q=/../", "/open/y?q=/../"),
        ("/open/%41%2D%5F%2E%7E", "/open/A-_.~"),
        ("/open/q%3Fx", "/open/q%3Fx"),
        ("/open/", "/open/"),
    ] {
        let reply = raw_get(env.addr(), sent, &[]).await;
        assert_eq!(reply.echo(sent).path, received, "GET {sent}");
    }
}

// === 2. identity headers spelled with underscores ===

#[tokio::test]
async fn underscore_spellings_of_identity_headers_never_reach_the_upstream() {
    let env = edge().await;
    // No `email` claim: on /api a spoofed X_User_Email would be the only value the app sees.
    let bearer = format!("Bearer {}", env.token("alice", "read"));
    let spoofs = [
        ("X_Auth_Subject", "spoof"),
        ("X_User_Email", "spoof@evil.example"),
        ("X-User_Email", "spoof@evil.example"),
        ("x_auth_anything", "spoof"),
    ];
    for (path, auth) in [("/api/me", Some(bearer.as_str())), ("/open/me", None), ("/", None)] {
        let mut headers = vec![("Host", "edge.example.test")];
        headers.extend_from_slice(&spoofs);
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        let echo = raw(env.addr(), &raw_request("GET", path, &headers)).await.echo(path);
        let leaked: Vec<&(String, String)> = echo
            .headers
            .iter()
            .filter(|(n, v)| {
                let dashed = n.replace('_', "-");
                (dashed == "x-user-email" || dashed.starts_with("x-auth-")) && v.contains("spoof")
            })
            .collect();
        assert!(leaked.is_empty(), "GET {path}: spoofed identity reached the upstream: {leaked:?}");
        let underscored: Vec<&str> = echo
            .headers
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| {
                let dashed = n.replace('_', "-");
                n.contains('_') && (dashed == "x-user-email" || dashed.starts_with("x-auth-"))
            })
            .collect();
        assert!(underscored.is_empty(), "GET {path}: underscore identity headers passed: {underscored:?}");
        if auth.is_some() {
            assert_eq!(echo.header("x-auth-subject"), Some("alice"), "GET {path}");
            assert!(!echo.has_header("x-user-email"), "GET {path}: no email claim, no X-User-Email");
        }
    }
}

// === 3. HTTP/2 slow clients ===

/// `max_connections = 4` and `header_read_timeout = "1s"`: four sockets that send
/// `opening` and stop must each be closed, then a fifth client is served.
async fn slow_clients_are_cut_off_and_free_their_slots(opening: &[u8], what: &str) {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        r#"
[limits]
max_connections = 4
header_read_timeout = "1s"

[[routes]]
name = "site"
upstream = "{}"
"#,
        up.url()
    ))
    .await;
    let mut watchers = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(proxy.http_addr()).await.expect("connect");
        s.write_all(opening).await.expect("send the opening bytes");
        watchers.push(tokio::spawn(async move {
            let started = Instant::now();
            let reply = read_until_closed(&mut s, Duration::from_secs(10)).await;
            (reply.closed, started.elapsed())
        }));
    }
    for (i, w) in watchers.into_iter().enumerate() {
        let (closed, after) = w.await.expect("watcher task");
        assert!(closed, "{what}: socket {i} still open after {after:?}");
    }
    let fifth = tokio::time::timeout(DEADLINE, get(proxy.url("/fifth")).send())
        .await
        .unwrap_or_else(|_| panic!("{what}: a fifth client was not served"));
    assert_eq!(fifth.echo().path, "/fifth");
    assert_eq!(up.seen().len(), 1, "{what}: only the fifth client reached the upstream");
}

#[tokio::test]
async fn http2_client_that_stops_after_one_preface_byte_is_cut_off() {
    slow_clients_are_cut_off_and_free_their_slots(b"P", "`P`").await;
}

#[tokio::test]
async fn http2_client_that_stops_inside_the_preface_is_cut_off() {
    slow_clients_are_cut_off_and_free_their_slots(b"PRI * HTTP/2.0\r\n", "`PRI * HTTP/2.0\\r\\n`").await;
}

#[tokio::test]
async fn http2_client_that_never_finishes_a_header_block_is_cut_off() {
    let mut opening = PREFACE.to_vec();
    opening.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS, empty
                                              // HEADERS on stream 1 with END_STREAM but without END_HEADERS: `:method GET`,
                                              // `:scheme http` (HPACK static table 2 and 6), and never a CONTINUATION.
    opening.extend(h2_frame(0x1, 0x1, 1, &[0x82, 0x86]));
    slow_clients_are_cut_off_and_free_their_slots(&opening, "an unfinished HTTP/2 header block").await;
}

// === 4. host variants ===

struct HostSite {
    idp: TestIdp,
    up: Upstream,
    proxy: Proxy,
}

/// `secure.example.test` (JWT required) and a public catch-all `/`, same upstream.
async fn host_site() -> HostSite {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        r#"
[[issuers]]
name = "main"
issuer = "{iss}"
jwks_url = "{jwks}"
algorithms = ["RS256"]
jwks_refresh = "1h"

[[routes]]
name = "secure"
host = "secure.example.test"
upstream = "{up}"
auth = "required"
issuer = "main"
audiences = ["orders-api"]

[[routes]]
name = "site"
path_prefix = "/"
upstream = "{up}"
auth = "none"
"#,
        iss = idp.issuer(),
        jwks = idp.jwks_url(),
        up = up.url(),
    ))
    .await;
    wait_ready(&proxy).await;
    HostSite { idp, up, proxy }
}

#[tokio::test]
async fn host_with_a_trailing_dot_reaches_the_protected_host_route() {
    let s = host_site().await;
    for host in ["secure.example.test.", "SECURE.Example.Test.", "secure.example.test.:8080"] {
        let reply = raw(s.proxy.http_addr(), &raw_request("GET", "/x", &[("Host", host)])).await;
        reply.assert_error(401, "missing_token", &format!("Host: {host}"));
    }
    assert!(s.up.seen().is_empty(), "an anonymous request went out via the catch-all: {:?}", s.up.seen());
    let bearer = format!("Bearer {}", s.idp.access_token("alice", 300));
    let reply = raw(
        s.proxy.http_addr(),
        &raw_request("GET", "/x", &[("Host", "secure.example.test."), ("Authorization", &bearer)]),
    )
    .await;
    assert_eq!(reply.echo("trailing dot with a token").header("x-auth-subject"), Some("alice"));
}

#[tokio::test]
async fn malformed_host_values_are_400_and_never_reach_the_catch_all() {
    let s = host_site().await;
    for host in [
        "secure.example.test:abc",
        "secure.example.test:443:80",
        "secure.example.test, other",
        "secure.example.test,other.example",
        "user@secure.example.test",
        "user:pass@secure.example.test",
    ] {
        let reply = raw(s.proxy.http_addr(), &raw_request("GET", "/x", &[("Host", host)])).await;
        reply.assert_error(400, "bad_request", &format!("Host: {host}"));
    }
    assert!(s.up.seen().is_empty(), "a malformed Host went out via the catch-all: {:?}", s.up.seen());
}

// === 11. HTTP/1.1 Host count ===

#[tokio::test]
async fn http1_request_without_host_is_400() {
    let s = host_site().await;
    let reply = raw(s.proxy.http_addr(), &raw_request("GET", "/x", &[])).await;
    reply.assert_error(400, "bad_request", "HTTP/1.1 without Host");
    assert!(s.up.seen().is_empty(), "forwarded: {:?}", s.up.seen());
}

#[tokio::test]
async fn http1_request_with_two_host_headers_is_400() {
    let s = host_site().await;
    for hosts in [["www.example.test", "secure.example.test"], ["secure.example.test", "secure.example.test"]]
    {
        let reply =
            raw(s.proxy.http_addr(), &raw_request("GET", "/x", &[("Host", hosts[0]), ("Host", hosts[1])]))
                .await;
        reply.assert_error(400, "bad_request", &format!("two Host headers {hosts:?}"));
    }
    assert!(s.up.seen().is_empty(), "forwarded: {:?}", s.up.seen());
}

// === 5. cross-site WebSocket hijacking ===

/// Opens a WebSocket upgrade on `/api/ws` with `extra` header lines; returns the answer
/// and, after a `101`, the open tunnel.
async fn ws_upgrade(proxy: &Proxy, extra: &[(&str, &str)]) -> (RawResponse, TcpStream) {
    let host = proxy.http_addr().to_string();
    let mut headers = vec![
        ("Host", host.as_str()),
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    headers.extend_from_slice(extra);
    let mut stream = TcpStream::connect(proxy.http_addr()).await.expect("connect");
    let reply = exchange_on(&mut stream, &raw_request("GET", "/api/ws", &headers)).await;
    (reply, stream)
}

/// Asserts a `101` and that the tunnel echoes a message.
async fn assert_tunnelled(reply: RawResponse, stream: TcpStream, what: &str) {
    assert_eq!(reply.status, 101, "{what}: {}", reply.text());
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    ws.send(Message::text(what.to_owned())).await.expect("send over the tunnel");
    let back =
        tokio::time::timeout(DEADLINE, ws.next()).await.expect("echo in time").expect("open").expect("ok");
    assert_eq!(back, Message::text(what.to_owned()), "{what}");
}

#[tokio::test]
async fn cross_site_websocket_upgrade_with_session_cookies_is_403_csrf() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let proxy = kit::start(&idp, &up, &kit::Opts::default()).await;
    let (_, jar) = kit::login(&proxy, "alice").await;
    let cookie = jar.header();
    for (what, origin) in [
        ("a foreign Origin", Some("https://evil.example")),
        ("an allowed host with another scheme", Some("https://app.test")),
        ("an opaque Origin", Some("null")),
        ("no Origin", None),
    ] {
        let mut extra = vec![("Cookie", cookie.as_str())];
        if let Some(o) = origin {
            extra.push(("Origin", o));
        }
        let (reply, _) = ws_upgrade(&proxy, &extra).await;
        reply.assert_error(403, "csrf", &format!("cookie upgrade with {what}"));
    }
    assert!(up.seen().is_empty(), "a cross-site upgrade reached the upstream: {:?}", up.seen());
}

#[tokio::test]
async fn websocket_upgrade_from_the_own_or_an_allowed_origin_is_tunnelled() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let proxy = kit::start(&idp, &up, &kit::Opts::default()).await;
    let (_, jar) = kit::login(&proxy, "alice").await;
    let cookie = jar.header();
    let own = kit::own_origin(&proxy);
    for origin in [own.as_str(), kit::APP_ORIGIN] {
        let (reply, stream) = ws_upgrade(&proxy, &[("Cookie", &cookie), ("Origin", origin)]).await;
        assert_tunnelled(reply, stream, &format!("cookie upgrade from {origin}")).await;
    }
}

#[tokio::test]
async fn bearer_authenticated_websocket_upgrade_from_a_foreign_origin_is_tunnelled() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let proxy = kit::start(&idp, &up, &kit::Opts::default()).await;
    let bearer = format!("Bearer {}", idp.access_token("bob", 300));
    let (reply, stream) =
        ws_upgrade(&proxy, &[("Authorization", &bearer), ("Origin", "https://evil.example")]).await;
    assert_tunnelled(reply, stream, "bearer upgrade from a foreign origin").await;
}

// === 6. h2c upgrade smuggling ===

#[tokio::test]
async fn h2c_upgrade_is_not_passed_to_the_upstream() {
    let env = edge().await;
    for (connection, upgrade) in [
        ("Upgrade, HTTP2-Settings", "h2c"),
        ("HTTP2-Settings, Upgrade", "H2C"),
        ("keep-alive, upgrade, http2-settings", "h2c"),
    ] {
        let request = raw_request(
            "GET",
            "/open/h2c",
            &[
                ("Host", "edge.example.test"),
                ("Connection", connection),
                ("Upgrade", upgrade),
                ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
            ],
        );
        let reply = raw(env.addr(), &request).await;
        let what = format!("Connection: {connection} / Upgrade: {upgrade}");
        let echo = reply.echo(&what);
        assert_eq!(echo.path, "/open/h2c", "{what}");
        assert!(!echo.has_header("upgrade"), "{what}: Upgrade reached the upstream: {:?}", echo.headers);
        assert!(!echo.has_header("http2-settings"), "{what}: HTTP2-Settings reached the upstream");
        let conn = echo.header_all("connection").join(",").to_ascii_lowercase();
        assert!(!conn.contains("upgrade"), "{what}: Connection: {conn} reached the upstream");
    }
}

// === 7. same-origin cookie POST over HTTP/2 ===

#[tokio::test]
async fn same_origin_cookie_post_over_http2_with_alpn_is_not_csrf() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let ca = TestCa::new();
    let dir = TempDir::new();
    let (cert, key) = ca.issue(&["api.example.com"]).write_to(&dir, "site");
    let opts = kit::Opts::default();
    let toml = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
         [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\n{}",
        kit::config(&idp, &up, &opts)
    );
    let proxy = Proxy::start_with(&toml, &kit::env_with_keys(&opts.keys), std::path::Path::new(".")).await;
    wait_ready(&proxy).await;
    let (_, jar) = kit::login(&proxy, "alice").await;
    let authority = format!("api.example.com:{}", proxy.https_addr().port());
    let post_h2 = |origin: String| {
        let jar = jar.clone();
        let ca = &ca;
        let authority = authority.clone();
        let addr = proxy.https_addr();
        async move {
            let stream = tls_connect(addr, "api.example.com", ca.client_config(&["h2"])).await.expect("TLS");
            assert_eq!(alpn(&stream).as_deref(), Some("h2"));
            let req = jar
                .on(post(format!("https://{authority}/api/orders"), "{}"))
                .header("content-type", "application/json")
                .header("origin", origin)
                .into_request();
            send_over(stream, req).await
        }
    };
    let own = post_h2(format!("https://{authority}")).await;
    assert_eq!(own.status, 200, "same-origin cookie POST over h2: {}", own.text());
    assert_eq!(own.echo().header("x-auth-subject"), Some("alice"));
    let foreign = post_h2("https://evil.example".to_owned()).await;
    foreign.assert_error(403, "csrf");
}

#[tokio::test]
async fn same_origin_cookie_post_over_h2c_is_not_csrf() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let proxy = kit::start(&idp, &up, &kit::Opts::default()).await;
    let (_, jar) = kit::login(&proxy, "alice").await;
    let own = kit::own_origin(&proxy);
    let req = jar
        .on(post(proxy.url("/api/orders"), "{}"))
        .header("content-type", "application/json")
        .header("origin", &own)
        .into_request();
    let reply = h2c_send(proxy.http_addr(), req).await;
    assert_eq!(reply.status, 200, "same-origin cookie POST over h2c: {}", reply.text());
    assert_eq!(reply.echo().header("x-auth-subject"), Some("alice"));
}

// === 8. JWT header checks ===

/// A token with exactly this JOSE header, RS256-signed with fixture key rsa1.
fn sign_raw_header(header: &Value, claims: &Value) -> String {
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &encoding_key("rsa1"), Algorithm::RS256).unwrap();
    format!("{input}.{sig}")
}

#[tokio::test]
async fn token_with_an_unknown_critical_header_is_invalid() {
    let env = edge().await;
    let claims = env.claims("alice", "read");
    let plain = sign_raw_header(&json!({"alg": "RS256", "kid": "rsa1", "typ": "JWT"}), &claims);
    assert_eq!(env.bearer("/api/x", &plain).await.status, 200, "the same token without crit");
    for header in [
        json!({"alg": "RS256", "kid": "rsa1", "typ": "JWT", "crit": ["exp-ext"], "exp-ext": true}),
        json!({"alg": "RS256", "kid": "rsa1", "crit": ["urn:example:policy"], "urn:example:policy": "strict"}),
    ] {
        let token = sign_raw_header(&header, &env.claims("alice", "read"));
        let before = env.up.seen().len();
        let reply = env.bearer("/api/x", &token).await;
        reply.assert_error(401, "invalid_token");
        assert_eq!(env.up.seen().len(), before, "header {header}: reached the upstream");
    }
}

#[tokio::test]
async fn tokens_of_other_types_are_not_accepted_as_access_tokens() {
    let env = edge().await;
    for typ in ["logout+jwt", "secevent+jwt", "id_token+jwt", "application/logout+jwt"] {
        let token = sign_raw_header(
            &json!({"alg": "RS256", "kid": "rsa1", "typ": typ}),
            &env.claims("alice", "read"),
        );
        let before = env.up.seen().len();
        let reply = env.bearer("/api/x", &token).await;
        assert_eq!(reply.status, 401, "typ {typ}: {}", reply.text());
        reply.assert_error(401, "invalid_token");
        assert_eq!(env.up.seen().len(), before, "typ {typ}: reached the upstream");
    }
}

#[tokio::test]
async fn access_token_types_are_accepted() {
    let env = edge().await;
    for typ in [Some("JWT"), Some("at+jwt"), Some("application/at+jwt"), None] {
        let mut header = json!({"alg": "RS256", "kid": "rsa1"});
        if let Some(t) = typ {
            header["typ"] = json!(t);
        }
        let token = sign_raw_header(&header, &env.claims("alice", "read"));
        let reply = env.bearer("/api/x", &token).await;
        assert_eq!(reply.status, 200, "typ {typ:?}: {}", reply.text());
        assert_eq!(reply.echo().header("x-auth-subject"), Some("alice"), "typ {typ:?}");
    }
}

// === 9. revocation dodged by numbers ===

#[tokio::test]
async fn revoking_a_subject_denies_its_tokens_carrying_sub_as_a_number() {
    let env = edge().await;
    let mut claims = env.claims("x", "read");
    claims["sub"] = json!(123);
    let token = sign("rsa1", &claims);
    let first = env.bearer("/api/x", &token).await;
    assert_eq!(first.status, 200, "a numeric sub is accepted before the revocation: {}", first.text());
    env.revoke(&json!({"sub": "123", "issued_before": now() + 1})).await;
    let before = env.up.seen().len();
    env.bearer("/api/x", &token).await.assert_error(401, "invalid_token");
    assert_eq!(env.up.seen().len(), before, "the revoked token reached the upstream");
}

#[tokio::test]
async fn revoking_a_jti_denies_a_token_carrying_it_as_a_number() {
    let env = edge().await;
    let mut claims = env.claims("alice", "read");
    claims["jti"] = json!(7);
    let token = sign("rsa1", &claims);
    assert_eq!(
        env.bearer("/api/x", &token).await.status,
        200,
        "a numeric jti is accepted before the revocation"
    );
    env.revoke(&json!({"jti": "7", "exp": claims["exp"]})).await;
    let before = env.up.seen().len();
    env.bearer("/api/x", &token).await.assert_error(401, "invalid_token");
    assert_eq!(env.up.seen().len(), before, "the revoked token reached the upstream");
}

// === 10. client Forwarded header ===

/// `for=1.2.3.4;proto=https` → `[("for", "1.2.3.4"), ("proto", "https")]`, quotes removed.
fn forwarded_pairs(element: &str) -> Vec<(String, String)> {
    element
        .split(';')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or_else(|| panic!("not a pair: {p:?} in {element:?}"));
            (k.trim().to_ascii_lowercase(), v.trim().trim_matches('"').to_owned())
        })
        .collect()
}

#[tokio::test]
async fn client_forwarded_header_is_replaced_by_the_proxys_own_element() {
    let env = edge().await;
    let host = env.proxy.http_addr().to_string();
    for spoof in
        [vec!["for=1.2.3.4;proto=https;host=evil"], vec!["for=1.2.3.4, for=5.6.7.8;host=evil", "proto=https"]]
    {
        let mut req = get(env.proxy.url("/open/fwd"));
        for s in &spoof {
            req = req.header("forwarded", s);
        }
        let echo = req.send().await.echo();
        let all = echo.header_all("forwarded");
        assert_eq!(all.len(), 1, "client sent {spoof:?}; upstream got {all:?}");
        assert!(!all[0].contains(','), "one element only, got {:?}", all[0]);
        let mut pairs = forwarded_pairs(all[0]);
        pairs.retain(|(k, _)| k != "by");
        pairs.sort();
        let want = vec![
            ("for".to_owned(), "127.0.0.1".to_owned()),
            ("host".to_owned(), host.clone()),
            ("proto".to_owned(), "http".to_owned()),
        ];
        assert_eq!(pairs, want, "client sent {spoof:?}; upstream got {:?}", all[0]);
    }
}

// === 12. split HTTP/2 cookie fields ===

#[tokio::test]
async fn split_http2_cookie_fields_reach_an_http1_upstream_as_one_header() {
    let env = edge().await;
    let req =
        get(env.proxy.url("/open/cookies")).header("cookie", "a=1").header("cookie", "b=2").into_request();
    let reply = h2c_send(env.addr(), req).await;
    let echo = reply.echo();
    assert_eq!(echo.header_all("cookie"), vec!["a=1; b=2"], "headers upstream: {:?}", echo.headers);
}

// === 13. a key rotated in right after start ===

#[tokio::test]
async fn key_rotated_in_right_after_start_is_accepted_within_seconds() {
    let idp = TestIdp::start().await;
    idp.set_keys(&["rsa1"]);
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        r#"
[[issuers]]
name = "main"
issuer = "{iss}"
jwks_url = "{jwks}"
algorithms = ["RS256"]
jwks_refresh = "5m"

[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "{up}"
issuer = "main"
audiences = ["orders-api"]
"#,
        iss = idp.issuer(),
        jwks = idp.jwks_url(),
        up = up.url(),
    ))
    .await;
    wait_ready(&proxy).await;
    idp.set_keys(&["rsa1", "rsa2"]);
    let token = sign("rsa2", &idp.claims("alice", 300));
    let url = proxy.url("/orders/1");
    let (url, token) = (&url, &token);
    eventually("a token signed with the key rotated in after start is accepted", Duration::from_secs(8), || async move {
        get(url).header("authorization", format!("Bearer {token}")).send().await.status == 200
    })
    .await;
}

#[tokio::test]
async fn flood_of_random_kids_costs_a_handful_of_jwks_fetches() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        r#"
[[issuers]]
name = "main"
issuer = "{iss}"
jwks_url = "{jwks}"
algorithms = ["RS256"]
jwks_refresh = "5m"

[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "{up}"
issuer = "main"
audiences = ["orders-api"]
"#,
        iss = idp.issuer(),
        jwks = idp.jwks_url(),
        up = up.url(),
    ))
    .await;
    wait_ready(&proxy).await;
    let before = idp.jwks_fetches.load(Ordering::SeqCst);
    let salt = now();
    let url = proxy.url("/orders/1");
    for batch in 0..10 {
        let sends = (0..20).map(|i| {
            let mut h = jsonwebtoken::Header::new(Algorithm::RS256);
            h.kid = Some(format!("flood-{salt}-{batch}-{i}"));
            let token = idp::sign_with_header("rsa1", h, &idp.claims("mallory", 300));
            get(&url).header("authorization", format!("Bearer {token}")).send()
        });
        for reply in futures_util::future::join_all(sends).await {
            reply.assert_error(401, "invalid_token");
        }
    }
    let fetches = idp.jwks_fetches.load(Ordering::SeqCst) - before;
    assert!(fetches <= 5, "200 tokens with random kids cost {fetches} JWKS fetches");
    assert!(up.seen().is_empty(), "a token with an unknown kid reached the upstream");
}
