//! What one request reads: the `Snapshot` built from a validated `Config`, swapped
//! whole on reload, and `Shared`, the state that outlives any one configuration.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::HeaderName;

use crate::config::{Config, Limits, RouteSettings};
use crate::forward::Upstream;
use crate::route::RouteTable;

/// Facts about the downstream connection a request arrived on.
#[derive(Debug, Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    pub tls: bool,
}

pub struct Route {
    pub settings: RouteSettings,
    pub upstream: Upstream,
}

/// One configuration, ready to serve. A request holds the snapshot it started with.
pub struct Snapshot {
    pub routes: RouteTable<Arc<Route>>,
    /// Every identity header name of every route, stripped from all inbound requests.
    pub identity_names: Vec<HeaderName>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
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
}

impl Snapshot {
    pub fn build(mut config: Config) -> Result<Self, BuildError> {
        let mut names = HashSet::new();
        let mut entries = Vec::with_capacity(config.routes.len());
        for settings in std::mem::take(&mut config.routes) {
            for (h, _) in &settings.identity_headers {
                names.insert(h.clone());
            }
            let upstream = Upstream::new(&settings)
                .map_err(|source| BuildError::UpstreamTls { route: settings.name.clone(), source })?;
            let host = settings.host.clone();
            let prefix = settings.path_prefix.clone();
            entries.push((host, prefix, Arc::new(Route { settings, upstream })));
        }
        let tls = match &config.tls {
            Some(t) => Some(
                crate::server::tls::server_config(t.default.clone(), &t.sni)
                    .map_err(BuildError::ListenerTls)?,
            ),
            None => None,
        };
        Ok(Self {
            routes: RouteTable::new(entries),
            identity_names: names.into_iter().collect(),
            tls,
            limits: config.limits.clone(),
            config,
        })
    }
}

/// State shared by every listener and every configuration generation.
pub struct Shared {
    pub current: ArcSwap<Snapshot>,
    pub draining: AtomicBool,
    pub open_connections: AtomicI64,
}

impl Shared {
    pub fn new(snapshot: Snapshot) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(snapshot),
            draining: AtomicBool::new(false),
            open_connections: AtomicI64::new(0),
        })
    }
}
