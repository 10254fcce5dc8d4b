//! Transparent refresh, the refresh endpoint and refresh outcomes (SPEC §4
//! "Transparent refresh", "Concurrency" (grace), "Refresh outcomes",
//! "Endpoints"), client authentication at the token endpoint (SPEC §3
//! `[auth_server] client_auth`), and `absolute_timeout`.

use std::time::Duration;

use crate::kit::session::*;
use crate::kit::*;
use base64::Engine as _;

/// A session whose access token needs refresh on every request (ttl 10 s <= refresh_ahead 30 s).
async fn short_session(o: &Opts) -> (TestIdp, Upstream, Proxy, Jar) {
    let (idp, up, proxy) = setup(o).await;
    idp.set_access_ttl(10);
    let (_, jar) = login(&proxy, "alice").await;
    (idp, up, proxy, jar)
}

#[tokio::test]
async fn expiring_access_token_is_refreshed_transparently() {
    let (idp, _up, proxy, jar) = short_session(&Opts::default()).await;
    idp.set_access_ttl(300);
    assert_eq!(token_calls(&idp), 0, "login passthrough does not use the token endpoint");

    let r = api(&proxy, &jar).await;
    let token = forwarded_token(&r);
    let c = claims(&token);
    assert_eq!(c["sub"], "alice");
    assert!(c["exp"].as_i64().unwrap() >= idp::now() + 200, "the upstream got the NEW token (ttl 300): {c}");
    assert_eq!(token_calls(&idp), 1);
    let form = idp.last_token_form();
    assert_eq!(form.get("grant_type").map(String::as_str), Some("refresh_token"));
    let access = assert_set(&r, ACCESS);
    let refresh = assert_set(&r, REFRESH);
    assert_ne!(Some(access.value.as_str()), jar.get(ACCESS));
    assert_ne!(Some(refresh.value.as_str()), jar.get(REFRESH), "a new refresh cookie is written");
    assert!(!access.value.contains(&token) && !access.value.contains(token.split('.').nth(1).unwrap()));

    // The new cookies carry a fresh token: no further refresh, same token upstream.
    let jar = jar.after(&r);
    let r2 = api(&proxy, &jar).await;
    assert_eq!(forwarded_token(&r2), token);
    assert!(set_cookies(&r2).is_empty(), "no refresh needed: {:?}", set_cookies(&r2));
    assert_eq!(token_calls(&idp), 1);
    assert_eq!(refreshes(&proxy, "rotated").await, 1);
}

#[tokio::test]
async fn expired_access_token_is_refreshed() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    // Expired well beyond the default 30 s leeway.
    idp.set_access_ttl(-120);
    let (_, jar) = login(&proxy, "alice").await;
    idp.set_access_ttl(300);
    let r = api(&proxy, &jar).await;
    assert!(claims(&forwarded_token(&r))["exp"].as_i64().unwrap() > idp::now());
    assert_eq!(token_calls(&idp), 1);
    assert_set(&r, ACCESS);
    assert_set(&r, REFRESH);
}

#[tokio::test]
async fn missing_access_cookie_with_a_refresh_cookie_is_refreshed() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    let (_, jar) = login(&proxy, "alice").await; // ttl 300: no refresh needed
    let jar = jar.without(ACCESS);
    let r = api(&proxy, &jar).await;
    assert_eq!(claims(&forwarded_token(&r))["sub"], "alice");
    assert_eq!(token_calls(&idp), 1);
    assert_set(&r, ACCESS);
    assert_set(&r, REFRESH);
}

#[tokio::test]
async fn refreshed_cookies_go_out_even_when_the_upstream_fails() {
    let down = Refused::reserve();
    let routes = format!(
        "[[routes]]\nname = \"down\"\npath_prefix = \"/down\"\nupstream = \"{}\"\n\
         auth = \"required\"\nissuer = \"main\"\naudiences = [\"orders-api\"]",
        down.url()
    );
    let (idp, _up, proxy, jar) = short_session(&Opts { routes, ..Opts::default() }).await;
    // The old refresh token is rotated away by now: the browser must get the new one.
    let r = jar.on(get(proxy.url("/down/orders"))).send().await;
    r.assert_error(502, "bad_gateway");
    assert_eq!(token_calls(&idp), 1);
    assert_set(&r, ACCESS);
    assert_set(&r, REFRESH);
    let jar = jar.after(&r);
    assert_eq!(api(&proxy, &jar).await.status, 200);
    assert!(!idp.family_revoked(&last_refresh_token(&idp)));
}

