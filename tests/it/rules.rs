//! `[[routes.rules]]` (SPEC §3, §4 "Rules"): ordered, the first rule whose `methods`
//! and segment-aware `path_prefix` match the client's path (before `strip_prefix`)
//! decides, else the route's own policy; `deny` (403 forbidden, no challenge, token or
//! not), `auth = "none"` (no token, identity headers still stripped), `scopes` that
//! replace the route's (403 insufficient_scope), `claims` by equality, array
//! containment and dotted paths into nested objects (403 forbidden with a bare
//! challenge). Also the CORS preflight (SPEC §4 "CORS preflight"), the `check`
//! errors for rules that can never match or are shadowed, and a reload that swaps
//! the rules.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::kit::*;

// === setup ===

/// The rules of route "orders", in order (numbered from 1).
const ORDERS_RULES: &str = r#"
[[routes.rules]]
path_prefix = "/orders/internal"
deny = true

[[routes.rules]]
path_prefix = "/orders/health"
auth = "none"

[[routes.rules]]
methods = ["POST", "DELETE"]
scopes = ["orders:write"]

[[routes.rules]]
path_prefix = "/orders/gold"
claims = { tier = "gold" }

[[routes.rules]]
path_prefix = "/orders/ops"
claims = { groups = "ops" }

[[routes.rules]]
path_prefix = "/orders/admin"
claims = { "realm_access.roles" = "admin" }

[[routes.rules]]
path_prefix = "/orders/eu"
claims = { "org.region" = "eu" }

[[routes.rules]]
path_prefix = "/orders/staff"
claims = { staff = true, level = 3 }
"#;

struct Env {
    idp: TestIdp,
    up: Upstream,
    proxy: Proxy,
}

