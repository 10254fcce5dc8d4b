//! Listeners: the accept loop (hyper-util `server_graceful` shape), TLS handshake
//! with a timeout, HTTP/1.1 + HTTP/2 with upgrades, a connection limit per
//! listener, and a bounded drain on shutdown.

pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::auth::unix_now;
use crate::config::Config;
use crate::state::{BuildError, Conn, Shared, Snapshot};

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
    shared: Arc<Shared>,
    listeners: Vec<(Kind, TcpListener)>,
    addrs: Addrs,
}

impl Server {
    /// Builds the runtime state and binds every configured listener.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let listen = config.listen.clone();
        let shared = Shared::new(config)?;
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
        tokio::spawn(sweep(Arc::downgrade(&shared)));
        Ok(Self { shared, listeners, addrs })
    }

    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting and drains in-flight
    /// requests for at most `limits.drain_timeout`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        // The admin listener outlives the drain, so `/readyz` can answer 503 meanwhile.
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        let graceful = Arc::new(GracefulShutdown::new());
        let mut loops = Vec::new();
        let mut admin_loops = Vec::new();
        for (kind, listener) in self.listeners {
            let shared = self.shared.clone();
            if kind == Kind::Admin {
                let stop = admin_stop_rx.clone();
                admin_loops.push(tokio::spawn(accept_loop(kind, listener, shared, stop, None)));
            } else {
                let stop = stop_rx.clone();
                loops.push(tokio::spawn(accept_loop(kind, listener, shared, stop, Some(graceful.clone()))));
            }
        }
        shutdown.await;
        self.shared.draining.store(true, Ordering::SeqCst);
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        let _ = stop_tx.send(true);
        for l in loops {
            let _ = l.await;
        }
        let drain = self.shared.current.load().limits.drain_timeout;
        // The proxy accept loops held the only other references.
        if let Ok(graceful) = Arc::try_unwrap(graceful) {
            match tokio::time::timeout(drain, graceful.shutdown()).await {
                Ok(()) => tracing::info!("drained"),
                Err(_) => {
                    tracing::warn!(timeout = ?drain, "drain timeout reached; closing remaining connections")
                }
            }
        }
        let _ = admin_stop_tx.send(true);
        for l in admin_loops {
            let _ = l.await;
        }
    }
}

async fn accept_loop(
    kind: Kind,
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    graceful: Option<Arc<GracefulShutdown>>,
) {
    let limit = shared.current.load().limits.max_connections;
    let permits = Arc::new(Semaphore::new(limit));
    loop {
        let permit = tokio::select! {
            _ = stop.changed() => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => return,
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
        let watcher = graceful.as_ref().map(|g| g.watcher());
        let stop = stop.clone();
        tokio::spawn(async move {
            shared.metrics.open_connections.fetch_add(1, Ordering::Relaxed);
            serve_connection(kind, stream, peer, &shared, watcher, stop).await;
            shared.metrics.open_connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

fn builder(snap: &Snapshot) -> auto::Builder<TokioExecutor> {
    let limits = &snap.limits;
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper needs at least 8 KiB of read buffer.
        .max_buf_size(limits.max_header_bytes.max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    b
}

async fn serve_connection(
    kind: Kind,
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    watcher: Option<hyper_util::server::graceful::Watcher>,
    mut stop: watch::Receiver<bool>,
) {
    let snap = shared.current.load_full();
    // Before its first request a connection is idle: shutdown simply drops it.
    let stopping = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopping);
    let builder = builder(&snap);
    match kind {
        Kind::Admin => {
            let shared = shared.clone();
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(crate::admin::handle(req, &shared).await) }
            });
            // Admin connections are not drained: they must keep answering during the drain.
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        }
        Kind::Http => {
            let Some(watcher) = watcher else { return };
            // HTTP/1 vs HTTP/2 detection waits for the first bytes with no timeout of its
            // own; a socket that sends nothing must not hold a connection slot forever.
            let mut first = [0u8; 1];
            let peek = tokio::time::timeout(snap.limits.header_read_timeout, stream.peek(&mut first));
            tokio::select! {
                r = peek => match r {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                },
                _ = &mut stopping => return,
            }
            let conn = Conn { peer, tls: false };
            let svc = proxy_service(shared.clone(), conn);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        }
        Kind::Https => {
            let Some(watcher) = watcher else { return };
            let Some(tls) = snap.tls.clone() else { return };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            let handshake =
                tokio::time::timeout(snap.limits.header_read_timeout, acceptor.accept(stream)).await;
            let stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(peer = %peer, failure = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(peer = %peer, failure = "timeout", "TLS handshake failed");
                    return;
                }
            };
            let conn = Conn { peer, tls: true };
            let svc = proxy_service(shared.clone(), conn);
            // ALPN already chose the protocol; no sniffing (and no wait) needed.
            let builder = if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                builder.http2_only()
            } else {
                builder.http1_only()
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        }
    }
}

fn proxy_service(
    shared: Arc<Shared>,
    conn: Conn,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<crate::body::Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<crate::body::Body>, Infallible>> + Send,
> + Clone {
    let conn = Arc::new(conn);
    service_fn(move |req| {
        let shared = shared.clone();
        let conn = conn.clone();
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
async fn sweep(shared: std::sync::Weak<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let Some(s) = shared.upgrade() else { return };
        s.revocations.sweep(unix_now());
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
