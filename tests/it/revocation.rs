//! Revocation on the admin listener (SPEC §4 Revocation) and the verified-token cache
//! (SPEC §4 Verified-token cache): a revoked token is refused on the very next request,
//! also when its signature check is cached; the cache never lends one token's identity
//! to another, never outlives `exp`, and never skips audience, scope or revocation.

use crate::kit::*;
use serde_json::{json, Value};

// === setup ===

struct Env {
    idp: TestIdp,
    up: Upstream,
    proxy: Proxy,
}

/// `/orders` (aud orders-api, scope orders:read), `/billing` (aud billing-api) and
/// `/admin` (scope orders:admin), all X-User-Id = sub. `extra` goes first (`[limits]`).
async fn start(extra: &str, leeway: &str) -> Env {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let issuer = idp
        .issuer_table()
        .set("algorithms", vec!["RS256", "ES256", "EdDSA"])
        .set("leeway", leeway)
        .set("jwks_refresh", "1h");
    let mut toml = Config::new().raw(extra).table(issuer).toml();
    for (name, audience, scope) in [
        ("orders", "orders-api", "orders:read"),
        ("billing", "billing-api", ""),
        ("admin", "orders-api", "orders:admin"),
    ] {
        let scopes = if scope.is_empty() { String::new() } else { format!("scopes = [\"{scope}\"]") };
        toml.push_str(&format!(
            r#"
[[routes]]
name = "{name}"
path_prefix = "/{name}"
upstream = "{up}"
issuer = "main"
audiences = ["{audience}"]
{scopes}
[routes.identity_headers]
"X-User-Id" = "sub"
"#,
            up = up.url()
        ));
    }
    let proxy = Proxy::start(&toml).await;
    wait_ready(&proxy).await;
    Env { idp, up, proxy }
}

impl Env {
    async fn call(&self, path: &str, token: &str) -> Reply {
        get(self.proxy.url(path)).bearer(token).send().await
    }

    /// The subject the upstream was told, or the proxy's error code.
    async fn who(&self, token: &str) -> Result<String, String> {
        let reply = self.call("/orders/1", token).await;
        if reply.status == 200 {
            Ok(reply.echo().header("x-user-id").unwrap_or("<none>").to_owned())
        } else {
            Err(format!("{} {}", reply.status.as_u16(), reply.json()["error"].as_str().unwrap_or("?")))
        }
    }

    async fn revoke(&self, body: &Value) -> Reply {
        revoke(&self.proxy, body).await
    }

    async fn revocations(&self) -> Vec<Value> {
        revocations(&self.proxy).await
    }

    fn token(&self, sub: &str) -> (String, Value) {
        let claims = self.idp.claims(sub, 300);
        (sign("rsa1", &claims), claims)
    }
}

// === revocation ===

#[tokio::test]
async fn revoked_jti_is_refused_on_the_next_request() {
    let env = start("", "30s").await;
    let (token, claims) = env.token("alice");
    let (other, _) = env.token("alice");
    assert_eq!(env.who(&token).await, Ok("alice".into()));

    let entry = json!({"jti": claims["jti"], "exp": claims["exp"]});
    let reply = env.revoke(&entry).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.json(), entry, "POST answers the stored entry");

    let forwarded = env.up.seen().len();
    assert_invalid_token(&env.call("/orders/1", &token).await, "revoked jti");
    assert_invalid_token(&env.call("/billing/1", &token).await, "revoked jti on another route");
    assert_eq!(env.up.seen().len(), forwarded, "a revoked token reached the upstream");
    assert_eq!(env.who(&other).await, Ok("alice".into()), "another token of the same subject is fine");
}

#[tokio::test]
async fn revoked_subject_denies_only_tokens_issued_before_the_cutoff() {
    let env = start("", "30s").await;
    let (alice1, _) = env.token("alice");
    let (alice2, _) = env.token("alice");
    let (bob, _) = env.token("bob");
    assert_eq!(env.who(&alice1).await, Ok("alice".into()));
    assert_eq!(env.who(&bob).await, Ok("bob".into()));

    let cutoff = idp::now() + 1;
    let entry = json!({"sub": "alice", "issued_before": cutoff});
    let reply = env.revoke(&entry).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.json()["sub"], "alice");
    assert_eq!(reply.json()["issued_before"], cutoff);

    assert_invalid_token(&env.call("/orders/1", &alice1).await, "alice's cached token");
    assert_invalid_token(&env.call("/orders/1", &alice2).await, "alice's other token");
    assert_eq!(env.who(&bob).await, Ok("bob".into()), "other subjects are not affected");
    // A token issued at or after the cut-off (a new login) is accepted.
    let mut later = env.idp.claims("alice", 300);
    later["iat"] = json!(cutoff);
    assert_eq!(env.who(&sign("rsa1", &later)).await, Ok("alice".into()));
    // A token of that subject without `iat` cannot show it is newer.
    let mut undated = env.idp.claims("alice", 300);
    undated.as_object_mut().unwrap().remove("iat");
    assert_invalid_token(&env.call("/orders/1", &sign("rsa1", &undated)).await, "alice without iat");
}

