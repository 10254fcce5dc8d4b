//! One connection, from its first byte to its end: protocol detection on the
//! plain listener, the TLS handshake, HTTP/1.1 (with upgrades) or HTTP/2, the
//! slow-client deadlines (`guard`), graceful close on shutdown or HTTP/2
//! idleness, and the service that hands each request to `proxy::handle`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{guard, stopped, Kind, Signals};
use crate::config::Limits;
use crate::conn::Conn;
use crate::state::Runtime;

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

pub(super) async fn serve_connection(
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
