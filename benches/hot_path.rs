#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hot functions of the request path: routing, RS256 verification (cache miss),
//! the verified-token cache hit, and cookie seal/open.

use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use portcullis::auth::cache::{hash, TokenCache};
use portcullis::auth::{jwt, keys};
use portcullis::config::{IssuerSettings, KeySource};
use portcullis::route::RouteTable;
use portcullis::session::Sealer;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn routing(c: &mut Criterion) {
    let mut entries = Vec::new();
    for i in 0..50 {
        entries.push((None, format!("/service{i}/v1"), i));
        entries.push((Some(format!("host{i}.example.com")), format!("/api{i}"), i));
    }
    entries.push((None, "/".to_owned(), 999));
    let table = RouteTable::new(entries);
    c.bench_function("route_find_50_routes", |b| {
        b.iter(|| table.find(black_box(Some("host7.example.com:8443")), black_box("/service42/v1/orders/17")))
    });
}

fn rs256(c: &mut Criterion) {
    let pem = std::fs::read(format!("{FIXTURES}/rsa1.pem")).unwrap();
    let jwks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/jwks.json")).unwrap()).unwrap();
    let set = keys::parse_jwks(serde_json::json!({"keys": [jwks["rsa1"]]}).to_string().as_bytes()).unwrap();
    let settings = IssuerSettings {
        name: "bench".into(),
        issuer: "https://id.example.com".into(),
        source: KeySource::Static(Arc::new(keys::KeySet::default())),
        algorithms: vec![Algorithm::RS256],
        leeway: Duration::from_secs(30),
        jwks_refresh: Duration::from_secs(300),
    };
    let policy = jwt::Policy::new(&settings);
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa1".into());
    let exp = portcullis::auth::unix_now() + 3600;
    let claims = serde_json::json!({
        "iss": "https://id.example.com", "sub": "user-1234", "aud": "orders-api", "exp": exp,
        "iat": exp - 3600, "scope": "orders:read orders:write", "jti": "bench-1",
    });
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap();
    let now = exp - 10;
    c.bench_function("verify_rs256_cache_miss", |b| {
        b.iter(|| jwt::verify(black_box(&token), &policy, &set, now).unwrap())
    });
    let cache = TokenCache::new(100_000);
    let verified = Arc::new(jwt::verify(&token, &policy, &set, now).unwrap());
    cache.insert(hash(&token), 1, 1, verified, now);
    c.bench_function("verify_cache_hit", |b| {
        b.iter(|| cache.get(&hash(black_box(&token)), 1, 1, now).unwrap())
    });
}

fn cookies(c: &mut Criterion) {
    let sealer = Sealer::new(&[[7u8; 32], [9u8; 32]]);
    let token = "x".repeat(1200);
    let sealed = sealer.seal("__Host-access", token.as_bytes()).unwrap();
    c.bench_function("cookie_seal_1200B", |b| {
        b.iter(|| sealer.seal("__Host-access", black_box(token.as_bytes())))
    });
    c.bench_function("cookie_open_1200B", |b| {
        b.iter(|| sealer.open("__Host-access", black_box(&sealed)).unwrap())
    });
}

criterion_group!(benches, routing, rs256, cookies);
criterion_main!(benches);
