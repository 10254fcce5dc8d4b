//! What a request reads: the `Snapshot` built from one validated configuration
//! (swapped whole on reload; a request keeps the one it started with), and the
//! `Runtime`, which outlives every configuration (the verifier with its cache and
//! deny list, the refresh broker, the fleet, the JWKS registry, metrics).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};

use http::header::HeaderName;

use crate::auth::jwks::Registry;
use crate::auth::revocation::Revocations;
use crate::auth::{jwt, Issuer, RoutePolicy, Verifier};
use crate::config::{Config, Limits, Listen};
use crate::fleet::Fleet;
use crate::forward::identity::IdentityHeaders;
use crate::forward::Forwarder;
use crate::metrics::{Metrics, RouteMetrics};
use crate::ratelimit::RateLimits;
use crate::route::RouteTable;
use crate::session::refresh::RefreshBroker;
use crate::session::Sessions;

pub struct Route {
    pub name: String,
    pub policy: RoutePolicy,
    /// `None` for a forward-auth-only route (no upstream).
    pub forwarder: Option<Forwarder>,
    /// What a forward-auth answer tells the front proxy about the caller.
    pub identity: IdentityHeaders,
    pub metrics: Arc<RouteMetrics>,
}

/// One configuration, ready to serve.
pub struct Snapshot {
    /// The routes with an upstream: what the proxy listeners serve.
    pub routes: RouteTable<Arc<Route>>,
    /// Every route: what the forward-auth listener authorizes.
    pub auth_routes: RouteTable<Arc<Route>>,
    /// Every identity header name of every route, stripped from all inbound requests.
    pub identity_names: Vec<HeaderName>,
    pub issuers: HashMap<String, Arc<Issuer>>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub sessions: Option<Arc<Sessions>>,
    /// The session cookies' names, never sent upstream (empty without `[session]`).
    pub own_cookies: Vec<String>,
    pub rate_limits: RateLimits,
    pub limits: Limits,
    pub listen: Listen,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("route {route}: cannot set up upstream TLS")]
    UpstreamTls {
        route: String,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot set up listener TLS")]
    ListenerTls(#[source] rustls::Error),
    #[error("[state] redis_url is unusable")]
    Fleet(#[source] redis::RedisError),
    #[error("[tracing]: cannot set up the collector client")]
    TracingTls(#[source] rustls::Error),
    #[error("cannot set up the authorization server client")]
    AuthServerTls(#[source] rustls::Error),
    #[error("issuer {issuer}: cannot set up the introspection client")]
    IntrospectionTls {
        issuer: String,
        #[source]
        source: rustls::Error,
    },
}

impl Snapshot {
    /// Builds one configuration; issuers' keys come from `registry`, so a reload
    /// that keeps an issuer keeps its keys.
    pub fn build(
        config: Config,
        registry: &Registry,
        limits: &crate::ratelimit::Registry,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, BuildError> {
        let mut issuers: HashMap<String, Arc<Issuer>> = HashMap::new();
        for s in &config.issuers {
            let keys = registry.get(&s.name, &s.source, s.jwks_refresh, metrics);
            let introspection = match &s.introspection {
                Some(i) => Some(
                    registry
                        .introspector(&s.name, &s.issuer, i, metrics)
                        .map_err(|source| BuildError::IntrospectionTls { issuer: s.name.clone(), source })?,
                ),
                None => None,
            };
            issuers.insert(s.name.clone(), Arc::new(Issuer::new(jwt::Policy::new(s), keys, introspection)));
        }
        let mut names = HashSet::new();
        let mut entries = Vec::with_capacity(config.routes.len());
        for settings in &config.routes {
            for (h, _) in &settings.identity_headers {
                names.insert(h.clone());
            }
            let forwarder = match settings.upstreams.is_empty() {
                true => None,
                false => Some(
                    Forwarder::new(settings)
                        .map_err(|source| BuildError::UpstreamTls { route: settings.name.clone(), source })?,
                ),
            };
            let policy = RoutePolicy {
                mode: settings.auth,
                issuers: settings.issuers.iter().filter_map(|n| issuers.get(n).cloned()).collect(),
                audiences: settings.audiences.clone(),
                scopes: settings.scopes.clone(),
                rules: settings.rules.clone(),
                cors_preflight: settings.cors_preflight,
            };
            let route = Route {
                name: settings.name.clone(),
                policy,
                forwarder,
                identity: IdentityHeaders::new(settings),
                metrics: metrics.route(&settings.name),
            };
            entries.push((settings.host.clone(), settings.path_prefix.clone(), Arc::new(route)));
        }
        let tls = match &config.tls {
            Some(t) => {
                Some(crate::tls::server_config(t.default.clone(), &t.sni).map_err(BuildError::ListenerTls)?)
            }
            None => None,
        };
        let sessions = match (config.session, config.auth_server) {
            (Some(session), Some(auth)) => {
                let logout_issuer = auth
                    .issuer
                    .as_deref()
                    .and_then(|iss| issuers.values().find(|i| i.policy.issuer == iss).cloned());
                Some(Arc::new(
                    Sessions::new(session, auth, logout_issuer).map_err(BuildError::AuthServerTls)?,
                ))
            }
            _ => None,
        };
        let proxied = entries.iter().filter(|(_, _, r)| r.forwarder.is_some()).cloned().collect::<Vec<_>>();
        Ok(Self {
            routes: RouteTable::new(proxied),
            auth_routes: RouteTable::new(entries),
            identity_names: names.into_iter().collect(),
            issuers,
            tls,
            own_cookies: sessions.as_ref().map(|s| s.cookies.names()).unwrap_or_default(),
            rate_limits: limits.build(&config.rate_limits),
            sessions,
            limits: config.limits,
            listen: config.listen,
        })
    }
}

/// The configuration in force, and each worker's handle on it: a request holds
/// its snapshot through an `Arc` of its worker's own, so starting and ending
/// one touches no count that every worker's requests share.
pub(crate) struct Current {
    workers: Box<[Slot]>,
    /// One store at a time, so every slot ends with the same snapshot.
    storing: Mutex<()>,
}

/// A snapshot as a request holds it: the outer count is its worker's own.
#[allow(clippy::redundant_allocation, reason = "the outer Arc is per worker, the inner one shared")]
pub(crate) type Held = Arc<Arc<Snapshot>>;

/// A worker's handle, on a cache line of its own.
#[repr(align(128))]
struct Slot(Mutex<Held>);

impl Current {
    fn new(snapshot: Snapshot) -> Self {
        let shared = Arc::new(snapshot);
        let workers =
            (0..crate::worker::shards()).map(|_| Slot(Mutex::new(Arc::new(shared.clone())))).collect();
        Self { workers, storing: Mutex::new(()) }
    }

    /// The snapshot in force, which a request (or connection) keeps to its end,
    /// even across a reload.
    pub(crate) fn hold(&self) -> Held {
        let held = &self.workers[crate::worker::shard(self.workers.len())];
        held.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Puts `snapshot` in force: requests that start after this returns use it.
    pub(crate) fn store(&self, snapshot: Arc<Snapshot>) {
        let _one = self.storing.lock().unwrap_or_else(PoisonError::into_inner);
        for held in &self.workers {
            let new = Arc::new(snapshot.clone());
            let old = std::mem::replace(&mut *held.0.lock().unwrap_or_else(PoisonError::into_inner), new);
            // Freed (maybe the whole old snapshot) after the worker's slot is unlocked.
            drop(old);
        }
    }
}

/// State shared by every listener and every configuration generation.
pub struct Runtime {
    pub(crate) current: Current,
    pub(crate) draining: AtomicBool,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) verifier: Verifier,
    pub(crate) broker: Arc<RefreshBroker>,
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) registry: Registry,
    pub(crate) limit_registry: crate::ratelimit::Registry,
    /// `[tracing]` as read at start (a reload does not change it).
    pub(crate) exporter: Option<crate::trace::Exporter>,
}

impl Runtime {
    /// Builds the first snapshot; must run inside a Tokio runtime (JWKS tasks start here).
    pub fn new(config: Config) -> Result<Arc<Self>, BuildError> {
        // Crates that build their own rustls configs (the Redis client) use the process default.
        let _ = rustls::crypto::CryptoProvider::install_default(crate::tls::provider().as_ref().clone());
        let metrics = Arc::new(Metrics::default());
        let revocations = Arc::new(Revocations::default());
        let fleet = Arc::new(
            Fleet::new(config.state.redis.as_ref(), revocations.clone(), &metrics)
                .map_err(BuildError::Fleet)?,
        );
        let verifier = Verifier::new(config.limits.token_cache_entries, revocations);
        let registry = Registry::default();
        let limit_registry = crate::ratelimit::Registry::default();
        let exporter = match config.tracing.clone() {
            Some(t) => {
                Some(crate::trace::Exporter::start(t, metrics.clone()).map_err(BuildError::TracingTls)?)
            }
            None => None,
        };
        let snapshot = Snapshot::build(config, &registry, &limit_registry, &metrics)?;
        let runtime = Arc::new(Self {
            current: Current::new(snapshot),
            draining: AtomicBool::new(false),
            broker: Arc::new(RefreshBroker::new(fleet.clone(), metrics.clone())),
            metrics,
            verifier,
            fleet,
            registry,
            limit_registry,
            exporter,
        });
        runtime.fleet.start();
        Ok(runtime)
    }
}