#[tokio::test]
async fn without_rotation_the_same_refresh_token_keeps_working() {
    // A short grace, so the next needed refresh is not answered from it.
    let o = Opts { session: "refresh_grace = \"1s\"".into(), ..Opts::default() };
    let (idp, _up, proxy, jar) = short_session(&o).await;
    idp.set_rotation(false);
    let r = api(&proxy, &jar).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_set(&r, ACCESS);
    let rt = last_refresh_token(&idp);
    let jar = jar.after(&r);
    let r = poll_until(
        "a second refresh with the unrotated token",
        DEADLINE,
        || jar.on(get(proxy.url("/api/orders"))),
        |r| r.status != 200 || token_calls(&idp) >= 2,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(token_calls(&idp), 2);
    assert_eq!(last_refresh_token(&idp), rt, "the unrotated refresh token is kept in the cookie");
    assert!(!idp.family_revoked(&rt));
    assert_eq!(refreshes(&proxy, "ok").await, 2);
    assert_eq!(refreshes(&proxy, "rotated").await, 0);
}

#[tokio::test]
async fn old_refresh_cookie_within_grace_gets_the_new_pair_without_a_second_call() {
    let (idp, _up, proxy, old) = short_session(&Opts::default()).await;
    let first = api(&proxy, &old).await;
    let new_token = forwarded_token(&first);
    let rt1 = last_refresh_token(&idp);
    assert_eq!(token_calls(&idp), 1);

    // Another tab still holds the pre-rotation cookies.
    let again = api(&proxy, &old).await;
    assert_eq!(forwarded_token(&again), new_token, "the grace answer is the pair of the first refresh");
    assert_eq!(token_calls(&idp), 1, "no second call with the rotated token");
    assert!(!idp.family_revoked(&rt1), "reuse detection was not tripped");
    assert_set(&again, ACCESS);
    assert_set(&again, REFRESH);
    assert!(refreshes(&proxy, "grace").await >= 1);

    // The cookies handed out in grace hold the rotated refresh token: both tabs go on.
    for (tab, reply) in [("first", &first), ("second", &again)] {
        let jar = old.clone().after(reply);
        let before = token_calls(&idp);
        let r = api(&proxy, &jar).await;
        assert_eq!(r.status, 200, "{tab} tab: {}", r.text());
        assert_ne!(last_refresh_token(&idp), rt1, "{tab} tab: the rotated refresh token is used");
        assert!(token_calls(&idp) <= before + 1);
    }
    assert!(!idp.family_revoked(&rt1));
}

#[tokio::test]
async fn rotated_refresh_token_after_the_grace_is_reuse_and_ends_the_session() {
    let o = Opts { session: "refresh_grace = \"1s\"".into(), ..Opts::default() };
    let (idp, _up, proxy, old) = short_session(&o).await;
    let first = api(&proxy, &old).await;
    assert_eq!(first.status, 200);
    let rt1 = last_refresh_token(&idp);
    let new = old.clone().after(&first);

    // Within the grace the old cookie still works; after it the proxy asks the
    // server, which sees the rotated token again and ends the whole family.
    let r = poll_until(
        "the grace for the rotated token ends",
        DEADLINE,
        || old.on(get(proxy.url("/api/orders"))),
        |r| r.status != 200,
    )
    .await;
    r.assert_error(401, "session_expired");
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"portcullis\", error=\"invalid_token\""));
    assert_cleared(&r, ACCESS);
    assert_cleared(&r, REFRESH);
    assert!(idp.family_revoked(&rt1));
    // The server revoked the family, so the newer cookies are dead as well.
    api(&proxy, &new).await.assert_error(401, "session_expired");
}

#[tokio::test]
async fn invalid_grant_ends_the_session_and_clears_both_cookies() {
    let (idp, _up, proxy, jar) = short_session(&Opts::default()).await;
    // The session ends at the server (an administrator, or another device's logout).
    idp.revoke_all_sessions();

    let r = api(&proxy, &jar).await;
    r.assert_error(401, "session_expired");
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"portcullis\", error=\"invalid_token\""));
    assert_cleared(&r, ACCESS);
    assert_cleared(&r, REFRESH);
    assert_eq!(refreshes(&proxy, "invalid_grant").await, 1);
    let jar = jar.after(&r);
    assert!(jar.is_empty(), "{jar:?}");
    api(&proxy, &jar).await.assert_error(401, "missing_token");
}

/// Login with an access token that expired long ago, so a refresh is required
/// and no still-valid token can carry the request.
async fn expired_session() -> (TestIdp, Upstream, Proxy, Jar) {
    let (idp, up, proxy) = setup(&Opts::default()).await;
    idp.set_access_ttl(-120);
    let (_, jar) = login(&proxy, "alice").await;
    idp.set_access_ttl(300);
    (idp, up, proxy, jar)
}