/// - `/orders` (required, aud orders-api, scope orders:read, `strip_prefix`, X-User-Id =
///   sub) with [`ORDERS_RULES`];
/// - `/maybe` (optional) with one claims rule on `/maybe/mine`;
/// - `/strict` (required, `cors_preflight = "deny"`).
async fn start() -> Env {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let routes = format!(
        r#"
[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "{up}"
strip_prefix = true
issuer = "main"
audiences = ["orders-api"]
scopes = ["orders:read"]
[routes.identity_headers]
"X-User-Id" = "sub"
{ORDERS_RULES}

[[routes]]
name = "maybe"
path_prefix = "/maybe"
upstream = "{up}"
auth = "optional"
issuer = "main"
audiences = ["orders-api"]
[routes.identity_headers]
"X-User-Id" = "sub"

[[routes.rules]]
path_prefix = "/maybe/mine"
claims = {{ groups = "ops" }}

[[routes]]
name = "strict"
path_prefix = "/strict"
upstream = "{up}"
issuer = "main"
audiences = ["orders-api"]
cors_preflight = "deny"
"#,
        up = up.url()
    );
    let toml = Config::new().table(idp.issuer_table().set("jwks_refresh", "1h")).raw(&routes).toml();
    let proxy = Proxy::start(&toml).await;
    wait_ready(&proxy).await;
    Env { idp, up, proxy }
}

impl Env {
    /// A token for `sub` (aud orders-api, scopes `orders:read orders:write`) with
    /// `extra` claims merged in (`"scope"` replaces the scopes).
    fn token(&self, sub: &str, extra: Value) -> String {
        let mut claims = self.idp.claims(sub, 300);
        for (k, v) in extra.as_object().expect("extra claims are an object") {
            claims[k] = v.clone();
        }
        sign("rsa1", &claims)
    }

    async fn call(&self, method: &str, path: &str, token: Option<&str>) -> Reply {
        let mut req = request(method, self.proxy.url(path));
        if let Some(t) = token {
            req = req.bearer(t);
        }
        req.send().await
    }

    /// Whether the upstream ever received a request whose path starts with `prefix`.
    fn upstream_saw(&self, prefix: &str) -> bool {
        self.up.seen().iter().any(|(_, p)| p.starts_with(prefix))
    }
}

/// A `403 forbidden`; `challenge` is whether a bare `WWW-Authenticate: Bearer
/// realm="portcullis"` must come with it (a token was checked) or none at all.
fn assert_forbidden(reply: &Reply, challenge: bool, what: &str) {
    assert_eq!(reply.status, 403, "{what}: {}", reply.text());
    reply.assert_error(403, "forbidden");
    let www = reply.header("www-authenticate");
    if challenge {
        assert_eq!(www, Some("Bearer realm=\"portcullis\""), "{what}: a bare challenge, no error attribute");
    } else {
        assert_eq!(www, None, "{what}: no challenge when no token was looked at");
    }
}

/// A `403 insufficient_scope` naming exactly `scope` in its challenge.
fn assert_insufficient_scope(reply: &Reply, scope: &str, what: &str) {
    assert_eq!(reply.status, 403, "{what}: {}", reply.text());
    reply.assert_error(403, "insufficient_scope");
    let www = reply.header("www-authenticate").unwrap_or_default();
    assert_eq!(
        www,
        format!("Bearer realm=\"portcullis\", error=\"insufficient_scope\", scope=\"{scope}\""),
        "{what}"
    );
}

// === deny ===

#[tokio::test]
async fn a_deny_rule_answers_403_forbidden_without_a_challenge_token_or_not() {
    let env = start().await;
    let good = env.token("alice", json!({}));
    for (token, what) in
        [(None, "no token"), (Some(good.as_str()), "a valid token"), (Some("garbage"), "garbage")]
    {
        for method in ["GET", "POST", "DELETE"] {
            let r = env.call(method, "/orders/internal/keys", token).await;
            assert_forbidden(&r, false, &format!("{method} with {what}"));
        }
    }
    assert!(!env.upstream_saw("/internal"), "a denied request never reaches the upstream");
    let m = metrics(&env.proxy).await;
    assert!(m.value("portcullis_auth_rejections_total{reason=\"forbidden\"}") >= 9.0, "rejections counted");
}

#[tokio::test]
async fn a_deny_rule_cannot_be_bypassed_by_spelling_the_path_differently() {
    let env = start().await;
    let good = env.token("alice", json!({}));
    for path in [
        "/orders/internal",
        "/orders/internal/",
        "/orders//internal/x",
        "/orders/./internal/x",
        "/orders/x/../internal/x",
        "/orders/%69nternal/x",
        "//orders/internal",
    ] {
        assert_forbidden(&env.call("GET", path, Some(&good)).await, false, path);
    }
    assert!(!env.upstream_saw("/internal"), "no spelling reached the upstream");
    // Segment-aware: a sibling that merely starts with the same letters is not denied.
    let r = env.call("GET", "/orders/internals", Some(&good)).await;
    assert_eq!(r.echo().path, "/internals", "the route policy decided /orders/internals");
}

// === auth = "none" ===

#[tokio::test]
async fn an_auth_none_rule_passes_without_a_token_and_still_strips_identity_headers() {
    let env = start().await;
    let r = get(env.proxy.url("/orders/health"))
        .header("X-User-Id", "victim")
        .header("X-Auth-Subject", "root")
        .header("X_User_Id", "victim")
        .send()
        .await;
    let echo = r.echo();
    assert_eq!(echo.path, "/health", "strip_prefix still applies");
    assert!(!echo.has_header("x-user-id"), "spoofed X-User-Id stripped: {:?}", echo.headers);
    assert!(!echo.has_header("x_user_id"), "CGI spelling stripped: {:?}", echo.headers);
    assert!(echo.names_starting_with("x-auth-").is_empty(), "X-Auth-* stripped: {:?}", echo.headers);
    // The rule looks at no token, so a bad one is not refused either; no identity is
    // derived from it.
    let echo = env.call("GET", "/orders/health/deep", Some("garbage")).await.echo();
    assert_eq!(echo.path, "/health/deep");
    assert!(!echo.has_header("x-user-id"));
}

#[tokio::test]
async fn rules_are_checked_in_order_and_the_first_match_decides() {
    let env = start().await;
    let read_only = env.token("alice", json!({"scope": "orders:read"}));
    // Rule 2 (auth none on /orders/health) comes before rule 3 (POST needs orders:write).
    let r = env.call("POST", "/orders/health", None).await;
    assert_eq!(r.echo().method, "POST", "rule 2 decided: no token needed");
    // Rule 3 comes before rule 4: a POST to /orders/gold needs orders:write, not the tier.
    let writer = env.token("bob", json!({"scope": "orders:write"}));
    assert_eq!(env.call("POST", "/orders/gold/1", Some(&writer)).await.echo().path, "/gold/1");
    assert_insufficient_scope(
        &env.call("POST", "/orders/gold/1", Some(&read_only)).await,
        "orders:write",
        "POST",
    );
    // Rule 1 comes before rule 3: a POST to /orders/internal is denied, whatever the token.
    assert_forbidden(&env.call("POST", "/orders/internal", Some(&writer)).await, false, "POST internal");
}

// === matching ===

#[tokio::test]
async fn rule_path_prefix_is_segment_aware_and_matched_on_the_clients_path_before_strip_prefix() {
    let env = start().await;
    // `/orders/healthz` is not under `/orders/health`: the route policy decides.
    env.call("GET", "/orders/healthz", None).await.assert_error(401, "missing_token");
    assert_eq!(env.call("GET", "/orders/health/deep/er", None).await.echo().path, "/health/deep/er");
    // `/orders/orders/health` is forwarded as `/orders/health`, but the rules read the
    // client's path: no rule matches, so a token is needed.
    env.call("GET", "/orders/orders/health", None).await.assert_error(401, "missing_token");
    env.call("GET", "/orders/orders/internal", None).await.assert_error(401, "missing_token");
    let good = env.token("alice", json!({}));
    let echo = env.call("GET", "/orders/orders/internal", Some(&good)).await.echo();
    assert_eq!(
        echo.path, "/orders/internal",
        "not denied: the deny rule is on the client's /orders/internal"
    );
}

#[tokio::test]
async fn the_methods_filter_limits_a_rule_to_its_methods() {
    let env = start().await;
    let read_only = env.token("alice", json!({"scope": "orders:read"}));
    for method in ["POST", "DELETE"] {
        let r = env.call(method, "/orders/7", Some(&read_only)).await;
        assert_insufficient_scope(&r, "orders:write", method);
    }
    for method in ["GET", "PUT", "PATCH", "HEAD"] {
        let r = env.call(method, "/orders/7", Some(&read_only)).await;
        assert_eq!(r.status, 200, "{method}: rule 3 is for POST and DELETE only: {}", r.text());
    }
}

#[tokio::test]
async fn a_lower_case_method_does_not_slip_past_a_method_rule() {
    // `check` reads `methods = ["POST"]` case-insensitively; a client's `post` must not
    // then reach an upstream that reads methods the same way without rule 3's scope.
    let env = start().await;
    let read_only = env.token("alice", json!({"scope": "orders:read"}));
    for method in ["post", "Post", "delete"] {
        let r = env.call(method, "/orders/7", Some(&read_only)).await;
        let forwarded = env.up.seen().iter().any(|(m, _)| m == method);
        assert!(
            !forwarded,
            "{method} with a read-only token reached the upstream: {} {}",
            r.status,
            r.text()
        );
    }
}

// === scopes ===

#[tokio::test]
async fn rule_scopes_replace_the_route_scopes_and_a_miss_is_403_insufficient_scope() {
    let env = start().await;
    let write_only = env.token("bob", json!({"scope": "orders:write"}));
    let read_only = env.token("alice", json!({"scope": "orders:read"}));
    // POST needs orders:write only: the route's orders:read is not added to it.
    let echo = env.call("POST", "/orders/7", Some(&write_only)).await.echo();
    assert_eq!(echo.header("x-user-id"), Some("bob"));
    assert_insufficient_scope(&env.call("POST", "/orders/7", Some(&read_only)).await, "orders:write", "POST");
    // A GET is decided by the route: orders:read, which the write-only token lacks.
    assert_insufficient_scope(&env.call("GET", "/orders/7", Some(&write_only)).await, "orders:read", "GET");
    // No token for a scoped rule is still a 401.
    env.call("DELETE", "/orders/7", None).await.assert_error(401, "missing_token");
}

#[tokio::test]
async fn a_rule_without_scopes_keeps_the_route_scopes_and_audience() {
    let env = start().await;
    let gold_writer = env.token("bob", json!({"tier": "gold", "scope": "orders:write"}));
    let r = env.call("GET", "/orders/gold/1", Some(&gold_writer)).await;
    assert_insufficient_scope(&r, "orders:read", "claims rule without scopes");
    let gold_elsewhere = env.token("bob", json!({"tier": "gold", "aud": "billing-api"}));
    let r = env.call("GET", "/orders/gold/1", Some(&gold_elsewhere)).await;
    assert_invalid_token(&r, "a rule does not lift the route's audience");
}

// === claims ===

#[tokio::test]
async fn a_claims_rule_refuses_403_forbidden_with_a_bare_challenge() {
    let env = start().await;
    let gold = env.token("alice", json!({"tier": "gold"}));
    let echo = env.call("GET", "/orders/gold/1", Some(&gold)).await.echo();
    assert_eq!(echo.header("x-user-id"), Some("alice"));
    for (claims, what) in [
        (json!({"tier": "silver"}), "another value"),
        (json!({}), "no such claim"),
        (json!({"tier": ["silver"]}), "an array without it"),
    ] {
        let t = env.token("mallory", claims);
        assert_forbidden(&env.call("GET", "/orders/gold/1", Some(&t)).await, true, what);
    }
    env.call("GET", "/orders/gold/1", None).await.assert_error(401, "missing_token");
    assert_invalid_token(&env.call("GET", "/orders/gold/1", Some("garbage")).await, "garbage");
    let forwarded = env.up.seen().iter().filter(|(_, p)| p == "/gold/1").count();
    assert_eq!(forwarded, 1, "only the gold request reached the upstream");
}

#[tokio::test]
async fn a_claims_rule_on_an_array_claim_requires_it_to_contain_the_value() {
    let env = start().await;
    for (groups, ok) in [
        (json!(["dev", "ops"]), true),
        (json!(["ops"]), true),
        (json!("ops"), true),
        (json!(["dev"]), false),
        (json!(["opsx", "xops"]), false),
        (json!("dev ops"), false),
        (json!([]), false),
    ] {
        let t = env.token("alice", json!({ "groups": groups }));
        let r = env.call("GET", "/orders/ops/x", Some(&t)).await;
        if ok {
            assert_eq!(r.status, 200, "groups {groups}: {}", r.text());
        } else {
            assert_forbidden(&r, true, &format!("groups {groups}"));
        }
    }
}

#[tokio::test]
async fn a_claims_rule_follows_a_dotted_path_into_nested_objects() {
    let env = start().await;
    let cases = [
        ("/orders/admin", json!({"realm_access": {"roles": ["user", "admin"]}}), true),
        ("/orders/admin", json!({"realm_access": {"roles": "admin"}}), true),
        ("/orders/admin", json!({"realm_access": {"roles": ["user"]}}), false),
        ("/orders/admin", json!({"realm_access": ["admin"]}), false),
        ("/orders/admin", json!({"roles": ["admin"]}), false),
        ("/orders/admin", json!({"resource_access": {"roles": ["admin"]}}), false),
        ("/orders/eu", json!({"org": {"region": "eu", "id": 7}}), true),
        ("/orders/eu", json!({"org": {"region": "us"}}), false),
        ("/orders/eu", json!({"org": "eu"}), false),
        ("/orders/eu", json!({"region": "eu"}), false),
    ];
    for (path, claims, ok) in cases {
        let t = env.token("alice", claims.clone());
        let r = env.call("GET", path, Some(&t)).await;
        if ok {
            assert_eq!(r.status, 200, "{path} with {claims}: {}", r.text());
        } else {
            assert_forbidden(&r, true, &format!("{path} with {claims}"));
        }
    }
}

#[tokio::test]
async fn every_claim_of_a_rule_must_hold_and_numbers_and_booleans_compare_by_value() {
    let env = start().await;
    for (claims, ok) in [
        (json!({"staff": true, "level": 3}), true),
        (json!({"staff": true, "level": 4}), false),
        (json!({"staff": false, "level": 3}), false),
        (json!({"staff": "true", "level": 3}), false),
        (json!({"staff": true, "level": "3"}), false),
        (json!({"staff": true}), false),
        (json!({"level": 3}), false),
    ] {
        let t = env.token("alice", claims.clone());
        let r = env.call("GET", "/orders/staff", Some(&t)).await;
        if ok {
            assert_eq!(r.status, 200, "{claims}: {}", r.text());
        } else {
            assert_forbidden(&r, true, &format!("{claims}"));
        }
    }
}

// === route policy ===

#[tokio::test]
async fn with_no_rule_matching_the_route_policy_decides() {
    let env = start().await;
    env.call("GET", "/orders/42", None).await.assert_error(401, "missing_token");
    let read_only = env.token("alice", json!({"scope": "orders:read"}));
    let echo = env.call("GET", "/orders/42", Some(&read_only)).await.echo();
    assert_eq!((echo.path.as_str(), echo.header("x-user-id")), ("/42", Some("alice")));
    let nothing = env.token("bob", json!({"scope": "profile"}));
    assert_insufficient_scope(&env.call("GET", "/orders/42", Some(&nothing)).await, "orders:read", "GET");
    assert_invalid_token(&env.call("GET", "/orders/42", Some("garbage")).await, "garbage");
}

#[tokio::test]
async fn a_rule_with_requirements_needs_a_token_even_on_an_optional_route() {
    let env = start().await;
    env.call("GET", "/maybe/mine/1", None).await.assert_error(401, "missing_token");
    let ops = env.token("alice", json!({"groups": ["ops"]}));
    assert_eq!(env.call("GET", "/maybe/mine/1", Some(&ops)).await.echo().header("x-user-id"), Some("alice"));
    let dev = env.token("bob", json!({"groups": ["dev"]}));
    assert_forbidden(&env.call("GET", "/maybe/mine/1", Some(&dev)).await, true, "dev on /maybe/mine");
    // Elsewhere on the optional route the route decides: no token is fine.
    let echo = env.call("GET", "/maybe/other", None).await.echo();
    assert!(!echo.has_header("x-user-id"));
}

// === CORS preflight ===

fn preflight(url: String) -> Req {
    request("OPTIONS", url)
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type")
}

#[tokio::test]
async fn a_cors_preflight_passes_a_required_route_without_a_token() {
    let env = start().await;
    for path in ["/orders/7", "/orders/gold/1", "/maybe/mine"] {
        let r = preflight(env.proxy.url(path))
            .header("X-User-Id", "victim")
            .header("X-Auth-Subject", "root")
            .send()
            .await;
        let echo = r.echo();
        assert_eq!(echo.method, "OPTIONS", "{path}: the upstream answers the preflight");
        assert_eq!(echo.header("origin"), Some("https://app.example.com"));
        assert_eq!(echo.header("access-control-request-method"), Some("POST"));
        assert!(!echo.has_header("x-user-id"), "{path}: identity headers stripped: {:?}", echo.headers);
        assert!(echo.names_starting_with("x-auth-").is_empty(), "{path}: {:?}", echo.headers);
    }
}

#[tokio::test]
async fn an_options_request_that_is_not_a_preflight_needs_a_token() {
    let env = start().await;
    let url = env.proxy.url("/orders/7");
    request("OPTIONS", &url).send().await.assert_error(401, "missing_token");
    let origin_only = request("OPTIONS", &url).header("origin", "https://app.example.com").send().await;
    origin_only.assert_error(401, "missing_token");
    let method_only = request("OPTIONS", &url).header("access-control-request-method", "POST").send().await;
    method_only.assert_error(401, "missing_token");
    let get_with_cors_headers = get(&url)
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await;
    get_with_cors_headers.assert_error(401, "missing_token");
}

#[tokio::test]
async fn cors_preflight_deny_treats_a_preflight_like_any_other_request() {
    let env = start().await;
    let r = preflight(env.proxy.url("/strict/x")).send().await;
    r.assert_error(401, "missing_token");
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"portcullis\""));
    assert!(!env.upstream_saw("/strict"), "the preflight never reached the upstream");
    let good = env.token("alice", json!({}));
    let echo = preflight(env.proxy.url("/strict/x")).bearer(&good).send().await.echo();
    assert_eq!(echo.method, "OPTIONS", "with a token it passes like any request");
}

