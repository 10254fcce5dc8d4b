//! The upstream side: a pooled keep-alive client per route, request rewriting
//! (hop-by-hop removal, `X-Forwarded-*`, identity headers, strip_prefix), streamed
//! bodies, `Upgrade` tunnels, and classification of failures into 502 / 504.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::auth::Admitted;
use crate::body::{Body, BoxError};
use crate::config::RouteSettings;
use crate::route::strip_path;
use crate::state::Conn;
use crate::target::Target as RequestTarget;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("route {route}: upstream {authority} refused or failed the connection")]
    Connect {
        route: String,
        authority: String,
        #[source]
        source: BoxError,
    },
    #[error("route {route}: upstream {authority} did not connect in time")]
    ConnectTimeout { route: String, authority: String },
    #[error("route {route}: upstream {authority} did not answer within {timeout:?}")]
    Timeout { route: String, authority: String, timeout: Duration },
    #[error("route {route}: upstream {authority} failed the exchange")]
    Upstream {
        route: String,
        authority: String,
        #[source]
        source: BoxError,
    },
    #[error("route {route}: request body over {limit} bytes")]
    BodyTooLarge { route: String, limit: u64 },
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

struct Backend {
    scheme: Scheme,
    authority: Authority,
    /// Path of the upstream URL without its trailing `/`, prepended to forwarded paths.
    base: String,
}

/// One route's upstreams (round-robin) and the pooled client that reaches them.
pub struct Upstream {
    client: HttpClient,
    targets: Vec<Backend>,
    next: AtomicUsize,
}

impl Upstream {
    pub fn new(route: &RouteSettings) -> Result<Self, rustls::Error> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(route.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = crate::server::tls::client_config(&route.ca)?;
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
        let targets = route
            .upstreams
            .iter()
            .filter_map(|u| {
                Some(Backend {
                    scheme: u.scheme()?.clone(),
                    authority: u.authority()?.clone(),
                    base: u.path().trim_end_matches('/').to_owned(),
                })
            })
            .collect();
        Ok(Self { client, targets, next: AtomicUsize::new(0) })
    }

    fn pick(&self) -> &Backend {
        let n = self.targets.len().max(1);
        &self.targets[self.next.fetch_add(1, Ordering::Relaxed) % n]
    }
}

/// What happened upstream, for the access log and metrics.
pub struct Sent {
    pub response: Response<Body>,
    pub upstream_time: Duration,
}

/// Forwards `req` to the route's upstream on behalf of an admitted caller.
pub async fn send(
    mut req: Request<Incoming>,
    request_target: &RequestTarget,
    route: &RouteSettings,
    upstream: &Upstream,
    conn: &Conn,
    admitted: &Admitted,
) -> Result<Sent, ForwardError> {
    let target = upstream.pick();
    let route_name = || route.name.clone();
    let authority = || target.authority.to_string();

    if let Some(limit) = route.max_request_body {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ForwardError::BodyTooLarge { route: route_name(), limit });
        }
    }

    let upgrade = upgrade_protocol(req.headers());
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    parts.uri = upstream_uri(target, route, request_target);
    parts.version = Version::HTTP_11;
    let headers = &mut parts.headers;
    remove_hop_by_hop(headers);
    headers.remove(header::HOST);
    if let Some(proto) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto.clone());
    }
    // HeaderValue clones share their bytes: no allocation.
    set_forwarded(headers, conn, request_target.authority().cloned());
    join_cookies(headers);
    admitted.apply(headers, route);

    let body: Body = match route.max_request_body {
        Some(limit) => Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).boxed(),
        None => body.map_err(BoxError::from).boxed(),
    };
    let started = Instant::now();
    let result =
        tokio::time::timeout(route.timeout, upstream.client.request(Request::from_parts(parts, body))).await;
    let upstream_time = started.elapsed();
    let mut resp = match result {
        Err(_) => {
            return Err(ForwardError::Timeout {
                route: route_name(),
                authority: authority(),
                timeout: route.timeout,
            })
        }
        Ok(Err(e)) => return Err(classify(e, route, authority())),
        Ok(Ok(resp)) => resp,
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let name = route.name.clone();
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((down, up)) => {
                        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                    Err(e) => tracing::debug!(route = %name, error = %e, "upgrade failed"),
                }
            });
        }
    } else {
        remove_hop_by_hop(resp.headers_mut());
    }
    let response = resp.map(|b| b.map_err(BoxError::from).boxed());
    Ok(Sent { response, upstream_time })
}

