//! Facts about the downstream connection a request arrived on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Conn {
    pub peer: SocketAddr,
    pub tls: bool,
    /// When the last request started, in ms since `opened` (for the HTTP/2 idle timeout).
    last_request_ms: AtomicU64,
    opened: Instant,
}

impl Conn {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        Self { peer, tls, last_request_ms: AtomicU64::new(0), opened: Instant::now() }
    }

    /// Records that a request started now.
    pub fn touch(&self) {
        self.last_request_ms.store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
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
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}
