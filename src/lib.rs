//! portcullis: an edge authentication proxy.
//!
//! The phases of a request, and the module that owns each (the one
//! authoritative copy; README's "What happens to a request" follows it):
//!
//! ```text
//! server    accept; TLS handshake (tls: SNI, ALPN) with a deadline; HTTP/1.1 or HTTP/2
//!           (ALPN, or the first bytes on the plain listener); slow-client deadlines
//!   proxy::handle(req, &Conn, &Snapshot, &Runtime)
//!        trace       traceparent continued or started; the upstream's names the proxy's span
//!     0. target      path normalised, host validated, once      → 400 bad_request
//!     1. forward::identity::strip_inbound                        client identity headers never pass
//!     2. session::endpoints                                      login, callback, refresh, logout answer here
//!     3. route       host + longest segment-aware prefix         → 404 no_route
//!     4. credential  auth::bearer, else session (cookies; CSRF; expired / expiring / missing
//!                    access token → session::refresh, single-flight, fleet-wide)
//!        auth::authenticate   revocation, audience, scopes       → 401 / 403 / 503
//!     5. forward     identity headers from claims, proxy cookies scrubbed, hop-by-hop,
//!                    X-Forwarded-*, Forwarded; streamed; Upgrade tunnelled → 502 / 504 / 413
//!     6. finish      Set-Cookie, request id, metrics, server span (with [tracing]), one access-log line
//!   any Err → error::ProxyError::into_response (the only place a status is chosen)
//! ```
//!
//! Beside the path: `state` (Snapshot per configuration, Runtime across them),
//! `config` (data only, with `keys` parsed once at load), `reload`, `admin`, `metrics`, `oauth` (the
//! authorization-server client), `outbound` (the one client and bounded
//! exchange for every call the proxy makes itself), `fleet` (Redis-shared state), `trace::export`
//! (spans batched to the OTLP collector on a background task).

pub(crate) mod admin;
pub(crate) mod auth;
pub mod body;
pub(crate) mod clock;
pub mod config;
pub(crate) mod conn;
pub mod demo;
pub(crate) mod error;
pub mod explain;
pub(crate) mod fleet;
pub(crate) mod forward;
pub(crate) mod forward_auth;
pub(crate) mod keys;
pub mod logfmt;
pub(crate) mod metrics;
pub(crate) mod oauth;
pub(crate) mod outbound;
pub(crate) mod proxy;
pub(crate) mod ratelimit;
pub mod reload;
pub(crate) mod route;
pub mod run;
pub(crate) mod server;
pub(crate) mod session;
pub(crate) mod state;
pub(crate) mod target;
pub(crate) mod tls;
pub(crate) mod trace;
pub(crate) mod worker;

#[doc(hidden)]
pub mod bench;

pub use server::{Addrs, Server};
pub use session::seal::keygen;
pub use state::Runtime;
