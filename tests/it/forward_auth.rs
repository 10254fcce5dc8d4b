//! Forward auth (SPEC §4 "Forward auth"): subrequests as each front proxy sends
//! them, straight to the `[forward_auth]` listener — Traefik and Caddy
//! (`X-Forwarded-*`), nginx (`X-Original-*` with `Host`), Envoy (the original
//! request as the subrequest) — and forward-auth-only routes.

use crate::kit::session::*;
use crate::kit::*;

/// The session suites' configuration plus a forward-auth listener, a route
/// "internal" without upstream on `/internal`, and identity headers on "api".
fn opts() -> Opts {
    Opts {
        routes: r#"
[[routes]]
name = "internal"
path_prefix = "/internal"
auth = "required"
issuer = "main"
audiences = ["orders-api"]
forward_token = true
[routes.identity_headers]
"X-User-Id" = "sub"

[[routes]]
name = "blind"
path_prefix = "/blind"
auth = "required"
issuer = "main"
audiences = ["orders-api"]
forward_token = false

[forward_auth]
listen = "127.0.0.1:0"
"#
        .to_owned(),
        ..Opts::default()
    }
}

fn fa(proxy: &Proxy, subrequest_path: &str) -> String {
    format!("http://{}{subrequest_path}", proxy.forward_auth_addr())
}

/// A subrequest as Traefik's ForwardAuth (and Caddy's forward_auth) sends it.
fn traefik(proxy: &Proxy, method: &str, uri: &str) -> Req {
    get(fa(proxy, "/"))
        .header("x-forwarded-method", method)
        .header("x-forwarded-proto", "http")
        .header("x-forwarded-host", proxy.http_addr().to_string())
        .header("x-forwarded-uri", uri)
}

#[tokio::test]
async fn a_valid_bearer_is_answered_200_with_identity_headers_in_each_convention() {
    let (idp, up, proxy) = setup(&opts()).await;
    let token = idp.access_token("alice", 300);

    let r = traefik(&proxy, "GET", "/internal/orders?x=1").bearer(&token).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-user-id"), Some("alice"));
    assert!(r.body.is_empty(), "the answer has no body: {}", r.text());
    assert!(r.header("x-request-id").is_some());

    // nginx: X-Original-Method / X-Original-URI with Host.
    let r = get(fa(&proxy, "/auth"))
        .header("host", "api.example.com")
        .header("x-original-method", "DELETE")
        .header("x-original-uri", "/internal/orders/7")
        .bearer(&token)
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-user-id"), Some("alice"));

    // Envoy ext_authz: the original method and path are the subrequest's own.
    let r = request("PUT", fa(&proxy, "/internal/orders/7")).bearer(&token).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-user-id"), Some("alice"));
    // A route with an upstream is authorized too; the answer never forwards.
    let r = traefik(&proxy, "GET", "/api/orders").bearer(&token).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.seen().len(), 0, "nothing went to the upstream");
}

#[tokio::test]
async fn a_bearer_comes_back_as_authorization_only_with_forward_token() {
    let (idp, _up, proxy) = setup(&opts()).await;
    let token = idp.access_token("alice", 300);
    // What the upstream of a proxied request would get: nginx sets Authorization
    // from the answer, so an answer without it would drop the client's bearer.
    let r = traefik(&proxy, "GET", "/internal/orders").bearer(&token).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("authorization"), Some(format!("Bearer {token}").as_str()));
    let r = traefik(&proxy, "GET", "/blind/orders").bearer(&token).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("authorization"), None, "forward_token = false");
}

#[tokio::test]
async fn refusals_are_the_answers_a_proxied_request_gets() {
    let (idp, _up, proxy) = setup(&opts()).await;
    let r = traefik(&proxy, "GET", "/internal/x").send().await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "missing_token");
    assert!(r.header("www-authenticate").is_some_and(|w| w.starts_with("Bearer")), "{:?}", r.headers);

    let r = traefik(&proxy, "GET", "/internal/x").bearer("garbage").send().await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "invalid_token");

    let r = traefik(&proxy, "GET", "/nowhere").bearer(&idp.access_token("alice", 300)).send().await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "no_route");
}

