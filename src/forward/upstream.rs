//! One route's upstreams (round-robin) and the pooled keep-alive client that
//! reaches them, with failures classified into connect errors, connect timeouts
//! and failed exchanges.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::CertificateDer;

use crate::body::Body;

type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

/// One upstream URL.
pub struct Backend {
    scheme: Scheme,
    pub authority: Authority,
    /// Path of the upstream URL without its trailing `/`, prepended to forwarded paths.
    base: String,
}

impl Backend {
    /// The upstream's URL for `path` (already normalised) and `query` (as sent).
    pub fn uri(&self, path: &str, query: Option<&str>) -> Uri {
        let mut pq = String::with_capacity(self.base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
        pq.push_str(&self.base);
        pq.push_str(if path.is_empty() { "/" } else { path });
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = PathAndQuery::try_from(pq).ok();
        Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
    }
}

pub struct Upstream {
    pub client: HttpClient,
    backends: Vec<Backend>,
    next: AtomicUsize,
}

impl Upstream {
    pub fn new(
        upstreams: &[Uri],
        ca: &[CertificateDer<'static>],
        connect_timeout: Duration,
    ) -> Result<Self, rustls::Error> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = crate::tls::client_config(ca)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let backends = upstreams
            .iter()
            .filter_map(|u| {
                Some(Backend {
                    scheme: u.scheme()?.clone(),
                    authority: u.authority()?.clone(),
                    base: u.path().trim_end_matches('/').to_owned(),
                })
            })
            .collect();
        Ok(Self { client, backends, next: AtomicUsize::new(0) })
    }

    pub fn pick(&self) -> &Backend {
        let n = self.backends.len().max(1);
        &self.backends[self.next.fetch_add(1, Ordering::Relaxed) % n]
    }
}

/// How an exchange with the upstream failed.
pub enum Failure {
    BodyTooLarge,
    ConnectTimeout,
    Connect,
    Exchange,
}

pub fn classify(e: &hyper_util::client::legacy::Error) -> Failure {
    if caused_by::<http_body_util::LengthLimitError>(e) {
        return Failure::BodyTooLarge;
    }
    if e.is_connect() {
        let timed_out = chain(e).any(|s| {
            s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        });
        return if timed_out { Failure::ConnectTimeout } else { Failure::Connect };
    }
    Failure::Exchange
}

fn chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    chain(e).any(|s| s.is::<T>())
}
