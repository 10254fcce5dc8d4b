//! Routing as a user sees it: host then segment-aware longest prefix, strip_prefix,
//! round-robin, and the proxy's own answers when no upstream can be used
//! (404 / 502 / 504 / 413 with their JSON `error` codes).

use std::time::{Duration, Instant};

use crate::kit::*;

/// Four routes, each to its own named upstream, so the echo tells which one answered.
struct Site {
    proxy: Proxy,
    _ups: Vec<Upstream>,
}

async fn site() -> Site {
    let root = Upstream::named("root").await;
    let orders = Upstream::named("orders").await;
    let admin = Upstream::named("orders-admin").await;
    let api = Upstream::named("api-orders").await;
    let proxy = Proxy::start(&format!(
        r#"
        [[routes]]
        name = "root"
        path_prefix = "/"
        upstream = "{}"

        [[routes]]
        name = "orders"
        path_prefix = "/orders"
        upstream = "{}"

        [[routes]]
        name = "orders-admin"
        path_prefix = "/orders/admin/"
        upstream = "{}"

        [[routes]]
        name = "api-orders"
        host = "api.example.com"
        path_prefix = "/orders"
        upstream = "{}"
        "#,
        root.url(),
        orders.url(),
        admin.url(),
        api.url()
    ))
    .await;
    Site { proxy, _ups: vec![root, orders, admin, api] }
}

async fn answered_by(proxy: &Proxy, host: Option<&str>, path: &str) -> String {
    let mut req = get(proxy.url(path));
    if let Some(h) = host {
        req = req.header("host", h);
    }
    req.send().await.echo().upstream
}

#[tokio::test]
async fn longest_prefix_wins_by_whole_segments() {
    let s = site().await;
    let cases = [
        ("/", "root"),
        ("/orders", "orders"),
        ("/orders/", "orders"),
        ("/orders/42?x=1", "orders"),
        ("/ordersx", "root"),
        ("/orders-old/1", "root"),
        ("/orders/admin", "orders-admin"),
        ("/orders/admin/users", "orders-admin"),
        ("/orders/administrator", "orders"),
    ];
    for (path, want) in cases {
        assert_eq!(answered_by(&s.proxy, None, path).await, want, "path {path}");
    }
}

#[tokio::test]
async fn host_route_beats_host_less_route() {
    let s = site().await;
    assert_eq!(answered_by(&s.proxy, Some("api.example.com"), "/orders/1").await, "api-orders");
    assert_eq!(answered_by(&s.proxy, Some("other.example.com"), "/orders/1").await, "orders");
    // A host route does not capture paths outside its own prefix.
    assert_eq!(answered_by(&s.proxy, Some("api.example.com"), "/ordersx").await, "root");
}

#[tokio::test]
async fn host_matches_without_port_and_case_insensitively() {
    let s = site().await;
    for host in ["api.example.com:8443", "API.Example.COM", "Api.EXAMPLE.com:80"] {
        assert_eq!(answered_by(&s.proxy, Some(host), "/orders/1").await, "api-orders", "Host: {host}");
    }
}

#[tokio::test]
async fn strip_prefix_sends_the_rest_of_the_path() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        r#"
        [[routes]]
        name = "stripped"
        path_prefix = "/api"
        strip_prefix = true
        upstream = "{0}"

        [[routes]]
        name = "based"
        path_prefix = "/legacy"
        strip_prefix = true
        upstream = "{0}/v1/"

        [[routes]]
        name = "kept"
        path_prefix = "/keep"
        upstream = "{0}"
        "#,
        up.url()
    ))
    .await;
    let cases = [
        ("/api/users?page=2", "/users?page=2"),
        ("/api", "/"),
        ("/api/", "/"),
        ("/legacy/items/7", "/v1/items/7"),
        ("/legacy", "/v1/"),
        ("/keep/me?a=b", "/keep/me?a=b"),
    ];
    for (sent, want) in cases {
        assert_eq!(get(proxy.url(sent)).send().await.echo().path, want, "request {sent}");
    }
}