#[tokio::test]
async fn a_deny_rule_refuses_a_preflight_too() {
    let env = start().await;
    let r = preflight(env.proxy.url("/orders/internal")).send().await;
    assert_forbidden(&r, false, "preflight to a denied path");
    // An auth = "none" sub-path lets it through, as it would any request.
    assert_eq!(preflight(env.proxy.url("/orders/health")).send().await.echo().method, "OPTIONS");
}

// === reload ===

#[tokio::test]
async fn a_reload_swaps_the_rules() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let dir = TempDir::new();
    let text = |rule: &str| {
        let route = format!(
            "[[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"{}\"\nissuer = \"main\"\n\n[[routes.rules]]\npath_prefix = \"/orders/reports\"\n{rule}\n",
            up.url()
        );
        Config::new()
            .raw("[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n")
            .table(idp.issuer_table().set("jwks_refresh", "1h"))
            .raw(&route)
            .toml()
    };
    let first = text("deny = true");
    let path = dir.write("portcullis.toml", &first);
    let proxy = Proxy::start_with(&first, &HashMap::new(), Path::new(".")).await;
    wait_ready(&proxy).await;
    let r = get(proxy.url("/orders/reports/q1")).send().await;
    assert_forbidden(&r, false, "before the reload");

    dir.write("portcullis.toml", &text("auth = \"none\""));
    portcullis::reload::reload(proxy.runtime(), &path).expect("the new rules are valid");
    assert_eq!(get(proxy.url("/orders/reports/q1")).send().await.echo().path, "/orders/reports/q1");
    get(proxy.url("/orders/other")).send().await.assert_error(401, "missing_token");

    // A file with a rule that can never match is refused; the running rules stay.
    dir.write("portcullis.toml", &text("deny = true\nmethods = [\"FETCH\"]"));
    assert!(portcullis::reload::reload(proxy.runtime(), &path).is_err());
    assert_eq!(get(proxy.url("/orders/reports/q1")).send().await.status, 200);
}

