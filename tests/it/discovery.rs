//! OpenID Connect discovery: an issuer URL alone is enough; explicit keys win.

use std::collections::HashMap;
use std::path::Path;

use crate::kit::session::{b64_key, login, token_calls};
use crate::kit::*;

#[tokio::test]
async fn an_issuer_url_alone_is_enough_to_verify_log_in_and_refresh() {
    let idp = TestIdp::start().await;
    idp.set_access_ttl(5);
    let up = Upstream::start().await;
    // No jwks_url, no token_url, no authorization_url: only the issuer.
    let toml = Config::new()
        .table(idp.issuer_table().unset("jwks_url"))
        .table(
            Table::new("[auth_server]")
                .set("issuer", idp.issuer())
                .set("login_url", idp.login_url())
                .set("client_id", "edge"),
        )
        .table(session_table())
        .table(api_route(&up))
        .toml();
    let env: HashMap<String, String> = [("COOKIE_KEY".to_owned(), b64_key(&[3u8; 32]))].into();
    let proxy = Proxy::start_with(&toml, &env, Path::new(".")).await;
    wait_ready(&proxy).await;
    let token = idp.access_token("alice", 300);
    let r = get(proxy.url("/api/x")).bearer(&token).send().await;
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
    let (_, jar) = login(&proxy, "bob").await;
    let calls = token_calls(&idp);
    let r = jar.on(get(proxy.url("/api/me"))).send().await;
    assert_eq!(r.echo().header("x-auth-subject"), Some("bob"));
    assert_eq!(token_calls(&idp), calls + 1, "refreshed at the discovered endpoint");
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
