//! An issuer's keys over time (SPEC §4 JWKS, Operations): not ready until the first
//! JWKS arrives (`/readyz` 503, routes `keys_unavailable`), rotation, the unknown-`kid`
//! refetch and its rate limit, and the last good keys surviving a failing JWKS endpoint.
//! Every wait polls with a deadline; nothing sleeps and hopes.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use crate::kit::idp::b64;
use crate::kit::*;

// === setup ===

/// An issuer named "main" (its `iss` is the test IdP's) fetching `jwks_url`, and a
/// required route `/orders` with X-User-Id = sub. `refresh`: `jwks_refresh`, or the default.
async fn proxy(idp: &TestIdp, jwks_url: &str, refresh: Option<&str>, up: &Upstream) -> Proxy {
    let mut issuer =
        idp.issuer_table().set("jwks_url", jwks_url).set("algorithms", vec!["RS256", "ES256", "EdDSA"]);
    if let Some(r) = refresh {
        issuer = issuer.set("jwks_refresh", r);
    }
    let route = format!(
        r#"
[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "{up}"
issuer = "main"
audiences = ["orders-api"]
[routes.identity_headers]
"X-User-Id" = "sub"
"#,
        up = up.url()
    );
    Proxy::start(&Config::new().table(issuer).raw(&route).toml()).await
}

async fn call(proxy: &Proxy, token: &str) -> Reply {
    get(proxy.url("/orders/1")).bearer(token).send().await
}

async fn accepted(proxy: &Proxy, token: &str) -> bool {
    call(proxy, token).await.status == 200
}

const FETCH_OK: &str = r#"portcullis_jwks_fetches_total{issuer="main",outcome="ok"}"#;
const FETCH_ERROR: &str = r#"portcullis_jwks_fetches_total{issuer="main",outcome="error"}"#;

/// Waits until the proxy has counted one more failed JWKS fetch than now.
async fn wait_for_another_failed_fetch(proxy: &Proxy, what: &str) {
    let before = metric(proxy, FETCH_ERROR).await;
    eventually(what, DEADLINE, || async { metric(proxy, FETCH_ERROR).await > before }).await;
}

fn fetches(idp: &TestIdp) -> usize {
    idp.jwks_fetches.load(Ordering::SeqCst)
}

// === readiness ===

#[tokio::test]
async fn readyz_is_503_and_routes_answer_keys_unavailable_until_the_jwks_loads() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    idp.set_jwks_answer(JwksAnswer::Unavailable);
    // Default jwks_refresh: the first retry still comes within a few seconds (SPEC: at most 5 s).
    let proxy = proxy(&idp, &idp.jwks_url(), None, &up).await;
    let token = sign("rsa1", &idp.claims("alice", 300));

    eventually("a first JWKS fetch was attempted", DEADLINE, || async { fetches(&idp) >= 1 }).await;
    let ready = readyz(&proxy).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("main"), "/readyz names the waiting issuer: {}", ready.text());
    let healthz = get(format!("{}/healthz", proxy.admin_url())).send().await;
    assert_eq!(healthz.status, 200, "the proxy is alive while it waits for keys");
    let reply = call(&proxy, &token).await;
    reply.assert_error(503, "keys_unavailable");
    assert!(reply.header("retry-after").is_some(), "keys_unavailable carries Retry-After");
    assert_eq!(up.seen(), Vec::new());
    eventually("the failed fetch is counted", DEADLINE, || async {
        metric(&proxy, FETCH_ERROR).await >= 1.0
    })
    .await;
    let rejected = metric(&proxy, r#"portcullis_auth_rejections_total{reason="keys_unavailable"}"#).await;
    assert!(rejected >= 1.0, "keys_unavailable rejections are counted");

    idp.set_keys(&["rsa1"]);
    idp.set_jwks_answer(JwksAnswer::Keys);
    wait_ready(&proxy).await;
    assert_eq!(call(&proxy, &token).await.echo().header("x-user-id"), Some("alice"));
    assert!(metric(&proxy, FETCH_OK).await >= 1.0, "the good fetch is counted");
}

