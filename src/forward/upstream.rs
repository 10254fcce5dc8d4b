//! One route's upstreams (round-robin) and the keep-alive connections to them.
//!
//! Each upstream keeps a pool of idle HTTP/1.1 connections (hyper's
//! connection-level client). A connection has no task of its own: the request
//! using it polls it, while waiting for the response and then from the response
//! body, so an exchange costs no task wake-ups beyond the client connection's;
//! an idle one is polled once when taken, to learn whether the upstream closed
//! it. The pool is sharded by worker thread, so a worker takes and
//! returns connections without contention. A connection goes back to the pool
//! when its response body has been read to the end; a body abandoned half-way,
//! an upgrade or an error closes it. A request that a pooled connection refused
//! before sending a byte (the upstream closed it meanwhile) is retried once on a
//! fresh connection.
//!
//! With `upstream_protocol = "h2"` each worker instead keeps one HTTP/2
//! connection per upstream and multiplexes its requests on it (a new one when
//! it closes, made once for a burst of requests), so many client connections
//! share a handful of upstream ones.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::Body;
use crate::worker;

/// An idle connection is closed after this long unused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The oldest idle connection is checked for a close by the upstream (at most
/// this often) when another one joins the pool.
const SWEEP_AFTER: Duration = Duration::from_secs(2);
/// Idle connections kept per upstream and worker; more are closed.
const MAX_IDLE: usize = 256;

/// How an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("HTTP handshake failed")]
    Handshake(#[source] hyper::Error),
    #[error("the exchange failed")]
    Exchange(#[source] hyper::Error),
}

impl UpstreamError {
    /// Whether the request body went over its limit (the cause is the body's own error).
    pub fn body_too_large(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(c) = cause {
            if c.is::<http_body_util::LengthLimitError>() {
                return true;
            }
            cause = c.source();
        }
        false
    }
}

/// A connection's own future: reads and writes its socket when polled.
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send + Sync>>;

/// An HTTP/1.1 connection: the handle requests go on, and the connection
/// itself, polled by whichever request uses it.
struct Link {
    sender: SendRequest<Body>,
    /// `None` once the connection has ended.
    driver: Option<Driver>,
}

impl Link {
    /// Lets the connection make progress; whether it is still open.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(d) = &mut self.driver {
            if d.as_mut().poll(cx).is_ready() {
                // Dropping the ended connection fails what still waits on it.
                self.driver = None;
            }
        }
        self.driver.is_some()
    }

    /// Whether an idle connection can take a request: polled once, with no task
    /// to wake, so it reads a close from the upstream and is ready for the next.
    fn usable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(std::task::Waker::noop())) && !self.sender.is_closed()
    }

    /// Drives the connection until `exchange` (a request sent on it) is answered.
    async fn exchange<F: Future>(&mut self, exchange: F) -> F::Output {
        let mut exchange = std::pin::pin!(exchange);
        std::future::poll_fn(|cx| {
            // The connection first: what it reads may answer the exchange now.
            self.drive(cx);
            exchange.as_mut().poll(cx)
        })
        .await
    }

    /// An upgraded connection (or one whose body was abandoned) is left to run
    /// on its own: the upgrade completes there and hands the socket to the tunnel.
    fn detach(self) {
        if let Some(d) = self.driver {
            tokio::spawn(async move {
                if let Err(e) = d.await {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            });
        }
    }
}

struct Idle {
    link: Link,
    since: Instant,
    /// When the sweep last found it open.
    checked: Instant,
}

/// Idle connections of one upstream, one shard per worker.
struct Pool {
    shards: Box<[Mutex<VecDeque<Idle>>]>,
}

impl Pool {
    fn new() -> Self {
        Self { shards: (0..worker::shards()).map(|_| Mutex::new(VecDeque::new())).collect() }
    }

    fn shard(&self) -> &Mutex<VecDeque<Idle>> {
        &self.shards[worker::shard(self.shards.len())]
    }

    fn take(&self) -> Option<Link> {
        let mut idle = self.shard().lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut i) = idle.pop_back() {
            if i.since.elapsed() < IDLE_TIMEOUT && i.link.usable() {
                return Some(i.link);
            }
        }
        None
    }

    fn put(&self, link: Link) {
        if link.driver.is_none() || link.sender.is_closed() {
            return;
        }
        let mut idle = self.shard().lock().unwrap_or_else(|p| p.into_inner());
        // The oldest are at the front: drop the expired ones on the way, and
        // those the upstream closed (no task watches an idle connection).
        let now = Instant::now();
        while let Some(front) = idle.front_mut() {
            if now.duration_since(front.since) >= IDLE_TIMEOUT {
                idle.pop_front();
            } else if now.duration_since(front.checked) < SWEEP_AFTER {
                break;
            } else if front.link.usable() {
                front.checked = now;
                break;
            } else {
                idle.pop_front();
            }
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { link, since: now, checked: now });
        }
    }
}

