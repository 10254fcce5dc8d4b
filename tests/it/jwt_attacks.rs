//! Token verification on the wire (SPEC §3 `[[issuers]]`, §4 Rejections): what is
//! accepted, and every forged, stolen-shape or out-of-policy token that must be
//! refused with the RFC 6750 answer — without the request ever reaching the upstream.

use std::sync::atomic::Ordering;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::kit::idp::{b64, sign_with_header, AUDIENCE};
use crate::kit::*;

// === setup ===

const ROUTE: &str = r#"
[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "{UP}"
auth = "required"
issuer = "main"
audiences = ["orders-api"]
scopes = ["orders:read"]
forward_token = true
[routes.identity_headers]
"X-User-Id" = "sub"
"X-User-Email" = "email"

[[routes]]
name = "maybe"
path_prefix = "/maybe"
upstream = "{UP}"
auth = "optional"
issuer = "main"
audiences = ["orders-api"]
[routes.identity_headers]
"X-User-Id" = "sub"
"#;

/// The issuer of the brief: JWKS from the test IdP, the three asymmetric algorithms.
fn jwks_issuer(idp: &TestIdp) -> Table {
    idp.issuer_table()
        .set("algorithms", vec!["RS256", "ES256", "EdDSA"])
        .set("leeway", "30s")
        .set("jwks_refresh", "1h")
}

/// The brief's issuer and routes, behind `extra` (e.g. `[limits]`).
fn config(issuer: Table, extra: &str, up: &Upstream) -> String {
    Config::new().raw(extra).table(issuer).raw(&ROUTE.replace("{UP}", &up.url())).toml()
}

struct Env {
    idp: TestIdp,
    up: Upstream,
    proxy: Proxy,
}

impl Env {
    async fn start() -> Self {
        Self::with(jwks_issuer, "").await
    }

    /// `issuer` makes the `[[issuers]]` table; `extra` is prepended (e.g. `[limits]`).
    async fn with(issuer: impl FnOnce(&TestIdp) -> Table, extra: &str) -> Self {
        let idp = TestIdp::start().await;
        let up = Upstream::start().await;
        let proxy = Proxy::start(&config(issuer(&idp), extra, &up)).await;
        wait_ready(&proxy).await;
        Self { idp, up, proxy }
    }

    async fn send(&self, token: &str) -> Reply {
        self.send_to("/orders/1", token).await
    }

    async fn send_to(&self, path: &str, token: &str) -> Reply {
        get(self.proxy.url(path)).bearer(token).send().await
    }

    /// A normal token for `sub`, as the IdP issues them (RS256, kid rsa1).
    fn token(&self, sub: &str) -> String {
        sign("rsa1", &self.idp.claims(sub, 300))
    }

    /// Asserts the token is refused with 401 `invalid_token` and never forwarded.
    async fn assert_refused(&self, token: &str, what: &str) {
        let forwarded = self.up.seen().len();
        let reply = self.send(token).await;
        assert_invalid_token(&reply, what);
        assert!(!reply.text().contains(token), "{what}: the token is echoed in the answer");
        assert_eq!(self.up.seen().len(), forwarded, "{what}: a refused request reached the upstream");
    }

    async fn assert_accepted(&self, token: &str, sub: &str, what: &str) {
        let reply = self.send(token).await;
        assert_eq!(reply.status, 200, "{what}: {}", reply.text());
        assert_eq!(reply.echo().header("x-user-id"), Some(sub), "{what}");
    }

    fn claims(&self, sub: &str) -> Value {
        self.idp.claims(sub, 300)
    }
}

/// `header.payload.signature` from raw JSON values, signed with nothing.
fn forge(header: &Value, claims: &Value, signature: &str) -> String {
    format!("{}.{}.{signature}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()))
}

fn header(alg: Algorithm, kid: Option<&str>) -> Header {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    h
}

fn remove(mut claims: Value, name: &str) -> Value {
    claims.as_object_mut().unwrap().remove(name);
    claims
}

fn with(mut claims: Value, name: &str, value: Value) -> Value {
    claims[name] = value;
    claims
}

/// A server standing for the attacker's URLs (`jku`, `x5u`): a second IdP that
/// publishes the attacker's key (rsa2) and counts every connection it is offered.
async fn attacker() -> TestIdp {
    let attacker = TestIdp::start().await;
    attacker.set_keys(&["rsa2"]);
    attacker
}

fn connections(attacker: &TestIdp) -> usize {
    attacker.connections.load(Ordering::SeqCst)
}

// === where the token comes from ===

#[tokio::test]
async fn missing_token_is_401_missing_token_with_a_bare_bearer_challenge() {
    let env = Env::start().await;
    let reply = get(env.proxy.url("/orders/1")).send().await;
    reply.assert_error(401, "missing_token");
    assert_eq!(reply.header("www-authenticate"), Some("Bearer realm=\"portcullis\""));
    assert_eq!(env.up.seen(), Vec::new());
}

#[tokio::test]
async fn basic_authorization_counts_as_missing_token() {
    let env = Env::start().await;
    for value in ["Basic dXNlcjpwYXNz", "Digest username=\"u\"", "Bearerx abc", "Token abc"] {
        let reply = get(env.proxy.url("/orders/1")).header("authorization", value).send().await;
        reply.assert_error(401, "missing_token");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer realm=\"portcullis\""), "{value}");
    }
    assert_eq!(env.up.seen(), Vec::new());
}