#[tokio::test]
async fn jwks_url_refusing_connections_at_start_is_not_fatal() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    // A port that nothing listens on yet; a JWKS server binds it later.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = proxy(&idp, &format!("http://{addr}/jwks.json"), Some("2s"), &up).await;
    let token = sign("ec1", &idp.claims("bob", 300));

    eventually("a refused JWKS fetch is counted", DEADLINE, || async {
        metric(&proxy, FETCH_ERROR).await >= 1.0
    })
    .await;
    assert_eq!(readyz(&proxy).await.status, 503);
    call(&proxy, &token).await.assert_error(503, "keys_unavailable");

    let keys = TestIdp::start_on(addr).await;
    keys.set_keys(&["rsa1", "ec1"]);
    wait_ready(&proxy).await;
    assert_eq!(call(&proxy, &token).await.echo().header("x-user-id"), Some("bob"));
}

// === rotation ===

#[tokio::test]
async fn rotated_keys_are_picked_up_and_removed_keys_stop_working() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let proxy = proxy(&idp, &idp.jwks_url(), Some("2s"), &up).await;
    wait_ready(&proxy).await;
    let old = sign("rsa1", &idp.claims("alice", 300));
    assert!(accepted(&proxy, &old).await, "rsa1 is published");
    assert!(accepted(&proxy, &old).await, "…and the token is now in the verified-token cache");
    let new = sign("rsa2", &idp.claims("alice", 300));
    assert_eq!(call(&proxy, &new).await.status, 401, "rsa2 is not published yet");

    // Overlap: both keys published.
    idp.set_keys(&["rsa1", "rsa2"]);
    eventually("a token signed by the new key rsa2 is accepted", DEADLINE, || accepted(&proxy, &new)).await;
    assert!(accepted(&proxy, &old).await, "rsa1 is still published");

    // rsa1 retired.
    idp.set_keys(&["rsa2"]);
    eventually("a token signed by the retired key rsa1 is rejected", DEADLINE, || async {
        call(&proxy, &old).await.status == 401
    })
    .await;
    call(&proxy, &old).await.assert_error(401, "invalid_token");
    let fresh_old = sign("rsa1", &idp.claims("carol", 300));
    call(&proxy, &fresh_old).await.assert_error(401, "invalid_token");
    assert!(accepted(&proxy, &new).await, "rsa2 keeps working");
}

#[tokio::test]
async fn unknown_kid_triggers_a_refetch() {
    let idp = TestIdp::start().await;
    // max-age pushes the background refresh an hour away: only the unknown-kid
    // refetch (spaced by jwks_refresh/10 = 1 s) can bring in the new key.
    idp.set_jwks_cache_control(Some("max-age=3600"));
    let up = Upstream::start().await;
    let proxy = proxy(&idp, &idp.jwks_url(), Some("10s"), &up).await;
    wait_ready(&proxy).await;
    let before = fetches(&idp);

    idp.set_keys(&["rsa1", "rsa2"]);
    let new = sign("rsa2", &idp.claims("dave", 300));
    eventually("the unknown kid rsa2 is fetched and accepted", DEADLINE, || accepted(&proxy, &new)).await;
    assert!(fetches(&idp) > before, "the JWKS was fetched again");
    assert_eq!(call(&proxy, &new).await.echo().header("x-user-id"), Some("dave"));
}

#[tokio::test]
async fn flood_of_random_kids_is_rate_limited() {
    let idp = TestIdp::start().await;
    idp.set_jwks_cache_control(Some("max-age=3600"));
    let up = Upstream::start().await;
    // Unknown-kid refetches are spaced by jwks_refresh/10 = 1 s; no background refresh.
    let proxy = proxy(&idp, &idp.jwks_url(), Some("10s"), &up).await;
    wait_ready(&proxy).await;

    let claims = b64(idp.claims("mallory", 300).to_string().as_bytes());
    let sig = b64(&[0x5a; 256]);
    let tokens: Vec<String> = (0..200)
        .map(|i| {
            let kid = format!("attacker-{i}-{:x}", i * 7919 + 13);
            format!("{}.{claims}.{sig}", b64(json!({"alg": "RS256", "kid": kid}).to_string().as_bytes()))
        })
        .collect();

    // The rate limiter is a clock: let one spacing pass since the start-up fetch so the
    // flood can open a refetch window (a time precondition, not a wait for an event).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = fetches(&idp);
    let started = Instant::now();
    // 50 in flight at a time: a burst beyond the listener's accept backlog would only
    // measure SYN retransmissions.
    let replies: Vec<Reply> = futures_util::stream::iter(tokens.iter().map(|t| call(&proxy, t)))
        .buffer_unordered(50)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let fetches = fetches(&idp) - before;
    for reply in &replies {
        reply.assert_error(401, "invalid_token");
    }
    // At most one refetch per spacing (1 s) the flood lasted, plus one for the window
    // it started in: 2 for a flood under a second.
    let allowed = 2 + elapsed.as_secs() as usize;
    assert!(
        fetches <= allowed,
        "{fetches} JWKS fetches for 200 random kids in {elapsed:?} (allowed {allowed})"
    );
    assert_eq!(up.seen(), Vec::new());

    // The rate limit is a spacing, not a lockout: a real new key still arrives.
    idp.set_keys(&["rsa1", "rsa2"]);
    let new = sign("rsa2", &idp.claims("erin", 300));
    eventually("a genuinely new kid is fetched after the flood", DEADLINE, || accepted(&proxy, &new)).await;
}

