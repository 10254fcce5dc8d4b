//! A rolling restart that refuses nothing (SPEC §3 `[limits] drain_delay`, §4
//! "Operations"): a real HAProxy on `examples/rollout/haproxy.cfg` (health checks
//! on `/readyz`, `retries 0`, no `option redispatch`) in front of three real
//! instances sharing one `redis-server`. Under continuous bearer-authenticated
//! load, each instance in turn gets SIGTERM, exits, and is replaced on the same
//! ports. With `drain_delay` longer than HAProxy needs to see `/readyz` fail, no
//! connection is refused and every answer is 2xx: the balancer never retried,
//! so portcullis itself refused nothing. And for balancers that pin connections,
//! keep-alive answers during `drain_delay` say `Connection: close`.
//!
//! Needs Debian's `haproxy` and `redis-server`; without them it fails, it does
//! not skip.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::kit::upstream::{full, Body};
use crate::kit::*;

/// Longer than HAProxy needs to take an instance out: the example's
/// `inter 500ms` × `fall 2` + `timeout check 1s`.
const DRAIN_DELAY: Duration = Duration::from_secs(3);
/// How long HAProxy may take to mark a draining instance down: the same bound,
/// with what is left of the margin going to a loaded machine.
const NOTICED_WITHIN: Duration = Duration::from_millis(2500);
const CLIENTS: usize = 4;
/// The load stops by itself after this many requests per client, or this long.
const MAX_REQUESTS: usize = 20_000;
const MAX_LOAD_TIME: Duration = Duration::from_secs(150);
/// Requests each instance, the first and its replacement, must have served.
const SERVED: usize = 20;

fn config(idp: &TestIdp, up: &Upstream, redis_url: &str) -> String {
    Config::new()
        .table(idp.issuer_table())
        .table(Table::new("[state]").set("redis_url", redis_url).set("key_prefix", "rollout:"))
        .table(
            Table::new("[limits]")
                .set("drain_delay", format!("{}s", DRAIN_DELAY.as_secs()))
                .set("drain_timeout", "10s"),
        )
        .table(api_route(up))
        .toml()
}

/// What one load client saw.
#[derive(Default)]
struct Tally {
    /// 2xx answers, by the echo upstream (hence the instance slot) that gave them.
    ok: BTreeMap<String, usize>,
    /// Everything else: refused or reset connections, timeouts, non-2xx answers.
    failures: Vec<String>,
}

