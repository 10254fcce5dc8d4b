//! Identity headers (SPEC §4): what a client sends is never trusted — every configured
//! identity header of any route and every `X-Auth-*` header is stripped on every route —
//! and what the upstream gets comes from verified claims only. Also `forward_token`.

use crate::kit::*;
use serde_json::{json, Value};

struct Env {
    idp: TestIdp,
    proxy: Proxy,
    _up: Upstream,
}

/// Routes: `/public` (auth none, default identity header), `/maybe` (optional, only
/// X-User-Id), `/orders` (required, many claims), `/blind` (required, forward_token
/// false), `/plain` (required, no identity_headers: the default X-Auth-Subject).
async fn start() -> Env {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let issuer =
        idp.issuer_table().set("algorithms", vec!["RS256", "ES256", "EdDSA"]).set("jwks_refresh", "1h");
    let routes = format!(
        r#"
[[routes]]
name = "public"
path_prefix = "/public"
upstream = "{up}"
auth = "none"

[[routes]]
name = "maybe"
path_prefix = "/maybe"
upstream = "{up}"
auth = "optional"
issuer = "main"
audiences = ["orders-api"]
[routes.identity_headers]
"X-User-Id" = "sub"

[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "{up}"
auth = "required"
issuer = "main"
audiences = ["orders-api"]
scopes = ["orders:read"]
forward_token = true
[routes.identity_headers]
"X-User-Id" = "sub"
"X-User-Email" = "email"
"X-Tenant" = "tenant"
"X-Admin" = "admin"
"X-Roles" = "roles"
"X-Score" = "score"
"X-Org" = "org"
"X-Auth-Scope" = "scope"

[[routes]]
name = "blind"
path_prefix = "/blind"
upstream = "{up}"
auth = "required"
issuer = "main"
forward_token = false
[routes.identity_headers]
"X-User-Id" = "sub"

[[routes]]
name = "plain"
path_prefix = "/plain"
upstream = "{up}"
issuer = "main"
"#,
        up = up.url()
    );
    let proxy = Proxy::start(&Config::new().table(issuer).raw(&routes).toml()).await;
    wait_ready(&proxy).await;
    Env { idp, proxy, _up: up }
}

impl Env {
    fn token(&self, claims: &Value) -> String {
        sign("rsa1", claims)
    }

    /// The request, with every spoofable identity header a client could try.
    fn spoofed(&self, path: &str) -> Req {
        get(self.proxy.url(path))
            .header("X-User-Id", "victim")
            .header("X-User-Email", "victim@example.com")
            .header("X-Tenant", "1")
            .header("X-Admin", "true")
            .header("X-Roles", "root")
            .header("X-Auth-Anything", "1")
            .header("X-Auth-Subject", "root")
            .header("x-auth-scope", "orders:admin")
    }

    fn with_token(&self, req: Req, token: &str) -> Req {
        req.bearer(token)
    }
}

const SPOOFABLE: [&str; 5] = ["x-user-id", "x-user-email", "x-tenant", "x-admin", "x-roles"];

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_upstream_on_any_route() {
    let env = start().await;
    // alice's token has no email, tenant, admin or roles claims.
    let token = env.token(&env.idp.claims("alice", 300));
    let cases = [
        ("/public/x", false, None),
        ("/maybe/x", false, None),
        ("/maybe/x", true, Some("alice")),
        ("/orders/x", true, Some("alice")),
        ("/blind/x", true, Some("alice")),
        ("/plain/x", true, None),
    ];
    for (path, with_token, user_id) in cases {
        let mut req = env.spoofed(path);
        if with_token {
            req = env.with_token(req, &token);
        }
        let echo = req.send().await.echo();
        let what = format!("{path} token={with_token}: {:?}", echo.headers);
        assert_eq!(echo.header("x-user-id"), user_id, "{what}");
        for name in &SPOOFABLE[1..] {
            assert!(!echo.has_header(name), "{name} on {what}");
        }
        for name in echo.names_starting_with("x-auth-") {
            let ours = matches!((path, name), ("/plain/x", "x-auth-subject") | ("/orders/x", "x-auth-scope"));
            assert!(ours, "client-sent {name} reached the upstream: {what}");
        }
        assert!(
            echo.header_all("x-auth-subject").iter().all(|v| *v != "root"),
            "client X-Auth-Subject forwarded: {what}"
        );
        assert!(
            echo.header_all("x-auth-scope").iter().all(|v| *v != "orders:admin"),
            "client X-Auth-Scope forwarded: {what}"
        );
    }
}

#[tokio::test]
async fn identity_header_configured_on_another_route_is_stripped() {
    let env = start().await;
    // /maybe configures only X-User-Id; X-User-Email belongs to /orders.
    let token = env.token(&env.idp.claims("alice", 300));
    for req in [env.spoofed("/maybe/x"), env.with_token(env.spoofed("/maybe/x"), &token)] {
        let echo = req.send().await.echo();
        assert!(!echo.has_header("x-user-email"), "{:?}", echo.headers);
        assert!(!echo.has_header("x-tenant"), "{:?}", echo.headers);
    }
    let echo = env.spoofed("/public/x").send().await.echo();
    for name in SPOOFABLE {
        assert!(!echo.has_header(name), "{name} on the auth = \"none\" route: {:?}", echo.headers);
    }
}

#[tokio::test]
async fn identity_headers_are_matched_case_insensitively() {
    let env = start().await;
    let echo = get(env.proxy.url("/public/x"))
        .header("x-user-id", "a")
        .header("X-USER-EMAIL", "b")
        .header("X-aUtH-Whatever", "c")
        .send()
        .await
        .echo();
    assert!(!echo.has_header("x-user-id") && !echo.has_header("x-user-email"), "{:?}", echo.headers);
    assert_eq!(echo.names_starting_with("x-auth-"), Vec::<&str>::new());
}

#[tokio::test]
async fn claims_are_rendered_as_header_text() {
    let env = start().await;
    let mut claims = env.idp.claims("carol", 300);
    claims["email"] = json!("carol@example.com");
    claims["tenant"] = json!(42);
    claims["admin"] = json!(false);
    claims["roles"] = json!(["reader", "writer"]);
    claims["score"] = json!(1.5);
    claims["org"] = json!({"id": 7});
    let token = env.token(&claims);
    let echo = env.with_token(env.spoofed("/orders/x"), &token).send().await.echo();
    let h = |n: &str| echo.header(n).map(str::to_owned);
    assert_eq!(h("x-user-id").as_deref(), Some("carol"));
    assert_eq!(h("x-user-email").as_deref(), Some("carol@example.com"));
    assert_eq!(h("x-tenant").as_deref(), Some("42"));
    assert_eq!(h("x-admin").as_deref(), Some("false"));
    assert_eq!(h("x-roles").as_deref(), Some("reader,writer"));
    assert_eq!(h("x-score").as_deref(), Some("1.5"));
    assert_eq!(h("x-auth-scope").as_deref(), Some("orders:read orders:write"));
    assert!(!echo.has_header("x-org"), "an object claim has no header form: {:?}", echo.headers);
    for name in ["x-user-id", "x-user-email", "x-tenant", "x-admin", "x-roles"] {
        assert_eq!(echo.header_all(name).len(), 1, "{name} appears once: {:?}", echo.headers);
    }

    let mut claims = env.idp.claims("dave", 300);
    claims["admin"] = json!(true);
    claims["roles"] = json!(["solo"]);
    claims["tenant"] = json!("acme");
    let echo = env.with_token(get(env.proxy.url("/orders/x")), &env.token(&claims)).send().await.echo();
    assert_eq!(echo.header("x-admin"), Some("true"));
    assert_eq!(echo.header("x-roles"), Some("solo"));
    assert_eq!(echo.header("x-tenant"), Some("acme"));
}

#[tokio::test]
async fn absent_claims_leave_the_header_absent_even_when_spoofed() {
    let env = start().await;
    let mut claims = env.idp.claims("erin", 300);
    claims["email"] = Value::Null;
    let echo = env.with_token(env.spoofed("/orders/x"), &env.token(&claims)).send().await.echo();
    assert_eq!(echo.header("x-user-id"), Some("erin"));
    for name in ["x-user-email", "x-tenant", "x-admin", "x-roles", "x-score", "x-org"] {
        assert!(!echo.has_header(name), "{name}: {:?}", echo.headers);
    }
}

#[tokio::test]
async fn claim_with_line_breaks_cannot_inject_headers() {
    let env = start().await;
    let mut claims = env.idp.claims("frank", 300);
    claims["email"] = json!("frank@example.com\r\nX-Injected: 1");
    claims["tenant"] = json!("t\nX-Injected-Too: 1");
    let reply = env.with_token(get(env.proxy.url("/orders/x")), &env.token(&claims)).send().await;
    let echo = reply.echo();
    assert!(!echo.has_header("x-injected") && !echo.has_header("x-injected-too"), "{:?}", echo.headers);
    for name in ["x-user-email", "x-tenant"] {
        let v = echo.header(name).unwrap_or_default();
        assert!(!v.contains('\r') && !v.contains('\n'), "{name} = {v:?}");
    }
    assert_eq!(echo.header("x-user-id"), Some("frank"));
}

#[tokio::test]
async fn default_identity_header_is_x_auth_subject() {
    let env = start().await;
    let token = env.token(&env.idp.claims("grace", 300));
    let echo = env.with_token(env.spoofed("/plain/x"), &token).send().await.echo();
    assert_eq!(echo.header_all("x-auth-subject"), vec!["grace"], "{:?}", echo.headers);
}

#[tokio::test]
async fn forward_token_true_forwards_the_authorization_header() {
    let env = start().await;
    let token = env.token(&env.idp.claims("heidi", 300));
    let echo = env.with_token(get(env.proxy.url("/orders/x")), &token).send().await.echo();
    assert_eq!(echo.header("authorization"), Some(format!("Bearer {token}").as_str()));
}

#[tokio::test]
async fn forward_token_false_removes_the_authorization_header() {
    let env = start().await;
    let token = env.token(&env.idp.claims("ivan", 300));
    let echo = env.with_token(get(env.proxy.url("/blind/x")), &token).send().await.echo();
    assert!(!echo.has_header("authorization"), "{:?}", echo.headers);
    assert_eq!(echo.header("x-user-id"), Some("ivan"));
}

#[tokio::test]
async fn optional_route_without_token_gets_no_identity() {
    let env = start().await;
    let echo = env.spoofed("/maybe/x").send().await.echo();
    assert!(!echo.has_header("x-user-id"), "{:?}", echo.headers);
    assert!(!echo.has_header("authorization"), "{:?}", echo.headers);
    assert_eq!(echo.names_starting_with("x-auth-"), Vec::<&str>::new());
}

#[tokio::test]
async fn duplicate_authorization_headers_never_smuggle_an_unverified_token() {
    let env = start().await;
    let good = env.token(&env.idp.claims("alice", 300));
    let mut claims = env.idp.claims("admin", 300);
    claims["iss"] = json!("https://evil.example.com");
    let forged = sign("rsa2", &claims);

    // Required route: a verified token first, a forged one second.
    let reply = get(env.proxy.url("/orders/x"))
        .header("authorization", format!("Bearer {good}"))
        .header("authorization", format!("Bearer {forged}"))
        .send()
        .await;
    if reply.status == 200 {
        let echo = reply.echo();
        let values = echo.header_all("authorization");
        assert!(
            values.len() == 1 && values[0] == format!("Bearer {good}"),
            "{} Authorization values reached the upstream; only the verified token may",
            values.len()
        );
    } else {
        assert!(matches!(reply.status.as_u16(), 400 | 401), "{} {}", reply.status, reply.text());
    }

    // Optional route: another scheme first (anonymous), a forged bearer token second.
    let reply = get(env.proxy.url("/maybe/x"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .header("authorization", format!("Bearer {forged}"))
        .send()
        .await;
    if reply.status == 200 {
        let echo = reply.echo();
        assert!(
            echo.header_all("authorization").iter().all(|v| !v.contains(&forged)),
            "an unverified bearer token reached the upstream of an anonymous request"
        );
    } else {
        assert!(matches!(reply.status.as_u16(), 400 | 401), "{} {}", reply.status, reply.text());
    }
}
