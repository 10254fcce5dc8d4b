//! Graceful shutdown: on SIGTERM/SIGINT (or the in-process shutdown future) the proxy
//! stops accepting at once, lets in-flight requests finish within `drain_timeout`,
//! and the binary exits 0.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::kit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn routes(up: &Upstream, drain_timeout: &str) -> String {
    format!(
        r#"
        [limits]
        drain_timeout = "{drain_timeout}"

        [[routes]]
        name = "api"
        upstream = "{}"
        "#,
        up.url()
    )
}

async fn refuses_connections(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect(addr).await, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[tokio::test]
async fn sigterm_lets_the_in_flight_request_finish_refuses_new_connections_and_exits_0() {
    let up = Upstream::start().await;
    let mut proxy = ProxyProcess::start(&routes(&up, "10s")).await;
    let slow = tokio::spawn(get(proxy.url("/slow?ms=2000")).send());
    up.wait_for_requests(1).await;
    proxy.signal("TERM");
    eventually("the proxy refuses new connections", DEADLINE, || refuses_connections(proxy.http)).await;
    assert!(!slow.is_finished(), "new connections were refused only after the slow request ended");
    // The admin listener stays up during the drain and reports it.
    let ready = readyz(&proxy).await;
    assert_eq!(ready.status, 503, "readyz while draining: {}", ready.text());
    let reply = slow.await.expect("slow request task");
    assert_eq!(reply.echo().path, "/slow?ms=2000", "the in-flight request completes");
    let status = proxy.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", proxy.log());
}

#[tokio::test]
async fn sigint_stops_like_sigterm() {
    let up = Upstream::start().await;
    let mut proxy = ProxyProcess::start(&routes(&up, "10s")).await;
    assert_eq!(get(proxy.url("/")).send().await.status, 200);
    assert!(proxy.log().contains("portcullis listening"), "log:\n{}", proxy.log());
    proxy.signal("INT");
    assert_eq!(proxy.wait_exit(DEADLINE).await.code(), Some(0), "log:\n{}", proxy.log());
}

#[tokio::test]
async fn drain_is_bounded_by_drain_timeout() {
    let up = Upstream::start().await;
    let mut proxy = ProxyProcess::start(&routes(&up, "1s")).await;
    let stuck = tokio::spawn(try_send(get(proxy.url("/slow?ms=30000"))));
    up.wait_for_requests(1).await;
    let started = Instant::now();
    proxy.signal("TERM");
    let status = proxy.wait_exit(DEADLINE).await;
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0), "log:\n{}", proxy.log());
    assert!(took >= Duration::from_millis(900), "exited after {took:?}, before drain_timeout");
    assert!(took < Duration::from_secs(6), "exited after {took:?}, long after drain_timeout");
    let outcome = stuck.await.expect("task");
    assert!(
        outcome.is_err(),
        "the request cut off by the drain cannot have succeeded: {outcome:?}\nlog:\n{}",
        proxy.log()
    );
}

#[tokio::test]
async fn idle_connections_do_not_delay_exit() {
    let up = Upstream::start().await;
    let mut proxy = ProxyProcess::start(&routes(&up, "20s")).await;
    // One keep-alive connection that served a request and now waits for the next…
    let mut keep_alive = TcpStream::connect(proxy.http).await.expect("connect");
    keep_alive.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(DEADLINE, keep_alive.read(&mut buf)).await.expect("answer").expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    // …and one that never sent a byte.
    let _silent = TcpStream::connect(proxy.http).await.expect("connect");
    let started = Instant::now();
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(DEADLINE).await.code(), Some(0), "log:\n{}", proxy.log());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "idle connections held the drain for {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn in_process_shutdown_drains_then_returns() {
    let up = Upstream::start().await;
    let mut proxy = Proxy::start(&routes(&up, "10s")).await;
    let addr = proxy.http_addr();
    let slow = tokio::spawn(get(proxy.url("/slow?ms=1000")).send());
    up.wait_for_requests(1).await;
    let done = proxy.begin_shutdown();
    eventually("the proxy refuses new connections", DEADLINE, || refuses_connections(addr)).await;
    assert_eq!(slow.await.expect("task").echo().path, "/slow?ms=1000");
    tokio::time::timeout(DEADLINE, done).await.expect("run returns after the drain").expect("no panic");
}

#[tokio::test]
async fn admin_listener_reports_health_and_readiness() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&routes(&up, "10s")).await;
    let admin = proxy.admin_url();
    let health = get(format!("{admin}/healthz")).send().await;
    assert_eq!(health.status, 200, "{}", health.text());
    let ready = get(format!("{admin}/readyz")).send().await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(get(format!("{admin}/nope")).send().await.status, 404);
    // The admin listener is not a route to the upstream.
    assert!(up.seen().is_empty());
    proxy.shutdown().await;
}

#[tokio::test]
async fn drain_delay_keeps_accepting_while_readyz_says_503() {
    let up = Upstream::start().await;
    let toml = format!(
        "[limits]\ndrain_timeout = \"5s\"\ndrain_delay = \"2s\"\n\n[[routes]]\nname = \"api\"\nupstream = \"{}\"\n",
        up.url()
    );
    let mut proxy = ProxyProcess::start(&toml).await;
    proxy.signal("TERM");
    // At once: not ready, so a balancer's health check takes the instance out…
    eventually("readyz answers 503 after SIGTERM", DEADLINE, || async {
        try_send(get(format!("{}/readyz", proxy.admin_url()))).await.is_ok_and(|r| r.status == 503)
    })
    .await;
    let noticed = Instant::now();
    // …while new connections are still accepted and served during drain_delay.
    let reply = get(proxy.url("/during-delay")).send().await;
    assert_eq!(reply.echo().path, "/during-delay");
    assert!(
        noticed.elapsed() < Duration::from_millis(1500),
        "the check itself took too long to prove anything"
    );
    eventually("the proxy refuses new connections after drain_delay", DEADLINE, || {
        refuses_connections(proxy.http)
    })
    .await;
    assert!(noticed.elapsed() >= Duration::from_millis(1000), "stopped accepting before drain_delay");
    assert_eq!(proxy.wait_exit(DEADLINE).await.code(), Some(0), "log:\n{}", proxy.log());
}