#[tokio::test]
async fn upstreams_are_used_round_robin() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let proxy = Proxy::start(&format!(
        r#"
        [[routes]]
        name = "pool"
        upstreams = ["{}", "{}"]
        "#,
        a.url(),
        b.url()
    ))
    .await;
    let mut order = Vec::new();
    for _ in 0..6 {
        order.push(get(proxy.url("/x")).send().await.echo().upstream);
    }
    let first = order[0].clone();
    let second = if first == "a" { "b" } else { "a" };
    let want: Vec<&str> = (0..6).map(|i| if i % 2 == 0 { first.as_str() } else { second }).collect();
    assert_eq!(order, want);
}

#[tokio::test]
async fn no_matching_route_is_404_no_route() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        r#"
        [[routes]]
        name = "orders"
        host = "api.example.com"
        path_prefix = "/orders"
        upstream = "{}"
        "#,
        up.url()
    ))
    .await;
    let r = get(proxy.url("/orders/1")).send().await;
    r.assert_error(404, "no_route");
    let r = get(proxy.url("/elsewhere")).header("host", "api.example.com").send().await;
    r.assert_error(404, "no_route");
    assert!(r.header("x-request-id").is_some(), "proxy answers carry X-Request-Id too");
    assert!(up.seen().is_empty(), "nothing reached the upstream");
}

#[tokio::test]
async fn refused_upstream_is_502_bad_gateway() {
    let down = Refused::reserve();
    let proxy = Proxy::start(&format!(
        r#"
        [[routes]]
        name = "down"
        upstream = "{}"
        "#,
        down.url()
    ))
    .await;
    get(proxy.url("/x")).send().await.assert_error(502, "bad_gateway");
}

#[tokio::test]
async fn upstream_answering_garbage_is_502_bad_gateway() {
    let (url, _task) = garbage_upstream().await;
    let proxy = Proxy::start(&format!(
        r#"
        [[routes]]
        name = "junk"
        upstream = "{url}"
        "#
    ))
    .await;
    get(proxy.url("/x")).send().await.assert_error(502, "bad_gateway");
}

#[tokio::test]
async fn slow_upstream_is_504_gateway_timeout() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        r#"
        [[routes]]
        name = "slow"
        upstream = "{}"
        timeout = "300ms"
        "#,
        up.url()
    ))
    .await;
    let started = Instant::now();
    get(proxy.url("/slow?ms=5000")).send().await.assert_error(504, "gateway_timeout");
    assert!(started.elapsed() < Duration::from_secs(4), "answered after the route timeout, not the upstream");
    // A fast answer on the same route is unaffected.
    assert_eq!(get(proxy.url("/slow?ms=10")).send().await.echo().path, "/slow?ms=10");
}

#[tokio::test]
async fn upstream_that_never_accepts_is_504_after_connect_timeout() {
    let hole = Blackhole::start().await;
    let proxy = Proxy::start(&format!(
        r#"
        [[routes]]
        name = "unreachable"
        upstream = "{}"
        connect_timeout = "300ms"
        "#,
        hole.url()
    ))
    .await;
    let started = Instant::now();
    get(proxy.url("/x")).send().await.assert_error(504, "gateway_timeout");
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn body_over_max_request_body_is_413() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        r#"
        [[routes]]
        name = "small"
        upstream = "{}"
        max_request_body = "1KB"
        "#,
        up.url()
    ))
    .await;
    // Declared with Content-Length: refused before anything is sent upstream.
    post(proxy.url("/upload"), vec![b'x'; 1001]).send().await.assert_error(413, "body_too_large");
    assert!(up.seen().is_empty(), "an over-long declared body never reaches the upstream");
    // At the limit passes.
    assert_eq!(post(proxy.url("/upload"), vec![b'x'; 1000]).send().await.echo().body_len, 1000);
}

#[tokio::test]
async fn chunked_body_over_max_request_body_is_413() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        r#"
        [[routes]]
        name = "small"
        upstream = "{}"
        max_request_body = "1KB"
        "#,
        up.url()
    ))
    .await;
    // No Content-Length: the limit is enforced while streaming.
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        for _ in 0..4 {
            if tx.send(bytes::Bytes::from(vec![b'y'; 400])).await.is_err() {
                break;
            }
        }
    });
    let r = request("POST", proxy.url("/upload")).stream(body.boxed_body()).send().await;
    r.assert_error(413, "body_too_large");
}