fn assert_outage_answer(r: &Reply) {
    r.assert_error(503, "auth_server_unavailable");
    let retry = r.header("retry-after").expect("Retry-After on 503");
    assert!(retry.parse::<u64>().is_ok_and(|s| s > 0), "Retry-After {retry:?}");
    assert!(set_cookies(r).is_empty(), "an outage must not touch the cookies: {:?}", set_cookies(r));
}

#[tokio::test]
async fn auth_server_errors_answer_503_and_keep_the_session() {
    let (idp, _up, proxy, jar) = expired_session().await;
    idp.set_outage(Outage::ServerError);
    assert_outage_answer(&api(&proxy, &jar).await);
    assert_outage_answer(&refresh_now(&proxy, &jar).await);
    assert!(refreshes(&proxy, "auth_server_error").await >= 1);

    idp.set_outage(Outage::None);
    let r = api(&proxy, &jar).await;
    assert_eq!(r.status, 200, "the session survived the outage: {}", r.text());
    assert_set(&r, ACCESS);
    assert_set(&r, REFRESH);
}

#[tokio::test]
async fn slow_auth_server_answers_503_and_keeps_the_cookies() {
    let (idp, _up, proxy, jar) = expired_session().await;
    idp.set_outage(Outage::Slow(Duration::from_secs(4))); // > [auth_server] timeout = 2s
    let started = std::time::Instant::now();
    assert_outage_answer(&api(&proxy, &jar).await);
    assert!(
        started.elapsed() < Duration::from_millis(3900),
        "bounded by the timeout: {:?}",
        started.elapsed()
    );
    idp.set_outage(Outage::None);
    let r = api(&proxy, &jar).await;
    assert_eq!(r.status, 200, "the session survived the outage: {}", r.text());
    assert_set(&r, REFRESH);
}

#[tokio::test]
async fn outage_with_a_still_valid_access_token_carries_on() {
    let (idp, _up, proxy, jar) = short_session(&Opts::default()).await;
    idp.set_outage(Outage::ServerError);
    // The token expires within refresh_ahead but is still valid: the request goes through with it.
    let r = api(&proxy, &jar).await;
    assert_eq!(claims(&forwarded_token(&r))["sub"], "alice");
    assert!(set_cookies(&r).is_empty(), "{:?}", set_cookies(&r));
}

#[tokio::test]
async fn refresh_endpoint_refreshes_now() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    let (_, jar) = login(&proxy, "alice").await;
    idp.set_access_ttl(120);
    let r = refresh_now(&proxy, &jar).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({"expires_in": 120}));
    assert_eq!(token_calls(&idp), 1);
    assert_set(&r, ACCESS);
    assert_set(&r, REFRESH);
    let jar = jar.after(&r);
    let token = forwarded_token(&api(&proxy, &jar).await);
    let exp = claims(&token)["exp"].as_i64().unwrap();
    assert!(
        (idp::now() + 100..=idp::now() + 121).contains(&exp),
        "the refreshed token went into the cookie: exp {exp}"
    );
}

#[tokio::test]
async fn refresh_endpoint_without_refresh_cookie_is_missing_token() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    refresh_now(&proxy, &Jar::default()).await.assert_error(401, "missing_token");
    let (_, jar) = login(&proxy, "alice").await;
    refresh_now(&proxy, &jar.without(REFRESH)).await.assert_error(401, "missing_token");
    assert_eq!(token_calls(&idp), 0);
}

#[tokio::test]
async fn refresh_endpoint_with_a_dead_refresh_token_is_session_expired() {
    let (idp, _up, proxy, jar) = short_session(&Opts::default()).await;
    idp.revoke_all_sessions();
    let r = refresh_now(&proxy, &jar).await;
    r.assert_error(401, "session_expired");
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"portcullis\", error=\"invalid_token\""));
    assert_cleared(&r, ACCESS);
    assert_cleared(&r, REFRESH);
    assert_eq!(token_calls(&idp), 1);
}

#[tokio::test]
async fn client_secret_basic_sends_the_secret_in_the_authorization_header() {
    let (idp, _up, proxy, jar) = short_session(&Opts::default()).await;
    assert_eq!(api(&proxy, &jar).await.status, 200);
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            idp::CLIENT_ID,
            idp::CLIENT_SECRET
        ))
    );
    assert_eq!(idp.last_token_auth(), Some(expected));
    let form = idp.last_token_form();
    assert!(!form.contains_key("client_secret"), "no secret in the form: {form:?}");
}

#[tokio::test]
async fn client_secret_post_sends_the_secret_in_the_form() {
    let o = Opts { client_auth: "client_secret_post", ..Opts::default() };
    let (idp, _up, proxy, jar) = short_session(&o).await;
    assert_eq!(api(&proxy, &jar).await.status, 200);
    assert_eq!(idp.last_token_auth(), None);
    let form = idp.last_token_form();
    assert_eq!(form.get("client_id").map(String::as_str), Some(idp::CLIENT_ID));
    assert_eq!(form.get("client_secret").map(String::as_str), Some(idp::CLIENT_SECRET));
}