#[tokio::test]
async fn the_original_path_is_normalised_before_the_route_is_chosen() {
    let (idp, _up, proxy) = setup(&opts()).await;
    let token = idp.access_token("alice", 300);
    // `/open` is public; what it really names is `/internal`, which needs a token.
    let r = traefik(&proxy, "GET", "/open/../internal/x").send().await;
    assert_eq!(r.status, 401, "{}", r.text());
    let r = traefik(&proxy, "GET", "/open/%2e%2e/internal/x").send().await;
    assert_eq!(r.status, 401, "{}", r.text());
    let r = traefik(&proxy, "GET", "/open/../../etc/passwd").bearer(&token).send().await;
    assert_eq!(r.status, 400, "{}", r.text());
    // A forwarded header with a list of values is ambiguous: refused.
    let r =
        traefik(&proxy, "GET", "/internal/x").header("x-forwarded-method", "GET").bearer(&token).send().await;
    assert_eq!(r.status, 400, "two X-Forwarded-Method fields: {}", r.text());
}

#[tokio::test]
async fn a_client_copy_of_the_other_convention_does_not_choose_the_route() {
    let (_idp, _up, proxy) = setup(&opts()).await;
    // nginx writes X-Original-*, and passes on what the client sent besides:
    // a public route named there must not stand for the one asked about.
    let nginx = |name: &str, value: &str| {
        get(fa(&proxy, "/auth"))
            .header("host", "api.example.com")
            .header("x-original-method", "GET")
            .header("x-original-uri", "/internal/x")
            .header(name, value)
    };
    for (name, value) in [
        ("x-forwarded-uri", "/open/x"),
        ("x-forwarded-method", "OPTIONS"),
        ("x-forwarded-host", "other.example"),
    ] {
        let r = nginx(name, value).send().await;
        assert_eq!(r.status, 400, "{name}: {}", r.text());
        assert_eq!(r.json()["error"], "bad_request");
    }
    // A copy that says the same thing changes nothing.
    let r = nginx("x-forwarded-uri", "/internal/x").send().await;
    assert_eq!(r.status, 401, "{}", r.text());
}

#[tokio::test]
async fn a_forward_auth_only_route_is_no_route_on_the_proxy_listener() {
    let (idp, up, proxy) = setup(&opts()).await;
    let token = idp.access_token("alice", 300);
    let r = get(proxy.url("/internal/x")).bearer(&token).send().await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "no_route");
    assert_eq!(up.seen().len(), 0);
}

#[tokio::test]
async fn an_expiring_session_is_refreshed_once_and_the_new_cookies_come_back_numbered() {
    let (idp, _up, proxy) = setup(&opts()).await;
    idp.set_access_ttl(10); // needs refresh on every request
    let (_, jar) = login(&proxy, "alice").await;
    idp.set_access_ttl(300);

    let r = jar.on(traefik(&proxy, "GET", "/internal/orders")).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(token_calls(&idp), 1);
    let access = assert_set(&r, ACCESS);
    let refresh = assert_set(&r, REFRESH);
    // The access token for the upstream (forward_token), fresh from the refresh.
    let token = r.header("authorization").and_then(|a| a.strip_prefix("Bearer ")).expect("Authorization");
    assert_eq!(claims(token)["sub"], "alice");
    assert!(claims(token)["exp"].as_i64().unwrap() > idp::now() + 200);
    // Every Set-Cookie also as X-Portcullis-Set-Cookie-N, in order (nginx copies these).
    let all: Vec<&str> = r.headers.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
    assert!(all.len() >= 2);
    for (i, c) in all.iter().enumerate() {
        assert_eq!(r.header(&format!("x-portcullis-set-cookie-{}", i + 1)), Some(*c));
    }
    assert_eq!(r.header(&format!("x-portcullis-set-cookie-{}", all.len() + 1)), None);

    // The new cookies work through forward auth and through the proxy, without another refresh.
    let jar = jar.after(&r);
    assert!(
        jar.get(ACCESS) == Some(access.value.as_str()) && jar.get(REFRESH) == Some(refresh.value.as_str())
    );
    let r = jar.on(traefik(&proxy, "GET", "/internal/orders")).send().await;
    assert_eq!(r.status, 200);
    assert!(set_cookies(&r).is_empty());
    assert_eq!(api(&proxy, &jar).await.status, 200);
    assert_eq!(token_calls(&idp), 1);
}