/// Loops bearer-authenticated requests through the balancer until `stop`, or
/// the bounds. Keep-alive clients reuse their connections to HAProxy; the others
/// open one per request. Every tenth request is slow, so some are in flight
/// whenever an instance starts draining.
async fn load(n: usize, base: String, token: String, keep_alive: bool, stop: Arc<AtomicBool>) -> Tally {
    let mut builder = Client::builder(TokioExecutor::new());
    if !keep_alive {
        builder.pool_max_idle_per_host(0);
    }
    let client = builder.build_http::<Body>();
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..MAX_REQUESTS {
        if stop.load(Ordering::Relaxed) || started.elapsed() > MAX_LOAD_TIME {
            break;
        }
        pace.tick().await;
        let path =
            if i % 10 == 0 { format!("/api/slow?ms=200&c={n}") } else { format!("/api/orders/{n}/{i}") };
        let req = http::Request::get(format!("{base}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .body(full(Bytes::new()))
            .expect("valid request");
        let exchange = async {
            let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
            Reply::read(resp).await
        };
        let at = started.elapsed();
        match tokio::time::timeout(DEADLINE, exchange).await {
            Ok(Ok(r)) if r.status.is_success() => *tally.ok.entry(r.echo().upstream).or_default() += 1,
            Ok(Ok(r)) => {
                let body: String = r.text().split_whitespace().collect::<Vec<_>>().join(" ");
                tally.failures.push(format!("{at:?} client {n} {path}: {} {body:.160}", r.status))
            }
            Ok(Err(e)) => tally.failures.push(format!("{at:?} client {n} {path}: {e}")),
            Err(_) => tally.failures.push(format!("{at:?} client {n} {path}: no answer within {DEADLINE:?}")),
        }
    }
    tally
}

/// Waits until `up` has seen `n` requests in all.
async fn served(up: &Upstream, n: usize, what: &str) {
    eventually(what, Duration::from_secs(30), || async { up.seen().len() >= n }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_behind_haproxy_without_retries_refuses_nothing() {
    let idp = TestIdp::start().await;
    let redis = RedisServer::start().await;
    let ups = [Upstream::named("app1").await, Upstream::named("app2").await, Upstream::named("app3").await];
    let configs: Vec<String> = ups.iter().map(|up| config(&idp, up, &redis.url())).collect();
    let env = [("PORTCULLIS_LOG", "info")];
    let mut instances = Vec::new();
    for c in &configs {
        // Ports outside the ephemeral range: the replacement binds them again.
        instances.push(ProxyProcess::start_picking(c, &env, stable_port).await);
    }
    for p in &instances {
        wait_ready(p).await;
    }
    let backends: Vec<(u16, u16)> = instances.iter().map(|p| (p.http.port(), p.admin.port())).collect();
    let lb = Haproxy::start(&backends).await;
    let token = idp.access_token("alice", 600);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| tokio::spawn(load(n, lb.url(""), token.clone(), n % 2 == 0, stop.clone())))
        .collect();

    let t0 = Instant::now();
    let mut events = Vec::new();
    let mut retired = Vec::new();
    let mut replaced_at = [0usize; 3];
    for i in 0..instances.len() {
        let name = format!("app{}", i + 1);
        served(&ups[i], SERVED, &format!("{name} serves {SERVED} requests before its restart")).await;
        let (http, admin) = (instances[i].http, instances[i].admin);

        // Taken before `kill` runs: the signal lands while it does.
        let term = Instant::now();
        instances[i].signal("TERM");
        events.push(format!("{:?} {name}: SIGTERM", t0.elapsed()));
        lb.wait_status(&name, "DOWN", DRAIN_DELAY + DEADLINE).await;
        let noticed = term.elapsed();
        events.push(format!("{:?} {name}: haproxy marks it down", t0.elapsed()));
        assert!(
            noticed < NOTICED_WITHIN,
            "haproxy took {noticed:?} to see {name}'s /readyz fail, too close to drain_delay {DRAIN_DELAY:?}"
        );
        let status = instances[i].wait_exit(DRAIN_DELAY + DEADLINE).await;
        events.push(format!("{:?} {name}: exited", t0.elapsed()));
        assert_eq!(status.code(), Some(0), "{name} log:\n{}", instances[i].log());
        assert!(
            term.elapsed() >= DRAIN_DELAY,
            "{name} exited after {:?}, before drain_delay",
            term.elapsed()
        );

        // Everything the upstream sees from now on comes through the replacement.
        replaced_at[i] = ups[i].seen().len();
        let replacement = ProxyProcess::start_on(http, admin, &configs[i], &env).await;
        retired.push(std::mem::replace(&mut instances[i], replacement));
        wait_ready(&instances[i]).await;
        lb.wait_status(&name, "UP", DEADLINE).await;
        events.push(format!("{:?} {name}: replacement up", t0.elapsed()));
    }
    for (i, up) in ups.iter().enumerate() {
        let what = format!("app{}'s replacement serves {SERVED} requests", i + 1);
        served(up, replaced_at[i] + SERVED, &what).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut ok = BTreeMap::<String, usize>::new();
    let mut failures = Vec::new();
    for c in clients {
        let t = c.await.expect("load client");
        for (k, v) in t.ok {
            *ok.entry(k).or_default() += v;
        }
        failures.extend(t.failures);
    }
    let total: usize = ok.values().sum();
    let context = || {
        let logs: Vec<String> = retired.iter().map(|p| p.log()).collect();
        format!(
            "answers: {ok:?}\ntimeline:\n{}\nhaproxy log:\n{}\nlogs of the stopped instances:\n{}",
            events.join("\n"),
            lb.log(),
            logs.join("\n---\n")
        )
    };
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the rollout:\n{}\n{}",
        failures.len(),
        total + failures.len(),
        failures.iter().take(30).cloned().collect::<Vec<_>>().join("\n"),
        context()
    );
    for (i, up) in ups.iter().enumerate() {
        let (first, second) = (replaced_at[i], up.seen().len() - replaced_at[i]);
        assert!(
            first >= SERVED && second >= SERVED,
            "app{}: {first} then {second} requests\n{}",
            i + 1,
            context()
        );
    }
    // HAProxy's own counters agree: no connection or response error on any
    // server, and no retry or redispatch that could have hidden one.
    for row in lb.stats().await.into_iter().filter(|r| r["pxname"] == "portcullis") {
        for counter in ["econ", "eresp", "wretr", "wredis", "hrsp_5xx"] {
            let v = row.get(counter).map(String::as_str).unwrap_or("");
            assert!(v.is_empty() || v == "0", "haproxy {} {counter} = {v}\n{}", row["svname"], context());
        }
    }
}

/// Behind a balancer that pins connections (a TCP balancer such as kube-proxy, or
/// HAProxy in `mode tcp`), a keep-alive client keeps its connection to a draining
/// instance. Answers during `drain_delay` say `Connection: close`, so the client
/// opens a new connection (which the balancer sends elsewhere) instead of having
/// its next request dropped unanswered when the drain closes the connection.
#[tokio::test]
async fn keep_alive_answers_during_drain_delay_say_connection_close() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let toml = Config::new()
        .table(idp.issuer_table())
        .table(Table::new("[limits]").set("drain_delay", "5s").set("drain_timeout", "5s"))
        .table(api_route(&up))
        .toml();
    let mut proxy = ProxyProcess::start(&toml).await;
    wait_ready(&proxy).await;
    let token = idp.access_token("alice", 600);
    let stream = tokio::net::TcpStream::connect(proxy.http).await.expect("connect");
    let (mut conn, driver) =
        hyper::client::conn::http1::handshake::<_, Body>(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
    let driver = tokio::spawn(driver);
    let ask = |path: &str| {
        http::Request::get(path)
            .header("host", "portcullis.test")
            .header("authorization", format!("Bearer {token}"))
            .body(full(Bytes::new()))
            .expect("valid request")
    };

    let before =
        Reply::read(conn.send_request(ask("/api/before")).await.expect("answer")).await.expect("body");
    assert_eq!(before.status, 200, "{}", before.text());
    assert_eq!(before.header("connection"), None, "keep-alive before the drain");

    proxy.signal("TERM");
    let term = Instant::now();
    eventually("readyz answers 503 after SIGTERM", DEADLINE, || async {
        try_send(get(format!("{}/readyz", proxy.admin_url()))).await.is_ok_and(|r| r.status == 503)
    })
    .await;
    conn.ready().await.expect("the connection is still open during drain_delay");
    let during =
        Reply::read(conn.send_request(ask("/api/during")).await.expect("answer")).await.expect("body");
    assert_eq!(during.status, 200, "{}", during.text());
    assert_eq!(during.header("connection"), Some("close"), "answers during drain_delay end keep-alive");
    // The proxy closes the connection after that answer, long before drain_delay ends…
    tokio::time::timeout(DEADLINE, driver).await.expect("connection closed").expect("driver task").ok();
    assert!(term.elapsed() < Duration::from_secs(5), "closed only by the drain");
    // …while new connections are still served.
    let again = get(proxy.url("/api/again")).bearer(&token).send().await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(proxy.wait_exit(DEADLINE).await.code(), Some(0), "log:\n{}", proxy.log());
}
