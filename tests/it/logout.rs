//! Logout (SPEC §4 "Back-channel logout", "RP-initiated logout", "Endpoints",
//! "Several instances"): the OpenID provider's back-channel logout token is
//! verified per OpenID Connect Back-Channel Logout 1.0 §2.6 and ends exactly the
//! sessions it names (by `sid`, or by `sub`) that were established before it —
//! with no call to `token_url`, their access tokens denied at once, on every
//! instance of a fleet; a replayed `jti` is refused; `POST logout_path` is the
//! script's logout (`204`), `GET logout_path` the browser's, sent on to the
//! provider's end-session endpoint with `id_token_hint`; every kind is counted.
//!
//! The test IdP acts as an OpenID provider here ([`TestIdp::set_id_tokens`]):
//! every login gets its own `sid`, which its ID token and access tokens carry.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::kit::idp::{b64, now, sign_with_header, BACKCHANNEL_EVENT, CLIENT_ID};
use crate::kit::session::*;
use crate::kit::*;

/// SPEC §4 says "within a second"; polled for a few, for a loaded machine.
const FLEET_PROPAGATION: Duration = Duration::from_secs(3);

// === the setup ===

/// The session suites' configuration with the back-channel receiver on, plus `session` lines.
fn opts(session: &str) -> Opts {
    Opts {
        session: format!("backchannel_logout_path = \"{BACKCHANNEL_LOGOUT}\"\n{session}"),
        ..Opts::default()
    }
}

/// An OpenID provider, an upstream and the proxy in front of them, ready.
async fn oidc_setup(session: &str) -> (TestIdp, Upstream, Proxy) {
    let idp = TestIdp::start().await;
    idp.set_id_tokens(true);
    let up = Upstream::start().await;
    let proxy = start(&idp, &up, &opts(session)).await;
    (idp, up, proxy)
}

/// A passthrough login of `user`: the jar and the `sid` of the ID token it answered with.
async fn login_sid(proxy: &impl Instance, user: &str) -> (Jar, String) {
    let (r, jar) = login(proxy, user).await;
    let body = r.json();
    let id_token = body["id_token"].as_str().unwrap_or_else(|| panic!("no ID token in the login: {body}"));
    let sid = claims(id_token)["sid"].as_str().expect("the ID token names a sid").to_owned();
    (jar, sid)
}

/// The session still works: the upstream sees `user`. Returns the jar after the
/// answer (a refresh may have rotated the cookies).
async fn assert_alive(proxy: &impl Instance, jar: &Jar, user: &str, what: &str) -> Jar {
    let r = api(proxy, jar).await;
    assert_eq!(r.status, 200, "{what}: the session should still work: {}", r.text());
    assert_eq!(r.echo().header("x-auth-subject"), Some(user), "{what}");
    jar.clone().after(&r)
}

/// The ended session's next request: `401 session_expired` (an `invalid_token`
/// challenge), both cookies cleared, and the authorization server not asked.
async fn assert_ended(idp: &TestIdp, proxy: &impl Instance, jar: &Jar, what: &str) {
    let calls = token_calls(idp);
    let r = api(proxy, jar).await;
    r.assert_error(401, "session_expired");
    let www = r.header("www-authenticate").unwrap_or_default();
    assert!(www.contains("error=\"invalid_token\""), "{what}: WWW-Authenticate {www:?}");
    assert_cleared(&r, ACCESS);
    assert_cleared(&r, REFRESH);
    assert!(jar.clone().after(&r).is_empty(), "{what}: the browser holds no session cookie any more");
    // The explicit refresh is over too.
    refresh_now(proxy, jar).await.assert_error(401, "session_expired");
    assert_eq!(token_calls(idp), calls, "{what}: no call to token_url for an ended session");
}

async fn logouts(p: &impl Instance, kind: &str) -> f64 {
    metric(p, &format!("portcullis_logouts_total{{kind=\"{kind}\"}}")).await
}

async fn refused(p: &impl Instance, reason: &str) -> f64 {
    metric(p, &format!("portcullis_logout_tokens_rejected_total{{reason=\"{reason}\"}}")).await
}

async fn refused_total(p: &impl Instance) -> f64 {
    metrics(p).await.total("portcullis_logout_tokens_rejected_total")
}