#[tokio::test]
async fn jwks_max_age_shortens_the_background_refresh() {
    let idp = TestIdp::start().await;
    idp.set_jwks_cache_control(Some("max-age=1"));
    let up = Upstream::start().await;
    // Without max-age, three more fetches would take 30 s.
    let proxy = proxy(&idp, &idp.jwks_url(), Some("10s"), &up).await;
    wait_ready(&proxy).await;
    let before = fetches(&idp);
    eventually("three background refreshes at max-age=1", DEADLINE, || async { fetches(&idp) >= before + 3 })
        .await;
}

// === failures keep the last good keys ===

#[tokio::test]
async fn failing_jwks_endpoint_keeps_the_last_good_keys() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    idp.set_keys(&["rsa1", "ed1"]);
    let proxy = proxy(&idp, &idp.jwks_url(), Some("2s"), &up).await;
    wait_ready(&proxy).await;
    assert!(accepted(&proxy, &sign("rsa1", &idp.claims("alice", 300))).await);

    for mode in [JwksAnswer::ServerError, JwksAnswer::Unavailable, JwksAnswer::Garbage, JwksAnswer::NoKeys] {
        idp.set_jwks_answer(mode);
        wait_for_another_failed_fetch(&proxy, &format!("a refresh fails with {mode:?}")).await;
        // A token never seen before, so the verified-token cache cannot answer for it.
        let sub = format!("user-during-{mode:?}");
        let reply = call(&proxy, &sign("ed1", &idp.claims(&sub, 300))).await;
        assert_eq!(reply.echo().header("x-user-id"), Some(sub.as_str()), "{mode:?}: last good keys used");
        assert_eq!(readyz(&proxy).await.status, 200, "{mode:?}: still ready");
    }

    idp.set_jwks_answer(JwksAnswer::Keys);
    let ok = metric(&proxy, FETCH_OK).await;
    eventually("the endpoint recovers", DEADLINE, || async { metric(&proxy, FETCH_OK).await > ok }).await;
    assert!(accepted(&proxy, &sign("rsa1", &idp.claims("bob", 300))).await);
}

#[tokio::test]
async fn stopped_jwks_server_keeps_the_last_good_keys() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    idp.set_keys(&["rsa1"]);
    let proxy = proxy(&idp, &idp.jwks_url(), Some("2s"), &up).await;
    wait_ready(&proxy).await;

    idp.stop();
    wait_for_another_failed_fetch(&proxy, "a refresh fails against the stopped server").await;
    let reply = call(&proxy, &sign("rsa1", &idp.claims("carol", 300))).await;
    assert_eq!(reply.echo().header("x-user-id"), Some("carol"));
    // An unknown kid during the outage is refused (not 503), and the keys stay.
    let stranger = sign("rsa2", &idp.claims("mallory", 300));
    call(&proxy, &stranger).await.assert_error(401, "invalid_token");
    assert!(accepted(&proxy, &sign("rsa1", &idp.claims("dave", 300))).await);
    assert_eq!(readyz(&proxy).await.status, 200);
}

#[tokio::test]
async fn empty_key_set_from_the_idp_keeps_the_last_good_keys() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let proxy = proxy(&idp, &idp.jwks_url(), Some("2s"), &up).await;
    wait_ready(&proxy).await;
    idp.set_keys(&[]);
    wait_for_another_failed_fetch(&proxy, "an empty JWKS is rejected").await;
    assert!(accepted(&proxy, &sign("ec1", &idp.claims("erin", 300))).await, "last good keys kept");
}
