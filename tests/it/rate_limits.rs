//! `[[rate_limits]]` (SPEC §3, §4 "Rate limits"): token buckets per key value, `429
//! rate_limited` with `Retry-After`, checked before the upstream (and, for
//! `client_ip` / `header:` keys, before the authorization server) sees anything.

use std::sync::atomic::Ordering;

use crate::kit::idp::{self, TestIdp};
use crate::kit::session as kit;
use crate::kit::*;

async fn proxy_with_limits(idp: &TestIdp, up: &Upstream, limits: &str) -> Proxy {
    let toml = format!(
        r#"
[[issuers]]
name = "main"
issuer = "{iss}"
jwks_url = "{jwks}"

{limits}

[[routes]]
name = "api"
path_prefix = "/api"
upstream = "{up}"
issuer = "main"
audiences = ["{aud}"]

[[routes]]
name = "open"
path_prefix = "/open"
upstream = "{up}"
"#,
        iss = idp.issuer(),
        jwks = idp.jwks_url(),
        up = up.url(),
        aud = idp::AUDIENCE,
    );
    let proxy = Proxy::start(&toml).await;
    wait_ready(&proxy).await;
    proxy
}

#[tokio::test]
async fn a_burst_over_the_bucket_gets_429_with_retry_after_and_never_reaches_the_upstream() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let proxy = proxy_with_limits(
        &idp,
        &up,
        "[[rate_limits]]\nname = \"per-user\"\nkey = \"sub\"\nrate = \"1/m\"\nburst = 3\nroutes = [\"api\"]",
    )
    .await;
    let alice = idp.access_token("alice", 300);
    let bob = idp.access_token("bob", 300);
    for _ in 0..3 {
        assert_eq!(
            get(proxy.url("/api/x")).header("authorization", format!("Bearer {alice}")).send().await.status,
            200
        );
    }
    let refused = get(proxy.url("/api/x")).header("authorization", format!("Bearer {alice}")).send().await;
    refused.assert_error(429, "rate_limited");
    let retry: u64 = refused.header("retry-after").expect("Retry-After").parse().expect("seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(up.seen().len(), 3, "the refused request reached the upstream");
    // Another subject has its own bucket; an unlimited route is not limited.
    assert_eq!(
        get(proxy.url("/api/x")).header("authorization", format!("Bearer {bob}")).send().await.status,
        200
    );
    assert_eq!(
        get(proxy.url("/open/x")).header("authorization", format!("Bearer {alice}")).send().await.status,
        200
    );
    assert_eq!(metric(&proxy, "portcullis_rate_limited_total{limit=\"per-user\"}").await, 1.0);
}

#[tokio::test]
async fn buckets_refill_at_the_rate() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let proxy = proxy_with_limits(
        &idp,
        &up,
        "[[rate_limits]]\nname = \"ip\"\nkey = \"client_ip\"\nrate = \"5/s\"\nburst = 1",
    )
    .await;
    assert_eq!(get(proxy.url("/open/a")).send().await.status, 200);
    get(proxy.url("/open/b")).send().await.assert_error(429, "rate_limited");
    // One token comes back every 200 ms.
    eventually("a token is back after a fifth of a second", DEADLINE, || async {
        get(proxy.url("/open/c")).send().await.status == 200
    })
    .await;
}

#[tokio::test]
async fn a_header_key_limits_only_requests_that_carry_the_header() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let proxy = proxy_with_limits(
        &idp,
        &up,
        "[[rate_limits]]\nname = \"tenant\"\nkey = \"header:x-tenant\"\nrate = \"1/h\"\nburst = 1\nroutes = [\"open\"]",
    )
    .await;
    assert_eq!(get(proxy.url("/open/1")).header("x-tenant", "acme").send().await.status, 200);
    get(proxy.url("/open/2")).header("x-tenant", "acme").send().await.assert_error(429, "rate_limited");
    assert_eq!(get(proxy.url("/open/3")).header("x-tenant", "globex").send().await.status, 200);
    for i in 0..5 {
        assert_eq!(
            get(proxy.url(&format!("/open/none-{i}"))).send().await.status,
            200,
            "no header, no limit"
        );
    }
}

#[tokio::test]
async fn a_client_ip_limit_on_login_stops_a_flood_before_the_login_url_is_called() {
    let o = kit::Opts {
        routes: "[[rate_limits]]\nname = \"login\"\nkey = \"client_ip\"\nrate = \"1/m\"\nburst = 2\nroutes = [\"@login\"]\n"
            .to_owned(),
        ..Default::default()
    };
    let (idp, _up, proxy) = kit::setup(&o).await;
    let mut limited = 0;
    for _ in 0..20 {
        let reply = post(proxy.url("/auth/login"), kit::login_body("alice", "wrong guess"))
            .header("content-type", "application/json")
            .header("origin", kit::own_origin(&proxy))
            .send()
            .await;
        if reply.status == 429 {
            limited += 1;
            reply.assert_error(429, "rate_limited");
        }
    }
    assert_eq!(limited, 18);
    assert_eq!(idp.login_calls.load(Ordering::SeqCst), 2, "the login flood reached login_url");
}

#[tokio::test]
async fn a_rate_limit_naming_an_unknown_route_is_refused_with_its_line() {
    let dir = TempDir::new();
    let file = dir.write(
        "p.toml",
        "[listen]\nhttp = \"127.0.0.1:0\"\n\n[[rate_limits]]\nname = \"x\"\nkey = \"client_ip\"\nrate = \"10/s\"\nroutes = [\"nope\"]\n\n[[routes]]\nname = \"api\"\nupstream = \"http://127.0.0.1:9\"\n",
    );
    let out = portcullis(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains(":8: rate_limits[0].routes[0]: unknown route \"nope\""), "{}", out.stderr);
}