#[tokio::test]
async fn empty_or_garbage_bearer_is_invalid_token() {
    let env = Env::start().await;
    let values = [
        "Bearer",
        "Bearer    ",
        "Bearer garbage",
        "Bearer a.b.c",
        "Bearer ..",
        "Bearer eyJhbGciOiJSUzI1NiJ9",
        "Bearer eyJhbGciOiJSUzI1NiJ9.e30",
        "Bearer not base64!.also not.nope",
        "Bearer héllo",
    ];
    for value in values {
        let reply = get(env.proxy.url("/orders/1")).header("authorization", value).send().await;
        assert_invalid_token(&reply, value);
    }
    assert_eq!(env.up.seen(), Vec::new());
}

#[tokio::test]
async fn bearer_scheme_is_case_insensitive() {
    let env = Env::start().await;
    let token = env.token("alice");
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let reply =
            get(env.proxy.url("/orders/1")).header("authorization", format!("{scheme} {token}")).send().await;
        assert_eq!(reply.echo().header("x-user-id"), Some("alice"), "{scheme}");
    }
}

// === what is accepted ===

#[tokio::test]
async fn rs256_es256_and_eddsa_tokens_are_accepted() {
    let env = Env::start().await;
    for kid in ["rsa1", "ec1", "ed1"] {
        let sub = format!("user-{kid}");
        env.assert_accepted(&sign(kid, &env.claims(&sub)), &sub, kid).await;
    }
}

#[tokio::test]
async fn at_jwt_typ_and_audience_array_are_accepted() {
    let env = Env::start().await;
    let mut h = header(Algorithm::RS256, Some("rsa1"));
    h.typ = Some("at+jwt".into());
    env.assert_accepted(&sign_with_header("rsa1", h, &env.claims("rfc9068")), "rfc9068", "typ at+jwt").await;
    let claims = with(env.claims("multi"), "aud", json!(["billing-api", AUDIENCE]));
    env.assert_accepted(&sign("rsa1", &claims), "multi", "aud array").await;
    let claims = with(env.claims("scp"), "scope", json!("orders:write"));
    let claims = with(claims, "scp", json!(["orders:read"]));
    env.assert_accepted(&sign("rsa1", &claims), "scp", "scope from scp array").await;
}

#[tokio::test]
async fn token_without_kid_is_checked_against_every_key_of_its_type() {
    let env = Env::start().await;
    let token = sign_with_header("ec1", header(Algorithm::ES256, None), &env.claims("nokid"));
    env.assert_accepted(&token, "nokid", "ES256 without kid").await;
    let forged = sign_with_header("rsa2", header(Algorithm::RS256, None), &env.claims("mallory"));
    env.assert_refused(&forged, "RS256 without kid by an untrusted key").await;
}

// === forged signatures ===

