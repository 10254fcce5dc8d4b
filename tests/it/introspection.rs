//! Opaque access tokens checked by RFC 7662 introspection (SPEC §4 "Opaque tokens",
//! "Several issuers per route"), against the kit's introspection endpoint: the call
//! and its client authentication, the answer's members as claims (audience, scopes,
//! rules, identity headers, revocation by `sub`), the positive cache (≤ `cache`, never
//! past `exp`), the 10 s negative cache, one call for concurrent requests, outages
//! (503 keys_unavailable with Retry-After; cached tokens keep working), a route with
//! a JWT issuer and an introspecting one, the metrics, and no token in the logs.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::kit::idp::{now, AUDIENCE};
use crate::kit::introspect::{active, opaque_token, Down, CLIENT_ID, CLIENT_SECRET, ISSUER, SECRET_ENV};
use crate::kit::*;

// === setup ===

struct Env {
    ins: IntrospectionServer,
    up: Upstream,
    proxy: Proxy,
}

/// Route "legacy" on `/api`: issuer "legacy" (introspecting; `extra` goes into its
/// `introspection` table), audience orders-api, scope orders:read, identity headers
/// from `sub`, `username`, `client_id` and `tenant`, and a rule on `/api/admin`
/// needing `realm_access.roles` to contain "admin".
async fn start(extra: &str) -> Env {
    let ins = IntrospectionServer::start().await;
    let up = Upstream::start().await;
    let toml = Config::new().table(ins.issuer_table("legacy", extra)).raw(&legacy_route(&up)).toml();
    let proxy = start_proxy(&toml).await;
    Env { ins, up, proxy }
}

fn legacy_route(up: &Upstream) -> String {
    format!(
        r#"
[[routes]]
name = "legacy"
path_prefix = "/api"
upstream = "{up}"
issuer = "legacy"
audiences = ["{AUDIENCE}"]
scopes = ["orders:read"]
[routes.identity_headers]
"X-User-Id" = "sub"
"X-User-Name" = "username"
"X-Client-Id" = "client_id"
"X-Tenant" = "tenant"

[[routes.rules]]
path_prefix = "/api/admin"
claims = {{ "realm_access.roles" = "admin" }}
"#,
        up = up.url()
    )
}

/// The proxy in process, with the introspection client's secret in its environment.
async fn start_proxy(toml: &str) -> Proxy {
    let env = HashMap::from([(SECRET_ENV.to_owned(), CLIENT_SECRET.to_owned())]);
    let proxy = Proxy::start_with(toml, &env, Path::new(".")).await;
    wait_ready(&proxy).await;
    proxy
}

impl Env {
    async fn call(&self, path: &str, token: &str) -> Reply {
        get(self.proxy.url(path)).bearer(token).send().await
    }

    /// A new opaque token the endpoint calls active for `sub` (exp in 300 s), plus `extra` members.
    fn issue(&self, sub: &str, extra: Value) -> String {
        let token = opaque_token();
        let mut answer = active(sub, 300);
        for (k, v) in extra.as_object().expect("extra members are an object") {
            answer[k] = v.clone();
        }
        self.ins.set(&token, answer);
        token
    }
}

/// `503 keys_unavailable` with a `Retry-After` in seconds.
fn assert_keys_unavailable(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 503, "{what}: {}", reply.text());
    reply.assert_error(503, "keys_unavailable");
    let retry = reply.header("retry-after").unwrap_or_default();
    assert!(retry.parse::<u64>().is_ok_and(|s| s > 0), "{what}: Retry-After {retry:?}");
}

// === the call ===

#[tokio::test]
async fn the_proxy_posts_the_token_form_encoded_with_the_access_token_hint() {
    let env = start("").await;
    // Characters a form encoding must escape, all legal in a bearer token.
    let token = format!("{}+/x==", opaque_token());
    env.ins.set(&token, active("carol", 300));
    assert_eq!(env.call("/api/orders", &token).await.status, 200);
    let call = env.ins.last();
    assert_eq!(call.method, "POST");
    assert_eq!(call.content_type.as_deref(), Some("application/x-www-form-urlencoded"));
    assert_eq!(call.token, token, "the token arrives exactly as the client sent it");
    assert_eq!(call.form.get("token_type_hint").map(String::as_str), Some("access_token"));
}

