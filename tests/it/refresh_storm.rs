//! Refresh storms (SPEC §4 "Concurrency", §5): many concurrent requests holding
//! the same refresh token share one call to `token_url`, whatever the outcome,
//! and never trip the server's reuse detection.

use std::time::Duration;

use crate::kit::session::*;
use crate::kit::*;

const STORM: usize = 100;

/// A logged-in browser whose access token needs refresh on every request
/// (ttl 10 s <= refresh_ahead 30 s); tokens minted afterwards live 300 s.
async fn storm_setup() -> (TestIdp, Upstream, Proxy, Jar) {
    let (idp, up, proxy) = setup(&Opts::default()).await;
    idp.set_access_ttl(10);
    let (_, jar) = login(&proxy, "alice").await;
    idp.set_access_ttl(300);
    assert_eq!(token_calls(&idp), 0);
    (idp, up, proxy, jar)
}

/// Sends `n` requests at once, half of them `POST refresh_path` when `mixed`;
/// each answer comes with whether it was the refresh endpoint's.
async fn storm(proxy: &Proxy, jar: &Jar, n: usize, mixed: bool) -> Vec<(bool, Reply)> {
    let endpoint = |i: usize| mixed && i % 2 == 1;
    let reqs = (0..n)
        .map(|i| {
            if endpoint(i) {
                jar.on(post(proxy.url("/auth/refresh"), "")).header("origin", own_origin(proxy))
            } else {
                jar.on(get(proxy.url(&format!("/api/orders/{i}"))))
            }
        })
        .collect();
    send_together(reqs).await.into_iter().enumerate().map(|(i, r)| (endpoint(i), r)).collect()
}

async fn assert_one_refresh_for_all(idp: &TestIdp, proxy: &Proxy, jar: &Jar, replies: &[(bool, Reply)]) {
    let mut tokens = std::collections::HashSet::new();
    for (endpoint, r) in replies {
        assert_eq!(r.status, 200, "every request of the storm succeeds: {}", r.text());
        assert_set(r, ACCESS);
        assert_set(r, REFRESH);
        if !endpoint {
            tokens.insert(forwarded_token(r));
        }
    }
    assert_eq!(token_calls(idp), 1, "exactly one call to the token endpoint");
    assert_eq!(tokens.len(), 1, "every request forwarded the one new token");
    let rt = last_refresh_token(idp);
    assert!(!idp.family_revoked(&rt), "the refresh-token family is not revoked");
    assert_eq!(refreshes(proxy, "rotated").await, 1);
    let grace = refreshes(proxy, "grace").await;
    assert!((1..replies.len() as u64).contains(&grace), "the others shared it: grace = {grace}");

    // Any answer's cookies carry the session on (the new token lives 300 s: no call).
    let next = jar.clone().after(&replies[replies.len() / 2].1);
    let r = api(proxy, &next).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(token_calls(idp), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_while_the_refresh_is_in_flight_makes_one_call() {
    let (idp, _up, proxy, jar) = storm_setup().await;
    // The server takes a while, so the storm piles up behind the one call.
    idp.set_outage(Outage::Slow(Duration::from_millis(500)));
    let replies = storm(&proxy, &jar, STORM, false).await;
    assert_one_refresh_for_all(&idp, &proxy, &jar, &replies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_against_a_fast_server_makes_one_call() {
    let (idp, _up, proxy, jar) = storm_setup().await;
    let replies = storm(&proxy, &jar, STORM, false).await;
    assert_one_refresh_for_all(&idp, &proxy, &jar, &replies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_mixing_api_calls_and_the_refresh_endpoint_makes_one_call() {
    let (idp, _up, proxy, jar) = storm_setup().await;
    idp.set_outage(Outage::Slow(Duration::from_millis(300)));
    let replies = storm(&proxy, &jar, STORM, true).await;
    for (endpoint, r) in &replies {
        if *endpoint {
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.json(), serde_json::json!({"expires_in": 300}));
        }
    }
    assert_one_refresh_for_all(&idp, &proxy, &jar, &replies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_on_a_dead_session_makes_one_call_and_ends_it_everywhere() {
    let (idp, _up, proxy, jar) = storm_setup().await;
    // The session ended at the server: it answers invalid_grant.
    idp.revoke_all_sessions();
    let replies = storm(&proxy, &jar, STORM, false).await;
    for (_, r) in &replies {
        r.assert_error(401, "session_expired");
        assert_cleared(r, ACCESS);
        assert_cleared(r, REFRESH);
    }
    assert_eq!(token_calls(&idp), 1, "the invalid_grant outcome is shared too");
    assert_eq!(refreshes(&proxy, "invalid_grant").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_during_an_outage_keeps_every_cookie_and_the_session() {
    let (idp, _up, proxy, jar) = storm_setup().await;
    let jar = jar.without(ACCESS); // no still-valid token to fall back on
    idp.set_outage(Outage::ServerError);
    let replies = storm(&proxy, &jar, 50, false).await;
    for (_, r) in &replies {
        r.assert_error(503, "auth_server_unavailable");
        assert!(r.header("retry-after").is_some());
        assert!(set_cookies(r).is_empty(), "{:?}", set_cookies(r));
    }
    idp.set_outage(Outage::None);
    let before = token_calls(&idp);
    let replies = storm(&proxy, &jar, 50, false).await;
    for (_, r) in &replies {
        assert_eq!(r.status, 200, "the session survived the outage: {}", r.text());
    }
    assert_eq!(token_calls(&idp), before + 1);
    assert!(!idp.family_revoked(&last_refresh_token(&idp)));
}
