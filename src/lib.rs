//! portcullis: an edge authentication proxy.
//!
//! ```text
//! accept (server) ─ TLS (server::tls) ─ hyper auto h1/h2
//!   └─ proxy::handle
//!        1. auth::strip_inbound_identity   client identity headers never pass
//!        2. route::RouteTable::find        host + longest segment-aware prefix
//!        3. auth::authenticate             token → Admitted, or AuthError
//!        4. forward::send                  upstream, 502/504 classification
//!        5. access log
//!   any error → error::ProxyError::into_response (the only place a status is chosen)
//! ```

pub mod admin;
pub mod auth;
pub mod body;
pub mod client;
pub mod config;
pub mod discovery;
pub mod error;
pub mod forward;
pub mod metrics;
pub mod oauth;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod target;

pub use server::{Addrs, Server};
pub mod run;

/// A fresh random cookie key: 32 bytes, base64.
pub fn keygen() -> Option<String> {
    use base64::Engine as _;
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).ok()?;
    Some(base64::engine::general_purpose::STANDARD.encode(key))
}
