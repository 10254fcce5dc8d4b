//! Listeners: the accept loop (hyper-util `server_graceful` shape), TLS handshake
//! with a timeout, HTTP/1.1 (with upgrades) or HTTP/2 chosen by ALPN or by the
//! first bytes, deadlines for slow clients (`guard`), a connection limit per
//! listener, and a bounded drain on shutdown.

mod guard;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::clock::unix_now;
use crate::config::{Config, Limits};
use crate::conn::Conn;
use crate::state::{BuildError, Runtime};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} (listen.{key})")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// The addresses actually bound (useful with port 0).
#[derive(Debug, Clone, Copy, Default)]
pub struct Addrs {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Http,
    Https,
    Admin,
}

pub struct Server {
    runtime: Arc<Runtime>,
    listeners: Vec<(Kind, TcpListener)>,
    addrs: Addrs,
}

impl Server {
    /// Builds the runtime state and binds every configured listener.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let listen = config.listen.clone();
        let runtime = Runtime::new(config)?;
        let mut listeners = Vec::new();
        let mut addrs = Addrs::default();
        for (kind, key, addr) in [
            (Kind::Http, "http", listen.http),
            (Kind::Https, "https", listen.https),
            (Kind::Admin, "admin", listen.admin),
        ] {
            let Some(addr) = addr else { continue };
            let l = bind_listener(addr).map_err(|source| StartError::Bind { key, addr, source })?;
            let local = l.local_addr().map_err(|source| StartError::Bind { key, addr, source })?;
            match kind {
                Kind::Http => addrs.http = Some(local),
                Kind::Https => addrs.https = Some(local),
                Kind::Admin => addrs.admin = Some(local),
            }
            listeners.push((kind, l));
        }
        tokio::spawn(sweep(Arc::downgrade(&runtime)));
        Ok(Self { runtime, listeners, addrs })
    }

    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting and drains in-flight
    /// requests for at most `limits.drain_timeout`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        // Proxy listeners: `stop` ends accepting and closes connections gracefully,
        // `force` drops whatever is left when the drain times out.
        let proxy = Signals::new();
        // The admin listener outlives the drain, so `/readyz` can answer 503 meanwhile.
        let admin = Signals::new();
        let open = Arc::new(OpenConnections::default());
        let mut loops = Vec::new();
        let mut admin_loops = Vec::new();
        for (kind, listener) in self.listeners {
            let shared = self.runtime.clone();
            if kind == Kind::Admin {
                admin_loops.push(tokio::spawn(accept_loop(kind, listener, shared, admin.clone(), None)));
            } else {
                let open = Some(open.clone());
                loops.push(tokio::spawn(accept_loop(kind, listener, shared, proxy.clone(), open)));
            }
        }
        shutdown.await;
        self.runtime.draining.store(true, Ordering::SeqCst);
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        proxy.stop();
        for l in loops {
            let _ = l.await;
        }
        let drain = self.runtime.current.load().limits.drain_timeout;
        match tokio::time::timeout(drain, open.none_left()).await {
            Ok(()) => tracing::info!("drained"),
            Err(_) => {
                tracing::warn!(timeout = ?drain, "drain timeout reached; closing remaining connections")
            }
        }
        proxy.force();
        // Let the forced connections close before the runtime goes: a task torn down
        // with the runtime could otherwise see its upstream vanish and answer 502.
        let _ = tokio::time::timeout(Duration::from_secs(1), open.none_left()).await;
        admin.stop();
        admin.force();
        for l in admin_loops {
            let _ = l.await;
        }
    }
}

/// The two ends of a listener's life, shared by its accept loop and connections.
#[derive(Clone)]
struct Signals {
    stop: watch::Sender<bool>,
    force: watch::Sender<bool>,
}

impl Signals {
    fn new() -> Self {
        Self { stop: watch::channel(false).0, force: watch::channel(false).0 }
    }
    fn stop(&self) {
        self.stop.send_replace(true);
    }
    fn force(&self) {
        self.force.send_replace(true);
    }
}

/// Resolves once the signal is (or already was) raised.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Open proxy connections, so the drain knows when the last one has ended.
#[derive(Default)]
struct OpenConnections {
    count: std::sync::atomic::AtomicUsize,
    changed: tokio::sync::Notify,
}

