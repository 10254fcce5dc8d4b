//! One issuer's keys over time. Static sources (`jwks_file`, `public_key_files`,
//! `hmac_secret_env`) never change. A `jwks_url` is fetched at start and then in
//! the background (every `jwks_refresh`, or the response's `Cache-Control:
//! max-age`); a failed fetch keeps the last good keys and is retried with
//! backoff (1 s, 2 s, 4 s … capped). An unknown `kid` triggers one refetch,
//! single-flight, and never more than one per `refetch_spacing` (a few seconds),
//! so a flood of random `kid`s costs the issuer at most one request per spacing.
//! Only unknown-`kid` refetches count against the spacing: a key rotated in just
//! after the start fetch (or a background refresh) is picked up at once. The key set is replaced
//! whole, and its generation bumped only when the document changed, which
//! invalidates verified-token cache entries made with removed keys.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};

use super::keys::{self, KeySet};
use crate::config::KeySource;
use crate::metrics::Metrics;

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_JWKS_BYTES: usize = 1 << 20;

type FetchClient = crate::oauth::HttpsClient<Empty<Bytes>>;

/// Where a remote key set comes from.
pub enum Remote {
    Jwks(Uri),
    /// The issuer URL, whose discovery document names `jwks_uri`.
    Discover(String),
}

pub struct IssuerKeys {
    name: String,
    source: Option<Remote>,
    /// The JWKS URL: configured, or read from discovery (then re-read after a failure).
    url: ArcSwapOption<Uri>,
    keys: ArcSwapOption<KeySet>,
    generation: AtomicU64,
    fingerprint: AtomicU64,
    /// Held while fetching, so fetches never overlap (and refetches are single-flight).
    fetching: tokio::sync::Mutex<()>,
    /// Time of the last unknown-`kid` refetch.
    last_refetch: std::sync::Mutex<Option<Instant>>,
    refresh: Duration,
    refetch_spacing: Duration,
    client: Option<FetchClient>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("issuer {issuer}: JWKS request failed")]
    Request {
        issuer: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("issuer {issuer}: JWKS request timed out")]
    Timeout { issuer: String },
    #[error("issuer {issuer}: JWKS answered {status}")]
    Status { issuer: String, status: StatusCode },
    #[error("issuer {issuer}: JWKS document rejected")]
    Document {
        issuer: String,
        #[source]
        source: keys::KeyError,
    },
    #[error("issuer {issuer}: discovery failed")]
    Discovery {
        issuer: String,
        #[source]
        source: crate::oauth::discovery::DiscoveryError,
    },
}