/// The upstream's URL: its own base path, then the normalised path (after
/// `strip_prefix`), then the query as the client sent it.
fn upstream_uri(target: &Backend, route: &RouteSettings, request: &RequestTarget) -> Uri {
    let path = request.path();
    let path = if route.strip_prefix { strip_path(&route.path_prefix, path) } else { path };
    let query = request.query();
    let mut pq = String::with_capacity(target.base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(&target.base);
    pq.push_str(if path.is_empty() { "/" } else { path });
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(target.scheme.clone());
    parts.authority = Some(target.authority.clone());
    parts.path_and_query = PathAndQuery::try_from(pq).ok();
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// The `Upgrade` protocol of an HTTP/1.1 upgrade request, if it is one. An
/// `h2c` upgrade is never one: an upstream accepting it would hand the client a
/// raw HTTP/2 connection past routing and authentication.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let value = headers.get(header::UPGRADE)?;
    let h2c = value.to_str().map_or(true, |v| {
        v.split(',').any(|p| p.trim().split('/').next().unwrap_or("").eq_ignore_ascii_case("h2c"))
    });
    if h2c {
        None
    } else {
        Some(value.clone())
    }
}

static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("http2-settings"),
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes RFC 9110 §7.6.1 hop-by-hop headers, including those named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// RFC 9113 §8.2.3: an HTTP/2 client may split `cookie` into several fields; an
/// HTTP/1.1 upstream must see one `Cookie` header.
fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(header::COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers.get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

/// `X-Forwarded-For` (appended), `-Proto`, `-Host`, and RFC 7239 `Forwarded`,
/// which replaces whatever the client sent.
fn set_forwarded(headers: &mut HeaderMap, conn: &Conn, host: Option<HeaderValue>) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let ip = conn.peer.ip().to_string();
    // Every earlier hop, however many header lines carried them.
    let mut value = String::new();
    for prev in headers.get_all(&xff).iter().filter_map(|v| v.to_str().ok()) {
        let prev = prev.trim();
        if !prev.is_empty() {
            value.push_str(prev);
            value.push_str(", ");
        }
    }
    value.push_str(&ip);
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(xff, v);
    }
    let proto = if conn.tls { "https" } else { "http" };
    headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static(proto));
    let mut forwarded = String::with_capacity(64);
    match conn.peer.ip() {
        std::net::IpAddr::V4(ip) => {
            let _ = write!(forwarded, "for={ip}");
        }
        std::net::IpAddr::V6(ip) => {
            let _ = write!(forwarded, "for=\"[{ip}]\"");
        }
    }
    forwarded.push_str(";proto=");
    forwarded.push_str(proto);
    if let Some(h) = host.as_ref().and_then(|h| h.to_str().ok()) {
        // A port's colon is not a token character: quote it.
        if h.contains(':') {
            let _ = write!(forwarded, ";host=\"{h}\"");
        } else {
            let _ = write!(forwarded, ";host={h}");
        }
    }
    match HeaderValue::try_from(forwarded) {
        Ok(v) => headers.insert(header::FORWARDED, v),
        Err(_) => headers.remove(header::FORWARDED),
    };
    let xfh = HeaderName::from_static("x-forwarded-host");
    match host {
        Some(v) => {
            headers.insert(xfh, v);
        }
        None => {
            headers.remove(xfh);
        }
    }
}

fn classify(e: hyper_util::client::legacy::Error, route: &RouteSettings, authority: String) -> ForwardError {
    let route_name = route.name.clone();
    if let Some(limit) = route.max_request_body {
        if caused_by::<http_body_util::LengthLimitError>(&e) {
            return ForwardError::BodyTooLarge { route: route_name, limit };
        }
    }
    if e.is_connect() {
        let timed_out = chain(&e).any(|s| {
            s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        });
        if timed_out {
            return ForwardError::ConnectTimeout { route: route_name, authority };
        }
        return ForwardError::Connect { route: route_name, authority, source: Box::new(e) };
    }
    ForwardError::Upstream { route: route_name, authority, source: Box::new(e) }
}

fn chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    chain(e).any(|s| s.is::<T>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret-Hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_protocol(&h), Some(HeaderValue::from_static("websocket")));
        h.remove(header::CONNECTION);
        assert_eq!(upgrade_protocol(&h), None);
    }
}
