//! Logging in and out (SPEC §4 "Endpoints"): the passthrough login that moves
//! tokens from a JSON answer into cookies, the authorization code flow with PKCE
//! and `state` (RFC 7636, RFC 9207 `iss`), `return_to` confined to same-origin
//! paths, and logout with RFC 7009 revocation.

use std::collections::HashMap;

use crate::kit::session::*;
use crate::kit::*;
use base64::Engine as _;

// === passthrough ===

#[tokio::test]
async fn passthrough_login_moves_the_tokens_into_cookies() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    let (r, jar) = login(&proxy, "alice").await;

    let body = r.json();
    assert_eq!(body["user"], serde_json::json!({"name": "alice"}), "{body}");
    assert_eq!(body["expires_in"], 300);
    assert!(body.get("access_token").is_none() && body.get("refresh_token").is_none(), "{body}");
    assert!(r.header("content-type").unwrap_or_default().starts_with("application/json"));
    assert_eq!(
        r.header("cache-control"),
        Some("no-store"),
        "an answer setting session cookies is not cached"
    );

    let access = assert_set(&r, ACCESS);
    let refresh = assert_set(&r, REFRESH);
    for c in [&access, &refresh] {
        assert!(c.has("HttpOnly"), "{}", c.raw);
        assert_eq!(c.attr("SameSite"), Some("Lax"), "{}", c.raw);
        assert_eq!(c.attr("Path"), Some("/"), "{}", c.raw);
        assert!(!c.has("Secure"), "secure = false: {}", c.raw);
        assert!(!c.has("Domain"), "host-only cookie: {}", c.raw);
        assert_eq!(c.max_age(), Some(7 * 86_400), "default idle_timeout: {}", c.raw);
    }

    // The login's access token is what the upstream gets (ttl 300: no refresh) ...
    let r = api(&proxy, &jar).await;
    let at = forwarded_token(&r);
    assert_eq!(claims(&at)["sub"], "alice");
    assert_eq!(token_calls(&idp), 0);
    // ... and the refresh token is what the proxy refreshes with.
    assert_eq!(refresh_now(&proxy, &jar).await.status, 200);
    let rt = last_refresh_token(&idp);
    for c in [&access, &refresh] {
        for secret in [at.as_str(), at.split('.').nth(1).unwrap(), at.split('.').nth(2).unwrap(), rt.as_str()]
        {
            assert!(!c.value.contains(secret), "cookie {} holds a token in clear", c.name);
        }
    }
}

#[tokio::test]
async fn failed_passthrough_login_passes_through_and_sets_no_cookie() {
    let (_idp, _up, proxy) = setup(&Opts::default()).await;
    let r = post(proxy.url("/auth/login"), login_body("alice", "wrong"))
        .header("content-type", "application/json")
        .header("origin", own_origin(&proxy))
        .send()
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({"error": "bad credentials"}), "the IdP's answer as it is");
    assert!(set_cookies(&r).is_empty(), "{:?}", set_cookies(&r));
}

// === logout ===

#[tokio::test]
async fn logout_revokes_the_refresh_token_and_clears_the_cookies() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    idp.set_access_ttl(10);
    let (_, jar) = login(&proxy, "alice").await;
    // One refresh tells the test which refresh token the session holds.
    let r = refresh_now(&proxy, &jar).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rt_family = last_refresh_token(&idp);
    let jar = jar.after(&r);
    let stolen_copy = jar.clone();

    let r = logout(&proxy, &jar).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    assert_cleared(&r, ACCESS);
    assert_cleared(&r, REFRESH);
    assert_eq!(revoke_calls(&idp), 1);
    assert!(idp.family_revoked(&rt_family), "the session's refresh token is revoked at the server");

    let jar = jar.after(&r);
    assert!(jar.is_empty(), "{jar:?}");
    api(&proxy, &jar).await.assert_error(401, "missing_token");
    // Cookies kept from before the logout cannot be refreshed any more.
    api(&proxy, &stolen_copy).await.assert_error(401, "session_expired");
    refresh_now(&proxy, &stolen_copy).await.assert_error(401, "session_expired");
}

