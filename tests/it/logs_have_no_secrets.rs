//! Runs the real binary at debug log level through logins, refreshes, rejections
//! and logout, then scans everything it logged for the secrets it handled.

use crate::kit::idp::CLIENT_SECRET;
use crate::kit::session::b64_key;
use crate::kit::*;

#[tokio::test]
async fn no_token_cookie_value_or_secret_reaches_the_log() {
    let idp = TestIdp::start().await;
    idp.set_access_ttl(5); // every cookie request refreshes (refresh_ahead 30s)
    let up = Upstream::start().await;
    let cookie_key = b64_key(&[42u8; 32]);
    let toml = Config::new()
        .table(idp.issuer_table())
        .table(idp.auth_server_table())
        .table(session_table())
        .table(api_route(&up))
        .toml();
    // The real binary, its stderr captured: everything it logs, at debug level.
    let proxy = ProxyProcess::start_with_env(
        &toml,
        &[("CLIENT_SECRET", CLIENT_SECRET), ("COOKIE_KEY", &cookie_key), ("PORTCULLIS_LOG", "debug")],
    )
    .await;
    wait_ready(&proxy).await;
    let origin = format!("http://{}", proxy.http);
    let mut secrets = vec![CLIENT_SECRET.to_owned(), cookie_key.clone()];

    // A bearer token, accepted, then tampered with.
    let token = idp.access_token("alice", 300);
    secrets.push(token.clone());
    assert_eq!(get(proxy.url("/api/x")).bearer(&token).send().await.status, 200);
    let tampered = format!("{token}x");
    let r = get(proxy.url("/api/x")).bearer(&tampered).send().await;
    assert_eq!(r.status, 401);

    // Login passthrough: tokens go into cookies.
    let login = post(proxy.url("/auth/login"), r#"{"username":"bob","password":"correct horse"}"#)
        .header("content-type", "application/json")
        .header("origin", &origin)
        .send()
        .await;
    assert_eq!(login.status, 200, "{}", login.text());
    let jar: Vec<String> = login
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
        .collect();
    for pair in &jar {
        secrets.push(pair.split_once('=').unwrap().1.to_owned());
    }
    let cookie = jar.join("; ");

    // A cookie request that refreshes, so the upstream sees a fresh access token.
    let r = get(proxy.url("/api/me")).header("cookie", &cookie).send().await;
    let echo = r.echo();
    let fresh = echo.header("authorization").unwrap().trim_start_matches("Bearer ").to_owned();
    secrets.push(fresh);
    for v in r.headers.get_all("set-cookie") {
        let pair = v.to_str().unwrap().split(';').next().unwrap();
        secrets.push(pair.split_once('=').unwrap().1.to_owned());
    }
    // Logout revokes at the IdP.
    let out =
        post(proxy.url("/auth/logout"), "").header("cookie", &cookie).header("origin", &origin).send().await;
    assert_eq!(out.status, 204);

    // The log is written by a background thread: wait for all five access log lines.
    eventually("every request is in the log", DEADLINE, || async {
        proxy.log().lines().filter(|l| l.contains("portcullis::access")).count() >= 5
    })
    .await;
    let log = proxy.log();
    for s in secrets.iter().filter(|s| s.len() >= 8) {
        assert!(!log.contains(s.as_str()), "a secret ({} bytes) appears in the log:\n{log}", s.len());
    }
    // Refresh tokens minted by the test IdP all look like `rt-<family>-<n>`.
    assert!(!log.contains("rt-"), "a refresh token appears in the log:\n{log}");
}