// === check ===

/// `portcullis check` on `text`: the result and the file's label as printed.
fn check(text: &str) -> (Finished, String) {
    let dir = TempDir::new();
    let file = dir.write("portcullis.toml", text);
    let label = file.display().to_string();
    (portcullis(&["check", "--config", &label]), label)
}

/// The 1-based line of the `nth` (from 1) line of `text` equal to `line`, trimmed.
fn line_of(text: &str, line: &str, nth: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim() == line)
        .nth(nth - 1)
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("no {nth}th line {line:?} in:\n{text}"))
}

/// A file with route "orders" on `/orders` (issuer main) followed by `rules`.
fn with_rules(rules: &str) -> String {
    format!(
        r#"[listen]
http = "127.0.0.1:8080"

[[issuers]]
name = "main"
issuer = "https://id.example.com"
jwks_url = "https://id.example.com/jwks.json"

[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "http://127.0.0.1:9001"
issuer = "main"
audiences = ["orders-api"]
{rules}"#
    )
}

#[test]
fn check_refuses_a_rule_whose_path_prefix_is_outside_the_route() {
    for prefix in ["/order", "/ordersx/admin", "/api", "/"] {
        let text = with_rules(&format!(
            "\n[[routes.rules]]\nmethods = [\"GET\"]\nscopes = [\"x\"]\n\n[[routes.rules]]\npath_prefix = \"{prefix}\"\ndeny = true\n"
        ));
        let (out, label) = check(&text);
        assert_eq!(out.code, Some(1), "{prefix}: {out:?}");
        let line = line_of(&text, &format!("path_prefix = \"{prefix}\""), 1);
        let want = format!("{label}:{line}: routes[0].rules[1].path_prefix: ");
        let problem = out.stderr.lines().find(|l| l.starts_with(&want));
        let problem = problem.unwrap_or_else(|| panic!("{prefix}: want {want:?} in stderr:\n{}", out.stderr));
        assert!(problem.contains("never match"), "{prefix}: {problem}");
        assert!(problem.contains("\"/orders\""), "{prefix}: names the route's prefix: {problem}");
    }
}

#[test]
fn check_refuses_a_rule_with_an_unknown_method() {
    let text = with_rules("\n[[routes.rules]]\nmethods = [\"GET\", \"FETCH\"]\nscopes = [\"x\"]\n");
    let (out, label) = check(&text);
    assert_eq!(out.code, Some(1), "{out:?}");
    let line = line_of(&text, "methods = [\"GET\", \"FETCH\"]", 1);
    let want = format!("{label}:{line}: routes[0].rules[0].methods[1]: ");
    let problem = out.stderr.lines().find(|l| l.starts_with(&want));
    let problem = problem.unwrap_or_else(|| panic!("want {want:?} in stderr:\n{}", out.stderr));
    assert!(problem.contains("FETCH") && problem.contains("never match"), "{problem}");
}

#[test]
fn an_unknown_method_is_the_only_problem_reported_for_its_rule() {
    // Rule 1's only method is unknown, so it matches nothing: it cannot shadow rule 2.
    let text = with_rules(
        "\n[[routes.rules]]\nmethods = [\"FETCH\"]\ndeny = true\n\n[[routes.rules]]\nmethods = [\"GET\"]\nscopes = [\"x\"]\n",
    );
    let (out, label) = check(&text);
    assert_eq!(out.code, Some(1), "{out:?}");
    let problems: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with(&label)).collect();
    assert_eq!(
        problems.len(),
        1,
        "one problem (the unknown method), not a made-up shadowing:\n{}",
        out.stderr
    );
    assert!(problems[0].contains("FETCH"), "{}", problems[0]);
}