impl IssuerKeys {
    pub fn fixed(name: &str, keys: Arc<KeySet>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            source: None,
            url: ArcSwapOption::empty(),
            keys: ArcSwapOption::from(Some(keys)),
            generation: AtomicU64::new(1),
            fingerprint: AtomicU64::new(0),
            fetching: tokio::sync::Mutex::new(()),
            last_refetch: std::sync::Mutex::new(None),
            refresh: Duration::MAX,
            refetch_spacing: Duration::MAX,
            client: None,
            metrics,
        })
    }

    /// A store that fetches `url`; its background task starts now and ends when
    /// the last configuration using this store is dropped.
    pub fn remote(name: &str, source: Remote, refresh: Duration, metrics: Arc<Metrics>) -> Arc<Self> {
        let url = match &source {
            Remote::Jwks(u) => ArcSwapOption::from_pointee(u.clone()),
            Remote::Discover(_) => ArcSwapOption::empty(),
        };
        let client = crate::oauth::outbound_client(FETCH_TIMEOUT).ok();
        let store = Arc::new(Self {
            name: name.to_owned(),
            source: Some(source),
            url,
            keys: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            fingerprint: AtomicU64::new(0),
            fetching: tokio::sync::Mutex::new(()),
            last_refetch: std::sync::Mutex::new(None),
            refresh,
            refetch_spacing: (refresh / 10).clamp(Duration::from_secs(1), Duration::from_secs(5)),
            client,
            metrics,
        });
        tokio::spawn(background(Arc::downgrade(&store)));
        store
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current keys, or `None` before the first successful fetch.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn is_ready(&self) -> bool {
        self.keys.load().is_some()
    }

    /// Called when a token names an unknown `kid`: refetches unless one happened
    /// within the spacing. Returns whether the key set now holds `kid`.
    pub async fn refetch_for(&self, kid: &str) -> bool {
        if self.source.is_none() {
            return false;
        }
        let _fetching = self.fetching.lock().await;
        // A flight that ended while this caller waited may have brought the key.
        if self.current().is_some_and(|k| k.has_kid(kid)) {
            return true;
        }
        {
            let mut last = self.last_refetch.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < self.refetch_spacing) {
                return false;
            }
            *last = Some(Instant::now());
        }
        if let Err(e) = self.fetch().await {
            tracing::warn!(issuer = %self.name, error = %e, cause = ?std::error::Error::source(&e).map(ToString::to_string), "JWKS refetch failed; keeping the last good keys");
        }
        self.current().is_some_and(|k| k.has_kid(kid))
    }

    /// Fetches once (serialised with other fetches); returns the `max-age` if the server gave one.
    async fn fetch_serialised(&self) -> Result<Option<Duration>, FetchError> {
        let _fetching = self.fetching.lock().await;
        self.fetch().await
    }

    async fn fetch(&self) -> Result<Option<Duration>, FetchError> {
        // A child span when a request caused the fetch (an unknown `kid`).
        let span = crate::trace::Child::start("jwks");
        let result = self.fetch_inner().await;
        self.metrics.jwks_fetch(&self.name, result.is_ok());
        if let Some(span) = span {
            use crate::trace::Attr;
            let outcome = if result.is_ok() { "ok" } else { "error" };
            let attrs = vec![
                Attr::Owned("portcullis.issuer", self.name.clone()),
                Attr::Str("portcullis.outcome", outcome),
            ];
            span.end(result.is_err(), attrs);
        }
        result
    }

    async fn fetch_inner(&self) -> Result<Option<Duration>, FetchError> {
        let (Some(source), Some(client)) = (&self.source, &self.client) else { return Ok(None) };
        let url = match (self.url.load_full(), source) {
            (Some(u), _) => u,
            (None, Remote::Discover(url)) => {
                use crate::oauth::discovery;
                let failed = |source| FetchError::Discovery { issuer: self.name.clone(), source };
                let meta = discovery::fetch(url).await.map_err(failed)?;
                let u = discovery::parse_uri(meta.jwks_uri.as_deref())
                    .ok_or_else(|| failed(discovery::DiscoveryError::NoJwksUri))?;
                let u = Arc::new(u);
                self.url.store(Some(u.clone()));
                u
            }
            (None, Remote::Jwks(u)) => Arc::new(u.clone()),
        };
        let result = self.fetch_from(client, &url).await;
        if result.is_err() && matches!(source, Remote::Discover(_)) {
            // The issuer may have moved its keys: read discovery again next time.
            self.url.store(None);
        }
        result
    }

    async fn fetch_from(&self, client: &FetchClient, url: &Arc<Uri>) -> Result<Option<Duration>, FetchError> {
        let issuer = || self.name.clone();
        let req = Request::get(Uri::clone(url))
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "portcullis")
            .body(Empty::new())
            .map_err(|e| FetchError::Request { issuer: issuer(), source: e.into() })?;
        let exchange = async {
            let resp = client
                .request(req)
                .await
                .map_err(|e| FetchError::Request { issuer: issuer(), source: e.into() })?;
            if resp.status() != StatusCode::OK {
                return Err(FetchError::Status { issuer: issuer(), status: resp.status() });
            }
            let max_age = max_age(resp.headers());
            let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| FetchError::Request { issuer: issuer(), source: e })?
                .to_bytes();
            Ok((body, max_age))
        };
        let (body, max_age) = tokio::time::timeout(FETCH_TIMEOUT, exchange)
            .await
            .map_err(|_| FetchError::Timeout { issuer: issuer() })??;
        let set =
            keys::parse_jwks(&body).map_err(|source| FetchError::Document { issuer: issuer(), source })?;
        let fp = fingerprint(&body);
        if self.keys.load().is_none() || self.fingerprint.swap(fp, Ordering::AcqRel) != fp {
            tracing::info!(issuer = %self.name, keys = set.len(), "JWKS loaded");
            self.keys.store(Some(Arc::new(set)));
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(max_age)
    }
}

