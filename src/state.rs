//! What one request reads: the `Snapshot` built from a validated `Config`, swapped
//! whole on reload, and `Shared`, the state that outlives any one configuration
//! (revocations, the verified-token cache, JWKS stores, metrics).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use http::header::HeaderName;

use crate::auth::cache::TokenCache;
use crate::auth::jwks::{KeyStore, Remote};
use crate::auth::revocation::Revocations;
use crate::auth::{jwt, Issuer};
use crate::config::{Config, KeySource, Limits, RouteSettings};
use crate::forward::Upstream;
use crate::metrics::{Metrics, RouteMetrics};
use crate::route::RouteTable;
use crate::session::refresh::RefreshBroker;
use crate::session::Sessions;
use crate::store::Store;

/// Facts about the downstream connection a request arrived on.
#[derive(Debug)]
pub struct Conn {
    pub peer: SocketAddr,
    pub tls: bool,
    /// When the last request started, in ms since `opened` (for the HTTP/2 idle timeout).
    last_request_ms: std::sync::atomic::AtomicU64,
    opened: tokio::time::Instant,
}

impl Conn {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        Self { peer, tls, last_request_ms: Default::default(), opened: tokio::time::Instant::now() }
    }

    /// Records that a request started now.
    pub fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_request_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Resolves once no request has started for `idle`.
    pub async fn idle_for(&self, idle: std::time::Duration) {
        loop {
            let last = self.last_request_ms.load(std::sync::atomic::Ordering::Relaxed);
            let until = self.opened + std::time::Duration::from_millis(last) + idle;
            if tokio::time::Instant::now() >= until {
                return;
            }
            tokio::time::sleep_until(until).await;
        }
    }
}

pub struct Route {
    pub settings: RouteSettings,
    pub upstream: Upstream,
    pub issuer: Option<Arc<Issuer>>,
    pub metrics: Arc<RouteMetrics>,
}

/// One configuration, ready to serve. A request holds the snapshot it started with.
pub struct Snapshot {
    pub routes: RouteTable<Arc<Route>>,
    /// Every identity header name of every route, stripped from all inbound requests.
    pub identity_names: Vec<HeaderName>,
    pub issuers: HashMap<String, Arc<Issuer>>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub sessions: Option<Arc<Sessions>>,
    pub limits: Limits,
    pub config: Config,
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
    Store(#[source] redis::RedisError),
    #[error("cannot set up the authorization server client")]
    AuthServerTls(#[source] rustls::Error),
}

/// JWKS stores by (issuer name, URL), so a reload that keeps an issuer keeps its keys.
#[derive(Default)]
pub struct KeyStores(Mutex<HashMap<(String, String), Weak<KeyStore>>>);

impl KeyStores {
    fn get(
        &self,
        name: &str,
        source: &KeySource,
        refresh: std::time::Duration,
        metrics: &Arc<Metrics>,
    ) -> Arc<KeyStore> {
        match source {
            KeySource::Static(keys) => KeyStore::fixed(name, keys.clone(), metrics.clone()),
            KeySource::JwksUrl(url) => {
                self.remote(name, url.to_string(), Remote::Jwks(url.clone()), refresh, metrics)
            }
            KeySource::Discover(issuer) => self.remote(
                name,
                format!("discover:{issuer}"),
                Remote::Discover(issuer.clone()),
                refresh,
                metrics,
            ),
        }
    }

    fn remote(
        &self,
        name: &str,
        key: String,
        remote: Remote,
        refresh: std::time::Duration,
        metrics: &Arc<Metrics>,
    ) -> Arc<KeyStore> {
        {
            {
                let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
                map.retain(|_, w| w.strong_count() > 0);
                let k = (name.to_owned(), key);
                if let Some(s) = map.get(&k).and_then(Weak::upgrade) {
                    return s;
                }
                let s = KeyStore::remote(name, remote, refresh, metrics.clone());
                map.insert(k, Arc::downgrade(&s));
                s
            }
        }
    }
}

impl Snapshot {
    pub fn build(mut config: Config, shared: &Shared) -> Result<Self, BuildError> {
        let issuers: HashMap<String, Arc<Issuer>> = config
            .issuers
            .iter()
            .map(|s| {
                let store = shared.key_stores.get(&s.name, &s.source, s.jwks_refresh, &shared.metrics);
                (s.name.clone(), Arc::new(Issuer::new(jwt::Policy::new(s), store)))
            })
            .collect();
        let mut names = HashSet::new();
        let mut entries = Vec::with_capacity(config.routes.len());
        for settings in std::mem::take(&mut config.routes) {
            for (h, _) in &settings.identity_headers {
                names.insert(h.clone());
            }
            let upstream = Upstream::new(&settings)
                .map_err(|source| BuildError::UpstreamTls { route: settings.name.clone(), source })?;
            let issuer = settings.issuer.as_ref().and_then(|n| issuers.get(n).cloned());
            let metrics = shared.metrics.route(&settings.name);
            let host = settings.host.clone();
            let prefix = settings.path_prefix.clone();
            entries.push((host, prefix, Arc::new(Route { settings, upstream, issuer, metrics })));
        }
        let tls = match &config.tls {
            Some(t) => Some(
                crate::server::tls::server_config(t.default.clone(), &t.sni)
                    .map_err(BuildError::ListenerTls)?,
            ),
            None => None,
        };
        let sessions = match (config.session.take(), &config.auth_server) {
            (Some(session), Some(auth)) => {
                Some(Arc::new(Sessions::new(session, auth.clone()).map_err(BuildError::AuthServerTls)?))
            }
            _ => None,
        };
        Ok(Self {
            routes: RouteTable::new(entries),
            identity_names: names.into_iter().collect(),
            issuers,
            tls,
            sessions,
            limits: config.limits.clone(),
            config,
        })
    }
}

/// State shared by every listener and every configuration generation.
pub struct Shared {
    pub current: ArcSwap<Snapshot>,
    pub draining: AtomicBool,
    pub metrics: Arc<Metrics>,
    pub revocations: Arc<Revocations>,
    pub store: Arc<Store>,
    pub token_cache: TokenCache,
    pub key_stores: KeyStores,
    pub refresh: Arc<RefreshBroker>,
}

impl Shared {
    /// Builds the first snapshot; must run inside a Tokio runtime (JWKS tasks start here).
    pub fn new(config: Config) -> Result<Arc<Self>, BuildError> {
        // Crates that build their own rustls configs (the Redis client) use the process default.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = Arc::new(Metrics::default());
        let store = Arc::new(Store::new(config.state.redis.as_ref(), &metrics).map_err(BuildError::Store)?);
        let placeholder = Snapshot {
            routes: RouteTable::new(Vec::new()),
            identity_names: Vec::new(),
            issuers: HashMap::new(),
            tls: None,
            sessions: None,
            limits: config.limits.clone(),
            config: Config::empty(),
        };
        let shared = Arc::new(Self {
            current: ArcSwap::from_pointee(placeholder),
            draining: AtomicBool::new(false),
            metrics,
            revocations: Arc::new(Revocations::default()),
            store,
            token_cache: TokenCache::new(config.limits.token_cache_entries),
            key_stores: KeyStores::default(),
            refresh: Arc::new(RefreshBroker::default()),
        });
        let snap = Snapshot::build(config, &shared)?;
        shared.current.store(Arc::new(snap));
        shared.store.start(Arc::downgrade(&shared.revocations));
        Ok(shared)
    }
}