#[tokio::test]
async fn alg_none_token_is_rejected() {
    let env = Env::start().await;
    let claims = env.claims("admin");
    let stolen_sig = env.token("alice").rsplit('.').next().unwrap().to_owned();
    let headers = [
        json!({"alg": "none", "typ": "JWT"}),
        json!({"alg": "None"}),
        json!({"alg": "NONE"}),
        json!({"alg": "nOnE", "kid": "rsa1"}),
        json!({"alg": "none", "kid": "rsa1", "typ": "at+jwt"}),
        json!({"typ": "JWT"}),
        json!({"alg": "", "kid": "rsa1"}),
    ];
    for h in &headers {
        env.assert_refused(&forge(h, &claims, ""), &format!("{h} unsigned")).await;
        env.assert_refused(&forge(h, &claims, &stolen_sig), &format!("{h} with a stolen signature")).await;
        let two_parts = format!("{}.{}", b64(h.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        env.assert_refused(&two_parts, &format!("{h} without a signature part")).await;
    }
}

#[tokio::test]
async fn hs256_signed_with_rsa_public_key_is_rejected() {
    let env = Env::start().await;
    let pem = std::fs::read(fixture("rsa1.pub.pem")).unwrap();
    let trimmed = String::from_utf8(pem.clone()).unwrap().trim_end().as_bytes().to_vec();
    let claims = env.claims("admin");
    for (secret, label) in [(&pem, "PEM"), (&trimmed, "PEM without final newline")] {
        let key = EncodingKey::from_secret(secret);
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            for kid in [Some("rsa1"), None] {
                let token = jsonwebtoken::encode(&header(alg, kid), &claims, &key).unwrap();
                env.assert_refused(&token, &format!("{alg:?} kid {kid:?} keyed with the {label}")).await;
            }
        }
    }
}

#[tokio::test]
async fn hs256_signed_with_rsa_public_key_is_rejected_by_a_pem_file_issuer() {
    // The classic confusion: the verifier holds the PEM file, the attacker signs with its bytes.
    let path = fixture("rsa1.pub.pem");
    let env = Env::with(
        |idp| {
            idp.issuer_table()
                .unset("jwks_url")
                .set("public_key_files", vec![path.as_str()])
                .set("algorithms", vec!["RS256"])
        },
        "",
    )
    .await;
    env.assert_accepted(
        &sign_with_header("rsa1", header(Algorithm::RS256, None), &env.claims("a")),
        "a",
        "RS256",
    )
    .await;
    let pem = std::fs::read(&path).unwrap();
    for kid in [None, Some("rsa1")] {
        let token = jsonwebtoken::encode(
            &header(Algorithm::HS256, kid),
            &env.claims("admin"),
            &EncodingKey::from_secret(&pem),
        )
        .unwrap();
        env.assert_refused(&token, &format!("HS256 keyed with the PEM file, kid {kid:?}")).await;
    }
}

#[tokio::test]
async fn algorithm_outside_the_allow_list_is_rejected() {
    let env = Env::with(|idp| jwks_issuer(idp).set("algorithms", vec!["RS256"]), "").await;
    env.assert_accepted(&env.token("alice"), "alice", "RS256 is allowed").await;
    env.assert_refused(&sign("ec1", &env.claims("bob")), "ES256 by a published key, not allowed").await;
    env.assert_refused(&sign("ed1", &env.claims("bob")), "EdDSA by a published key, not allowed").await;
    let ps256 = sign_with_header("rsa1", header(Algorithm::PS256, Some("rsa1")), &env.claims("bob"));
    env.assert_refused(&ps256, "PS256 by the trusted RSA key, not allowed").await;
}

#[tokio::test]
async fn algorithm_not_matching_the_key_type_is_rejected() {
    let env = Env::start().await;
    // ES256 signed by ec1 but naming the RSA key, and the other way round.
    let t = sign_with_header("ec1", header(Algorithm::ES256, Some("rsa1")), &env.claims("mallory"));
    env.assert_refused(&t, "ES256 token naming the RSA key").await;
    let t = sign_with_header("rsa1", header(Algorithm::RS256, Some("ec1")), &env.claims("mallory"));
    env.assert_refused(&t, "RS256 token naming the EC key").await;
    let t = sign_with_header("ed1", header(Algorithm::EdDSA, Some("rsa1")), &env.claims("mallory"));
    env.assert_refused(&t, "EdDSA token naming the RSA key").await;
}

#[tokio::test]
async fn tampered_payload_is_rejected() {
    let env = Env::start().await;
    let good = env.token("alice");
    let parts: Vec<&str> = good.split('.').collect();
    let mut claims = env.claims("admin");
    claims["scope"] = json!("orders:read orders:write orders:admin");
    let swapped = format!("{}.{}.{}", parts[0], b64(claims.to_string().as_bytes()), parts[2]);
    env.assert_refused(&swapped, "payload replaced, signature kept").await;
    // One flipped character in the signature.
    let mut sig = parts[2].to_owned();
    let last = sig.pop().unwrap();
    sig.push(if last == 'A' { 'B' } else { 'A' });
    env.assert_refused(&format!("{}.{}.{sig}", parts[0], parts[1]), "signature altered").await;
    // A header swapped for one naming another key.
    let other = b64(json!({"alg": "RS256", "kid": "ec1"}).to_string().as_bytes());
    env.assert_refused(&format!("{other}.{}.{}", parts[1], parts[2]), "header altered").await;
}

#[tokio::test]
async fn stripped_signature_is_rejected() {
    let env = Env::start().await;
    let good = env.token("alice");
    let (signed_part, _) = good.rsplit_once('.').unwrap();
    env.assert_refused(&format!("{signed_part}."), "empty signature").await;
    env.assert_refused(signed_part, "signature part missing").await;
    env.assert_refused(&format!("{signed_part}.{}", b64(&[0u8; 256])), "zero signature").await;
}

#[tokio::test]
async fn token_signed_by_an_unknown_kid_is_rejected() {
    let env = Env::start().await;
    let t = sign_with_header("rsa2", header(Algorithm::RS256, Some("rsa2")), &env.claims("mallory"));
    env.assert_refused(&t, "kid not in the JWKS").await;
    let t = sign_with_header("rsa1", header(Algorithm::RS256, Some("no-such-key")), &env.claims("mallory"));
    env.assert_refused(&t, "right key, unknown kid").await;
}

#[tokio::test]
async fn trusted_kid_with_a_foreign_signature_is_rejected() {
    let env = Env::start().await;
    let t = sign_with_header("rsa2", header(Algorithm::RS256, Some("rsa1")), &env.claims("mallory"));
    env.assert_refused(&t, "kid rsa1, signed by rsa2").await;
}

// === key-locating headers are never followed ===

#[tokio::test]
async fn jku_header_is_never_followed() {
    let env = Env::start().await;
    let attacker = attacker().await;
    for kid in [Some("rsa2"), None, Some("rsa1")] {
        let mut h = header(Algorithm::RS256, kid);
        h.jku = Some(attacker.jwks_url());
        let t = sign_with_header("rsa2", h, &env.claims("mallory"));
        env.assert_refused(&t, &format!("jku to the attacker, kid {kid:?}")).await;
    }
    assert_eq!(connections(&attacker), 0, "the proxy contacted the jku URL");
}

#[tokio::test]
async fn x5u_header_is_never_followed() {
    let env = Env::start().await;
    let attacker = attacker().await;
    for kid in [Some("rsa2"), None, Some("rsa1")] {
        let mut h = header(Algorithm::RS256, kid);
        h.x5u = Some(format!("{}/cert.pem", attacker.issuer()));
        let t = sign_with_header("rsa2", h, &env.claims("mallory"));
        env.assert_refused(&t, &format!("x5u to the attacker, kid {kid:?}")).await;
    }
    assert_eq!(connections(&attacker), 0, "the proxy contacted the x5u URL");
}

#[tokio::test]
async fn embedded_jwk_header_is_never_trusted() {
    let env = Env::start().await;
    let attacker = attacker().await;
    let attacker_jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(idp::jwk("rsa2")).unwrap();
    for kid in [Some("rsa2"), None, Some("rsa1")] {
        let mut h = header(Algorithm::RS256, kid);
        h.jwk = Some(attacker_jwk.clone());
        h.jku = Some(attacker.jwks_url());
        let t = sign_with_header("rsa2", h, &env.claims("mallory"));
        env.assert_refused(&t, &format!("embedded attacker jwk, kid {kid:?}")).await;
    }
    assert_eq!(connections(&attacker), 0, "the proxy contacted an attacker URL");
}

// === claims ===

#[tokio::test]
async fn wrong_issuer_is_rejected() {
    let env = Env::start().await;
    let iss = env.idp.issuer();
    for bad in [json!("https://evil.example.com"), json!(format!("{iss}/")), json!([iss]), json!(null)] {
        let t = sign("rsa1", &with(env.claims("mallory"), "iss", bad.clone()));
        env.assert_refused(&t, &format!("iss {bad}")).await;
    }
    env.assert_refused(&sign("rsa1", &remove(env.claims("mallory"), "iss")), "no iss").await;
}

#[tokio::test]
async fn wrong_audience_is_rejected() {
    let env = Env::start().await;
    for bad in [json!("billing-api"), json!(["billing-api", "other"]), json!([]), json!("orders-api-x")] {
        let t = sign("rsa1", &with(env.claims("mallory"), "aud", bad.clone()));
        env.assert_refused(&t, &format!("aud {bad}")).await;
    }
    env.assert_refused(&sign("rsa1", &remove(env.claims("mallory"), "aud")), "no aud").await;
}

#[tokio::test]
async fn expired_token_beyond_leeway_is_rejected() {
    let env = Env::start().await;
    let now = idp::now();
    let t = sign("rsa1", &with(env.claims("late"), "exp", json!(now - 120)));
    env.assert_refused(&t, "expired 2 minutes ago (leeway 30 s)").await;
    let t = sign("rsa1", &with(env.claims("skewed"), "exp", json!(now - 5)));
    env.assert_accepted(&t, "skewed", "expired 5 s ago, within the leeway").await;
}

#[tokio::test]
async fn not_yet_valid_token_is_rejected() {
    let env = Env::start().await;
    let now = idp::now();
    let t = sign("rsa1", &with(env.claims("early"), "nbf", json!(now + 120)));
    env.assert_refused(&t, "nbf in 2 minutes (leeway 30 s)").await;
    let t = sign("rsa1", &with(env.claims("skewed"), "nbf", json!(now + 5)));
    env.assert_accepted(&t, "skewed", "nbf in 5 s, within the leeway").await;
    let t = sign("rsa1", &with(env.claims("future"), "iat", json!(now + 3600)));
    env.assert_refused(&t, "issued an hour in the future").await;
}

#[tokio::test]
async fn token_without_exp_is_rejected() {
    let env = Env::start().await;
    env.assert_refused(&sign("rsa1", &remove(env.claims("forever"), "exp")), "no exp").await;
    for bad in [json!(null), json!("9999999999"), json!({"t": 1})] {
        let t = sign("rsa1", &with(env.claims("odd"), "exp", bad.clone()));
        env.assert_refused(&t, &format!("exp {bad}")).await;
    }
}

#[tokio::test]
async fn oversized_token_is_rejected() {
    // The header limit is raised so that the request reaches token verification.
    let env = Env::with(jwks_issuer, "[limits]\nmax_header_bytes = 262144\n").await;
    let head = b64(json!({"alg": "RS256", "kid": "rsa1"}).to_string().as_bytes());
    let body = "A".repeat(64 * 1024);
    env.assert_refused(&format!("{head}.{body}.{}", b64(&[7u8; 256])), "64 KiB token").await;
    let junk = "x".repeat(64 * 1024);
    env.assert_refused(&junk, "64 KiB of garbage").await;
}

#[tokio::test]
async fn oversized_token_within_default_limits_is_refused_before_the_upstream() {
    let env = Env::start().await;
    let junk = "x".repeat(64 * 1024);
    let req = get(env.proxy.url("/orders/1")).header("authorization", format!("Bearer {junk}"));
    // 64 KiB plus the header name exceeds max_header_bytes: 431 or a closed connection.
    if let Ok(reply) = try_send(req).await {
        assert!(matches!(reply.status.as_u16(), 401 | 431), "{} {}", reply.status, reply.text());
    }
    assert_eq!(env.up.seen(), Vec::new());
}

// === scopes ===

#[tokio::test]
async fn missing_scope_is_403_insufficient_scope() {
    let env = Env::start().await;
    let cases = [
        with(env.claims("w"), "scope", json!("orders:write")),
        with(env.claims("w"), "scope", json!("orders:readx ORDERS:READ orders")),
        with(env.claims("w"), "scope", json!("")),
        remove(env.claims("w"), "scope"),
        with(remove(env.claims("w"), "scope"), "scp", json!(["orders:write"])),
    ];
    for claims in &cases {
        let reply = env.send(&sign("rsa1", claims)).await;
        reply.assert_error(403, "insufficient_scope");
        let www = reply.header("www-authenticate").unwrap_or_default();
        assert!(www.starts_with("Bearer realm=\"portcullis\""), "{www}");
        assert!(www.contains("error=\"insufficient_scope\""), "{www}");
        assert!(www.contains("scope=\"orders:read\""), "{www}");
    }
    assert_eq!(env.up.seen(), Vec::new());
}

// === optional routes ===

#[tokio::test]
async fn optional_route_without_token_is_forwarded_anonymously() {
    let env = Env::start().await;
    let echo = get(env.proxy.url("/maybe/x")).send().await.echo();
    assert!(!echo.has_header("x-user-id"), "{:?}", echo.headers);
    assert_eq!(echo.names_starting_with("x-auth-"), Vec::<&str>::new());
    let echo =
        get(env.proxy.url("/maybe/x")).header("authorization", "Basic dXNlcjpwYXNz").send().await.echo();
    assert!(!echo.has_header("x-user-id"), "{:?}", echo.headers);
}

#[tokio::test]
async fn optional_route_with_invalid_token_is_401() {
    let env = Env::start().await;
    let forged = sign_with_header("rsa2", header(Algorithm::RS256, Some("rsa1")), &env.claims("mallory"));
    let expired = sign("rsa1", &with(env.claims("late"), "exp", json!(idp::now() - 3600)));
    for token in [forged.as_str(), expired.as_str(), "garbage"] {
        assert_invalid_token(&env.send_to("/maybe/x", token).await, token);
    }
    let reply = get(env.proxy.url("/maybe/x")).header("authorization", "Bearer").send().await;
    assert_invalid_token(&reply, "empty bearer");
    assert_eq!(env.up.seen(), Vec::new());
    let echo = env.send_to("/maybe/x", &env.token("alice")).await.echo();
    assert_eq!(echo.header("x-user-id"), Some("alice"));
}

// === metrics ===

#[tokio::test]
async fn rejections_are_counted_per_reason() {
    let env = Env::start().await;
    let series = |reason: &str| format!("portcullis_auth_rejections_total{{reason=\"{reason}\"}}");
    let before = [
        metric(&env.proxy, &series("missing_token")).await,
        metric(&env.proxy, &series("invalid_token")).await,
        metric(&env.proxy, &series("insufficient_scope")).await,
    ];
    get(env.proxy.url("/orders/1")).send().await.assert_error(401, "missing_token");
    env.send("garbage").await.assert_error(401, "invalid_token");
    let forged = sign_with_header("rsa2", header(Algorithm::RS256, Some("rsa1")), &env.claims("mallory"));
    env.send(&forged).await.assert_error(401, "invalid_token");
    let claims = with(env.claims("w"), "scope", json!("orders:write"));
    env.send(&sign("rsa1", &claims)).await.assert_error(403, "insufficient_scope");
    env.assert_accepted(&env.token("alice"), "alice", "a good token is not a rejection").await;
    let after = [
        metric(&env.proxy, &series("missing_token")).await,
        metric(&env.proxy, &series("invalid_token")).await,
        metric(&env.proxy, &series("insufficient_scope")).await,
    ];
    assert_eq!([after[0] - before[0], after[1] - before[1], after[2] - before[2]], [1.0, 2.0, 1.0]);
}

// === logs ===

#[tokio::test]
async fn rejections_are_logged_with_a_reason_but_never_with_the_token() {
    let idp = TestIdp::start().await;
    let up = Upstream::start().await;
    // The proxy's own debug logs too; set explicitly so an inherited RUST_LOG cannot mute them.
    let proxy = ProxyProcess::start_with_env(
        &config(jwks_issuer(&idp), "", &up),
        &[("PORTCULLIS_LOG", "info,portcullis=debug")],
    )
    .await;
    wait_ready(&proxy).await;

    let claims = idp.claims("alice", 300);
    let tokens = [
        sign_with_header("rsa2", header(Algorithm::RS256, Some("rsa1")), &claims),
        sign("rsa1", &with(claims.clone(), "exp", json!(idp::now() - 3600))),
        sign("rsa1", &with(claims.clone(), "aud", json!("billing-api"))),
        sign("rsa1", &with(claims.clone(), "scope", json!("orders:write"))),
        forge(&json!({"alg": "none"}), &claims, ""),
        sign("rsa1", &claims),
    ];
    for t in &tokens {
        get(proxy.url("/orders/1")).bearer(t).header("x-user-id", "spoof").send().await;
    }
    let log_has = |needle: &str| proxy.log().contains(needle);
    eventually("the rejections are logged", DEADLINE, || async {
        log_has("invalid_token") && log_has("insufficient_scope")
    })
    .await;
    for t in &tokens {
        let (signed, sig) = t.rsplit_once('.').unwrap();
        let payload = signed.split('.').nth(1).unwrap();
        for (part, what) in [(t.as_str(), "token"), (payload, "payload"), (sig, "signature")] {
            assert!(part.len() < 8 || !log_has(part), "the log holds a {what}");
        }
    }
}