#[tokio::test]
async fn logout_without_a_session_answers_204() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    let r = logout(&proxy, &Jar::default()).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(revoke_calls(&idp), 0, "nothing to revoke");
}

// === authorization code + PKCE ===

fn query_of(url: &str) -> HashMap<String, String> {
    let q = url.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn location(r: &Reply) -> String {
    assert_eq!(r.status, 302, "expected a redirect: {}", r.text());
    r.header("location").expect("Location").to_owned()
}

/// `GET login_path?return_to=…` → the authorization request's URL and the login-state cookie.
async fn begin_login(proxy: &Proxy, return_to: &str) -> (Reply, String, Jar) {
    let r = get(proxy.url(&format!("/auth/login?return_to={}", enc(return_to)))).send().await;
    let authorize = location(&r);
    let jar = Jar::default().after(&r);
    (r, authorize, jar)
}

/// Follows the authorization request at the IdP; returns the callback URL it redirects to.
async fn authorize_at_idp(authorize: &str) -> String {
    location(&get(authorize).send().await)
}

/// The whole flow; returns the callback's answer and the jar after it.
async fn code_login(proxy: &Proxy, return_to: &str) -> (Reply, Jar) {
    let (_, authorize, jar) = begin_login(proxy, return_to).await;
    let callback = authorize_at_idp(&authorize).await;
    let r = jar.on(get(&callback)).send().await;
    let jar = jar.after(&r);
    (r, jar)
}

#[tokio::test]
async fn code_flow_with_pkce_logs_in_and_returns_to_the_page() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    let (r, authorize, jar) = begin_login(&proxy, "/app/page?tab=2").await;
    assert!(authorize.starts_with(&format!("{}?", idp.authorize_url())), "{authorize}");
    let q = query_of(&authorize);
    let redirect_uri = format!("{}/auth/callback", proxy.http_url());
    assert_eq!(q.get("response_type").map(String::as_str), Some("code"));
    assert_eq!(q.get("client_id").map(String::as_str), Some(idp::CLIENT_ID));
    assert_eq!(q.get("redirect_uri"), Some(&redirect_uri));
    assert_eq!(q.get("scope").map(String::as_str), Some("openid offline_access"));
    assert_eq!(q.get("code_challenge_method").map(String::as_str), Some("S256"));
    let challenge = q.get("code_challenge").expect("code_challenge");
    let raw =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(challenge).expect("base64url challenge");
    assert_eq!(raw.len(), 32, "a SHA-256 digest");
    let state = q.get("state").expect("state");
    assert!(state.len() >= 22, "state has enough entropy: {state}");
    let login_cookie = assert_set(&r, LOGIN);
    assert!(login_cookie.has("HttpOnly") && login_cookie.attr("Path") == Some("/"), "{}", login_cookie.raw);
    assert!(!login_cookie.value.contains(state.as_str()), "the state is sealed in the cookie");
    assert!(set_cookie(&r, ACCESS).is_none() && set_cookie(&r, REFRESH).is_none());

    // A second login attempt gets a different state and PKCE pair.
    let (_, other, _) = begin_login(&proxy, "/").await;
    assert_ne!(query_of(&other).get("state"), Some(state));
    assert_ne!(query_of(&other).get("code_challenge"), Some(challenge));

    let callback = authorize_at_idp(&authorize).await;
    assert!(callback.starts_with(&format!("{redirect_uri}?")), "{callback}");
    let r = jar.on(get(&callback)).send().await;
    assert_eq!(location(&r), "/app/page?tab=2");
    assert_set(&r, ACCESS);
    assert_set(&r, REFRESH);
    assert_cleared(&r, LOGIN);

    // The code was exchanged with the verifier (the IdP checked S256) and client authentication.
    let form = idp.last_token_form();
    assert_eq!(form.get("grant_type").map(String::as_str), Some("authorization_code"));
    assert_eq!(form.get("redirect_uri"), Some(&redirect_uri));
    let verifier = form.get("code_verifier").expect("code_verifier");
    assert!((43..=128).contains(&verifier.len()), "RFC 7636 verifier length: {}", verifier.len());
    assert!(idp.last_token_auth().is_some_and(|a| a.starts_with("Basic ")));
    assert_eq!(token_calls(&idp), 1);

    let jar = jar.after(&r);
    assert!(jar.get(LOGIN).is_none());
    let r = api(&proxy, &jar).await;
    assert_eq!(claims(&forwarded_token(&r))["sub"], "alice");
    assert_eq!(r.echo().header("x-auth-subject"), Some("alice"));
}

