//! The proxy's cookies (SPEC §4 "Cookies", "Identity headers"): attributes,
//! sealing (a cookie that fails to open is absent), key rotation, chunking of
//! large values, lifetimes, and removal of the proxy's cookies from the
//! `Cookie` header sent upstream.

use crate::kit::session::*;
use crate::kit::*;

fn assert_attributes(c: &SetCookie, secure: bool, same_site: &str) {
    assert!(c.has("HttpOnly"), "{}", c.raw);
    assert_eq!(c.has("Secure"), secure, "{}", c.raw);
    assert_eq!(c.attr("SameSite"), Some(same_site), "{}", c.raw);
    assert_eq!(c.attr("Path"), Some("/"), "{}", c.raw);
    assert!(!c.has("Domain"), "{}", c.raw);
}

#[tokio::test]
async fn secure_cookies_use_host_prefixed_names() {
    let o = Opts { secure: true, session: "same_site = \"strict\"".into(), ..Opts::default() };
    let (_idp, _up, proxy) = setup(&o).await;
    let r = post(proxy.url("/auth/login"), login_body("alice", PASSWORD))
        .header("content-type", "application/json")
        .header("origin", own_origin(&proxy))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for name in ["__Host-access", "__Host-refresh"] {
        assert_attributes(&assert_set(&r, name), true, "Strict");
    }
    let jar = Jar::default().after(&r);
    let echo = jar.on(get(proxy.url("/api/x"))).header("cookie", "theme=dark").send().await.echo();
    assert_eq!(echo.header("x-auth-subject"), Some("alice"));
    assert_eq!(echo.header_all("cookie").join("; "), "theme=dark");
    // The login-state cookie of the code flow is host-prefixed too, and Lax so it
    // survives the authorization server's cross-site redirect back.
    let r = get(proxy.url("/auth/login")).send().await;
    assert_attributes(&assert_set(&r, "__Host-portcullis-login"), true, "Lax");
}

#[tokio::test]
async fn insecure_development_cookies_have_no_secure_attribute() {
    let (_idp, _up, proxy) = setup(&Opts::default()).await;
    let (r, _) = login(&proxy, "alice").await;
    assert_attributes(&assert_set(&r, ACCESS), false, "Lax");
    assert_attributes(&assert_set(&r, REFRESH), false, "Lax");
    let r = get(proxy.url("/auth/login")).send().await;
    assert_attributes(&assert_set(&r, LOGIN), false, "Lax");
}

#[tokio::test]
async fn access_cookie_lives_as_long_as_the_refresh_cookie() {
    let o = Opts { session: "idle_timeout = \"1h\"".into(), ..Opts::default() };
    let (idp, _up, proxy) = setup(&o).await;
    idp.set_access_ttl(10);
    let (r, jar) = login(&proxy, "alice").await;
    let lifetimes = |r: &Reply| (assert_set(r, ACCESS).max_age(), assert_set(r, REFRESH).max_age());
    assert_eq!(lifetimes(&r), (Some(3600), Some(3600)), "not the 10 s of the token");
    let r = api(&proxy, &jar).await; // transparent refresh
    assert_eq!(r.status, 200);
    assert_eq!(lifetimes(&r), (Some(3600), Some(3600)), "renewed on refresh");
    let r = refresh_now(&proxy, &jar.after(&r)).await;
    assert_eq!(r.status, 200);
    assert_eq!(lifetimes(&r), (Some(3600), Some(3600)));
}

