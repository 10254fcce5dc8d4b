//! Hostile or broken clients: garbage, oversized headers, ambiguous framing
//! (request smuggling), slowloris, idle sockets and connection floods. Each is
//! answered with a 4xx or a closed connection, and the proxy keeps serving.

use std::time::{Duration, Instant};

use crate::kit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn proxy_with(up: &Upstream, limits: &str) -> Proxy {
    Proxy::start(&format!(
        r#"
        [limits]
        {limits}

        [[routes]]
        name = "api"
        upstream = "{}"
        "#,
        up.url()
    ))
    .await
}

/// The refusal the spec allows: a 4xx answer, or the connection simply closed.
fn assert_refused(what: &str, reply: &RawReply) {
    match reply.status() {
        Some(s) => assert!((400..500).contains(&s), "{what}: answered {s}: {}", reply.text()),
        None => assert!(reply.closed, "{what}: neither answered nor closed: {:?}", reply.text()),
    }
}

async fn still_serves(proxy: &Proxy) {
    assert_eq!(get(proxy.url("/after")).send().await.echo().path, "/after");
}

#[tokio::test]
async fn garbage_bytes_are_refused_and_the_proxy_keeps_serving() {
    let up = Upstream::start().await;
    let proxy = proxy_with(&up, "").await;
    let inputs: [&[u8]; 4] = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"\x00\x01\x02\x03\x04\x05\x06\x07\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    ];
    for input in inputs {
        let reply = raw_exchange(proxy.http_addr(), input, DEADLINE).await;
        assert_refused(&format!("{input:?}"), &reply);
    }
    assert!(up.seen().is_empty(), "garbage reached the upstream: {:?}", up.seen());
    still_serves(&proxy).await;
}

#[tokio::test]
async fn one_mib_header_is_refused_and_the_proxy_keeps_serving() {
    let up = Upstream::start().await;
    let proxy = proxy_with(&up, "").await;
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    let reply = raw_exchange(proxy.http_addr(), &req, DEADLINE).await;
    assert_refused("1 MiB header", &reply);
    assert!(up.seen().is_empty());
    still_serves(&proxy).await;
}

#[tokio::test]
async fn headers_over_a_small_max_header_bytes_are_refused() {
    let up = Upstream::start().await;
    let proxy = proxy_with(&up, "max_header_bytes = 8192").await;
    let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(12000));
    let reply = raw_exchange(proxy.http_addr(), req.as_bytes(), DEADLINE).await;
    assert_refused("12000-byte header over an 8192-byte limit", &reply);
    assert!(up.seen().is_empty(), "the oversized request reached the upstream");
}

#[tokio::test]
async fn request_smuggling_with_content_length_and_transfer_encoding_is_not_split() {
    let up = Upstream::start().await;
    let proxy = proxy_with(&up, "").await;
    // A front end trusting Content-Length and a back end trusting Transfer-Encoding
    // would disagree on where the first request ends; the tail is a second request.
    let smuggle =
        b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n\
0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let reply = raw_exchange(proxy.http_addr(), smuggle, DEADLINE).await;
    let answers = reply.text().matches("HTTP/1.1 ").count();
    assert!(reply.closed, "the connection must be closed after an ambiguous request: {}", reply.text());
    assert!(answers <= 1, "the smuggled request was answered: {}", reply.text());
    if let Some(s) = reply.status() {
        assert!(s < 500, "answered {s}: {}", reply.text());
    }
    let paths: Vec<String> = up.seen().into_iter().map(|(_, p)| p).collect();
    assert!(
        !paths.iter().any(|p| p.contains("smuggled")),
        "smuggled request reached the upstream: {paths:?}"
    );
    still_serves(&proxy).await;
}

#[tokio::test]
async fn malformed_framing_is_refused_and_the_proxy_keeps_serving() {
    let up = Upstream::start().await;
    let proxy = proxy_with(&up, "").await;
    let cases: [(&str, &[u8]); 5] = [
        (
            "two different Content-Lengths",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        ),
        ("signed Content-Length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc"),
        (
            "Transfer-Encoding not ending in chunked",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\nabc",
        ),
        (
            "space before the colon",
            b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "bad chunk size",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        ),
    ];
    for (what, input) in cases {
        let reply = raw_exchange(proxy.http_addr(), input, DEADLINE).await;
        match reply.status() {
            // The bad chunk is only seen once the request was forwarded: the upstream
            // then gets a broken body and the proxy answers for it.
            Some(s) if what == "bad chunk size" => assert!(s >= 400, "{what}: {s}"),
            _ => assert_refused(what, &reply),
        }
    }
    still_serves(&proxy).await;
}

