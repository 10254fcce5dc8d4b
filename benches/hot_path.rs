#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hot functions of the request path: routing, path normalisation, RS256
//! verification (cache miss), the verified-token cache hit, cookie seal/open, and
//! one request's trace work (the proxy's own spans beside the OpenTelemetry SDK's).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use portcullis::bench::{normalise, unix_now, Routing, Seal, Tracing, Verify};

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

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Per request: continue the client's trace, write the upstream's traceparent
/// and, when sampled, hand a server span with four attributes to the exporter.
fn trace_context(c: &mut Criterion) {
    let mut incoming = http::HeaderMap::new();
    incoming.insert("traceparent", http::HeaderValue::from_static(TRACEPARENT));
    let fresh = http::HeaderMap::new();
    for (name, ratio) in [("off", None), ("sampled", Some(1.0)), ("ratio_0.01", Some(0.01))] {
        let t = Tracing::new(ratio).unwrap();
        let headers = if name == "ratio_0.01" { &fresh } else { &incoming };
        c.bench_function(&format!("trace_own_{name}"), |b| {
            b.iter(|| {
                let mut h = headers.clone();
                t.request(&mut h);
                black_box(h)
            })
        });
    }
    for (name, ratio) in [("sampled", 1.0), ("ratio_0.01", 0.01)] {
        let headers = if name == "ratio_0.01" { &fresh } else { &incoming };
        let sdk = otel::Sdk::new(ratio);
        c.bench_function(&format!("trace_sdk_{name}"), |b| {
            b.iter(|| {
                let mut h = headers.clone();
                sdk.request(&mut h);
                black_box(h)
            })
        });
    }
}

/// The same work done with `opentelemetry_sdk`: W3C propagator, parent-based
/// ratio sampler, batch processor with an exporter that drops what it gets.
mod otel {
    use http::{HeaderMap, HeaderName, HeaderValue};
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider as _};
    use opentelemetry::KeyValue;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter};

    #[derive(Debug)]
    struct Discard;

    impl SpanExporter for Discard {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            Ok(())
        }
    }

    struct Read<'a>(&'a HeaderMap);

    impl Extractor for Read<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(HeaderName::as_str).collect()
        }
    }

    struct Write<'a>(&'a mut HeaderMap);

    impl Injector for Write<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(key.as_bytes()), HeaderValue::from_str(&value)) {
                self.0.insert(n, v);
            }
        }
    }

    pub struct Sdk {
        _provider: SdkTracerProvider,
        tracer: SdkTracer,
        propagator: TraceContextPropagator,
    }

    impl Sdk {
        pub fn new(ratio: f64) -> Self {
            let provider = SdkTracerProvider::builder()
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
                .with_batch_exporter(Discard)
                .build();
            let tracer = provider.tracer("bench");
            Self { _provider: provider, tracer, propagator: TraceContextPropagator::new() }
        }

        pub fn request(&self, h: &mut HeaderMap) {
            let parent = self.propagator.extract(&Read(h));
            let span = self
                .tracer
                .span_builder("GET")
                .with_kind(SpanKind::Server)
                .with_attributes([
                    KeyValue::new("http.request.method", "GET"),
                    KeyValue::new("http.response.status_code", 200),
                    KeyValue::new("portcullis.route", "api"),
                    KeyValue::new("enduser.id", "user-1234"),
                ])
                .start_with_context(&self.tracer, &parent);
            let cx = parent.with_span(span);
            self.propagator.inject_context(&cx, &mut Write(h));
            cx.span().end();
        }
    }
}

criterion_group!(benches, routing, rs256, cookies, rules, trace_context);
criterion_main!(benches);
