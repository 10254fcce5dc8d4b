//! CSRF (SPEC §4 "CSRF"): a cookie-authenticated unsafe request must come from
//! an allowed origin or the proxy's own (Origin, else Referer); `Authorization`
//! requests are exempt; the session endpoints follow the same rule.

use crate::kit::session::*;
use crate::kit::*;

/// A proxy with alice logged in.
async fn logged_in() -> (TestIdp, Upstream, Proxy, Jar) {
    let (idp, up, proxy) = setup(&Opts::default()).await;
    let (_, jar) = login(&proxy, "alice").await;
    (idp, up, proxy, jar)
}

async fn send(proxy: &Proxy, jar: &Jar, method: &str, headers: &[(&str, String)]) -> Reply {
    let mut req = jar.on(request(method, proxy.url("/api/orders")).body("{}"));
    for (n, v) in headers {
        req = req.header(n, v);
    }
    req.send().await
}

fn assert_csrf(r: &Reply, what: &str) {
    assert_eq!(r.status, 403, "{what}: {}", r.text());
    r.assert_error(403, "csrf");
    assert!(set_cookies(r).is_empty(), "{what}: a refused request does not touch the cookies");
}

#[tokio::test]
async fn cookie_authenticated_unsafe_requests_need_an_allowed_or_own_origin() {
    let (idp, up, proxy, jar) = logged_in().await;
    let own = own_origin(&proxy);
    let port = proxy.http_addr().port();
    let refused: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("no Origin and no Referer", vec![]),
        ("a foreign Origin", vec![("origin", "http://evil.example".into())]),
        ("an opaque Origin", vec![("origin", "null".into())]),
        ("the own host on another port", vec![("origin", format!("http://127.0.0.1:{}", port + 1))]),
        ("the own host with another scheme", vec![("origin", format!("https://127.0.0.1:{port}"))]),
        ("an allowed origin's sibling", vec![("origin", "http://evil.app.test".into())]),
        ("an allowed host with another scheme", vec![("origin", "https://app.test".into())]),
        ("a foreign Referer", vec![("referer", "http://evil.example/http://app.test/".into())]),
        (
            "a foreign Origin with an allowed Referer",
            vec![("origin", "http://evil.example".into()), ("referer", "http://app.test/page".into())],
        ),
    ];
    let allowed: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("an allowed Origin", vec![("origin", APP_ORIGIN.into())]),
        ("an allowed Origin with the default port", vec![("origin", "http://app.test:80".into())]),
        ("the proxy's own origin", vec![("origin", own.clone())]),
        ("an allowed Referer", vec![("referer", "http://app.test/orders?x=1".into())]),
        ("the own origin as Referer", vec![("referer", format!("{own}/app/page"))]),
    ];
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        for (what, headers) in &refused {
            assert_csrf(&send(&proxy, &jar, method, headers).await, &format!("{method} with {what}"));
        }
        for (what, headers) in &allowed {
            let r = send(&proxy, &jar, method, headers).await;
            assert_eq!(r.status, 200, "{method} with {what}: {}", r.text());
            let echo = r.echo();
            assert_eq!(echo.method, method);
            assert_eq!(echo.header("x-auth-subject"), Some("alice"), "{method} with {what}");
        }
    }
    let forwarded = up.seen().len();
    assert_eq!(forwarded, 4 * allowed.len(), "no refused request reached the upstream");
    assert_eq!(token_calls(&idp), 0);
}

#[tokio::test]
async fn safe_methods_need_no_origin() {
    let (_idp, _up, proxy, jar) = logged_in().await;
    for method in ["GET", "OPTIONS"] {
        let r = send(&proxy, &jar, method, &[]).await;
        assert_eq!(r.echo().header("x-auth-subject"), Some("alice"), "{method}");
    }
    let r = send(&proxy, &jar, "HEAD", &[("origin", "http://evil.example".into())]).await;
    assert_eq!(r.status, 200, "HEAD");
}

#[tokio::test]
async fn requests_authenticated_by_an_authorization_header_are_exempt() {
    let (idp, _up, proxy, jar) = logged_in().await;
    let token = idp.access_token("bob", 300);
    let bearer = format!("Bearer {token}");
    for headers in [
        vec![("authorization", bearer.clone())],
        vec![("authorization", bearer.clone()), ("origin", "http://evil.example".into())],
    ] {
        // Even with the session cookies present, the header decides.
        let r = send(&proxy, &jar, "POST", &headers).await;
        let echo = r.echo();
        assert_eq!(echo.header("x-auth-subject"), Some("bob"), "{headers:?}");
        assert_eq!(echo.header("authorization"), Some(bearer.as_str()));
        let r = send(&proxy, &Jar::default(), "DELETE", &headers).await;
        assert_eq!(r.echo().header("x-auth-subject"), Some("bob"));
    }
    // Another scheme is no authentication: the cookies are, and the rule applies.
    let r = send(&proxy, &jar, "POST", &[("authorization", "Basic dXNlcjpwYXNz".into())]).await;
    assert_csrf(&r, "Basic with cookies");
}

#[tokio::test]
async fn unsafe_request_without_a_session_is_a_missing_token_not_csrf() {
    let (_idp, _up, proxy, _jar) = logged_in().await;
    let r = send(&proxy, &Jar::default(), "POST", &[("origin", "http://evil.example".into())]).await;
    r.assert_error(401, "missing_token");
}

#[tokio::test]
async fn a_foreign_request_never_triggers_a_refresh() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    idp.set_access_ttl(10);
    let (_, jar) = login(&proxy, "alice").await;
    assert_csrf(&send(&proxy, &jar, "POST", &[("origin", "http://evil.example".into())]).await, "POST");
    assert_eq!(token_calls(&idp), 0, "the gate comes before the refresh");
    let r = send(&proxy, &jar, "POST", &[("origin", APP_ORIGIN.into())]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(token_calls(&idp), 1);
}

#[tokio::test]
async fn session_endpoints_follow_the_same_rule() {
    let (idp, _up, proxy, jar) = logged_in().await;
    let foreign = [None, Some("http://evil.example")];
    for origin in foreign {
        let with = |req: Req| match origin {
            Some(o) => req.header("origin", o),
            None => req,
        };
        let what = origin.unwrap_or("no origin");
        assert_csrf(&with(jar.on(post(proxy.url("/auth/refresh"), ""))).send().await, what);
        assert_csrf(&with(jar.on(post(proxy.url("/auth/logout"), ""))).send().await, what);
        let r = with(post(proxy.url("/auth/login"), login_body("mallory", PASSWORD)))
            .header("content-type", "application/json")
            .send()
            .await;
        assert_csrf(&r, &format!("login from {what}"));
    }
    assert_eq!(token_calls(&idp), 0);
    assert_eq!(revoke_calls(&idp), 0, "a forged logout revokes nothing");
    assert_eq!(api(&proxy, &jar).await.status, 200, "the session is intact");

    // From an allowed origin all three work.
    let r = jar.on(post(proxy.url("/auth/refresh"), "")).header("origin", APP_ORIGIN).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let jar = jar.after(&r);
    let r = post(proxy.url("/auth/login"), login_body("bob", PASSWORD))
        .header("content-type", "application/json")
        .header("origin", APP_ORIGIN)
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = jar.on(post(proxy.url("/auth/logout"), "")).header("origin", APP_ORIGIN).send().await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(revoke_calls(&idp), 1);
}