#[tokio::test]
async fn revocation_list_shows_every_entry() {
    let env = start("", "30s").await;
    assert_eq!(env.revocations().await, Vec::<Value>::new());
    let (_, claims) = env.token("alice");
    let exp = claims["exp"].as_i64().unwrap();
    let cutoff = idp::now();
    assert_eq!(env.revoke(&json!({"jti": claims["jti"], "exp": exp})).await.status, 201);
    assert_eq!(env.revoke(&json!({"sub": "bob", "issued_before": cutoff})).await.status, 201);

    let list = env.revocations().await;
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(list.iter().any(|e| e["jti"] == claims["jti"] && e["exp"] == exp), "{list:?}");
    assert!(list.iter().any(|e| e["sub"] == "bob" && e["issued_before"] == cutoff), "{list:?}");
}

#[tokio::test]
async fn malformed_revocations_are_400() {
    let env = start("", "30s").await;
    let url = format!("{}/revocations", env.proxy.admin_url());
    let bodies: Vec<String> = vec![
        "not json".into(),
        "".into(),
        "{}".into(),
        "[]".into(),
        r#"{"jti": "x"}"#.into(),
        r#"{"sub": "alice"}"#.into(),
        r#"{"jti": 5, "exp": 1700000000}"#.into(),
        r#"{"jti": "x", "exp": "tomorrow"}"#.into(),
        r#"{"sub": "alice", "issued_before": "now"}"#.into(),
        r#"{"jti": "", "exp": 1700000000}"#.into(),
        r#"{"sub": "", "issued_before": 1700000000}"#.into(),
        format!(r#"{{"jti": "{}", "exp": 1700000000}}"#, "x".repeat(70 * 1024)),
    ];
    for body in &bodies {
        let reply = post(&url, body.clone()).header("content-type", "application/json").send().await;
        let shown: String = body.chars().take(60).collect();
        assert_eq!(reply.status, 400, "{shown}: {}", reply.text());
        reply.assert_error(400, "bad_request");
    }
    assert_eq!(env.revocations().await, Vec::<Value>::new(), "nothing was stored");
}

// === verified-token cache ===

#[tokio::test]
async fn same_token_is_accepted_again_and_again() {
    let env = start("", "30s").await;
    let (token, _) = env.token("alice");
    for i in 0..5 {
        assert_eq!(env.who(&token).await, Ok("alice".into()), "request {i}");
    }
}

#[tokio::test]
async fn revoked_token_is_refused_even_though_its_check_is_cached() {
    let env = start("", "30s").await;
    let (token, claims) = env.token("alice");
    for _ in 0..3 {
        assert_eq!(env.who(&token).await, Ok("alice".into()));
    }
    let reply = env.revoke(&json!({"jti": claims["jti"], "exp": claims["exp"]})).await;
    assert_eq!(reply.status, 201);
    for i in 0..3 {
        assert_invalid_token(&env.call("/orders/1", &token).await, &format!("cached + revoked, request {i}"));
    }
}

#[tokio::test]
async fn cached_token_is_still_checked_against_each_routes_audience_and_scopes() {
    let env = start("", "30s").await;
    let (token, _) = env.token("alice");
    assert_eq!(env.who(&token).await, Ok("alice".into()));
    assert_eq!(env.who(&token).await, Ok("alice".into()), "now cached");
    env.call("/billing/1", &token).await.assert_error(401, "invalid_token");
    let reply = env.call("/admin/1", &token).await;
    reply.assert_error(403, "insufficient_scope");
    assert!(reply.header("www-authenticate").unwrap_or_default().contains("scope=\"orders:admin\""));
    assert_eq!(env.who(&token).await, Ok("alice".into()), "and still fine where it fits");
}

#[tokio::test]
async fn tokens_never_share_a_cached_identity() {
    // A tiny cache, so entries are evicted and refilled while requests interleave.
    let env = start("[limits]\ntoken_cache_entries = 2", "30s").await;
    let users = ["alice", "bob", "carol", "dave", "erin"];
    let tokens: Vec<(String, &str)> = users.iter().map(|u| (env.token(u).0, *u)).collect();
    let rounds = (0..4).flat_map(|_| tokens.iter());
    let env = &env;
    let answers =
        futures_util::future::join_all(rounds.map(|(t, u)| async move { (env.who(t).await, *u) })).await;
    for (got, want) in answers {
        assert_eq!(got, Ok(want.to_owned()));
    }
    // Two tokens of one subject with different claims keep their own claims too.
    let mut narrow = env.idp.claims("alice", 300);
    narrow["scope"] = json!("orders:write");
    let narrow = sign("rsa1", &narrow);
    assert_eq!(env.who(&tokens[0].0).await, Ok("alice".into()));
    assert_eq!(env.who(&narrow).await, Err("403 insufficient_scope".into()));
    assert_eq!(env.who(&tokens[0].0).await, Ok("alice".into()));
}

#[tokio::test]
async fn cached_token_is_not_accepted_past_its_expiry() {
    let env = start("", "0s").await;
    let mut claims = env.idp.claims("alice", 0);
    claims["exp"] = json!(idp::now() + 3);
    let token = sign("rsa1", &claims);
    assert_eq!(env.who(&token).await, Ok("alice".into()));
    assert_eq!(env.who(&token).await, Ok("alice".into()), "cached");
    eventually("the cached token expires", DEADLINE, || async {
        env.who(&token).await == Err("401 invalid_token".into())
    })
    .await;
    assert!(idp::now() > claims["exp"].as_i64().unwrap(), "refused only after exp");
}

#[tokio::test]
async fn everything_works_with_the_token_cache_disabled() {
    let env = start("[limits]\ntoken_cache_entries = 0", "30s").await;
    let (alice, claims) = env.token("alice");
    let (bob, _) = env.token("bob");
    for _ in 0..3 {
        assert_eq!(env.who(&alice).await, Ok("alice".into()));
        assert_eq!(env.who(&bob).await, Ok("bob".into()));
    }
    let (head, rest) = alice.split_once('.').unwrap();
    let (_, sig) = rest.split_once('.').unwrap();
    let forged = format!("{head}.{}.{sig}", idp::b64(env.idp.claims("root", 300).to_string().as_bytes()));
    assert_eq!(env.who(&forged).await, Err("401 invalid_token".into()));
    assert_eq!(env.revoke(&json!({"jti": claims["jti"], "exp": claims["exp"]})).await.status, 201);
    assert_eq!(env.who(&alice).await, Err("401 invalid_token".into()));
    assert_eq!(env.who(&bob).await, Ok("bob".into()));
    env.call("/billing/1", &bob).await.assert_error(401, "invalid_token");
}

// === the cache across a configuration reload (the real binary, SIGHUP) ===

fn binary_config(idp: &TestIdp, up: &Upstream, issuer: &str, algorithms: Vec<&str>) -> String {
    let issuer =
        idp.issuer_table().set("issuer", issuer).set("algorithms", algorithms).set("jwks_refresh", "1h");
    let route = format!(
        "[[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"{}\"\nissuer = \"main\"\n",
        up.url()
    );
    Config::new().table(issuer).raw(&route).toml()
}

async fn status(bin: &ProxyProcess, token: &str) -> u16 {
    get(bin.url("/orders/1")).bearer(token).send().await.status.as_u16()
}

#[tokio::test]
async fn reload_that_tightens_an_issuer_is_not_bypassed_by_the_token_cache() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    let bin = ProxyProcess::start(&binary_config(&idp, &up, &idp.issuer(), vec!["RS256", "EdDSA"])).await;
    wait_ready(&bin).await;
    let eddsa = sign("ed1", &idp.claims("alice", 300));
    assert_eq!(status(&bin, &eddsa).await, 200);
    assert_eq!(status(&bin, &eddsa).await, 200, "now cached");

    // The operator withdraws EdDSA (same issuer name and jwks_url, so the key store is kept).
    bin.reload(&binary_config(&idp, &up, &idp.issuer(), vec!["RS256"])).await;
    assert_eq!(
        status(&bin, &sign("ed1", &idp.claims("bob", 300))).await,
        401,
        "a fresh EdDSA token is refused"
    );
    assert_eq!(status(&bin, &eddsa).await, 401, "a cached EdDSA token must be refused as well");

    // The operator changes the required `iss`.
    let rs256 = sign("rsa1", &idp.claims("carol", 300));
    assert_eq!(status(&bin, &rs256).await, 200);
    bin.reload(&binary_config(&idp, &up, "https://new-issuer.example.com", vec!["RS256"])).await;
    assert_eq!(status(&bin, &rs256).await, 401, "a cached token with the old iss must be refused");
}