#[tokio::test]
async fn slowloris_client_is_cut_off_after_header_read_timeout() {
    let up = Upstream::start().await;
    let proxy = proxy_with(&up, r#"header_read_timeout = "1s""#).await;
    let mut s = TcpStream::connect(proxy.http_addr()).await.expect("connect");
    let started = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.expect("first line");
    let mut buf = [0u8; 1024];
    let mut answer = Vec::new();
    let mut n = 0;
    // One header line every 100 ms, forever, unless the proxy hangs up.
    let cut_off = loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => break true,
                Ok(k) => answer.extend_from_slice(&buf[..k]),
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                n += 1;
                if s.write_all(format!("X-Slow-{n}: y\r\n").as_bytes()).await.is_err() {
                    break true;
                }
            }
        }
        if started.elapsed() > Duration::from_secs(8) {
            break false;
        }
    };
    let took = started.elapsed();
    assert!(cut_off, "still connected after {took:?}");
    assert!(took >= Duration::from_millis(900), "cut off after {took:?}, before the timeout");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "answer: {text}");
    assert!(up.seen().is_empty());
    still_serves(&proxy).await;
}

#[tokio::test]
async fn idle_connection_without_a_request_is_closed_after_header_read_timeout() {
    let up = Upstream::start().await;
    let proxy = proxy_with(&up, r#"header_read_timeout = "1s""#).await;
    let mut s = TcpStream::connect(proxy.http_addr()).await.expect("connect");
    let started = Instant::now();
    let reply = read_until_closed(&mut s, Duration::from_secs(8)).await;
    let took = started.elapsed();
    assert!(reply.closed, "an idle socket was kept open for {took:?}");
    assert!(took >= Duration::from_millis(900), "closed after {took:?}, before the timeout");
    still_serves(&proxy).await;
}

#[tokio::test]
async fn connection_flood_is_held_at_max_connections() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::start().await;
    let proxy = proxy_with(&up, "max_connections = 2").await;
    // Two connections are being served (their requests reached the upstream)…
    let mut a = TcpStream::connect(proxy.http_addr()).await.expect("connect a");
    a.write_all(b"GET /slow?ms=300 HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write a");
    let mut b = TcpStream::connect(proxy.http_addr()).await.expect("connect b");
    b.write_all(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write b");
    up.wait_for_requests(2).await;
    // …so a third is held until one of them closes.
    let mut third = tokio::spawn(get(proxy.url("/third")).send());
    let early = tokio::time::timeout(Duration::from_millis(500), &mut third).await;
    assert!(early.is_err(), "a third connection was served while two were open");
    assert_eq!(up.seen().len(), 2);
    let first = read_until_closed_or(&mut a, "/slow").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    drop(a);
    let reply = tokio::time::timeout(DEADLINE, third).await.expect("served once a slot frees").expect("task");
    assert_eq!(reply.echo().path, "/third");
}

/// Reads from `s` until `marker` appears in what arrived (or the deadline passes).
async fn read_until_closed_or(s: &mut TcpStream, marker: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(marker) {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn idle_sockets_cannot_hold_every_connection_slot() {
    let up = Upstream::start().await;
    let proxy = proxy_with(&up, "max_connections = 2\nheader_read_timeout = \"1s\"").await;
    // The attacker opens max_connections sockets and never sends a byte.
    let _a = TcpStream::connect(proxy.http_addr()).await.expect("connect a");
    let _b = TcpStream::connect(proxy.http_addr()).await.expect("connect b");
    let third = tokio::time::timeout(Duration::from_secs(6), get(proxy.url("/victim")).send()).await;
    let reply = third.expect("a real client is served once header_read_timeout evicts the idle sockets");
    assert_eq!(reply.echo().path, "/victim");
}