#[tokio::test]
async fn proxy_cookies_are_removed_from_the_upstream_cookie_header() {
    let (_idp, _up, proxy) = setup(&Opts::default()).await;
    let (_, jar) = login(&proxy, "alice").await;
    let login_state = Jar::default().after(&get(proxy.url("/auth/login")).send().await);
    let cookie = format!(
        "theme=dark; {ACCESS}={}; {REFRESH}={}; {LOGIN}={}; portcullis-accessory=keep; {ACCESS}.7=x; lang=en",
        jar.get(ACCESS).unwrap(),
        jar.get(REFRESH).unwrap(),
        login_state.get(LOGIN).unwrap(),
    );
    let others = "theme=dark; portcullis-accessory=keep; lang=en";
    for path in ["/api/orders", "/open/page"] {
        let echo = get(proxy.url(path)).header("cookie", &cookie).send().await.echo();
        assert_eq!(echo.header_all("cookie").join("; "), others, "{path}");
        let sent = echo.header_all("cookie").join("; ");
        for v in [jar.get(ACCESS).unwrap(), jar.get(REFRESH).unwrap()] {
            assert!(!sent.contains(v), "{path}: a sealed session cookie reached the upstream");
        }
    }
    // Also when the token came from the Authorization header.
    let idp_token = forwarded_token(&api(&proxy, &jar).await);
    let echo = get(proxy.url("/api/orders"))
        .header("authorization", format!("Bearer {idp_token}"))
        .header("cookie", &cookie)
        .send()
        .await
        .echo();
    assert_eq!(echo.header_all("cookie").join("; "), others);
    // Nothing but the proxy's cookies: no Cookie header at all.
    let echo = jar.on(get(proxy.url("/api/orders"))).send().await.echo();
    assert!(!echo.has_header("cookie"), "{:?}", echo.headers);
    assert_eq!(echo.header("x-auth-subject"), Some("alice"));
}

#[tokio::test]
async fn cookie_token_is_not_forwarded_when_forward_token_is_off() {
    let up = Upstream::start().await;
    let routes = format!(
        "[[routes]]\nname = \"quiet\"\npath_prefix = \"/quiet\"\nupstream = \"{}\"\nauth = \"required\"\n\
         issuer = \"main\"\naudiences = [\"orders-api\"]\nforward_token = false",
        up.url()
    );
    let idp = TestIdp::start().await;
    let proxy = start(&idp, &up, &Opts { routes, ..Opts::default() }).await;
    let (_, jar) = login(&proxy, "alice").await;
    let echo = jar.on(get(proxy.url("/quiet/x"))).send().await.echo();
    assert_eq!(echo.header("x-auth-subject"), Some("alice"));
    assert!(!echo.has_header("authorization") && !echo.has_header("cookie"), "{:?}", echo.headers);
}

/// Flips one character in the middle of a sealed value.
fn tamper(v: &str) -> String {
    let mut b = v.as_bytes().to_vec();
    let i = b.len() / 2;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

#[tokio::test]
async fn cookies_that_fail_to_open_are_treated_as_absent() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    let (_, jar) = login(&proxy, "alice").await;
    let (access, refresh) = (jar.get(ACCESS).unwrap().to_owned(), jar.get(REFRESH).unwrap().to_owned());
    let variants: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("tampered access, no refresh", vec![(ACCESS, tamper(&access))]),
        ("both tampered", vec![(ACCESS, tamper(&access)), (REFRESH, tamper(&refresh))]),
        ("values swapped between names", vec![(ACCESS, refresh.clone()), (REFRESH, access.clone())]),
        ("not base64", vec![(ACCESS, "%%%!!!".into()), (REFRESH, "..".into())]),
        ("truncated", vec![(ACCESS, access[..access.len() / 2].to_owned()), (REFRESH, "AAAA".into())]),
        ("a bare JWT", vec![(ACCESS, idp.access_token("mallory", 300))]),
    ];
    for (what, cookies) in variants {
        let mut j = Jar::default();
        for (n, v) in &cookies {
            j.set(n, v);
        }
        let r = api(&proxy, &j).await;
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        r.assert_error(401, "missing_token");
        let r = refresh_now(&proxy, &j).await;
        r.assert_error(401, "missing_token");
    }
    assert_eq!(token_calls(&idp), 0);

    // A broken access cookie next to a good refresh cookie: refreshed like a missing one.
    let mut j = jar.clone();
    j.set(ACCESS, &tamper(&access));
    let r = api(&proxy, &j).await;
    assert_eq!(claims(&forwarded_token(&r))["sub"], "alice");
    assert_set(&r, ACCESS);
    assert_eq!(token_calls(&idp), 1);
}