/// Key holders by (issuer name, source), and introspection clients by (issuer
/// name, endpoint, client), so a reload that keeps an issuer keeps its keys (and
/// their background refresh) and its cached introspection answers.
#[derive(Default)]
pub struct Registry {
    keys: std::sync::Mutex<HashMap<(String, String), Weak<IssuerKeys>>>,
    introspectors: std::sync::Mutex<HashMap<String, Weak<super::introspect::Introspector>>>,
}

impl Registry {
    pub fn introspector(
        &self,
        name: &str,
        issuer: &str,
        s: &crate::config::IntrospectionSettings,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<super::introspect::Introspector>, rustls::Error> {
        let key = format!(
            "{name}\n{issuer}\n{}\n{}\n{:?}\n{:?}\n{:?}",
            s.url, s.client_id, s.client_auth, s.cache, s.timeout
        );
        let mut map = self.introspectors.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(i) = map.get(&key).and_then(Weak::upgrade) {
            return Ok(i);
        }
        let i = super::introspect::Introspector::new(name, issuer, s, metrics.clone())?;
        map.insert(key, Arc::downgrade(&i));
        Ok(i)
    }

    pub fn get(
        &self,
        name: &str,
        source: &KeySource,
        refresh: Duration,
        metrics: &Arc<Metrics>,
    ) -> Arc<IssuerKeys> {
        let (key, remote) = match source {
            KeySource::Static(keys) => return IssuerKeys::fixed(name, keys.clone(), metrics.clone()),
            KeySource::JwksUrl(url) => (url.to_string(), Remote::Jwks(url.clone())),
            KeySource::Discover(issuer) => (format!("discover:{issuer}"), Remote::Discover(issuer.clone())),
        };
        let mut map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        let k = (name.to_owned(), key);
        if let Some(s) = map.get(&k).and_then(Weak::upgrade) {
            return s;
        }
        let s = IssuerKeys::remote(name, remote, refresh, metrics.clone());
        map.insert(k, Arc::downgrade(&s));
        s
    }
}

async fn background(store: Weak<IssuerKeys>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let Some(s) = store.upgrade() else { return };
        let wait = match s.fetch_serialised().await {
            Ok(max_age) => {
                backoff = Duration::from_secs(1);
                max_age.map_or(s.refresh, |m| m.clamp(s.refetch_spacing, Duration::from_secs(86_400)))
            }
            Err(e) => {
                tracing::warn!(issuer = %s.name, error = %e, cause = ?std::error::Error::source(&e).map(ToString::to_string), retry_in = ?backoff, "JWKS fetch failed; keeping the last good keys");
                let wait = backoff;
                backoff = (backoff * 2).min(s.refresh.min(Duration::from_secs(60)));
                wait
            }
        };
        drop(s);
        tokio::time::sleep(wait).await;
    }
}

fn max_age(headers: &http::HeaderMap) -> Option<Duration> {
    let cc = headers.get(header::CACHE_CONTROL)?.to_str().ok()?;
    if cc.split(',').any(|d| matches!(d.trim(), "no-store" | "no-cache")) {
        return None;
    }
    cc.split(',')
        .filter_map(|d| d.trim().strip_prefix("max-age="))
        .find_map(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

fn fingerprint(bytes: &Bytes) -> u64 {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_max_age() {
        let mut h = http::HeaderMap::new();
        assert_eq!(max_age(&h), None);
        h.insert(header::CACHE_CONTROL, "public, max-age=120".parse().unwrap());
        assert_eq!(max_age(&h), Some(Duration::from_secs(120)));
        h.insert(header::CACHE_CONTROL, "no-store, max-age=120".parse().unwrap());
        assert_eq!(max_age(&h), None);
    }
}