/// One upstream URL and its connections.
pub struct Backend {
    pub authority: Authority,
    /// `Host` for requests to it.
    host: HeaderValue,
    /// `host:port` to connect to.
    addr: String,
    /// Path of the upstream URL without its trailing `/`, prepended to forwarded paths.
    base: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    pool: Arc<Pool>,
    /// HTTP/2: this worker's multiplexed connection, once made.
    h2: Option<H2Shards>,
}

/// One slot per worker for its HTTP/2 connection to an upstream.
type H2Shards = Box<[H2Slot]>;

/// A worker's HTTP/2 connection to one upstream, and the making of it.
#[derive(Default)]
struct H2Slot {
    sender: Mutex<Option<http2::SendRequest<Body>>>,
    /// Held while a connection is made, so a burst of requests on a cold slot
    /// shares one connection instead of each making its own. Holds whether the
    /// last failed attempt timed out.
    connecting: tokio::sync::Mutex<bool>,
    /// Failed attempts so far: a request that waited through one fails with it
    /// rather than trying again in turn (a dead upstream would make them queue).
    failures: AtomicU64,
}

impl H2Slot {
    fn live(&self) -> Option<http2::SendRequest<Body>> {
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).clone().filter(|s| !s.is_closed())
    }
}

impl Backend {
    /// The origin-form target for `path` (already normalised) and `query` (as sent).
    pub fn path_and_query(&self, path: &str, query: Option<&str>) -> PathAndQuery {
        let mut pq = String::with_capacity(self.base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
        pq.push_str(&self.base);
        pq.push_str(if path.is_empty() { "/" } else { path });
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        PathAndQuery::try_from(pq).unwrap_or_else(|_| PathAndQuery::from_static("/"))
    }

    /// Whether requests need no base path (the client's own target can be reused).
    pub fn has_base(&self) -> bool {
        !self.base.is_empty()
    }

    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    async fn connect(&self) -> Result<Link, UpstreamError> {
        match self.tls_stream().await? {
            Stream::Plain(tcp) => handshake(tcp).await,
            Stream::Tls(tls) => handshake(tls).await,
        }
    }

    async fn tls_stream(&self) -> Result<Stream, UpstreamError> {
        let establish = async {
            let tcp = TcpStream::connect(&self.addr).await.map_err(UpstreamError::Connect)?;
            let _ = tcp.set_nodelay(true);
            Ok::<_, UpstreamError>(tcp)
        };
        let tcp = tokio::time::timeout(self.connect_timeout, establish)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)??;
        match &self.tls {
            None => Ok(Stream::Plain(tcp)),
            Some((connector, name)) => {
                let tls = tokio::time::timeout(self.connect_timeout, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| UpstreamError::ConnectTimeout)?
                    .map_err(UpstreamError::Tls)?;
                Ok(Stream::Tls(Box::new(tls)))
            }
        }
    }

    /// Sends `req` over this worker's HTTP/2 connection, making one when there
    /// is none (or it has closed); a request the old connection refused unsent
    /// goes once more on a new one. One request at a time makes the connection;
    /// those that arrive meanwhile wait for it and share it (or its failure).
    async fn send_h2(
        &self,
        shards: &[H2Slot],
        req: Request<Body>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let slot = &shards[worker::shard(shards.len())];
        let mut req = self.h2_request(req);
        if let Some(mut sender) = slot.live() {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(|inner| PooledBody { inner, link: None })),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(UpstreamError::Exchange(e.into_error())),
                },
            }
        }
        let failures = slot.failures.load(Ordering::Acquire);
        let mut sender = {
            let mut timed_out = slot.connecting.lock().await;
            match slot.live() {
                // Made while this request waited.
                Some(sender) => sender,
                None if slot.failures.load(Ordering::Acquire) != failures => {
                    return Err(if *timed_out {
                        UpstreamError::ConnectTimeout
                    } else {
                        UpstreamError::Connect(std::io::Error::other("the shared upstream connection failed"))
                    });
                }
                None => {
                    let made = match self.tls_stream().await {
                        Ok(Stream::Plain(tcp)) => handshake_h2(tcp).await,
                        Ok(Stream::Tls(tls)) => handshake_h2(tls).await,
                        Err(e) => Err(e),
                    };
                    match made {
                        Ok(sender) => {
                            *slot.sender.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
                            sender
                        }
                        Err(e) => {
                            *timed_out = match &e {
                                UpstreamError::ConnectTimeout => true,
                                UpstreamError::Connect(io) => io.kind() == std::io::ErrorKind::TimedOut,
                                _ => false,
                            };
                            slot.failures.fetch_add(1, Ordering::Release);
                            return Err(e);
                        }
                    }
                }
            }
        };
        let resp = sender.send_request(req).await.map_err(UpstreamError::Exchange)?;
        Ok(resp.map(|inner| PooledBody { inner, link: None }))
    }

    /// HTTP/2 names the target in `:scheme` and `:authority`, not in `Host`.
    fn h2_request(&self, req: Request<Body>) -> Request<Body> {
        let (mut parts, body) = req.into_parts();
        parts.version = http::Version::HTTP_2;
        parts.headers.remove(http::header::HOST);
        let scheme = if self.tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP };
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(scheme);
        uri.authority = Some(self.authority.clone());
        uri.path_and_query = parts.uri.path_and_query().cloned().or(Some(PathAndQuery::from_static("/")));
        if let Ok(u) = http::Uri::from_parts(uri) {
            parts.uri = u;
        }
        Request::from_parts(parts, body)
    }

    /// Sends `req` on a pooled connection (or a new one), returning the response
    /// with a body that gives the connection back to the pool once read to the end.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<PooledBody>, UpstreamError> {
        if let Some(shards) = &self.h2 {
            return Box::pin(self.send_h2(shards, req)).await;
        }
        let mut req = req;
        if let Some(mut link) = self.pool.take() {
            let sent = link.sender.try_send_request(req);
            match link.exchange(sent).await {
                Ok(resp) => return Ok(self.pooled(resp, link)),
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection had closed; a fresh one will do.
                    Some(unsent) => req = unsent,
                    None => return Err(UpstreamError::Exchange(e.into_error())),
                },
            }
        }
        // Boxed: a pooled connection's exchange does not carry a handshake's state.
        let mut link = Box::pin(self.connect()).await?;
        let sent = link.sender.send_request(req);
        let resp = link.exchange(sent).await.map_err(UpstreamError::Exchange)?;
        Ok(self.pooled(resp, link))
    }

    fn pooled(&self, resp: Response<Incoming>, link: Link) -> Response<PooledBody> {
        // An upgraded connection belongs to the tunnel now.
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            link.detach();
            return resp.map(|inner| PooledBody { inner, link: None });
        }
        let link = Some((link, self.pool.clone()));
        resp.map(|inner| PooledBody { inner, link })
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// HTTP/2 keep-alive to the upstream: a PING every interval, the connection
/// dropped when one goes unanswered.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