#[tokio::test]
async fn cookies_sealed_with_a_retired_key_open_after_key_rotation() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let old = start(&idp, &up, &Opts { keys: vec![KEY_A], ..Opts::default() }).await;
    let rotated = start(&idp, &up, &Opts { keys: vec![KEY_B, KEY_A], ..Opts::default() }).await;
    let only_new = start(&idp, &up, &Opts { keys: vec![KEY_B], ..Opts::default() }).await;

    let (_, jar_a) = login(&old, "alice").await;
    // The rotated proxy opens cookies sealed with the retired key ...
    let r = api(&rotated, &jar_a).await;
    assert_eq!(r.echo().header("x-auth-subject"), Some("alice"));
    assert!(set_cookies(&r).is_empty(), "no refresh needed");
    // ... and seals new ones with the first key.
    let r = refresh_now(&rotated, &jar_a).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let jar_b = jar_a.clone().after(&r);
    assert_eq!(api(&only_new, &jar_b).await.echo().header("x-auth-subject"), Some("alice"));
    api(&old, &jar_b).await.assert_error(401, "missing_token");
    // A key that is gone from the list no longer opens anything.
    api(&only_new, &jar_a).await.assert_error(401, "missing_token");
}

#[tokio::test]
async fn large_access_tokens_are_chunked_and_joined() {
    let (idp, _up, proxy) = setup(&Opts::default()).await;
    // The test IdP puts the login name into `sub`: a long one makes a large token.
    let long_name = "a".repeat(6000);
    let (r, jar) = login(&proxy, &long_name).await;
    let chunks: Vec<SetCookie> =
        set_cookies(&r).into_iter().filter(|c| c.name.starts_with(&format!("{ACCESS}."))).collect();
    assert!(chunks.len() >= 2, "{:?}", set_cookies(&r).iter().map(|c| &c.name).collect::<Vec<_>>());
    assert!(set_cookie(&r, ACCESS).is_none(), "one logical cookie is either whole or chunked");
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.name, format!("{ACCESS}.{i}"));
        assert!(c.raw.len() < 4096, "each Set-Cookie fits a browser's limit: {} bytes", c.raw.len());
        assert_attributes(c, false, "Lax");
        assert_eq!(c.max_age(), assert_set(&r, REFRESH).max_age());
    }

    let r = api(&proxy, &jar).await;
    let token = forwarded_token(&r);
    assert_eq!(claims(&token)["sub"], long_name.as_str(), "joined from the chunks");
    assert!(!r.echo().has_header("cookie"), "no chunk reaches the upstream");
    assert_eq!(token_calls(&idp), 0);

    // A refresh writes the large token in chunks again.
    let r = refresh_now(&proxy, &jar).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let jar = jar.after(&r);
    let fresh = forwarded_token(&api(&proxy, &jar).await);
    assert_ne!(fresh, token);
    assert_eq!(claims(&fresh)["sub"], long_name.as_str());

    // A small token later replaces the chunks and deletes every stale part.
    let r = jar
        .on(post(proxy.url("/auth/login"), login_body("bob", PASSWORD)))
        .header("content-type", "application/json")
        .header("origin", own_origin(&proxy))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_set(&r, ACCESS);
    for i in 0..chunks.len() {
        assert_cleared(&r, &format!("{ACCESS}.{i}"));
    }
    let jar = jar.after(&r);
    assert_eq!(jar.0.keys().filter(|k| k.starts_with(&format!("{ACCESS}."))).count(), 0, "{jar:?}");
    assert_eq!(api(&proxy, &jar).await.echo().header("x-auth-subject"), Some("bob"));
}