#[tokio::test]
async fn callback_with_a_wrong_or_missing_state_is_a_bad_request() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    let (_, authorize, jar) = begin_login(&proxy, "/app").await;
    let callback = authorize_at_idp(&authorize).await;
    let q = query_of(&callback);
    let (code, iss) = (enc(&q["code"]), enc(&q["iss"]));
    let cases = [
        format!("/auth/callback?code={code}&state=forged&iss={iss}"),
        format!("/auth/callback?code={code}&iss={iss}"),
        format!("/auth/callback?code={code}&state=&iss={iss}"),
    ];
    for path in cases {
        let r = jar.on(get(proxy.url(&path))).send().await;
        r.assert_error(400, "bad_request");
        assert!(set_cookie(&r, ACCESS).is_none(), "{path}");
    }
    // The right state without the login-state cookie (another browser) is refused too.
    get(&callback).send().await.assert_error(400, "bad_request");
    assert_eq!(token_calls(&idp), 0, "no code was exchanged");
    // The genuine callback still works afterwards.
    let r = jar.on(get(&callback)).send().await;
    assert_eq!(location(&r), "/app");
}

#[tokio::test]
async fn callback_from_another_issuer_is_refused() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    let (_, authorize, jar) = begin_login(&proxy, "/app").await;
    let callback = authorize_at_idp(&authorize).await;
    let q = query_of(&callback);
    let path = format!(
        "/auth/callback?code={}&state={}&iss={}",
        enc(&q["code"]),
        enc(&q["state"]),
        enc("https://evil.example")
    );
    let r = jar.on(get(proxy.url(&path))).send().await;
    r.assert_error(400, "bad_request");
    assert!(set_cookie(&r, ACCESS).is_none());
    assert_eq!(token_calls(&idp), 0, "a mix-up attack does not get the code exchanged");
}

#[tokio::test]
async fn an_error_from_the_authorization_server_is_a_bad_request() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    let (_, authorize, jar) = begin_login(&proxy, "/app").await;
    let state = query_of(&authorize)["state"].clone();
    let path = format!("/auth/callback?error=access_denied&state={}&iss={}", enc(&state), enc(&idp.issuer()));
    let r = jar.on(get(proxy.url(&path))).send().await;
    r.assert_error(400, "bad_request");
    assert_cleared(&r, LOGIN);
    assert_eq!(token_calls(&idp), 0);
}

#[tokio::test]
async fn an_authorization_code_is_exchanged_once() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    let (_, authorize, jar) = begin_login(&proxy, "/app").await;
    let callback = authorize_at_idp(&authorize).await;
    let first = jar.on(get(&callback)).send().await;
    assert_eq!(location(&first), "/app");
    // Replayed with the same login-state cookie: the server refuses the used code.
    let again = jar.on(get(&callback)).send().await;
    again.assert_error(400, "bad_request");
    assert!(set_cookie(&again, ACCESS).is_none());
    assert_eq!(token_calls(&idp), 2);
}