#[test]
fn check_refuses_a_rule_shadowed_by_an_earlier_one_naming_both_lines() {
    let cases = [
        // (earlier rule, later rule it shadows)
        (
            "path_prefix = \"/orders/admin\"\nscopes = [\"a\"]",
            "path_prefix = \"/orders/admin/users\"\nscopes = [\"b\"]",
        ),
        (
            "methods = [\"GET\", \"POST\"]\npath_prefix = \"/orders/admin\"\ndeny = true",
            "methods = [\"POST\"]\npath_prefix = \"/orders/admin/x\"\nscopes = [\"b\"]",
        ),
        ("scopes = [\"a\"]", "path_prefix = \"/orders/x\"\nauth = \"none\""),
        ("path_prefix = \"/orders\"\ndeny = true", "methods = [\"GET\"]\nclaims = { groups = \"ops\" }"),
        ("path_prefix = \"/orders/a\"\nauth = \"none\"", "path_prefix = \"/orders/a/\"\nauth = \"none\""),
    ];
    for (earlier, later) in cases {
        let text = with_rules(&format!(
            "\n[[routes.rules]]\npath_prefix = \"/orders/other\"\ndeny = true\n\n[[routes.rules]]\n{earlier}\n\n[[routes.rules]]\n{later}\n"
        ));
        let (out, label) = check(&text);
        assert_eq!(out.code, Some(1), "{earlier} / {later}: {out:?}");
        let (l2, l3) = (line_of(&text, "[[routes.rules]]", 2), line_of(&text, "[[routes.rules]]", 3));
        let want = format!("{label}:{l3}: routes[0].rules[2]: ");
        let problem = out.stderr.lines().find(|l| l.starts_with(&want));
        let problem = problem
            .unwrap_or_else(|| panic!("{earlier} / {later}: want {want:?} in stderr:\n{}", out.stderr));
        assert!(problem.contains("shadowed"), "{problem}");
        assert!(
            problem.contains(&format!("rule 2 (line {l2})")),
            "names the earlier rule and its line: {problem}"
        );
        assert_eq!(out.stderr.lines().filter(|l| l.starts_with(&label)).count(), 1, "{}", out.stderr);
    }
}

#[test]
fn check_accepts_rules_that_each_can_decide_something() {
    let rules = [
        // A narrower rule before a broader one.
        "path_prefix = \"/orders/admin/users\"\ndeny = true",
        "path_prefix = \"/orders/admin\"\nscopes = [\"a\"]",
        // The same prefix for other methods.
        "methods = [\"GET\"]\npath_prefix = \"/orders/reports\"\nauth = \"none\"",
        "methods = [\"POST\"]\npath_prefix = \"/orders/reports\"\nscopes = [\"w\"]",
        // Some methods, then all of them.
        "methods = [\"DELETE\"]\nscopes = [\"d\"]",
        "path_prefix = \"/orders/reports\"\ndeny = true",
        // A sibling that only shares letters.
        "path_prefix = \"/orders/administrators\"\nclaims = { \"realm_access.roles\" = \"admin\", level = 3, staff = true }",
    ];
    let text = with_rules(&rules.iter().map(|r| format!("\n[[routes.rules]]\n{r}\n")).collect::<String>());
    let (out, _) = check(&text);
    assert_eq!(out.code, Some(0), "{}\n{text}", out.stderr);
}
