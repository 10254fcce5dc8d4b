//! Entry points for `benches/hot_path.rs`: the hot functions of the request path
//! behind a small surface, so the modules themselves stay crate-private.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::cache::{hash, TokenCache};
use crate::auth::{jwt, keys};
use crate::config::{IssuerSettings, KeySource};
use crate::route::RouteTable;
use crate::session::seal::Sealer;

/// A route table of `(host, prefix)` entries.
pub struct Routing(RouteTable<usize>);

impl Routing {
    pub fn new(entries: Vec<(Option<String>, String)>) -> Self {
        Self(RouteTable::new(entries.into_iter().enumerate().map(|(i, (h, p))| (h, p, i))))
    }

    pub fn find(&self, host: Option<&str>, path: &str) -> Option<usize> {
        self.0.find(host, path).copied()
    }
}

/// Path normalisation; returns the normalised length.
pub fn normalise(path: &str) -> usize {
    crate::target::normalise_path(path).map_or(0, |p| p.len())
}

/// One issuer's verification of one token, uncached and cached.
pub struct Verify {
    policy: jwt::Policy,
    keys: keys::KeySet,
    cache: TokenCache,
    token: String,
    now: i64,
}

impl Verify {
    /// `jwks`: a JWKS document; `token` signed by one of its keys for `issuer`.
    pub fn new(jwks: &[u8], issuer: &str, token: String, now: i64) -> Option<Self> {
        let settings = IssuerSettings {
            name: "bench".into(),
            issuer: issuer.into(),
            source: KeySource::Static(Arc::new(keys::KeySet::default())),
            introspection: None,
            algorithms: vec![jsonwebtoken::Algorithm::RS256],
            leeway: Duration::from_secs(30),
            jwks_refresh: Duration::from_secs(300),
        };
        let policy = jwt::Policy::new(&settings);
        let keys = keys::parse_jwks(jwks).ok()?;
        let cache = TokenCache::new(100_000);
        let claims = Arc::new(jwt::verify(&token, &policy, &keys, now).ok()?);
        cache.insert(hash(&token), 1, 1, claims, now);
        Some(Self { policy, keys, cache, token, now })
    }

    /// A full signature and claims check.
    pub fn miss(&self) -> bool {
        jwt::verify(&self.token, &self.policy, &self.keys, self.now).is_ok()
    }

    /// The cache lookup a repeated token costs.
    pub fn hit(&self) -> bool {
        self.cache.get(&hash(&self.token), 1, 1, self.now).is_some()
    }
}

/// Cookie sealing with a two-key list.
pub struct Seal(Sealer);

impl Default for Seal {
    fn default() -> Self {
        Self(Sealer::new(&[[7u8; 32], [9u8; 32]]))
    }
}

impl Seal {
    pub fn seal(&self, value: &[u8]) -> Option<String> {
        self.0.seal("__Host-access", value)
    }

    pub fn open(&self, sealed: &str) -> Option<Vec<u8>> {
        self.0.open("__Host-access", sealed)
    }
}

pub use crate::clock::unix_now;

/// A route's `[[routes.rules]]`: 19 rules that do not match the request, then
/// one that does and checks a nested claim and the scopes.
pub struct Rules {
    rules: Vec<crate::config::RuleSettings>,
    claims: crate::auth::Claims,
    method: http::Method,
}

impl Rules {
    pub fn twenty() -> Self {
        use crate::config::{ClaimMatch, RuleAction, RuleSettings};
        let mut rules: Vec<RuleSettings> = (1..20)
            .map(|n| RuleSettings {
                methods: if n % 2 == 0 { vec![http::Method::DELETE] } else { Vec::new() },
                path_prefix: Some(format!("/orders/section{n}")),
                action: RuleAction::Deny,
                number: n,
                line: None,
            })
            .collect();
        rules.push(RuleSettings {
            methods: vec![http::Method::GET, http::Method::POST],
            path_prefix: Some("/orders/admin".to_owned()),
            action: RuleAction::Require {
                scopes: Some(vec!["orders:admin".to_owned()]),
                claims: vec![ClaimMatch {
                    path: vec!["realm_access".to_owned(), "roles".to_owned()],
                    value: serde_json::Value::from("admin"),
                }],
            },
            number: 20,
            line: None,
        });
        let all = serde_json::json!({"sub": "u1", "realm_access": {"roles": ["user", "admin"]}});
        let claims = crate::auth::Claims {
            sub: Some("u1".to_owned()),
            scopes: vec!["orders:read".to_owned(), "orders:admin".to_owned()],
            all: all.as_object().cloned().unwrap_or_default(),
            ..Default::default()
        };
        Self { rules, claims, method: http::Method::GET }
    }

    /// Decides `GET path` as the request path does: the deciding rule, its scopes and claims.
    pub fn allows(&self, path: &str) -> bool {
        use crate::config::RuleAction;
        match crate::auth::rules::decide(&self.rules, &self.method, path).map(|r| &r.action) {
            Some(RuleAction::Require { scopes, claims }) => {
                scopes.iter().flatten().all(|s| self.claims.scopes.contains(s))
                    && crate::auth::rules::claims_match(&self.claims, claims)
            }
            Some(RuleAction::Public) | None => true,
            Some(RuleAction::Deny) => false,
        }
    }
}

/// One request's trace work: read or start the context, write the upstream's
/// `traceparent`, and (sampled, with an exporter) queue its server span. The
/// queue is drained by a task that drops what it takes, so only the request
/// path is measured.
pub struct Tracing {
    exporter: Option<crate::trace::Exporter>,
    _runtime: Option<tokio::runtime::Runtime>,
}

impl Tracing {
    /// `None`: no `[tracing]`; `Some(ratio)`: exported at that sample ratio.
    pub fn new(ratio: Option<f64>) -> Option<Self> {
        let Some(ratio) = ratio else { return Some(Self { exporter: None, _runtime: None }) };
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().ok()?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
        runtime.spawn(async move {
            let mut batch = Vec::with_capacity(512);
            while rx.recv_many(&mut batch, 512).await > 0 {
                batch.clear();
            }
        });
        let settings = crate::config::TracingSettings {
            otlp_endpoint: http::Uri::from_static("http://127.0.0.1:4318"),
            service_name: "bench".into(),
            sample_ratio: ratio,
        };
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let (flush, _) = tokio::sync::mpsc::channel(1);
        let wake = Arc::default();
        let exporter = crate::trace::Exporter::with_queue(tx, wake, flush, settings, metrics);
        Some(Self { exporter: Some(exporter), _runtime: Some(runtime) })
    }

    pub fn request(&self, headers: &mut http::HeaderMap) {
        use crate::trace::{Attr, Context, Kind, Recording, Span};
        let cx = Context::start(headers, self.exporter.as_ref());
        if let Some(rec) = Recording::of(&cx, self.exporter.as_ref()) {
            let start_ns = crate::trace::unix_nanos();
            let attrs = vec![
                Attr::Str("http.request.method", "GET"),
                Attr::Int("http.response.status_code", 200),
                Attr::Str("portcullis.route", "api"),
                Attr::Str("enduser.id", "user-1234"),
            ];
            rec.exporter().queue(Span {
                trace_id: cx.trace_id,
                span_id: cx.span_id,
                parent: cx.parent,
                name: "GET",
                kind: Kind::Server,
                start_ns,
                end_ns: start_ns + 1000,
                error: false,
                attrs,
            });
        }
    }
}
