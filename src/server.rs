//! Listeners: the accept loop (hyper-util `server_graceful` shape), TLS handshake
//! with a timeout, HTTP/1.1 (with upgrades) or HTTP/2 chosen by ALPN or by the
//! first bytes, deadlines for slow clients (`guard`), a connection limit per
//! listener, and a bounded drain on shutdown.

mod guard;
mod on_wake;
mod serve;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::clock::unix_now;
use crate::config::Config;
use crate::state::{BuildError, Runtime};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({key})")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start worker threads")]
    Workers(#[source] std::io::Error),
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// The addresses actually bound (useful with port 0).
#[derive(Debug, Clone, Copy, Default)]
pub struct Addrs {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub forward_auth: Option<SocketAddr>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kind {
    Http,
    Https,
    Admin,
    ForwardAuth,
}

/// One proxy listener's sockets: one per worker, bound to the same address with
/// `SO_REUSEPORT`, so the kernel spreads connections and no accept is shared.
struct Listener {
    kind: Kind,
    sockets: Vec<std::net::TcpListener>,
    /// `max_connections` counts across the listener's workers.
    permits: Arc<Semaphore>,
}

pub struct Server {
    runtime: Arc<Runtime>,
    proxy: Vec<Listener>,
    admin: Option<std::net::TcpListener>,
    addrs: Addrs,
    workers: usize,
}

impl Server {
    /// Builds the runtime state and binds every configured listener.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let listen = config.listen.clone();
        let max_connections = config.limits.max_connections;
        let runtime = Runtime::new(config)?;
        let workers = crate::worker::shards();
        let mut proxy = Vec::new();
        let mut addrs = Addrs::default();
        let listeners = [
            (Kind::Http, "listen.http", listen.http),
            (Kind::Https, "listen.https", listen.https),
            (Kind::ForwardAuth, "forward_auth.listen", listen.forward_auth),
        ];
        for (kind, key, addr) in listeners {
            let Some(addr) = addr else { continue };
            let err = |source| StartError::Bind { key, addr, source };
            let first = bind_listener(addr, workers > 1).map_err(err)?;
            let local = first.local_addr().map_err(err)?;
            let mut sockets = vec![first];
            for _ in 1..workers {
                sockets.push(bind_listener(local, true).map_err(err)?);
            }
            match kind {
                Kind::Http => addrs.http = Some(local),
                Kind::ForwardAuth => addrs.forward_auth = Some(local),
                _ => addrs.https = Some(local),
            }
            proxy.push(Listener { kind, sockets, permits: Arc::new(Semaphore::new(max_connections)) });
        }
        let admin = match listen.admin {
            Some(addr) => {
                let err = |source| StartError::Bind { key: "listen.admin", addr, source };
                let l = bind_listener(addr, false).map_err(err)?;
                addrs.admin = Some(l.local_addr().map_err(err)?);
                Some(l)
            }
            None => None,
        };
        tokio::spawn(sweep(Arc::downgrade(&runtime)));
        Ok(Self { runtime, proxy, admin, addrs, workers })
    }

    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting and drains in-flight
    /// requests for at most `limits.drain_timeout`. Proxy connections are served by
    /// worker threads, each with its own single-threaded runtime (a connection and
    /// its upstream connections stay on one thread); the admin listener and the
    /// background work stay on the caller's runtime.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        // Proxy listeners: `stop` ends accepting and closes connections gracefully,
        // `force` drops whatever is left when the drain times out.
        let proxy = Signals::new();
        // The admin listener outlives the drain, so `/readyz` can answer 503 meanwhile.
        let admin = Signals::new();
        let open = Arc::new(OpenConnections::default());
        let mut per_worker: Vec<Vec<(Kind, std::net::TcpListener, Arc<Semaphore>)>> =
            (0..self.workers).map(|_| Vec::new()).collect();
        for l in self.proxy {
            for (w, socket) in l.sockets.into_iter().enumerate() {
                per_worker[w].push((l.kind, socket, l.permits.clone()));
            }
        }
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut threads = Vec::new();
        for (w, listeners) in per_worker.into_iter().enumerate() {
            let runtime = self.runtime.clone();
            let (proxy, open, done) = (proxy.clone(), open.clone(), done_tx.clone());
            let spawned =
                std::thread::Builder::new().name(format!("portcullis-worker-{w}")).spawn(move || {
                    worker(w, listeners, runtime, proxy, open);
                    drop(done);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(error = %e, worker = w, "cannot start a worker thread"),
            }
        }
        drop(done_tx);
        let admin_loop = self.admin.and_then(|l| {
            let l = TcpListener::from_std(l).ok()?;
            let permits = Arc::new(Semaphore::new(1024));
            Some(tokio::spawn(accept_loop(
                Kind::Admin,
                l,
                permits,
                self.runtime.clone(),
                admin.clone(),
                None,
            )))
        });
        shutdown.await;
        // /readyz answers 503 from now; keep serving until balancers have noticed.
        self.runtime.draining.store(true, Ordering::SeqCst);
        let delay = self.runtime.current.hold().limits.drain_delay;
        if !delay.is_zero() {
            tracing::info!(drain_delay = ?delay, "shutting down: not ready; still accepting for drain_delay");
            tokio::time::sleep(delay).await;
        }
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        proxy.stop();
        let drain = self.runtime.current.hold().limits.drain_timeout;
        match tokio::time::timeout(drain, open.none_left()).await {
            Ok(()) => tracing::info!("drained"),
            Err(_) => {
                tracing::warn!(timeout = ?drain, "drain timeout reached; closing remaining connections")
            }
        }
        proxy.force();
        // Every worker has closed its connections once its thread ends.
        let _ = tokio::time::timeout(Duration::from_secs(5), done_rx.recv()).await;
        // The drained requests' spans go out before the process ends.
        if let Some(e) = &self.runtime.exporter {
            e.flush(crate::trace::export::FLUSH_TIMEOUT).await;
        }
        admin.stop();
        admin.force();
        if let Some(l) = admin_loop {
            let _ = l.await;
        }
        let _ = threads;
    }
}

/// One worker thread: a single-threaded runtime serving its share of each proxy
/// listener until `stop`, then its connections until they end or `force`.
fn worker(
    n: usize,
    listeners: Vec<(Kind, std::net::TcpListener, Arc<Semaphore>)>,
    runtime: Arc<Runtime>,
    signals: Signals,
    open: Arc<OpenConnections>,
) {
    crate::worker::set(n);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, worker = n, "cannot start a worker runtime");
            return;
        }
    };
    rt.block_on(async move {
        let mut loops = Vec::new();
        for (kind, socket, permits) in listeners {
            match TcpListener::from_std(socket) {
                Ok(l) => loops.push(tokio::spawn(accept_loop(
                    kind,
                    l,
                    permits,
                    runtime.clone(),
                    signals.clone(),
                    Some(open.clone()),
                ))),
                Err(e) => tracing::error!(error = %e, worker = n, "cannot register a listener"),
            }
        }
        for l in loops {
            let _ = l.await;
        }
        // Accepting has stopped; serve what is open until it ends or is forced off.
        let mut force = signals.force.subscribe();
        tokio::select! {
            _ = open.none_left() => {}
            _ = stopped(&mut force) => {}
        }
        // Forced connections close before the runtime goes: a task torn down with
        // the runtime could otherwise see its upstream vanish and answer 502.
        let _ = tokio::time::timeout(Duration::from_secs(1), open.none_left()).await;
    });
}

