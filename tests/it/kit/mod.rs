//! The test kit: start portcullis from a TOML string on `127.0.0.1:0` (in process,
//! or the real binary), talk to it over real sockets, and wait on events or poll
//! with a deadline — never sleep and hope.
//!
//! ```ignore
//! let up = Upstream::start().await;
//! let proxy = Proxy::start(&format!(r#"
//!     [[routes]]
//!     name = "api"
//!     upstream = "{}"
//! "#, up.url())).await;
//! let reply = get(proxy.url("/x")).header("x-auth-subject", "spoof").send().await;
//! assert!(!reply.echo().has_header("x-auth-subject"));
//! ```
//!
//! - [`proxy`]: [`Proxy`] (in process), [`ProxyProcess`] (the binary), [`portcullis`]
//!   (one command to completion), and what every running instance answers
//!   ([`Instance`], [`wait_ready`], [`revoke`]);
//! - [`client`]: requests and whole answers, raw TCP exchanges;
//! - [`upstream`]: the echo upstream, misbehaving upstreams, streamed bodies;
//! - [`idp`]: the test authorization server (the demo's identity provider on the
//!   fixture keys, with JWKS failures, outages and a record of each call) and the keys;
//! - [`introspect`]: the test RFC 7662 introspection endpoint (answers from a table
//!   changed at runtime, outages on demand, every call recorded);
//! - [`collector`]: a test OTLP/HTTP trace receiver (protobuf, every span and raw byte kept);
//! - [`config`]: the `[[issuers]]` / `[auth_server]` / `[session]` tables as a builder;
//! - [`session`]: the session suites' configuration, cookie jar and flows;
//! - [`metrics`]: the one `/metrics` parser;
//! - [`tls`]: a test CA and a TLS client trusting it;
//! - [`websocket`]: a WebSocket client through the proxy, and the end of its tunnel;
//! - [`grpc`]: a gRPC upstream and a gRPC client, tonic on both ends;
//! - `redis`: a throwaway `redis-server`;
//! - [`serve`]: the one accept loop of the kit's servers;
//! - [`haproxy`]: a real HAProxy on `examples/rollout/haproxy.cfg`, and its stats.

pub mod client;
pub mod collector;
pub mod config;
pub mod grpc;
pub mod haproxy;
pub mod idp;
pub mod introspect;
pub mod metrics;
pub mod proxy;
// Not `pub`: a glob import of the kit must not shadow the `redis` crate.
mod redis;
pub mod serve;
pub mod session;
pub mod tls;
pub mod upstream;
pub mod websocket;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use client::{
    assert_invalid_token, get, post, raw_exchange, read_until_closed, request, send_together, try_send,
    RawReply, Reply, Req,
};
pub use collector::Collector;
pub use config::{api_route, session_table, Config, Table};
pub use haproxy::Haproxy;
pub use idp::{fixture, sign, JwksAnswer, Outage, TestIdp};
pub use introspect::IntrospectionServer;
pub use metrics::{metric, metrics, Metrics};
pub use proxy::{
    portcullis, readyz, revocations, revoke, wait_ready, Finished, Instance, Proxy, ProxyProcess,
};
pub use redis::{RedisServer, SlowLink};
pub use tls::{alpn, open_over, presented_leaf, send_over, tls_connect, Leaf, TestCa};
pub use upstream::{
    channel_body, count_pattern, garbage_upstream, Blackhole, Body, Pattern, Refused, Upstream,
};
pub use websocket::WebSocket;

/// How long any single wait in a test may take before it fails loudly.
pub const DEADLINE: Duration = Duration::from_secs(15);

// === TempDir ===

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let name =
            format!("portcullis-test-{}-{}-{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `text` to `name` inside the directory and returns the full path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A port that was free a moment ago (bind `127.0.0.1:0`, read it, release it).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind for a free port");
    l.local_addr().expect("local address").port()
}

/// A free port below the kernel's ephemeral range: no outgoing connection takes it
/// as its local port, so a listener can let go of it and bind it again (a restart
/// on the same port) without another socket slipping in between.
pub fn stable_port() -> u16 {
    static N: AtomicU64 = AtomicU64::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, span) = (10_000u64, u64::from(low.saturating_sub(10_000)).max(1));
    // No RNG needed: the clock, the process and a counter spread concurrent picks.
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut seed = (nanos as u64) ^ (u64::from(std::process::id()) << 32);
    for _ in 0..1000 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407 + N.fetch_add(1, Ordering::Relaxed));
        let port = u16::try_from(from + (seed >> 33) % span).unwrap_or(10_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {low}");
}

/// Polls `check` every 20 ms until it returns true; panics naming `what` after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
