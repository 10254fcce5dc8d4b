//! The integration tests: one crate, so the kit and the suites are compiled and
//! linked once. Each suite is a module named after what it covers; `kit` holds
//! everything they share (see its docs).
//!
//! Every test starts its own proxy, upstream, IdP (and Redis) on `127.0.0.1:0`, so
//! the suites run side by side in one process: nothing in them touches the
//! process environment (`*_env` keys are answered by an env map, see clippy.toml)
//! or installs a global logger. What must read logs runs the real binary and reads
//! its captured stderr ([`kit::ProxyProcess::log`]).

// Helpers panic with a message on purpose: a broken fixture is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kit;

mod config_errors;
mod cookies;
mod csrf;
mod demo;
mod discovery;
mod explain;
mod fleet;
mod forward_auth;
mod forwarding;
mod front_proxies;
mod grpc;
mod identity_headers;
mod introspection;
mod jwks_lifecycle;
mod jwt_attacks;
mod login;
mod logout;
mod logs_have_no_secrets;
mod operations;
mod rate_limits;
mod refresh;
mod refresh_storm;
mod reload;
mod revocation;
mod robustness;
mod rollout;
mod routing;
mod rules;
mod schema;
mod security_bypasses;
mod shutdown;
mod tls;
mod tracing;
mod tunnels;
mod upstream_pool;