impl OpenConnections {
    async fn none_left(&self) {
        loop {
            let notified = self.changed.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

async fn accept_loop(
    kind: Kind,
    listener: TcpListener,
    shared: Arc<Runtime>,
    signals: Signals,
    open: Option<Arc<OpenConnections>>,
) {
    let limit = shared.current.load().limits.max_connections;
    let permits = Arc::new(Semaphore::new(limit));
    let mut stop = signals.stop.subscribe();
    loop {
        let permit = tokio::select! {
            _ = stopped(&mut stop) => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (stream, peer) = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let signals = signals.clone();
        let open = open.clone();
        if let Some(o) = &open {
            o.count.fetch_add(1, Ordering::AcqRel);
        }
        tokio::spawn(async move {
            shared.metrics.open_connections.fetch_add(1, Ordering::Relaxed);
            serve_connection(kind, stream, peer, &shared, &signals).await;
            shared.metrics.open_connections.fetch_sub(1, Ordering::Relaxed);
            if let Some(o) = open {
                o.count.fetch_sub(1, Ordering::AcqRel);
                o.changed.notify_waiters();
            }
            drop(permit);
        });
    }
}

/// An HTTP/2 connection that has started no stream for this long is closed (GOAWAY).
/// HTTP/1.1 keep-alive connections are bounded by `header_read_timeout` instead.
const H2_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2 keep-alive: a PING every interval, the connection dropped when unanswered.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

fn http1(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper needs at least 8 KiB of read buffer.
        .max_buf_size(limits.max_header_bytes.max(8192));
    b
}

fn http2(limits: &Limits) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT);
    b
}

async fn serve_connection(
    kind: Kind,
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Runtime>,
    signals: &Signals,
) {
    let snap = shared.current.load_full();
    let limits = &snap.limits;
    let mut stop = signals.stop.subscribe();
    let force = signals.force.subscribe();
    match kind {
        Kind::Admin => {
            let shared = shared.clone();
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(crate::admin::handle(req, &shared).await) }
            });
            // Admin connections are not drained: they must keep answering during the drain.
            let conn = http1(limits).serve_connection(TokioIo::new(stream), svc);
            drive(conn, |_| {}, None, force, None).await;
        }
        Kind::Http => {
            // Before its first request a connection is idle: shutdown simply drops it.
            let detected = tokio::select! {
                d = guard::detect(stream, limits.header_read_timeout) => d,
                _ = stopped(&mut stop) => return,
            };
            let conn = Arc::new(Conn::new(peer, false));
            match detected {
                guard::Detected::Http1(io) => serve_h1(io, conn, shared, limits, stop, force).await,
                guard::Detected::Http2(io) => serve_h2(io, conn, shared, limits, stop, force).await,
                guard::Detected::Nothing => {}
            }
        }
        Kind::Https => {
            let Some(tls) = snap.tls.clone() else { return };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            let handshake = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
            let stream = tokio::select! {
                h = handshake => match h {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(peer = %peer, failure = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(peer = %peer, failure = "timeout", "TLS handshake failed");
                        return;
                    }
                },
                _ = stopped(&mut stop) => return,
            };
            let conn = Arc::new(Conn::new(peer, true));
            // ALPN already chose the protocol; no sniffing (and no wait) needed.
            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                serve_h2(stream, conn, shared, limits, stop, force).await;
            } else {
                serve_h1(stream, conn, shared, limits, stop, force).await;
            }
        }
    }
}

async fn serve_h1<IO>(
    io: IO,
    conn: Arc<Conn>,
    shared: &Arc<Runtime>,
    limits: &Limits,
    stop: watch::Receiver<bool>,
    force: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = proxy_service(shared.clone(), conn);
    let c = http1(limits).serve_connection(TokioIo::new(io), svc).with_upgrades();
    drive(c, |c| c.graceful_shutdown(), Some(stop), force, None).await;
}

async fn serve_h2<IO>(
    io: IO,
    conn: Arc<Conn>,
    shared: &Arc<Runtime>,
    limits: &Limits,
    stop: watch::Receiver<bool>,
    force: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = guard::HeaderDeadline::new(io, limits.header_read_timeout);
    let svc = proxy_service(shared.clone(), conn.clone());
    let c = http2(limits).serve_connection(TokioIo::new(io), svc);
    drive(c, |c| c.graceful_shutdown(), Some(stop), force, Some(conn)).await;
}

/// Runs a connection to its end: gracefully closed on `stop` (or, for HTTP/2,
/// after `H2_IDLE_TIMEOUT` without a new stream), dropped on `force`.
async fn drive<C, E>(
    conn: C,
    graceful: impl Fn(std::pin::Pin<&mut C>),
    stop: Option<watch::Receiver<bool>>,
    mut force: watch::Receiver<bool>,
    idle: Option<Arc<Conn>>,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let stopping = async move {
        match stop {
            Some(mut s) => stopped(&mut s).await,
            None => std::future::pending().await,
        }
    };
    let idle = async move {
        match idle {
            Some(c) => c.idle_for(H2_IDLE_TIMEOUT).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stopping, idle);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = &mut stopping, if !closing => {
                graceful(conn.as_mut());
                closing = true;
            }
            _ = &mut idle, if !closing => {
                graceful(conn.as_mut());
                closing = true;
            }
            _ = stopped(&mut force) => return,
        }
    }
}

fn proxy_service(
    shared: Arc<Runtime>,
    conn: Arc<Conn>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<crate::body::Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<crate::body::Body>, Infallible>> + Send,
> + Clone {
    service_fn(move |req| {
        let shared = shared.clone();
        let conn = conn.clone();
        conn.touch();
        // Boxed: hyper keeps room for one service future per connection, so an
        // idle keep-alive connection should not carry the whole pipeline's state.
        Box::pin(async move {
            // Each request keeps the configuration it started with, even across a reload.
            let snap = shared.current.load_full();
            Ok::<_, Infallible>(crate::proxy::handle(req, &conn, &snap, &shared).await)
        })
    })
}

/// Forgets revocations of tokens that have expired anyway.
async fn sweep(runtime: std::sync::Weak<Runtime>) {
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let Some(rt) = runtime.upgrade() else { return };
        rt.verifier.revocations.sweep(unix_now());
    }
}

/// Binds with a backlog deeper than the default 128, so a burst of connects is
/// queued instead of waiting for SYN retries.
fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}
