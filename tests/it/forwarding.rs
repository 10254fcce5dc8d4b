//! What reaches the upstream and what comes back: identity and forwarding headers,
//! hop-by-hop removal, request ids, streamed bodies in both directions, and
//! WebSocket tunnels.

use std::time::Duration;

use crate::kit::*;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

async fn proxy_to(up: &Upstream) -> Proxy {
    Proxy::start(&format!(
        r#"
        [[routes]]
        name = "api"
        upstream = "{}"
        "#,
        up.url()
    ))
    .await
}

#[tokio::test]
async fn spoofed_x_auth_headers_are_stripped_on_a_public_route() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let echo = get(proxy.url("/me"))
        .header("X-Auth-Subject", "admin")
        .header("x-auth-roles", "root")
        .header("X-AUTH-Email", "ceo@example.com")
        .header("x-authentic", "not an identity header")
        .send()
        .await
        .echo();
    assert_eq!(echo.names_starting_with("x-auth-"), Vec::<&str>::new(), "headers: {:?}", echo.headers);
    assert_eq!(echo.header("x-authentic"), Some("not an identity header"));
}

#[tokio::test]
async fn spoofed_configured_identity_header_of_another_route_is_stripped() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        r#"
        [[routes]]
        name = "public"
        upstream = "{0}"

        [[routes]]
        name = "users"
        path_prefix = "/users"
        upstream = "{0}"
        [routes.identity_headers]
        "X-User-Id" = "sub"
        "#,
        up.url()
    ))
    .await;
    for path in ["/anything", "/users/1"] {
        let echo = get(proxy.url(path)).header("X-User-Id", "victim").send().await.echo();
        assert!(!echo.has_header("x-user-id"), "{path}: {:?}", echo.headers);
    }
}

#[tokio::test]
async fn authorization_and_cookies_pass_unchanged_on_a_public_route() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let echo = get(proxy.url("/"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .header("cookie", "theme=dark; lang=en")
        .send()
        .await
        .echo();
    assert_eq!(echo.header("authorization"), Some("Basic dXNlcjpwYXNz"));
    assert_eq!(echo.header("cookie"), Some("theme=dark; lang=en"));
}

#[tokio::test]
async fn method_path_query_and_body_pass_through() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let r = request("PUT", proxy.url("/items/7?expand=a,b&x=%20y"))
        .header("content-type", "text/plain")
        .header("x-custom", "kept")
        .body("hello upstream")
        .send()
        .await;
    let echo = r.echo();
    assert_eq!(echo.method, "PUT");
    assert_eq!(echo.path, "/items/7?expand=a,b&x=%20y");
    assert_eq!(echo.body_len, 14);
    assert_eq!(echo.header("x-custom"), Some("kept"));
    assert_eq!(echo.header("content-type"), Some("text/plain"));
}

#[tokio::test]
async fn x_forwarded_for_appends_the_client_address() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let echo = get(proxy.url("/")).send().await.echo();
    assert_eq!(echo.header_all("x-forwarded-for"), vec!["127.0.0.1"]);
    let echo = get(proxy.url("/")).header("X-Forwarded-For", "203.0.113.9, 10.0.0.1").send().await.echo();
    assert_eq!(echo.header_all("x-forwarded-for"), vec!["203.0.113.9, 10.0.0.1, 127.0.0.1"]);
}

#[tokio::test]
async fn x_forwarded_for_keeps_every_hop_sent_on_several_lines() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let echo = get(proxy.url("/"))
        .header("X-Forwarded-For", "203.0.113.9")
        .header("X-Forwarded-For", "198.51.100.7")
        .send()
        .await
        .echo();
    let all = echo.header_all("x-forwarded-for").join(", ");
    assert_eq!(all, "203.0.113.9, 198.51.100.7, 127.0.0.1");
}

#[tokio::test]
async fn spoofed_x_forwarded_proto_and_host_are_overwritten() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let echo = get(proxy.url("/"))
        .header("host", "shop.example.com:8080")
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-Host", "evil.example")
        .send()
        .await
        .echo();
    assert_eq!(echo.header_all("x-forwarded-proto"), vec!["http"]);
    assert_eq!(echo.header_all("x-forwarded-host"), vec!["shop.example.com:8080"]);
}