#[tokio::test]
async fn a_cross_origin_cookie_post_is_403_and_a_same_origin_one_passes() {
    let (_idp, _up, proxy) = setup(&opts()).await;
    let (_, jar) = login(&proxy, "alice").await;
    let r = jar
        .on(traefik(&proxy, "POST", "/internal/orders"))
        .header("origin", "https://evil.example")
        .send()
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = jar.on(traefik(&proxy, "POST", "/internal/orders")).header("origin", APP_ORIGIN).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The origin check reads the original scheme and host, not the subrequest's.
    let own = format!("http://{}", proxy.http_addr());
    let r = jar.on(traefik(&proxy, "POST", "/internal/orders")).header("origin", &own).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = jar
        .on(traefik(&proxy, "POST", "/internal/orders"))
        .header("x-forwarded-proto", "https")
        .header("origin", &own)
        .send()
        .await;
    assert_eq!(r.status, 400, "two X-Forwarded-Proto fields: {}", r.text());
}

#[tokio::test]
async fn an_ended_session_is_401_with_its_cookies_cleared() {
    let (idp, _up, proxy) = setup(&opts()).await;
    idp.set_access_ttl(10);
    let (_, jar) = login(&proxy, "alice").await;
    idp.revoke_all_sessions();
    let r = jar.on(traefik(&proxy, "GET", "/internal/orders")).send().await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "session_expired");
    assert_cleared(&r, ACCESS);
    assert_cleared(&r, REFRESH);
    assert!(r.header("x-portcullis-set-cookie-1").is_some(), "the clearing cookies are numbered too");
}

#[tokio::test]
async fn subrequests_are_counted_and_logged_like_proxied_requests() {
    let (idp, _up, proxy) = setup(&opts()).await;
    let token = idp.access_token("alice", 300);
    for _ in 0..3 {
        assert_eq!(traefik(&proxy, "GET", "/internal/x").bearer(&token).send().await.status, 200);
    }
    assert_eq!(traefik(&proxy, "GET", "/internal/x").send().await.status, 401);
    let m = metrics(&proxy).await;
    assert_eq!(m.value(r#"portcullis_requests_total{route="internal",status="200"}"#), 3.0);
    assert_eq!(m.value(r#"portcullis_requests_total{route="internal",status="401"}"#), 1.0);
}

#[tokio::test]
async fn check_names_the_forward_auth_only_routes() {
    let dir = TempDir::new();
    let path = dir.write(
        "p.toml",
        r#"
[listen]
http = "127.0.0.1:0"

[forward_auth]
listen = "127.0.0.1:0"

[[issuers]]
name = "main"
issuer = "https://id.example.com"
jwks_url = "https://id.example.com/jwks"

[[routes]]
name = "internal"
path_prefix = "/internal"
issuer = "main"
audiences = ["a"]
"#,
    );
    let out = portcullis(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("route internal: forward auth only"), "{}", out.stdout);

    // Without [forward_auth], a route needs an upstream.
    let text =
        std::fs::read_to_string(&path).unwrap().replace("[forward_auth]\nlisten = \"127.0.0.1:0\"\n", "");
    let path = dir.write("q.toml", &text);
    let out = portcullis(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("upstream") && out.stderr.contains("[forward_auth]"), "{}", out.stderr);
}
