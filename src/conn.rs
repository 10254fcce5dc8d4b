//! Facts about the downstream connection a request arrived on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

use tokio::time::Instant;

#[allow(clippy::type_complexity)]
pub struct Conn {
    pub peer: SocketAddr,
    /// The peer's address as `X-Forwarded-For` and `Forwarded` write it, formatted
    /// once per connection rather than once per request.
    pub peer_ip: http::HeaderValue,
    pub forwarded_for: http::HeaderValue,
    /// `Forwarded` for the first `Host` the connection's requests named: a
    /// keep-alive client names the same one every time.
    forwarded_host: std::sync::OnceLock<(http::HeaderValue, Option<http::HeaderValue>)>,
    pub tls: bool,
    /// Arrived on the forward-auth listener: requests are authorization subrequests.
    pub forward_auth: bool,
    /// When the last request started, in ms since `opened` (idle timeouts, parking).
    last_request_ms: AtomicU64,
    /// Requests whose answer is not yet produced.
    in_flight: AtomicUsize,
    opened: Instant,
    /// What to do with the client's connection once a `101` answer is written
    /// (HTTP/1.1 upgrades are completed by the connection).
    upgrade: Mutex<Option<Splice>>,
}

/// A connection's byte stream, whatever its transport.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Takes the client's side of an upgraded connection.
pub type Splice = Box<dyn FnOnce(Box<dyn Io>) + Send>;

/// Counts a request as in flight until dropped.
pub struct InFlight<'a>(&'a Conn);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Conn {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        let (peer_ip, forwarded_for) = peer_texts(peer, tls);
        Self {
            peer,
            peer_ip,
            forwarded_for,
            forwarded_host: std::sync::OnceLock::new(),
            tls,
            forward_auth: false,
            last_request_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            opened: Instant::now(),
            upgrade: Mutex::new(None),
        }
    }

    /// A connection of the forward-auth listener.
    pub fn for_forward_auth(peer: SocketAddr) -> Self {
        Self { forward_auth: true, ..Self::new(peer, false) }
    }

    /// The `Forwarded` value for `host`: made by `make` once per connection for
    /// its first host, and for any other host each time it is asked for.
    pub fn forwarded_with_host(
        &self,
        host: &http::HeaderValue,
        make: impl FnOnce() -> Option<http::HeaderValue>,
    ) -> Option<http::HeaderValue> {
        if let Some((h, v)) = self.forwarded_host.get() {
            return if h == host { v.clone() } else { make() };
        }
        let v = make();
        // A copy: the request's own value shares its read buffer, which the
        // connection must not keep while it idles.
        if let Ok(h) = http::HeaderValue::from_bytes(host.as_bytes()) {
            let _ = self.forwarded_host.set((h, v.clone()));
        }
        v
    }

    /// Records that a request started now; it is in flight until the guard drops.
    pub fn request_started(&self) -> InFlight<'_> {
        self.last_request_ms.store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Resolves once nothing is in flight and no request has started for `idle`.
    pub async fn park_due(&self, idle: Duration) {
        loop {
            self.idle_for(idle).await;
            if self.in_flight.load(Ordering::Relaxed) == 0 {
                return;
            }
            tokio::time::sleep(idle).await;
        }
    }

    /// What the connection hands its client side to after the `101`.
    pub fn offer_upgrade(&self, splice: Splice) {
        *self.upgrade.lock().unwrap_or_else(|p| p.into_inner()) = Some(splice);
    }

    pub fn take_upgrade(&self) -> Option<Splice> {
        self.upgrade.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Resolves once no request has started for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.last_request_ms.load(Ordering::Relaxed);
            let until = self.opened + Duration::from_millis(last) + idle;
            if Instant::now() >= until {
                return;
            }
            tokio::time::sleep_until(until).await;
        }
    }

    pub fn scheme(&self) -> &'static str {
        scheme(self.tls)
    }
}

fn scheme(tls: bool) -> &'static str {
    if tls {
        "https"
    } else {
        "http"
    }
}

/// `1.2.3.4` and `for=1.2.3.4;proto=http` (RFC 7239 quotes an IPv6 address).
fn peer_texts(peer: SocketAddr, tls: bool) -> (http::HeaderValue, http::HeaderValue) {
    let ip = peer.ip().to_string();
    let proto = scheme(tls);
    let forwarded = match peer.ip() {
        std::net::IpAddr::V4(_) => format!("for={ip};proto={proto}"),
        std::net::IpAddr::V6(_) => format!("for=\"[{ip}]\";proto={proto}"),
    };
    let value = |s: String| http::HeaderValue::try_from(s).unwrap_or(http::HeaderValue::from_static(""));
    (value(ip), value(forwarded))
}
