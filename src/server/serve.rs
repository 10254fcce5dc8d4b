//! One connection, from its first byte to its end: protocol detection on the
//! plain listener, the TLS handshake, HTTP/1.1 (parked when idle, upgrades
//! spliced) or HTTP/2, the slow-client deadlines (`guard`), graceful close on
//! shutdown or HTTP/2 idleness, and the service that hands each request to
//! `proxy::handle`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::on_wake::OnWake;
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
    let snap = shared.current.hold();
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
        Kind::Http | Kind::ForwardAuth => {
            // Before its first request a connection is idle: shutdown simply drops it.
            let detected = tokio::select! {
                d = guard::detect(stream, limits.header_read_timeout) => d,
                _ = stopped(&mut stop) => return,
            };
            let conn = Arc::new(match kind {
                Kind::ForwardAuth => Conn::for_forward_auth(peer),
                _ => Conn::new(peer, false),
            });
            match detected {
                // Boxed, so a connection's task is only as large as the protocol it speaks.
                guard::Detected::Http1(io, head) => {
                    Box::pin(serve_h1(io, head, conn, shared, limits, stop, force)).await
                }
                guard::Detected::Http2(io) => Box::pin(serve_h2(io, conn, shared, limits, stop, force)).await,
                guard::Detected::Nothing => {}
            }
        }
        // Boxed: plain connections do not carry a TLS handshake's state.
        Kind::Https => Box::pin(serve_tls(stream, peer, &snap, shared, stop, force)).await,
    }
}

async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    snap: &crate::state::Snapshot,
    shared: &Arc<Runtime>,
    mut stop: watch::Receiver<bool>,
    force: watch::Receiver<bool>,
) {
    let limits = &snap.limits;
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
        Box::pin(serve_h2(stream, conn, shared, limits, stop, force)).await;
    } else {
        Box::pin(serve_h1(stream, Bytes::new(), conn, shared, limits, stop, force)).await;
    }
}

/// An HTTP/1.1 keep-alive connection with no request for this long hands its
/// buffers back (hyper's read and write buffers, about 24 KiB) and waits for its
/// next request holding nothing but the socket.
const H1_PARK_AFTER: Duration = Duration::from_secs(2);
/// How much of a parked connection's next request is read before hyper takes over.
const PARK_READ: usize = 256;

/// HTTP/1.1, request after request. While requests come, one hyper connection
/// serves them; once the connection idles, hyper lets go of the socket without
/// closing it (`poll_without_shutdown`), its buffers are freed, and a new hyper
/// connection starts with the next request's first bytes. Upgrades are handled
/// here too: after a `101` the client's socket (and any bytes it already sent)
/// is spliced to the upstream's.
async fn serve_h1<IO>(
    io: IO,
    head: Bytes,
    conn: Arc<Conn>,
    shared: &Arc<Runtime>,
    limits: &Limits,
    mut stop: watch::Receiver<bool>,
    mut force: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut io = guard::Replay::new(io, head);
    loop {
        // The busy part is boxed: a parked connection's task keeps none of it.
        let active = Box::pin(serve_h1_active(io, &conn, shared, limits, &mut stop, &mut force)).await;
        let Some((parts, parking)) = active else { return };
        let hyper::server::conn::http1::Parts { io: hyper_io, read_buf, .. } = parts;
        // hyper's leftover bytes share its 16 KiB read buffer: copy them out so it is freed.
        let leftover = if read_buf.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(&read_buf) };
        drop(read_buf);
        let raw = hyper_io.into_inner();
        if let Some(splice) = conn.take_upgrade() {
            splice(Box::new(raw.with_prefix(leftover)));
            return;
        }
        if !parking {
            return;
        }
        let mut raw = raw.with_prefix(leftover);
        if !raw.has_prefix() {
            // Parked: wait for the next request within what is left of the idle bound.
            let wait = limits.header_read_timeout.saturating_sub(H1_PARK_AFTER);
            let mut first = [0u8; PARK_READ];
            let n = tokio::select! {
                r = tokio::time::timeout(wait, tokio::io::AsyncReadExt::read(&mut raw, &mut first)) => match r {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => return,
                },
                _ = stopped(&mut stop) => return,
                _ = stopped(&mut force) => return,
            };
            raw = raw.with_prefix(Bytes::copy_from_slice(&first[..n]));
        }
        io = raw;
    }
}