#[tokio::test]
async fn upstream_receives_its_own_authority_as_host() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let echo = get(proxy.url("/")).header("host", "shop.example.com").send().await.echo();
    assert_eq!(echo.header_all("host"), vec![up.addr().to_string()]);
    assert_eq!(echo.header("x-forwarded-host"), Some("shop.example.com"));
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_removed() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let echo = get(proxy.url("/"))
        .header("connection", "keep-alive, X-Hop")
        .header("x-hop", "must not pass")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .header("proxy-connection", "keep-alive")
        .header("proxy-authorization", "Basic cHJveHk6c2VjcmV0")
        .header("x-end-to-end", "kept")
        .send()
        .await
        .echo();
    for gone in ["x-hop", "keep-alive", "te", "trailer", "proxy-connection", "proxy-authorization"] {
        assert!(!echo.has_header(gone), "{gone} reached the upstream: {:?}", echo.headers);
    }
    let conn = echo.header_all("connection").join(",").to_ascii_lowercase();
    assert!(!conn.contains("x-hop"), "connection: {conn}");
    assert_eq!(echo.header("x-end-to-end"), Some("kept"));
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_removed() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let r = get(proxy.url("/hop-headers")).send().await;
    assert_eq!(r.status, 200);
    for gone in ["x-resp-hop", "keep-alive", "proxy-authenticate"] {
        assert!(r.header(gone).is_none(), "{gone} reached the client: {:?}", r.headers);
    }
    let conn = r.header("connection").unwrap_or_default().to_ascii_lowercase();
    assert!(!conn.contains("x-resp-hop"), "connection: {conn}");
    assert_eq!(r.header("x-end-to-end"), Some("kept"));
}

#[tokio::test]
async fn well_formed_request_id_is_kept_upstream_and_returned() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let r = get(proxy.url("/")).header("X-Request-Id", "trace-42_a.b:c").send().await;
    assert_eq!(r.header("x-request-id"), Some("trace-42_a.b:c"));
    assert_eq!(r.echo().header_all("x-request-id"), vec!["trace-42_a.b:c"]);
}

#[tokio::test]
async fn malformed_request_id_is_replaced() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let too_long = "a".repeat(200);
    for bad in ["has spaces in it", "quote\"injection", too_long.as_str(), ""] {
        let r = get(proxy.url("/")).header("X-Request-Id", bad).send().await;
        let returned = r.header("x-request-id").expect("an id is returned").to_owned();
        assert_ne!(returned, bad);
        assert!(!returned.is_empty());
        assert_eq!(r.echo().header_all("x-request-id"), vec![returned.as_str()], "for {bad:?}");
    }
}

#[tokio::test]
async fn request_id_is_generated_unique_and_sent_upstream() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let a = get(proxy.url("/")).send().await;
    let b = get(proxy.url("/")).send().await;
    let (ida, idb) = (a.header("x-request-id").expect("id"), b.header("x-request-id").expect("id"));
    assert_ne!(ida, idb);
    assert_eq!(a.echo().header("x-request-id"), Some(ida));
    assert_eq!(b.echo().header("x-request-id"), Some(idb));
}

#[tokio::test]
async fn response_body_streams_before_the_upstream_finishes() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let resp = get(proxy.url("/gate")).send_streaming().await;
    let mut body = resp.into_body();
    // The upstream holds back its second chunk until the first one reached us; a
    // proxy that buffered the whole response would never deliver this.
    let first = tokio::time::timeout(DEADLINE, http_body_util::BodyExt::frame(&mut body))
        .await
        .expect("first chunk arrives while the upstream is still sending")
        .expect("a frame")
        .expect("no error");
    assert_eq!(first.data_ref().map(|d| d.as_ref()), Some(&b"first\n"[..]));
    up.open_gate();
    let rest = Reply::read(http::Response::new(body)).await.expect("rest of body");
    assert_eq!(rest.body, Bytes::from_static(b"second\n"));
}

#[tokio::test]
async fn request_body_streams_before_the_client_finishes() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let (tx, body) = channel_body();
    let sending = tokio::spawn(request("POST", proxy.url("/upload")).stream(body.boxed_body()).send());
    tx.send(Bytes::from_static(b"first part ")).await.expect("send first part");
    // The client has not finished its body, yet the upstream already reads it.
    tokio::time::timeout(DEADLINE, up.body_started())
        .await
        .expect("the upstream sees the body's start before the client finished");
    tx.send(Bytes::from_static(b"second part")).await.expect("send second part");
    drop(tx);
    let echo = sending.await.expect("request task").echo();
    assert_eq!(echo.body_len, 22);
}

