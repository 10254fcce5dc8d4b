#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Prints RS256 access tokens signed with the test fixture key `rsa1`, for load
//! tests and local trials: `cargo run --example mint -- [COUNT] [ISSUER] [TTL_SECS]`.
//! One token per line; each has its own `jti` and `sub`.

use jsonwebtoken::{Algorithm, EncodingKey, Header};

fn main() {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let issuer = args.next().unwrap_or_else(|| "https://id.example.com".to_owned());
    let ttl: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(3600);
    let pem = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rsa1.pem"))
        .expect("tests/fixtures/rsa1.pem is readable");
    let key = EncodingKey::from_rsa_pem(&pem).expect("fixture key is an RSA PEM");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa1".to_owned());
    let now = portcullis::bench::unix_now();
    for i in 0..count {
        let claims = serde_json::json!({
            "iss": issuer, "sub": format!("user-{i}"), "aud": "orders-api", "exp": now + ttl, "iat": now,
            "scope": "orders:read orders:write", "jti": format!("load-{now}-{i}"),
        });
        println!("{}", jsonwebtoken::encode(&header, &claims, &key).expect("token encodes"));
    }
}