type H1Parts<IO> = hyper::server::conn::http1::Parts<TokioIo<guard::Replay<IO>>, ProxyService>;

/// Serves requests on one hyper connection until it ends: `None` when the
/// connection is over, else its parts and whether it was let go to park (as
/// opposed to after an upgrade).
async fn serve_h1_active<IO>(
    io: guard::Replay<IO>,
    conn: &Arc<Conn>,
    shared: &Arc<Runtime>,
    limits: &Limits,
    stop: &mut watch::Receiver<bool>,
    force: &mut watch::Receiver<bool>,
) -> Option<(H1Parts<IO>, bool)>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = proxy_service(shared.clone(), conn.clone());
    let mut c = http1(limits).serve_connection(TokioIo::new(io), svc);
    let mut closing = false;
    let mut parking = false;
    // The connection first; the signals and the park timer only when they fire.
    let mut stopping = std::pin::pin!(OnWake::new(stopped(stop)));
    let mut park = std::pin::pin!(OnWake::new(conn.park_due(H1_PARK_AFTER)));
    let mut forced = std::pin::pin!(OnWake::new(stopped(force)));
    let ended = loop {
        tokio::select! {
            biased;
            r = std::future::poll_fn(|cx| c.poll_without_shutdown(cx)) => break r,
            _ = stopping.as_mut(), if !closing => {
                std::pin::Pin::new(&mut c).graceful_shutdown();
                closing = true;
            }
            _ = park.as_mut(), if !closing && !parking => {
                std::pin::Pin::new(&mut c).graceful_shutdown();
                parking = true;
            }
            _ = forced.as_mut() => return None,
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
        return None;
    }
    Some((c.into_parts(), parking && !closing))
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
    let (stopping, idle) = (OnWake::new(stopping), OnWake::new(idle));
    let forced = OnWake::new(stopped(&mut force));
    tokio::pin!(stopping, idle, forced);
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
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
            _ = &mut forced => return,
        }
    }
}

/// The service hyper calls for each request: `proxy::handle` on the snapshot
/// current when the request starts.
#[derive(Clone)]
struct ProxyService(Arc<Served>);

/// One `Arc` per connection: a request clones only this one, never a count that
/// every connection's requests share.
struct Served {
    shared: Arc<Runtime>,
    conn: Arc<Conn>,
}

type Answer =
    std::pin::Pin<Box<dyn Future<Output = Result<http::Response<crate::body::Body>, Infallible>> + Send>>;

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for ProxyService {
    type Response = http::Response<crate::body::Body>;
    type Error = Infallible;
    // Boxed: hyper keeps room for one service future per connection, so an idle
    // keep-alive connection should not carry the whole pipeline's state.
    type Future = Answer;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Answer {
        let served = self.0.clone();
        Box::pin(async move {
            let (shared, conn) = (&served.shared, &served.conn);
            let _in_flight = conn.request_started();
            let h1 = req.version() < http::Version::HTTP_2;
            // Each request keeps the configuration it started with, even across a reload.
            let snap = shared.current.hold();
            let mut resp = match conn.forward_auth {
                false => crate::proxy::handle(req, conn, &snap, shared).await,
                true => crate::proxy::authorize_only(req, conn, &snap, shared).await,
            };
            // Draining: an HTTP/1 client must not send its next request on a
            // connection the drain will close, so it is told to reconnect now, while
            // new connections are still accepted (HTTP/2 gets GOAWAY at the drain).
            if h1
                && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
                && shared.draining.load(Ordering::SeqCst)
            {
                resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            Ok(resp)
        })
    }
}

fn proxy_service(shared: Arc<Runtime>, conn: Arc<Conn>) -> ProxyService {
    ProxyService(Arc::new(Served { shared, conn }))
}
