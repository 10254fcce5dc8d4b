//! OpenID Connect discovery: an issuer URL alone is enough; explicit keys win.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod idp;
mod support;

use std::collections::HashMap;
use std::path::Path;

use base64::Engine as _;
use idp::TestIdp;
use support::*;

#[tokio::test]
async fn an_issuer_url_alone_is_enough_to_verify_log_in_and_refresh() {
    let idp = TestIdp::start().await;
    idp.set_access_ttl(5);
    let up = Upstream::start().await;
    let toml = format!(
        r#"
[[issuers]]
name = "main"
issuer = "{iss}"

[auth_server]
issuer = "{iss}"
login_url = "{login}"
client_id = "edge"

[session]
cookie_key_env = "COOKIE_KEY"
secure = false

[[routes]]
name = "api"
path_prefix = "/api"
upstream = "{up}"
issuer = "main"
"#,
        iss = idp.issuer(),
        login = idp.login_url(),
        up = up.url()
    );
    let env: HashMap<String, String> =
        [("COOKIE_KEY".to_owned(), base64::engine::general_purpose::STANDARD.encode([3u8; 32]))].into();
    let proxy = Proxy::start_with(&toml, &env, Path::new(".")).await;
    eventually("keys discovered and loaded", DEADLINE, || async {
        get(format!("{}/readyz", proxy.admin_url())).send().await.status == 200
    })
    .await;
    let token = idp.access_token("alice", 300);
    let r = get(proxy.url("/api/x")).header("authorization", format!("Bearer {token}")).send().await;
    assert_eq!(r.echo().header("x-auth-subject"), Some("alice"));

    // The authorization endpoint was discovered: code + PKCE login is on.
    eventually("authorization endpoint discovered", DEADLINE, || async {
        get(proxy.url("/auth/login?return_to=/x")).send().await.status == 302
    })
    .await;
    let r = get(proxy.url("/auth/login?return_to=/x")).send().await;
    let location = r.header("location").unwrap_or_default().to_owned();
    assert!(location.starts_with(&idp.authorize_url()), "{location}");

    // The token endpoint was discovered: a session refreshes through it.
    let origin = format!("http://{}", proxy.http_addr());
    let login = post(proxy.url("/auth/login"), r#"{"username":"bob","password":"correct horse"}"#)
        .header("content-type", "application/json")
        .header("origin", &origin)
        .send()
        .await;
    assert_eq!(login.status, 200, "{}", login.text());
    let cookie: Vec<String> = login
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
        .collect();
    let calls = idp.token_calls.load(std::sync::atomic::Ordering::SeqCst);
    let r = get(proxy.url("/api/me")).header("cookie", cookie.join("; ")).send().await;
    assert_eq!(r.echo().header("x-auth-subject"), Some("bob"));
    assert_eq!(
        idp.token_calls.load(std::sync::atomic::Ordering::SeqCst),
        calls + 1,
        "refreshed at the discovered endpoint"
    );
}

#[tokio::test]
async fn check_explains_what_discovery_needs() {
    let dir = TempDir::new();
    let path = dir.write(
        "p.toml",
        "[listen]\nhttp = \"127.0.0.1:0\"\n[[issuers]]\nname = \"main\"\nissuer = \"main-idp\"\n[auth_server]\nclient_id = \"edge\"\n",
    );
    let out = portcullis(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("issuers[0].issuer"), "{}", out.stderr);
    assert!(out.stderr.contains("auth_server.token_url: set token_url, or issuer"), "{}", out.stderr);
}
