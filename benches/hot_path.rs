#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hot functions of the request path: routing, path normalisation, RS256
//! verification (cache miss), the verified-token cache hit, and cookie seal/open.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use portcullis::bench::{normalise, unix_now, Routing, Seal, Verify};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn routing(c: &mut Criterion) {
    let mut entries = Vec::new();
    for i in 0..50 {
        entries.push((None, format!("/service{i}/v1")));
        entries.push((Some(format!("host{i}.example.com")), format!("/api{i}")));
    }
    entries.push((None, "/".to_owned()));
    let table = Routing::new(entries);
    c.bench_function("route_find_50_routes", |b| {
        b.iter(|| table.find(black_box(Some("host7.example.com:8443")), black_box("/service42/v1/orders/17")))
    });
    c.bench_function("normalise_clean_path", |b| b.iter(|| normalise(black_box("/service42/v1/orders/17"))));
    c.bench_function("normalise_dotted_path", |b| {
        b.iter(|| normalise(black_box("/service42/./v1/%6Frders/x/../17")))
    });
}

fn rs256(c: &mut Criterion) {
    let pem = std::fs::read(format!("{FIXTURES}/rsa1.pem")).unwrap();
    let jwks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/jwks.json")).unwrap()).unwrap();
    let doc = serde_json::json!({"keys": [jwks["rsa1"]]}).to_string();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa1".into());
    let exp = unix_now() + 3600;
    let claims = serde_json::json!({
        "iss": "https://id.example.com", "sub": "user-1234", "aud": "orders-api", "exp": exp,
        "iat": exp - 3600, "scope": "orders:read orders:write", "jti": "bench-1",
    });
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap();
    let v = Verify::new(doc.as_bytes(), "https://id.example.com", token, exp - 10).unwrap();
    c.bench_function("verify_rs256_cache_miss", |b| b.iter(|| assert!(black_box(&v).miss())));
    c.bench_function("verify_cache_hit", |b| b.iter(|| assert!(black_box(&v).hit())));
}

fn cookies(c: &mut Criterion) {
    let seal = Seal::default();
    let token = "x".repeat(1200);
    let sealed = seal.seal(token.as_bytes()).unwrap();
    c.bench_function("cookie_seal_1200B", |b| b.iter(|| seal.seal(black_box(token.as_bytes()))));
    c.bench_function("cookie_open_1200B", |b| b.iter(|| seal.open(black_box(&sealed)).unwrap()));
}

fn rules(c: &mut Criterion) {
    let r = portcullis::bench::Rules::twenty();
    assert!(r.allows("/orders/admin/users/7"));
    c.bench_function("rules_20_last_matches", |b| b.iter(|| r.allows(black_box("/orders/admin/users/7"))));
    c.bench_function("rules_20_none_match", |b| b.iter(|| r.allows(black_box("/orders/17"))));
}

criterion_group!(benches, routing, rs256, cookies, rules);
criterion_main!(benches);