#[tokio::test]
async fn public_client_sends_only_its_id() {
    let o = Opts { client_auth: "none", ..Opts::default() };
    let (idp, _up, proxy, jar) = short_session(&o).await;
    assert_eq!(api(&proxy, &jar).await.status, 200);
    assert_eq!(idp.last_token_auth(), None);
    let form = idp.last_token_form();
    assert_eq!(form.get("client_id").map(String::as_str), Some(idp::CLIENT_ID));
    assert!(!form.contains_key("client_secret"), "{form:?}");
}

#[tokio::test]
async fn resource_indicator_is_sent_on_refresh() {
    let o = Opts { auth: "resource = \"urn:example:orders-api\"".into(), ..Opts::default() };
    let (idp, _up, proxy, jar) = short_session(&o).await;
    assert_eq!(api(&proxy, &jar).await.status, 200);
    assert_eq!(idp.last_token_form().get("resource").map(String::as_str), Some("urn:example:orders-api"));
}

#[tokio::test]
async fn session_past_absolute_timeout_is_refused_and_cleared() {
    let o = Opts { session: "absolute_timeout = \"2s\"\nidle_timeout = \"2s\"".into(), ..Opts::default() };
    let (idp, _up, proxy, jar) = short_session(&o).await;
    let first = api(&proxy, &jar).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let max_age = assert_set(&first, REFRESH).max_age().unwrap();
    assert!((0..=2).contains(&max_age), "cookies never outlive absolute_timeout: Max-Age {max_age}");
    let fresh = jar.clone().after(&first);

    // Every request needs a refresh (ttl 10 s); the old cookie is served from the
    // grace until the session passes its absolute deadline.
    let r = poll_until(
        "the session passes absolute_timeout",
        DEADLINE,
        || jar.on(get(proxy.url("/api/orders"))),
        |r| r.status != 200,
    )
    .await;
    r.assert_error(401, "session_expired");
    assert_cleared(&r, ACCESS);
    assert_cleared(&r, REFRESH);
    let calls = token_calls(&idp);
    let r = refresh_now(&proxy, &fresh).await;
    r.assert_error(401, "session_expired");
    assert_cleared(&r, ACCESS);
    assert_cleared(&r, REFRESH);
    assert_eq!(token_calls(&idp), calls, "a session past its deadline is not refreshed");
}

#[tokio::test]
async fn a_client_ignoring_max_age_is_refused_past_absolute_timeout_while_its_access_token_lives() {
    let o = Opts { session: "absolute_timeout = \"2s\"\nidle_timeout = \"2s\"".into(), ..Opts::default() };
    let (idp, _up, proxy) = setup(&o).await;
    idp.set_access_ttl(300);
    let (_, jar) = login(&proxy, "alice").await;
    let first = api(&proxy, &jar).await;
    assert_eq!(first.status, 200, "{}", first.text());

    // The same cookies again and again, as a client that keeps expired cookies
    // would send them: the access token inside lives 300 s, the session 2 s.
    let r = poll_until(
        "the session passes absolute_timeout",
        DEADLINE,
        || jar.on(get(proxy.url("/api/orders"))),
        |r| r.status != 200,
    )
    .await;
    r.assert_error(401, "session_expired");
    assert_cleared(&r, ACCESS);
    assert_cleared(&r, REFRESH);
    assert_eq!(
        token_calls(&idp),
        0,
        "ending a session past its deadline asks the authorization server nothing"
    );
}

#[tokio::test]
async fn a_wrong_client_secret_is_refused_by_the_provider_and_keeps_the_session() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let o = Opts::default();
    let mut env = env_with_keys(&o.keys);
    env.insert("CLIENT_SECRET".into(), "not-the-secret".into());
    let proxy = Proxy::start_with(&config(&idp, &up, &o), &env, std::path::Path::new(".")).await;
    wait_ready(&proxy).await;
    idp.set_access_ttl(-120);
    let (_, jar) = login(&proxy, "alice").await;

    // 401 invalid_client is the proxy's misconfiguration, not the user's: 503, cookies kept.
    let r = api(&proxy, &jar).await;
    r.assert_error(503, "auth_server_unavailable");
    assert!(set_cookies(&r).is_empty(), "{:?}", set_cookies(&r));
    assert_eq!(token_calls(&idp), 1);
    assert_eq!(refreshes(&proxy, "auth_server_error").await, 1);
    assert!(!idp.family_revoked(&last_refresh_token(&idp)));
}