#[tokio::test]
async fn return_to_is_confined_to_same_origin_paths() {
    let (_idp, _up, proxy) = setup(&Opts::default()).await;
    let cases = [
        ("/orders/42?x=1", "/orders/42?x=1"),
        ("//evil.example", "/"),
        ("//evil.example/path", "/"),
        ("https://evil.example", "/"),
        ("http://evil.example/x", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("orders", "/"),
        ("", "/"),
    ];
    for (return_to, want) in cases {
        let (r, jar) = code_login(&proxy, return_to).await;
        assert_eq!(location(&r), want, "return_to={return_to:?}");
        assert!(jar.get(ACCESS).is_some(), "return_to={return_to:?}: still logged in");
    }
    // Without return_to at all.
    let r = get(proxy.url("/auth/login")).send().await;
    let jar = Jar::default().after(&r);
    let callback = authorize_at_idp(&location(&r)).await;
    assert_eq!(location(&jar.on(get(&callback)).send().await), "/");
}

#[tokio::test]
async fn authorize_params_and_resource_reach_the_server() {
    let o = Opts {
        auth: "resource = \"urn:example:orders-api\"\nauthorize_params = { prompt = \"consent\" }".into(),
        ..Opts::default()
    };
    let (idp, _up, proxy) = setup(&o).await;
    let (_, authorize, jar) = begin_login(&proxy, "/").await;
    let q = query_of(&authorize);
    assert_eq!(q.get("prompt").map(String::as_str), Some("consent"));
    assert_eq!(q.get("resource").map(String::as_str), Some("urn:example:orders-api"));
    let callback = authorize_at_idp(&authorize).await;
    assert_eq!(location(&jar.on(get(&callback)).send().await), "/");
    assert_eq!(idp.last_token_form().get("resource").map(String::as_str), Some("urn:example:orders-api"));
}

#[tokio::test]
async fn login_state_cookie_is_lax_even_when_session_cookies_are_strict() {
    let o = Opts { session: "same_site = \"strict\"".into(), ..Opts::default() };
    let (_idp, _up, proxy) = setup(&o).await;
    let (r, _, _) = begin_login(&proxy, "/").await;
    let c = assert_set(&r, LOGIN);
    // The callback is a top-level navigation redirected from the IdP's site:
    // only Lax (or None) cookies go with it.
    assert_eq!(c.attr("SameSite"), Some("Lax"), "{}", c.raw);
    // The session cookies themselves follow the configuration.
    let (r, _) = login(&proxy, "alice").await;
    assert_eq!(assert_set(&r, ACCESS).attr("SameSite"), Some("Strict"));
}

#[tokio::test]
async fn logout_also_ends_the_grace_of_the_rotated_token() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    idp.set_access_ttl(10);
    let (_, old) = login(&proxy, "alice").await;
    // A refresh rotates the token; `old` is what another tab (or a thief) still holds.
    let r = api(&proxy, &old).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let current = old.clone().after(&r);
    assert_eq!(logout(&proxy, &current).await.status, 204);
    assert!(idp.family_revoked(&last_refresh_token(&idp)));

    // Within refresh_grace, but the session is over: no new cookies, no access.
    let r = api(&proxy, &old).await;
    r.assert_error(401, "session_expired");
    assert!(set_cookies(&r).iter().all(SetCookie::is_deletion), "{:?}", set_cookies(&r));
    refresh_now(&proxy, &old).await.assert_error(401, "session_expired");
}

#[tokio::test]
async fn a_session_endpoint_called_with_the_wrong_method_is_a_bad_request() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    for path in ["/auth/refresh", "/auth/logout", "/auth/callback"] {
        let r = request("PUT", proxy.url(path)).header("origin", own_origin(&proxy)).send().await;
        r.assert_error(400, "bad_request");
    }
    assert_eq!(token_calls(&idp), 0);
}