/// The two ends of a listener's life, shared by its accept loop and connections.
#[derive(Clone)]
pub(super) struct Signals {
    pub(super) stop: watch::Sender<bool>,
    pub(super) force: watch::Sender<bool>,
}

impl Signals {
    fn new() -> Self {
        Self { stop: watch::channel(false).0, force: watch::channel(false).0 }
    }
    pub(super) fn stop(&self) {
        self.stop.send_replace(true);
    }
    pub(super) fn force(&self) {
        self.force.send_replace(true);
    }
}

/// Resolves once the signal is (or already was) raised.
pub(super) async fn stopped(rx: &mut watch::Receiver<bool>) {
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
    permits: Arc<Semaphore>,
    shared: Arc<Runtime>,
    signals: Signals,
    open: Option<Arc<OpenConnections>>,
) {
    let mut stop = signals.stop.subscribe();
    loop {
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
        // The permit is taken after the accept: a worker waiting in accept must not
        // hold a slot that another worker's connection needs. Over the limit, the
        // connection waits here, unserved (at most one per worker).
        let permit = tokio::select! {
            _ = stopped(&mut stop) => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
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
            serve::serve_connection(kind, stream, peer, &shared, &signals).await;
            shared.metrics.open_connections.fetch_sub(1, Ordering::Relaxed);
            if let Some(o) = open {
                o.count.fetch_sub(1, Ordering::AcqRel);
                o.changed.notify_waiters();
            }
            drop(permit);
        });
    }
}

/// Forgets revocations of tokens that have expired anyway.
async fn sweep(runtime: std::sync::Weak<Runtime>) {
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let Some(rt) = runtime.upgrade() else { return };
        rt.verifier.revocations.sweep(unix_now());
        rt.current.hold().rate_limits.sweep();
    }
}

/// Binds with a backlog deeper than the default 128, so a burst of connects is
/// queued instead of waiting for SYN retries; `SO_REUSEPORT` when several
/// workers share the address.
fn bind_listener(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}