#[tokio::test]
async fn client_secret_basic_authenticates_with_an_authorization_header() {
    // The default with a secret, and the explicit setting.
    for extra in ["", r#"client_auth = "client_secret_basic""#] {
        let env = start(extra).await;
        let token = env.issue("carol", json!({}));
        assert_eq!(env.call("/api/orders", &token).await.status, 200);
        let call = env.ins.last();
        let enc = |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            enc(CLIENT_ID),
            enc(CLIENT_SECRET)
        ));
        assert_eq!(call.authorization, Some(format!("Basic {basic}")), "{extra:?}");
        assert!(!call.form.contains_key("client_secret"), "{extra:?}: the secret is not also in the form");
    }
}

#[tokio::test]
async fn client_secret_post_authenticates_in_the_form() {
    let env = start(r#"client_auth = "client_secret_post""#).await;
    let token = env.issue("carol", json!({}));
    assert_eq!(env.call("/api/orders", &token).await.status, 200);
    let call = env.ins.last();
    assert_eq!(call.authorization, None);
    assert_eq!(call.form.get("client_id").map(String::as_str), Some(CLIENT_ID));
    assert_eq!(call.form.get("client_secret").map(String::as_str), Some(CLIENT_SECRET));
}

#[tokio::test]
async fn client_auth_none_sends_only_the_client_id() {
    let ins = IntrospectionServer::start().await;
    let up = Upstream::start().await;
    let issuer = Table::new("[[issuers]]").set("name", "legacy").set("issuer", ISSUER).lines(&format!(
        r#"introspection = {{ url = "{}", client_id = "{CLIENT_ID}", client_auth = "none" }}"#,
        ins.url()
    ));
    let proxy = start_proxy(&Config::new().table(issuer).raw(&legacy_route(&up)).toml()).await;
    let token = opaque_token();
    ins.set(&token, active("carol", 300));
    assert_eq!(get(proxy.url("/api/x")).bearer(&token).send().await.status, 200);
    let call = ins.last();
    assert_eq!(call.authorization, None);
    assert_eq!(call.form.get("client_id").map(String::as_str), Some(CLIENT_ID));
    assert!(!call.form.contains_key("client_secret"));
}

// === the answer ===

#[tokio::test]
async fn an_active_answer_admits_the_token_and_its_members_become_identity_headers() {
    let env = start("").await;
    let token = env.issue("carol", json!({"tenant": "acme", "username": "carol.c"}));
    let reply = get(env.proxy.url("/api/orders"))
        .bearer(&token)
        .header("X-User-Id", "victim")
        .header("X-Tenant", "evil")
        .header("X-Auth-Subject", "root")
        .send()
        .await;
    let echo = reply.echo();
    assert_eq!(echo.header_all("x-user-id"), vec!["carol"]);
    assert_eq!(echo.header_all("x-user-name"), vec!["carol.c"]);
    assert_eq!(echo.header_all("x-client-id"), vec!["legacy-spa"]);
    assert_eq!(echo.header_all("x-tenant"), vec!["acme"]);
    assert!(echo.names_starting_with("x-auth-").is_empty(), "{:?}", echo.headers);
    assert_eq!(echo.header("authorization"), Some(format!("Bearer {token}").as_str()), "forward_token");
}

#[tokio::test]
async fn an_inactive_answer_is_401_invalid_token() {
    let env = start("").await;
    let token = opaque_token();
    env.ins.set(&token, json!({"active": false}));
    assert_invalid_token(&env.call("/api/orders", &token).await, "active false");
    assert_invalid_token(&env.call("/api/orders", &opaque_token()).await, "unknown to the server");
    let odd = opaque_token();
    env.ins.set(&odd, json!({"active": "true", "sub": "carol", "exp": now() + 300, "aud": AUDIENCE}));
    assert_invalid_token(&env.call("/api/orders", &odd).await, "active is not the boolean true");
    assert!(env.up.seen().is_empty(), "nothing reached the upstream");
}

#[tokio::test]
async fn an_iss_member_must_equal_the_issuer() {
    let env = start("").await;
    let same = env.issue("carol", json!({"iss": ISSUER}));
    assert_eq!(env.call("/api/orders", &same).await.status, 200, "iss equal to the issuer's");
    let other = env.issue("carol", json!({"iss": "https://evil.example.com"}));
    assert_invalid_token(&env.call("/api/orders", &other).await, "iss of another issuer");
    let none = env.issue("carol", json!({}));
    assert_eq!(env.call("/api/orders", &none).await.status, 200, "no iss member: optional");
}

#[tokio::test]
async fn audience_scopes_and_rules_apply_to_introspected_claims() {
    let env = start("").await;
    let elsewhere = env.issue("carol", json!({"aud": ["billing-api"]}));
    assert_invalid_token(&env.call("/api/orders", &elsewhere).await, "another audience");
    let no_aud = env.issue("carol", json!({"aud": null}));
    assert_invalid_token(&env.call("/api/orders", &no_aud).await, "no audience");
    let both = env.issue("carol", json!({"aud": ["billing-api", AUDIENCE]}));
    assert_eq!(env.call("/api/orders", &both).await.status, 200, "an array with ours");

    let write_only = env.issue("carol", json!({"scope": "orders:write"}));
    let r = env.call("/api/orders", &write_only).await;
    r.assert_error(403, "insufficient_scope");
    assert!(r.header("www-authenticate").unwrap_or_default().contains("scope=\"orders:read\""));

    let admin = env.issue("root", json!({"realm_access": {"roles": ["admin"]}}));
    assert_eq!(env.call("/api/admin/users", &admin).await.echo().header("x-user-id"), Some("root"));
    let user = env.issue("carol", json!({"realm_access": {"roles": ["user"]}}));
    let r = env.call("/api/admin/users", &user).await;
    r.assert_error(403, "forbidden");
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"portcullis\""));
}