/// `POST backchannel_logout_path` with a body of the test's choosing.
async fn post_backchannel(p: &impl Instance, body: &str, content_type: &str) -> Reply {
    post(p.url(BACKCHANNEL_LOGOUT), body.to_owned()).header("content-type", content_type).send().await
}

/// Asserts the provider's logout was taken: `200`, nothing cached.
fn assert_taken(r: &Reply, what: &str) {
    assert_eq!(r.status, 200, "{what}: the logout token should be taken: {}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"), "{what}");
}

/// Waits until the clock (whole Unix seconds, as the proxy and the IdP count
/// them) is past `t`.
async fn clock_past(t: i64) {
    eventually(&format!("the clock passes {t}"), Duration::from_secs(3), || async move { now() > t }).await;
}

/// `header.payload.signature` from raw JSON values.
fn forge(header: &Value, claims: &Value, signature: &str) -> String {
    format!("{}.{}.{signature}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()))
}

fn remove(mut claims: Value, name: &str) -> Value {
    claims.as_object_mut().unwrap().remove(name);
    claims
}

fn with(mut claims: Value, name: &str, value: Value) -> Value {
    claims[name] = value;
    claims
}

fn logout_header(alg: Algorithm, kid: &str) -> Header {
    let mut h = Header::new(alg);
    h.kid = Some(kid.to_owned());
    h.typ = Some("logout+jwt".into());
    h
}

fn form(logout_token: &str) -> String {
    form_urlencoded::Serializer::new(String::new()).append_pair("logout_token", logout_token).finish()
}

// === back-channel logout: what is refused ===

#[tokio::test]
async fn logout_tokens_that_break_the_rules_are_refused_and_counted() {
    let (idp, _up, proxy) = oidc_setup("").await;
    let (jar, _) = login_sid(&proxy, "alice").await;
    let base = idp.logout_claims(Some("alice"), None);
    let valid = idp.logout_token(&base);
    let sign = |c: &Value| idp.logout_token(c);
    let n = now();

    let tampered = {
        let parts: Vec<&str> = valid.split('.').collect();
        let payload = b64(with(base.clone(), "sub", json!("bob")).to_string().as_bytes());
        format!("{}.{payload}.{}", parts[0], parts[2])
    };
    let pem = std::fs::read(fixture("rsa1.pub.pem")).unwrap();
    let hs_with_public_key = jsonwebtoken::encode(
        &logout_header(Algorithm::HS256, "rsa1"),
        &base,
        &EncodingKey::from_secret(&pem),
    )
    .unwrap();
    let other_event = json!({ "http://schemas.openid.net/event/other": {} });
    let typed = |typ: &str| {
        let mut h = logout_header(Algorithm::RS256, "rsa1");
        h.typ = Some(typ.to_owned());
        sign_with_header("rsa1", h, &base)
    };

    // (what, the logout token, the `reason` label it is counted under)
    let tokens: Vec<(&str, String, &str)> = vec![
        (
            "signed by another key under a trusted kid",
            sign_with_header("rsa2", logout_header(Algorithm::RS256, "rsa1"), &base),
            "bad_signature",
        ),
        ("payload changed after signing", tampered, "bad_signature"),
        ("signed by a key the issuer does not publish", crate::kit::sign("rsa2", &base), "unknown_key"),
        (
            "alg none, no signature",
            forge(&json!({"alg": "none", "typ": "logout+jwt"}), &base, ""),
            "algorithm_not_allowed",
        ),
        ("HS256 keyed with the issuer's RSA public key", hs_with_public_key, "algorithm_not_allowed"),
        ("another issuer", sign(&with(base.clone(), "iss", json!("https://evil.example"))), "wrong_issuer"),
        ("no iss", sign(&remove(base.clone(), "iss")), "wrong_issuer"),
        (
            "aud is the API, not this client",
            sign(&with(base.clone(), "aud", json!("orders-api"))),
            "wrong_audience",
        ),
        (
            "aud array without this client",
            sign(&with(base.clone(), "aud", json!(["x", "orders-api"]))),
            "wrong_audience",
        ),
        ("no aud", sign(&remove(base.clone(), "aud")), "wrong_audience"),
        ("no iat", sign(&remove(base.clone(), "iat")), "missing_iat"),
        (
            "iat an hour ago, no exp",
            sign(&remove(with(base.clone(), "iat", json!(n - 3600)), "exp")),
            "expired",
        ),
        (
            "exp passed",
            sign(&with(with(base.clone(), "iat", json!(n - 900)), "exp", json!(n - 600))),
            "expired",
        ),
        ("iat an hour ahead", sign(&with(base.clone(), "iat", json!(n + 3600))), "issued_in_future"),
        ("no jti", sign(&remove(base.clone(), "jti")), "missing_jti"),
        ("empty jti", sign(&with(base.clone(), "jti", json!(""))), "missing_jti"),
        ("no events", sign(&remove(base.clone(), "events")), "missing_event"),
        (
            "events without the back-channel logout event",
            sign(&with(base.clone(), "events", other_event)),
            "missing_event",
        ),
        (
            "the event is not a JSON object",
            sign(&with(base.clone(), "events", json!({ BACKCHANNEL_EVENT: "yes" }))),
            "missing_event",
        ),
        (
            "a nonce (an ID token, not a logout token)",
            sign(&with(base.clone(), "nonce", json!("n-0S6_WzA2Mj"))),
            "nonce",
        ),
        ("neither sub nor sid", sign(&remove(base.clone(), "sub")), "missing_sub_and_sid"),
        ("empty sub, no sid", sign(&with(base.clone(), "sub", json!(""))), "missing_sub_and_sid"),
        // SPEC is silent on `typ`; Back-Channel Logout 1.0 §2.4 types logout tokens `logout+jwt`.
        ("typed as an access token", typed("at+jwt"), "wrong_type"),
        ("typed as an ID token", typed("id_token+jwt"), "wrong_type"),
        ("not a JWT", "not-a-jwt".to_owned(), "malformed"),
        ("empty logout_token", String::new(), "malformed"),
    ];
    let form_ct = "application/x-www-form-urlencoded";
    let mut cases: Vec<(&str, String, &str, &str)> =
        tokens.into_iter().map(|(what, token, reason)| (what, form(&token), form_ct, reason)).collect();
    // (what, the request body, its content type, reason): not what §2.5 says the provider sends.
    cases.extend([
        (
            "JSON instead of a form",
            json!({ "logout_token": valid }).to_string(),
            "application/json",
            "content_type",
        ),
        ("a form sent as text/plain", form(&valid), "text/plain", "content_type"),
        ("no logout_token field", format!("token={valid}"), form_ct, "missing_logout_token"),
        ("empty body", String::new(), form_ct, "missing_logout_token"),
    ]);
    for (what, body, content_type, reason) in &cases {
        let (before, before_total) = (refused(&proxy, reason).await, refused_total(&proxy).await);
        let r = post_backchannel(&proxy, body, content_type).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        r.assert_error(400, "invalid_request");
        assert_eq!(refused(&proxy, reason).await, before + 1.0, "{what}: counted under reason=\"{reason}\"");
        assert_eq!(refused_total(&proxy).await, before_total + 1.0, "{what}: counted once");
    }

    // Nothing was ended by any of them ...
    assert_eq!(logouts(&proxy, "backchannel").await, 0.0);
    assert!(revocations(&proxy).await.is_empty(), "{:?}", revocations(&proxy).await);
    let jar = assert_alive(&proxy, &jar, "alice", "after the refused tokens").await;
    // ... and none of them used up the jti they share with the genuine token: it is taken.
    assert_taken(&backchannel_logout(&proxy, &valid).await, "the genuine token");
    assert_eq!(logouts(&proxy, "backchannel").await, 1.0);
    assert_ended(&idp, &proxy, &jar, "alice after the genuine token").await;
}

#[tokio::test]
async fn a_replayed_logout_token_is_refused() {
    let (idp, _up, proxy) = oidc_setup("").await;
    let (first, _) = login_sid(&proxy, "alice").await;
    let token = idp.logout_token(&idp.logout_claims(Some("alice"), None));
    assert_taken(&backchannel_logout(&proxy, &token).await, "first delivery");
    assert_ended(&idp, &proxy, &first, "alice").await;

    let before = refused(&proxy, "replayed").await;
    let r = backchannel_logout(&proxy, &token).await;
    r.assert_error(400, "invalid_request");
    assert_eq!(refused(&proxy, "replayed").await, before + 1.0);
    // A token re-signed with the same jti (and a new iat) is the same logout, used up too.
    let again = idp.logout_token(&with(claims(&token), "iat", json!(now())));
    backchannel_logout(&proxy, &again).await.assert_error(400, "invalid_request");
    assert_eq!(refused(&proxy, "replayed").await, before + 2.0);
    assert_eq!(logouts(&proxy, "backchannel").await, 1.0, "only the first delivery ended sessions");
}

#[tokio::test]
async fn without_backchannel_logout_path_there_is_no_receiver() {
    let idp = TestIdp::start().await;
    idp.set_id_tokens(true);
    let up = Upstream::start().await;
    let proxy = start(&idp, &up, &Opts::default()).await;
    let (jar, _) = login_sid(&proxy, "alice").await;
    let token = idp.logout_token(&idp.logout_claims(Some("alice"), None));
    let r = backchannel_logout(&proxy, &token).await;
    r.assert_error(404, "no_route");
    assert_alive(&proxy, &jar, "alice", "nothing was received").await;
}

// === back-channel logout: what it ends ===

#[tokio::test]
async fn a_logout_by_sub_ends_every_session_of_that_user_and_no_other() {
    let (idp, _up, proxy) = oidc_setup("").await;
    // Access tokens near expiry: every request of a live session refreshes, so an
    // ended one asking nothing of token_url is visible.
    idp.set_access_ttl(10);
    let (alice_1, _) = login_sid(&proxy, "alice").await;
    let (alice_2, _) = login_sid(&proxy, "alice").await;
    let (bob, _) = login_sid(&proxy, "bob").await;
    let alice_1 = assert_alive(&proxy, &alice_1, "alice", "alice's first session").await;
    let alice_2 = assert_alive(&proxy, &alice_2, "alice", "alice's second session").await;
    let bob = assert_alive(&proxy, &bob, "bob", "bob's session").await;

    let r = backchannel_logout(&proxy, &idp.logout_token(&idp.logout_claims(Some("alice"), None))).await;
    assert_taken(&r, "logout of alice by sub");
    assert!(r.body.is_empty(), "{}", r.text());
    assert_eq!(logouts(&proxy, "backchannel").await, 1.0);

    assert_ended(&idp, &proxy, &alice_1, "alice's first session").await;
    assert_ended(&idp, &proxy, &alice_2, "alice's second session").await;
    let calls = token_calls(&idp);
    let bob = assert_alive(&proxy, &bob, "bob", "bob's session, after alice's logout").await;
    assert_eq!(token_calls(&idp), calls + 1, "bob's session still refreshes");
    assert_alive(&proxy, &bob, "bob", "bob's session, once more").await;
}

#[tokio::test]
async fn a_logout_by_sid_ends_only_that_session() {
    let (idp, _up, proxy) = oidc_setup("").await;
    idp.set_access_ttl(10);
    let (a, sid_a) = login_sid(&proxy, "alice").await;
    let (b, sid_b) = login_sid(&proxy, "alice").await;
    let (c, _) = login_sid(&proxy, "alice").await;
    let (bob, _) = login_sid(&proxy, "bob").await;
    assert_ne!(sid_a, sid_b, "every login is its own provider session");

    // sid alone.
    assert_taken(
        &backchannel_logout(&proxy, &idp.logout_token(&idp.logout_claims(None, Some(&sid_a)))).await,
        "sid A",
    );
    assert_ended(&idp, &proxy, &a, "session A (its sid)").await;
    let b = assert_alive(&proxy, &b, "alice", "session B, same sub, another sid").await;
    let c = assert_alive(&proxy, &c, "alice", "session C").await;
    let bob = assert_alive(&proxy, &bob, "bob", "bob").await;

    // sub and sid: the sid narrows it to that one session of the subject.
    let both = idp.logout_claims(Some("alice"), Some(&sid_b));
    assert_taken(&backchannel_logout(&proxy, &idp.logout_token(&both)).await, "sub alice + sid B");
    assert_ended(&idp, &proxy, &b, "session B").await;
    assert_alive(&proxy, &c, "alice", "session C, same sub, sid not named").await;
    assert_alive(&proxy, &bob, "bob", "bob").await;
    assert_eq!(logouts(&proxy, "backchannel").await, 2.0);
}

#[tokio::test]
async fn a_session_started_after_the_logout_survives_it() {
    let (idp, _up, proxy) = oidc_setup("").await;
    let (before, _) = login_sid(&proxy, "alice").await;
    let logged_in = now();
    clock_past(logged_in).await;
    // The provider logs alice out (the token is issued now) ...
    let token = idp.logout_token(&idp.logout_claims(Some("alice"), None));
    let issued = claims(&token)["iat"].as_i64().unwrap();
    assert!(issued > logged_in);
    // ... and, before the token arrives, alice logs in again.
    clock_past(issued).await;
    let (after, _) = login_sid(&proxy, "alice").await;

    assert_taken(&backchannel_logout(&proxy, &token).await, "logout of alice");
    assert_ended(&idp, &proxy, &before, "the session from before the logout").await;
    let after = assert_alive(&proxy, &after, "alice", "the session started after the logout").await;
    // It goes on refreshing, and its access token passes as a bearer too.
    let r = refresh_now(&proxy, &after).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let after = after.after(&r);
    let token = forwarded_token(&api(&proxy, &after).await);
    let r = get(proxy.url("/api/orders")).bearer(&token).send().await;
    assert_eq!(r.echo().header("x-auth-subject"), Some("alice"));
}

#[tokio::test]
async fn access_tokens_of_an_ended_session_are_denied_at_once_as_bearers() {
    let (idp, _up, proxy) = oidc_setup("").await;
    let (a, sid_a) = login_sid(&proxy, "alice").await;
    let (b, _) = login_sid(&proxy, "alice").await;
    let (bob, _) = login_sid(&proxy, "bob").await;
    let token_a = forwarded_token(&api(&proxy, &a).await);
    let token_b = forwarded_token(&api(&proxy, &b).await);
    let token_bob = forwarded_token(&api(&proxy, &bob).await);
    assert_eq!(claims(&token_a)["sid"], sid_a.as_str(), "the access token names its session");
    let bearer = |t: &str| get(proxy.url("/api/orders")).bearer(t).send();
    for t in [&token_a, &token_b, &token_bob] {
        assert_eq!(bearer(t).await.status, 200);
    }

    // By sid: session A's access token, wherever it is presented.
    assert_taken(
        &backchannel_logout(&proxy, &idp.logout_token(&idp.logout_claims(None, Some(&sid_a)))).await,
        "sid A",
    );
    assert_invalid_token(&bearer(&token_a).await, "session A's access token after its logout");
    assert_eq!(bearer(&token_b).await.status, 200, "session B's access token");
    assert_eq!(bearer(&token_bob).await.status, 200, "bob's access token");

    // By sub: every access token of the subject issued before the logout.
    let token = idp.logout_token(&idp.logout_claims(Some("alice"), None));
    let issued = claims(&token)["iat"].as_i64().unwrap();
    assert_taken(&backchannel_logout(&proxy, &token).await, "sub alice");
    assert_invalid_token(&bearer(&token_b).await, "session B's access token after alice's logout");
    assert_eq!(bearer(&token_bob).await.status, 200, "bob's access token");
    // A token the provider issues after the logout is good.
    clock_past(issued).await;
    assert_eq!(bearer(&idp.access_token("alice", 300)).await.status, 200, "a token issued after the logout");

    // The proxy's own logout: that session's access token is denied at once too.
    let t = forwarded_token(&api(&proxy, &bob).await);
    assert_eq!(logout(&proxy, &bob).await.status, 204);
    assert_invalid_token(&bearer(&t).await, "bob's access token after his logout");
}

// === back-channel logout in a fleet ===

#[tokio::test]
async fn a_logout_posted_to_one_instance_ends_the_session_on_the_other() {
    let idp = TestIdp::start().await;
    idp.set_id_tokens(true);
    let up = Upstream::start().await;
    let redis = RedisServer::start().await;
    let o = Opts {
        routes: format!("[state]\nredis_url = \"{}\"\nkey_prefix = \"logout:\"\n", redis.url()),
        ..opts("")
    };
    let a = start(&idp, &up, &o).await;
    let b = start(&idp, &up, &o).await;
    let (alice, _) = login_sid(&a, "alice").await;
    let (bob, _) = login_sid(&a, "bob").await;
    let alice = assert_alive(&b, &alice, "alice", "alice's session on B").await;
    let alice_token = forwarded_token(&api(&b, &alice).await);
    let token = idp.logout_token(&idp.logout_claims(Some("alice"), None));

    assert_taken(&backchannel_logout(&a, &token).await, "logout posted to A");
    let calls = token_calls(&idp);
    let r = poll_until(
        "B ends alice's session",
        FLEET_PROPAGATION,
        || alice.on(get(b.url("/api/orders"))),
        |r| r.status == 401,
    )
    .await;
    r.assert_error(401, "session_expired");
    assert_cleared(&r, ACCESS);
    assert_cleared(&r, REFRESH);
    assert_eq!(token_calls(&idp), calls, "B asked token_url nothing for the ended session");
    assert_invalid_token(
        &get(b.url("/api/orders")).bearer(&alice_token).send().await,
        "alice's access token on B",
    );
    assert_alive(&b, &bob, "bob", "bob's session on B").await;
    assert_alive(&a, &bob, "bob", "bob's session on A").await;

    // The same token delivered to B (a provider retrying, or an attacker replaying it) is refused there.
    let before = refused(&b, "replayed").await;
    backchannel_logout(&b, &token).await.assert_error(400, "invalid_request");
    assert_eq!(refused(&b, "replayed").await, before + 1.0);
    assert_eq!(logouts(&a, "backchannel").await, 1.0);
    assert_eq!(logouts(&b, "backchannel").await, 0.0);
}

// === the proxy's own logout endpoint ===

#[tokio::test]
async fn post_logout_answers_204_clears_the_cookies_and_is_counted_as_local() {
    let (idp, _up, proxy) = oidc_setup("end_session_url = \"https://id.example.test/logout\"").await;
    let (jar, _) = login_sid(&proxy, "alice").await;
    let (other, _) = login_sid(&proxy, "alice").await;
    let r = logout(&proxy, &jar).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    assert!(r.header("location").is_none(), "a script's logout is not redirected");
    assert_cleared(&r, ACCESS);
    assert_cleared(&r, REFRESH);
    assert_eq!(revoke_calls(&idp), 1, "the refresh token is revoked at the server");
    assert_eq!(logouts(&proxy, "local").await, 1.0);
    assert_eq!(logouts(&proxy, "rp_initiated").await, 0.0);
    // Cookies kept from before the logout are over; another session of the same user is not.
    assert_ended(&idp, &proxy, &jar, "the logged-out session's old cookies").await;
    assert_alive(&proxy, &other, "alice", "alice's other session").await;
}

/// `GET logout_path` as a browser navigates to it from the proxy's own pages.
fn navigate_logout(proxy: &impl Instance, jar: &Jar) -> Req {
    jar.on(get(proxy.url("/auth/logout")))
        .header("sec-fetch-site", "same-origin")
        .header("sec-fetch-mode", "navigate")
}

fn location(r: &Reply) -> String {
    assert_eq!(r.status, 302, "expected a redirect: {}", r.text());
    r.header("location").expect("Location").to_owned()
}

fn query_of(url: &str) -> std::collections::HashMap<String, String> {
    let q = url.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

#[tokio::test]
async fn get_logout_sends_the_browser_to_the_configured_end_session_url() {
    let (idp, _up, proxy) = oidc_setup(
        "end_session_url = \"https://id.example.test/oidc/logout?ui_locales=en\"\n\
         post_logout_redirect_uri = \"http://app.test/goodbye\"",
    )
    .await;
    let jar = code_login(&proxy).await;
    let id_token = idp.id_tokens().pop().expect("the code exchange issued an ID token");

    let r = navigate_logout(&proxy, &jar).send().await;
    let to = location(&r);
    assert!(to.starts_with("https://id.example.test/oidc/logout?"), "{to}");
    let q = query_of(&to);
    assert_eq!(q.get("ui_locales").map(String::as_str), Some("en"), "the URL's own query is kept: {to}");
    assert_eq!(q.get("client_id").map(String::as_str), Some(CLIENT_ID), "{to}");
    assert_eq!(q.get("id_token_hint"), Some(&id_token), "the ID token from the login: {to}");
    assert_eq!(q.get("post_logout_redirect_uri").map(String::as_str), Some("http://app.test/goodbye"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    // It is a logout here first.
    assert_cleared(&r, ACCESS);
    assert_cleared(&r, REFRESH);
    assert_eq!(revoke_calls(&idp), 1);
    assert_ended(&idp, &proxy, &jar, "the session after GET logout").await;
    assert_eq!(logouts(&proxy, "rp_initiated").await, 1.0);
    assert_eq!(logouts(&proxy, "local").await, 0.0);
}

#[tokio::test]
async fn get_logout_uses_the_end_session_endpoint_from_discovery() {
    let (idp, _up, proxy) = oidc_setup("post_logout_redirect_uri = \"http://app.test/goodbye\"").await;
    let jar = code_login(&proxy).await;
    let id_token = idp.id_tokens().pop().expect("an ID token");

    let r = navigate_logout(&proxy, &jar).send().await;
    let to = location(&r);
    assert!(to.starts_with(&format!("{}?", idp.end_session_url())), "{to}");
    assert_cleared(&r, REFRESH);
    // The browser follows it; the provider gets what it needs and sends it back to the app.
    let at_idp = get(&to).send().await;
    assert_eq!(location(&at_idp), "http://app.test/goodbye");
    let seen = idp.end_session_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].get("id_token_hint"), Some(&id_token));
    assert_eq!(seen[0].get("client_id").map(String::as_str), Some(CLIENT_ID));
    assert_eq!(seen[0].get("post_logout_redirect_uri").map(String::as_str), Some("http://app.test/goodbye"));
    assert_ended(&idp, &proxy, &jar, "the session after GET logout").await;

    // A session whose login gave no ID token: no hint, the rest the same.
    idp.set_id_tokens(false);
    let (_, plain) = login(&proxy, "bob").await;
    let q = query_of(&location(&navigate_logout(&proxy, &plain).send().await));
    assert!(!q.contains_key("id_token_hint"), "{q:?}");
    assert_eq!(q.get("client_id").map(String::as_str), Some(CLIENT_ID));
    assert_eq!(logouts(&proxy, "rp_initiated").await, 2.0);
    // And a browser with no session at all is still sent on to the provider.
    let q = query_of(&location(&navigate_logout(&proxy, &Jar::default()).send().await));
    assert_eq!(q.get("client_id").map(String::as_str), Some(CLIENT_ID));
}

#[tokio::test]
async fn get_logout_without_an_end_session_url_goes_to_post_logout_redirect_uri_or_root() {
    let idp = TestIdp::start().await;
    idp.set_id_tokens(true);
    idp.set_end_session(false);
    let up = Upstream::start().await;
    for (session, want) in
        [("post_logout_redirect_uri = \"http://app.test/goodbye\"", "http://app.test/goodbye"), ("", "/")]
    {
        let proxy = start(&idp, &up, &opts(session)).await;
        let (jar, _) = login_sid(&proxy, "alice").await;
        let r = navigate_logout(&proxy, &jar).send().await;
        assert_eq!(location(&r), want, "{session:?}");
        assert_cleared(&r, ACCESS);
        assert_cleared(&r, REFRESH);
        assert_ended(&idp, &proxy, &jar, "the session after GET logout").await;
        assert_eq!(logouts(&proxy, "rp_initiated").await, 0.0, "no provider to send the browser to");
        assert_eq!(logouts(&proxy, "local").await, 1.0);
    }
}

#[tokio::test]
async fn get_logout_from_a_foreign_site_is_refused_and_from_the_app_is_not() {
    let (idp, _up, proxy) = oidc_setup("end_session_url = \"https://id.example.test/logout\"").await;
    let (jar, _) = login_sid(&proxy, "alice").await;
    let foreign = [
        ("cross-site", None, Some("https://evil.example/page")),
        ("cross-site", Some("https://evil.example"), None),
        ("same-site", None, None),
        ("cross-site", None, None),
    ];
    for (site, origin, referer) in foreign {
        let mut req = jar.on(get(proxy.url("/auth/logout"))).header("sec-fetch-site", site);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        if let Some(r) = referer {
            req = req.header("referer", r);
        }
        let r = req.send().await;
        r.assert_error(403, "csrf");
        assert!(set_cookies(&r).is_empty(), "{site} {origin:?} {referer:?}: {:?}", set_cookies(&r));
    }
    let jar = assert_alive(&proxy, &jar, "alice", "after the forged logouts").await;
    assert_eq!(revoke_calls(&idp), 0);

    // The app's own "log out" link (an allowed origin; a navigation carries a Referer, no Origin).
    let r = jar
        .on(get(proxy.url("/auth/logout")))
        .header("sec-fetch-site", "cross-site")
        .header("sec-fetch-mode", "navigate")
        .header("referer", format!("{APP_ORIGIN}/orders"))
        .send()
        .await;
    assert!(location(&r).starts_with("https://id.example.test/logout?"));
    assert_ended(&idp, &proxy, &jar, "after the app's logout link").await;
}
