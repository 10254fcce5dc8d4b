//! Hot reload of the real binary: SIGHUP and file changes, a broken file on
//! reload, in-flight requests finishing on their configuration, none lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::kit::*;

fn two_routes(up: &Upstream, second: &str) -> String {
    format!(
        r#"
[[routes]]
name = "a"
path_prefix = "/a"
upstream = "{up}"

[[routes]]
name = "{second}"
path_prefix = "/{second}"
upstream = "{up}"
"#,
        up = up.url()
    )
}

#[tokio::test]
async fn sighup_adds_and_removes_routes_while_a_slow_request_finishes_on_the_old_config() {
    let up = Upstream::start().await;
    let proxy = ProxyProcess::start(&two_routes(&up, "b")).await;
    assert_eq!(get(proxy.url("/b/x")).send().await.status, 200);
    let slow = tokio::spawn(get(proxy.url("/b/slow?ms=1500")).send());
    up.wait_for_requests(2).await;
    proxy.rewrite_config(&two_routes(&up, "c"));
    proxy.signal("HUP");
    eventually("route c appears", DEADLINE, || async { get(proxy.url("/c/x")).send().await.status == 200 })
        .await;
    get(proxy.url("/b/x")).send().await.assert_error(404, "no_route");
    let reply = slow.await.unwrap();
    assert_eq!(reply.echo().path, "/b/slow?ms=1500", "the in-flight request finished on the old route");
    assert!(metric(&proxy, "portcullis_config_reloads_total{outcome=\"ok\"}").await >= 1.0);
}

#[tokio::test]
async fn a_broken_file_on_reload_is_rejected_and_the_running_config_stays() {
    let up = Upstream::start().await;
    let proxy = ProxyProcess::start(&two_routes(&up, "b")).await;
    let broken = format!("[[routes]]\nname = \"a\"\nupstrem = \"{}\"\n", up.url());
    proxy.rewrite_config(&broken);
    proxy.signal("HUP");
    eventually("the failed reload is counted", DEADLINE, || async {
        metric(&proxy, "portcullis_config_reloads_total{outcome=\"error\"}").await >= 1.0
    })
    .await;
    // Logs are written by a background thread: the line may follow the counter.
    eventually("the rejection is logged with its key", DEADLINE, || async {
        proxy.log().contains("routes[0].upstrem: unknown key")
    })
    .await;
    assert_eq!(get(proxy.url("/a/x")).send().await.status, 200);
    assert_eq!(get(proxy.url("/b/x")).send().await.status, 200);
}

#[tokio::test]
async fn a_changed_file_is_picked_up_without_a_signal() {
    let up = Upstream::start().await;
    let proxy = ProxyProcess::start(&two_routes(&up, "b")).await;
    proxy.rewrite_config(&two_routes(&up, "d"));
    eventually("route d appears", DEADLINE, || async { get(proxy.url("/d/x")).send().await.status == 200 })
        .await;
    get(proxy.url("/b/x")).send().await.assert_error(404, "no_route");
}

#[tokio::test]
async fn no_request_is_lost_across_reloads() {
    let up = Upstream::start().await;
    let proxy = ProxyProcess::start(&two_routes(&up, "b")).await;
    let failures = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (failures, sent, stop) = (failures.clone(), sent.clone(), stop.clone());
        let url = proxy.url("/a/x");
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match try_send(get(&url)).await {
                    Ok(r) if r.status == 200 => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for i in 0..5 {
        proxy.rewrite_config(&two_routes(&up, if i % 2 == 0 { "c" } else { "b" }));
        proxy.signal("HUP");
        let want = i + 1;
        eventually("the reload is applied", DEADLINE, || async {
            metric(&proxy, "portcullis_config_reloads_total{outcome=\"ok\"}").await >= f64::from(want)
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert!(sent.load(Ordering::Relaxed) > 0);
    assert_eq!(failures.load(Ordering::Relaxed), 0, "requests failed across reloads");
}