const BIG: u64 = 64 * 1024 * 1024;
/// Generous for a debug build, far below the 64 MiB a buffering proxy would need.
const MEMORY_BUDGET: u64 = 40 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_of_64_mib_streams_with_bounded_memory() {
    let up = Upstream::start().await;
    let mut proxy = ProxyProcess::start(&format!(
        r#"
        [[routes]]
        name = "files"
        upstream = "{}"
        "#,
        up.url()
    ))
    .await;
    let before = proxy.peak_rss();
    let resp = get(proxy.url(&format!("/stream?bytes={BIG}"))).send_streaming().await;
    assert_eq!(resp.status(), 200);
    let n = tokio::time::timeout(Duration::from_secs(120), count_pattern(resp.into_body()))
        .await
        .expect("download finishes")
        .expect("intact body");
    assert_eq!(n, BIG);
    let grew = proxy.peak_rss().saturating_sub(before);
    assert!(grew < MEMORY_BUDGET, "proxy peak memory grew by {} KiB while streaming 64 MiB", grew / 1024);
    proxy.signal("TERM");
    assert!(proxy.wait_exit(DEADLINE).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_of_64_mib_streams_with_bounded_memory() {
    let up = Upstream::start().await;
    let mut proxy = ProxyProcess::start(&format!(
        r#"
        [[routes]]
        name = "files"
        upstream = "{}"
        "#,
        up.url()
    ))
    .await;
    let before = proxy.peak_rss();
    let send = request("POST", proxy.url("/upload")).stream(Pattern::new(BIG).boxed_body()).send();
    let echo = tokio::time::timeout(Duration::from_secs(120), send).await.expect("upload finishes").echo();
    assert_eq!(echo.body_len, BIG);
    assert!(echo.body_is_pattern, "the upstream received different bytes");
    let grew = proxy.peak_rss().saturating_sub(before);
    assert!(grew < MEMORY_BUDGET, "proxy peak memory grew by {} KiB while streaming 64 MiB", grew / 1024);
    proxy.signal("TERM");
    assert!(proxy.wait_exit(DEADLINE).await.success());
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let tcp = tokio::net::TcpStream::connect(proxy.http_addr()).await.expect("connect");
    let url = format!("ws://{}/ws/chat", proxy.http_addr());
    let (mut ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(url, tcp))
        .await
        .expect("handshake within the deadline")
        .expect("WebSocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    for msg in
        [Message::text("hello"), Message::binary(vec![0u8, 1, 2, 255]), Message::text("x".repeat(100_000))]
    {
        ws.send(msg.clone()).await.expect("send");
        let back = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("echo in time")
            .expect("open")
            .expect("ok");
        assert_eq!(back, msg);
    }
    ws.close(None).await.expect("close");
    assert_eq!(up.seen(), vec![("GET".to_owned(), "/ws/chat".to_owned())]);
}

/// Reads one `200` answer with a `Content-Length` body from a raw keep-alive socket.
async fn read_one_answer(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let done = |b: &[u8]| {
        let text = String::from_utf8_lossy(b);
        let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
        let len = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        body.len() >= len
    };
    while !done(&got) {
        let n =
            tokio::time::timeout(DEADLINE, tcp.read(&mut buf)).await.expect("answer in time").expect("read");
        assert!(n > 0, "the proxy closed the keep-alive connection; got {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

// An idle HTTP/1.1 connection hands hyper's buffers back after 2 s and waits for
// its next request with none; the client must not notice.
const PARKED: Duration = Duration::from_millis(2600);

#[tokio::test]
async fn an_idle_keep_alive_connection_serves_its_next_request_after_giving_back_its_buffers() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.http_addr()).await.expect("connect");
    tcp.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    assert!(read_one_answer(&mut tcp).await.starts_with("HTTP/1.1 200"));
    // A time precondition, not a wait for an event: the connection must be idle long enough to park.
    tokio::time::sleep(PARKED).await;
    // The next request arrives in two pieces: the parked connection reads the first
    // bytes itself, hyper the rest.
    tcp.write_all(b"GET /sec").await.expect("write");
    tokio::time::sleep(Duration::from_millis(50)).await;
    tcp.write_all(b"ond HTTP/1.1\r\nHost: x\r\nX-Kept: 1\r\n\r\n").await.expect("write");
    let answer = read_one_answer(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    tcp.write_all(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    assert!(read_one_answer(&mut tcp).await.starts_with("HTTP/1.1 200"));
    let paths: Vec<String> = up.seen().into_iter().map(|(_, p)| p).collect();
    assert_eq!(paths, ["/first", "/second", "/third"]);
}

#[tokio::test]
async fn a_websocket_upgrade_on_a_parked_connection_is_tunnelled() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::start().await;
    let proxy = proxy_to(&up).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.http_addr()).await.expect("connect");
    tcp.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    assert!(read_one_answer(&mut tcp).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(PARKED).await;
    let url = format!("ws://{}/ws/chat", proxy.http_addr());
    let (mut ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(url, tcp))
        .await
        .expect("handshake within the deadline")
        .expect("WebSocket handshake on the parked connection");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("after parking")).await.expect("send");
    let back =
        tokio::time::timeout(DEADLINE, ws.next()).await.expect("echo in time").expect("open").expect("ok");
    assert_eq!(back, Message::text("after parking"));
}