async fn handshake_h2<IO>(io: IO) -> Result<http2::SendRequest<Body>, UpstreamError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(sender)
}

async fn handshake<IO>(io: IO) -> Result<Link, UpstreamError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync + 'static,
{
    let (sender, conn) =
        http1::Builder::new().handshake(TokioIo::new(io)).await.map_err(UpstreamError::Handshake)?;
    Ok(Link { sender, driver: Some(Box::pin(conn.with_upgrades())) })
}

pin_project_lite::pin_project! {
    /// An upstream response body that drives its HTTP/1.1 connection while it is
    /// read, and returns the connection to the pool at its end.
    pub struct PooledBody {
        #[pin]
        inner: Incoming,
        link: Option<(Link, Arc<Pool>)>,
    }

    impl PinnedDrop for PooledBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Read to the end (or had none): the connection can serve another request.
            if this.inner.is_end_stream() {
                if let Some((link, pool)) = this.link.take() {
                    pool.put(link);
                }
            }
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        if let Some((link, _)) = this.link.as_mut() {
            link.drive(cx);
        }
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = frame {
            if let Some((link, pool)) = this.link.take() {
                pool.put(link);
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One route's upstreams, chosen round-robin.
pub struct Upstream {
    backends: Vec<Backend>,
    next: AtomicUsize,
}

impl Upstream {
    pub fn new(
        upstreams: &[http::Uri],
        ca: &[CertificateDer<'static>],
        connect_timeout: Duration,
        h2: bool,
    ) -> Result<Self, rustls::Error> {
        let mut tls_config = None;
        let mut backends = Vec::with_capacity(upstreams.len());
        for u in upstreams {
            let (Some(scheme), Some(authority)) = (u.scheme(), u.authority()) else { continue };
            let https = *scheme == Scheme::HTTPS;
            let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
            let host = authority.host();
            let tls = if https {
                let config = match &tls_config {
                    Some(c) => Arc::clone(c),
                    None => {
                        let mut c = crate::tls::client_config(ca)?;
                        // HTTP/1.1 only unless asked for HTTP/2, so `Upgrade` works end to end.
                        c.alpn_protocols = vec![if h2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
                        let c = Arc::new(c);
                        tls_config = Some(c.clone());
                        c
                    }
                };
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(bare.to_owned())
                    .map_err(|_| rustls::Error::General(format!("{host} is not a server name")))?;
                Some((tokio_rustls::TlsConnector::from(config), name))
            } else {
                None
            };
            backends.push(Backend {
                authority: authority.clone(),
                host: HeaderValue::from_str(authority.as_str())
                    .map_err(|_| rustls::Error::General(format!("{authority} is not a Host")))?,
                addr: format!("{host}:{port}"),
                base: u.path().trim_end_matches('/').to_owned(),
                tls,
                connect_timeout,
                pool: Arc::new(Pool::new()),
                h2: h2.then(|| (0..worker::shards()).map(|_| H2Slot::default()).collect()),
            });
        }
        Ok(Self { backends, next: AtomicUsize::new(0) })
    }

    pub fn pick(&self) -> Option<&Backend> {
        if self.backends.len() == 1 {
            return self.backends.first();
        }
        let n = self.backends.len().max(1);
        self.backends.get(self.next.fetch_add(1, Ordering::Relaxed) % n)
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish()
    }
}