#[tokio::test]
async fn an_active_answer_whose_exp_has_passed_is_refused() {
    let env = start("").await;
    let token = env.issue("carol", json!({"exp": now() - 5}));
    assert_invalid_token(&env.call("/api/orders", &token).await, "exp in the past");
}

// === the positive cache ===

#[tokio::test]
async fn a_cached_answer_is_reused_without_another_call() {
    let env = start("").await;
    let token = env.issue("carol", json!({}));
    for _ in 0..5 {
        assert_eq!(env.call("/api/orders", &token).await.echo().header("x-user-id"), Some("carol"));
    }
    assert_eq!(env.ins.calls_for(&token), 1, "one call, then the cache");
    // Rotating the server's answer changes nothing while the cache entry lives.
    env.ins.forget(&token);
    assert_eq!(env.call("/api/orders", &token).await.status, 200);
    assert_eq!(env.ins.calls_for(&token), 1);
}

#[tokio::test]
async fn a_cached_answer_expires_after_cache_and_the_proxy_asks_again() {
    let env = start(r#"cache = "1s""#).await;
    let token = env.issue("carol", json!({}));
    assert_eq!(env.call("/api/orders", &token).await.status, 200);
    env.ins.set(&token, json!({"active": false})); // revoked at the server
                                                   // Until the entry expires the cached answer admits it; then the new answer refuses it.
    eventually("the proxy asks again once `cache` has passed", DEADLINE, || async {
        let r = env.call("/api/orders", &token).await;
        assert!(r.status == 200 || r.status == 401, "{}", r.text());
        r.status == 401
    })
    .await;
    let log = env.ins.log();
    assert_eq!(env.ins.calls_for(&token), 2, "one call per cache lifetime");
    let gap = log[1].at - log[0].at;
    assert!(gap >= Duration::from_millis(900), "asked again after {gap:?}, before `cache` (1s) passed");
}

#[tokio::test]
async fn a_cached_answer_never_outlives_the_answers_exp() {
    let env = start(r#"cache = "60s""#).await;
    let token = env.issue("carol", json!({"exp": now() + 2}));
    assert_eq!(env.call("/api/orders", &token).await.status, 200);
    env.ins.set(&token, json!({"active": false}));
    eventually("the token is refused once its exp has passed", DEADLINE, || async {
        env.call("/api/orders", &token).await.status == 401
    })
    .await;
    assert!(env.ins.calls_for(&token) <= 2, "{} calls", env.ins.calls_for(&token));
}

#[tokio::test]
async fn an_answer_without_exp_counts_as_expiring_after_cache() {
    let env = start(r#"cache = "1s""#).await;
    let token = opaque_token();
    env.ins.set(&token, json!({"active": true, "sub": "carol", "aud": AUDIENCE, "scope": "orders:read"}));
    assert_eq!(env.call("/api/orders", &token).await.status, 200, "no exp is not invalid for introspection");
    eventually("a second call once `cache` has passed", DEADLINE, || async {
        assert_eq!(env.call("/api/orders", &token).await.status, 200);
        env.ins.calls_for(&token) == 2
    })
    .await;
}

// === the negative cache ===

#[tokio::test]
async fn the_same_garbage_token_a_thousand_times_makes_a_handful_of_calls_at_most() {
    let env = start("").await;
    let garbage = opaque_token();
    let started = Instant::now();
    for _ in 0..10 {
        let batch = (0..100).map(|_| get(env.proxy.url("/api/orders")).bearer(&garbage)).collect();
        for r in send_together(batch).await {
            assert_invalid_token(&r, "garbage");
        }
    }
    let elapsed = started.elapsed();
    // Inactive answers are remembered 10 s: one call per 10 s window at most.
    let allowed = 1 + elapsed.as_secs() as usize / 10;
    let calls = env.ins.calls_for(&garbage);
    assert!((1..=allowed).contains(&calls), "{calls} calls for 1,000 requests over {elapsed:?}");
    assert!(env.up.seen().is_empty());
}

#[tokio::test]
async fn a_thousand_distinct_garbage_tokens_make_one_call_each_and_a_repeat_makes_none() {
    let env = start("").await;
    let tokens: Vec<String> = (0..1000).map(|_| opaque_token()).collect();
    // 20 workers, each sending its tokens twice in a row: the repeat comes within
    // milliseconds, well inside the 10 s the inactive answer is remembered.
    let url = env.proxy.url("/api/orders");
    let workers: Vec<_> = tokens
        .chunks(50)
        .map(|chunk| {
            let (chunk, url) = (chunk.to_vec(), url.clone());
            tokio::spawn(async move {
                for t in chunk {
                    for _ in 0..2 {
                        let r = get(&url).bearer(&t).send().await;
                        assert_eq!(r.status, 401, "{}", r.text());
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let mut per_token: HashMap<String, usize> = HashMap::new();
    for c in env.ins.log() {
        *per_token.entry(c.token).or_default() += 1;
    }
    assert_eq!(per_token.len(), 1000, "each garbage token was asked about");
    let repeated: Vec<_> = per_token.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "{} tokens were introspected twice", repeated.len());
}

#[tokio::test]
async fn an_inactive_answer_is_remembered_for_10_seconds_then_asked_again() {
    let env = start("").await;
    let token = opaque_token();
    assert_invalid_token(&env.call("/api/orders", &token).await, "unknown yet");
    env.ins.set(&token, active("carol", 300)); // the server now knows it
    eventually("the proxy asks again after the negative cache", Duration::from_secs(30), || async {
        env.call("/api/orders", &token).await.status == 200
    })
    .await;
    let log = env.ins.log();
    assert_eq!(log.len(), 2, "two calls: the inactive one and the one after 10 s");
    let gap = log[1].at - log[0].at;
    assert!(gap >= Duration::from_millis(9_900), "asked again after {gap:?}, within the 10 s");
}

// === single flight ===

#[tokio::test]
async fn a_hundred_concurrent_requests_with_one_new_token_make_one_call() {
    let env = start(r#"timeout = "10s""#).await;
    let token = env.issue("carol", json!({}));
    env.ins.hold();
    let url = env.proxy.url("/api/orders");
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let (url, token) = (url.clone(), token.clone());
            tokio::spawn(async move { get(url).bearer(&token).send().await })
        })
        .collect();
    // The first call is held; keep holding until every request is in the proxy.
    env.ins.wait_for_calls(1).await;
    eventually("the 100 requests are open at the proxy", DEADLINE, || async {
        metric(&env.proxy, "portcullis_open_connections").await >= 100.0
    })
    .await;
    env.ins.release();
    for r in requests {
        let r = r.await.unwrap();
        assert_eq!(r.echo().header("x-user-id"), Some("carol"));
    }
    assert_eq!(env.ins.calls(), 1, "100 requests with one new token shared one call");
}

// === outages ===

#[tokio::test]
async fn an_outage_keeps_cached_tokens_working_and_new_ones_get_503_keys_unavailable() {
    let env = start("").await;
    let cached = env.issue("carol", json!({}));
    assert_eq!(env.call("/api/orders", &cached).await.status, 200);
    let new = env.issue("dave", json!({}));
    env.ins.stop(); // connections refused from now on
    assert_eq!(env.call("/api/orders", &cached).await.echo().header("x-user-id"), Some("carol"));
    assert_keys_unavailable(&env.call("/api/orders", &new).await, "endpoint refusing connections");
    assert_eq!(env.up.seen().len(), 2, "only carol's two requests reached the upstream");
    let m = metrics(&env.proxy).await;
    assert!(m.value("portcullis_auth_rejections_total{reason=\"keys_unavailable\"}") >= 1.0);
}

#[tokio::test]
async fn every_kind_of_outage_is_503_keys_unavailable_and_none_is_remembered() {
    let env = start(r#"timeout = "1s""#).await;
    let cached = env.issue("carol", json!({}));
    assert_eq!(env.call("/api/orders", &cached).await.status, 200);
    let mut refused = Vec::new();
    for down in [Down::Unavailable, Down::Slow(Duration::from_secs(30)), Down::Hangup, Down::Garbage] {
        env.ins.set_down(down);
        let token = env.issue("dave", json!({}));
        let started = Instant::now();
        assert_keys_unavailable(&env.call("/api/orders", &token).await, &format!("{down:?}"));
        assert!(started.elapsed() < Duration::from_secs(10), "{down:?}: the 1 s timeout applies");
        assert_eq!(env.call("/api/orders", &cached).await.status, 200, "{down:?}: the cached token works");
        refused.push(token);
    }
    // Back up: the tokens refused during the outage work at once (no error was cached).
    env.ins.set_down(Down::No);
    for token in &refused {
        assert_eq!(env.call("/api/orders", token).await.echo().header("x-user-id"), Some("dave"));
    }
}

// === metrics ===

#[tokio::test]
async fn introspection_calls_are_counted_by_issuer_and_outcome() {
    let env = start("").await;
    let good = env.issue("carol", json!({}));
    assert_eq!(env.call("/api/orders", &good).await.status, 200);
    assert_eq!(env.call("/api/orders", &good).await.status, 200); // cached: no call
    assert_eq!(env.call("/api/orders", &opaque_token()).await.status, 401);
    env.ins.set_down(Down::Unavailable);
    assert_eq!(env.call("/api/orders", &opaque_token()).await.status, 503);
    let m = metrics(&env.proxy).await;
    for (outcome, want) in [("active", 1.0), ("inactive", 1.0), ("error", 1.0)] {
        let series = format!("portcullis_introspections_total{{issuer=\"legacy\",outcome=\"{outcome}\"}}");
        assert_eq!(m.get(&series), Some(want), "{series}");
    }
}

// === revocation ===

#[tokio::test]
async fn revocation_by_sub_denies_an_introspected_token_even_when_cached() {
    let env = start("").await;
    let carol = env.issue("carol", json!({}));
    let dave = env.issue("dave", json!({}));
    assert_eq!(env.call("/api/orders", &carol).await.status, 200);
    assert_eq!(env.call("/api/orders", &dave).await.status, 200);
    let r = revoke(&env.proxy, &json!({"sub": "carol", "issued_before": now() + 1})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let refused = env.call("/api/orders", &carol).await;
    assert_invalid_token(&refused, "carol revoked");
    assert!(refused.text().contains("revoked"), "{}", refused.text());
    assert_eq!(env.call("/api/orders", &dave).await.status, 200, "dave is not revoked");
    assert_eq!(env.ins.calls_for(&carol), 1, "the cached answer was used, and revocation still checked");
}

// === several issuers per route ===

#[tokio::test]
async fn a_route_with_a_jwt_issuer_and_an_introspection_issuer_accepts_each_kind_by_its_issuer() {
    let main = TestIdp::start().await;
    let other = TestIdp::start().await;
    let ins = IntrospectionServer::start().await;
    let up = Upstream::start().await;
    let toml = Config::new()
        .table(main.issuer_table().set("jwks_refresh", "1h"))
        .table(other.issuer_table().set("name", "other").set("jwks_refresh", "1h"))
        .table(ins.issuer_table("legacy", ""))
        .raw(&format!(
            r#"
[[routes]]
name = "mixed"
path_prefix = "/mixed"
upstream = "{up}"
issuers = ["main", "legacy"]
audiences = ["{AUDIENCE}"]
[routes.identity_headers]
"X-User-Id" = "sub"

[[routes]]
name = "jwt-only"
path_prefix = "/jwt-only"
upstream = "{up}"
issuer = "main"
audiences = ["{AUDIENCE}"]
"#,
            up = up.url()
        ))
        .toml();
    let proxy = start_proxy(&toml).await;
    let call = |path: &str, token: &str| get(proxy.url(path)).bearer(token).send();

    let jwt = main.access_token("alice", 300);
    assert_eq!(call("/mixed/x", &jwt).await.echo().header("x-user-id"), Some("alice"), "JWT of main");
    let opaque = opaque_token();
    ins.set(&opaque, active("carol", 300));
    assert_eq!(call("/mixed/x", &opaque).await.echo().header("x-user-id"), Some("carol"), "opaque token");
    assert_eq!(ins.calls(), 1, "only the opaque token was introspected");

    // A JWT of an issuer the route does not list: refused, and never introspected.
    assert_invalid_token(&call("/mixed/x", &other.access_token("eve", 300)).await, "JWT of other");
    // A JWT naming the introspecting issuer is checked as a JWT (it has no keys), not introspected.
    let mut claims = main.claims("eve", 300);
    claims["iss"] = json!(ISSUER);
    assert_invalid_token(&call("/mixed/x", &sign("rsa1", &claims)).await, "JWT naming legacy");
    // An opaque token on a route without an introspecting issuer is not introspected.
    assert_invalid_token(&call("/jwt-only/x", &opaque).await, "opaque token on a JWT-only route");
    assert_eq!(ins.calls(), 1, "no other token reached the introspection endpoint");
}

// === logs ===

#[tokio::test]
async fn no_token_or_client_secret_reaches_the_log() {
    let ins = IntrospectionServer::start().await;
    let up = Upstream::start().await;
    let toml =
        Config::new().table(ins.issuer_table("legacy", r#"timeout = "1s""#)).raw(&legacy_route(&up)).toml();
    let proxy =
        ProxyProcess::start_with_env(&toml, &[(SECRET_ENV, CLIENT_SECRET), ("PORTCULLIS_LOG", "debug")])
            .await;
    wait_ready(&proxy).await;
    let call = |token: &str| get(proxy.url("/api/orders")).bearer(token).send();
    let mut tokens = Vec::new();

    let good = opaque_token();
    ins.set(&good, active("carol", 300));
    assert_eq!(call(&good).await.status, 200);
    let garbage = opaque_token();
    assert_eq!(call(&garbage).await.status, 401);
    let other_iss = opaque_token();
    ins.set(
        &other_iss,
        json!({"active": true, "sub": "x", "aud": AUDIENCE, "iss": "https://evil.example.com"}),
    );
    assert_eq!(call(&other_iss).await.status, 401);
    let mut tokens_in_outage = Vec::new();
    for down in [Down::Unavailable, Down::Garbage, Down::Hangup] {
        ins.set_down(down);
        let t = opaque_token();
        ins.set(&t, active("dave", 300));
        assert_eq!(call(&t).await.status, 503, "{down:?}");
        tokens_in_outage.push(t);
    }
    tokens.extend([good, garbage, other_iss]);
    tokens.extend(tokens_in_outage);

    // The log is written by a background thread: wait for all six access log lines.
    let requests = 6;
    eventually("every request is in the log", DEADLINE, || async {
        let log = proxy.log();
        log.lines().filter(|l| l.contains("portcullis::access")).count() >= requests
    })
    .await;
    let log = proxy.log();
    assert!(log.contains("introspection failed"), "the outage was logged:\n{log}");
    for t in &tokens {
        assert!(!log.contains(t.as_str()), "token {t} appears in the log:\n{log}");
    }
    assert!(!log.contains("opq_"), "a token appears in the log:\n{log}");
    assert!(!log.contains(CLIENT_SECRET), "the client secret appears in the log:\n{log}");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{CLIENT_ID}:{}",
        form_urlencoded::byte_serialize(CLIENT_SECRET.as_bytes()).collect::<String>()
    ));
    assert!(!log.contains(&basic), "the client's Basic credentials appear in the log:\n{log}");
}

#[tokio::test]
async fn an_opaque_session_token_whose_answer_has_no_exp_is_refreshed_by_its_expires_in() {
    let ins = IntrospectionServer::start().await;
    let up = Upstream::start().await;
    let idp = TestIdp::start().await;
    // The token response says 4 s; the introspection answer names no exp, so
    // without expires_in the token would count as good for the whole 60 s cache.
    idp.set_access_ttl(4);
    let answers = ins.answers();
    idp.set_opaque_access(move |token, claims| {
        let mut answer = active(claims["sub"].as_str().unwrap(), 0);
        answer.as_object_mut().unwrap().remove("exp");
        answers.set(token, answer);
    });
    let toml = Config::new()
        .table(ins.issuer_table("legacy", "cache = \"60s\""))
        .table(idp.auth_server_table())
        .table(session_table().set("refresh_ahead", "1s"))
        .raw(&legacy_route(&up))
        .toml();
    let mut env = crate::kit::session::env_with_keys(&[[7; 32]]);
    env.insert(SECRET_ENV.to_owned(), CLIENT_SECRET.to_owned());
    let proxy = Proxy::start_with(&toml, &env, Path::new(".")).await;
    wait_ready(&proxy).await;

    let (_, jar) = crate::kit::session::login(&proxy, "alice").await;
    let first = crate::kit::session::api(&proxy, &jar).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let logged_in = now();
    assert_eq!(
        idp.token_calls.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a fresh token needs no refresh"
    );

    // The same cookies until the proxy refreshes: due 3 s after login (4 s − refresh_ahead).
    let r = crate::kit::session::poll_until(
        "a transparent refresh of the opaque token",
        Duration::from_secs(15),
        || jar.on(get(proxy.url("/api/orders"))),
        |_| idp.token_calls.load(std::sync::atomic::Ordering::SeqCst) > 0,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(now() >= logged_in + 2, "refreshed before the token was due");
    assert!(
        crate::kit::session::set_cookie(&r, crate::kit::session::ACCESS).is_some(),
        "the refreshed access cookie comes back"
    );
}
