//! The request pipeline, in the order of SPEC §4:
//! strip inbound identity → route → authenticate → forward → access log.
//! Every error becomes a response in `error.rs`; this function only sequences.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;

use crate::auth::{self, Admitted};
use crate::body::Body;
use crate::error::ProxyError;
use crate::forward;
use crate::session::endpoints;
use crate::state::{Conn, Shared, Snapshot};
use crate::target::Target;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the access log line reports about one request.
#[derive(Default)]
struct Outcome {
    /// The matched route; `Arc` clones, so the access log costs no allocation.
    route: Option<std::sync::Arc<crate::state::Route>>,
    /// Set for the session endpoints, which are not routes.
    endpoint: bool,
    claims: Option<std::sync::Arc<crate::auth::Claims>>,
    upstream_time: Option<Duration>,
    error: Option<&'static str>,
    set_cookies: Vec<HeaderValue>,
}

impl Outcome {
    fn route_name(&self) -> &str {
        match &self.route {
            Some(r) => &r.settings.name,
            None if self.endpoint => "session",
            None => "-",
        }
    }
}

pub async fn handle(
    mut req: Request<Incoming>,
    conn: &Conn,
    snap: &Snapshot,
    shared: &Shared,
) -> Response<Body> {
    let started = Instant::now();
    let request_id = request_id(&mut req);
    let method = req.method().clone();
    let uri = req.uri().clone();
    let mut outcome = Outcome::default();
    let mut resp = match pipeline(req, conn, snap, shared, &mut outcome).await {
        Ok(resp) => resp,
        Err(e) => {
            outcome.error = Some(e.code());
            if let ProxyError::Auth(a) = &e {
                shared.metrics.rejection(a.code());
            }
            log_error(&e, outcome.route_name());
            e.into_response()
        }
    };
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id.clone());
    // Cookies from a refresh go out whatever the upstream answered: the old
    // refresh token may already be rotated away.
    for c in outcome.set_cookies.drain(..) {
        resp.headers_mut().append(http::header::SET_COOKIE, c);
    }
    let status = resp.status().as_u16();
    match outcome.route.as_ref().map(|r| &r.metrics) {
        Some(m) => {
            m.record_status(status);
            if let Some(t) = outcome.upstream_time {
                m.record_upstream(t);
            }
        }
        None => shared.metrics.unrouted.record_status(status),
    }
    tracing::info!(
        target: "portcullis::access",
        request_id = request_id.to_str().unwrap_or(""),
        method = %method,
        path = uri.path(),
        route = outcome.route_name(),
        status = resp.status().as_u16(),
        duration_us = started.elapsed().as_micros() as u64,
        upstream_us = outcome.upstream_time.map(|d| d.as_micros() as u64),
        subject = outcome.claims.as_ref().and_then(|c| c.sub.as_deref()),
        error = outcome.error,
        "request"
    );
    resp
}

async fn pipeline(
    mut req: Request<Incoming>,
    conn: &Conn,
    snap: &Snapshot,
    shared: &Shared,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ProxyError> {
    // 0. The path and host, read once for routing and forwarding alike.
    let target = Target::read(&req).map_err(|e| ProxyError::BadRequest(e.description()))?;
    // 1. Identity headers are the proxy's alone, on every route.
    auth::strip_inbound_identity(req.headers_mut(), &snap.identity_names);
    // 2. The session endpoints answer themselves.
    if let Some(sessions) = &snap.sessions {
        if let Some(ep) = endpoints::which(sessions, target.path()) {
            outcome.endpoint = true;
            let set_cookies = &mut outcome.set_cookies;
            return Ok(endpoints::serve(ep, req, conn, &target, sessions, shared, set_cookies).await?);
        }
    }
    // 3. Route by host and path.
    let route = snap.routes.find(target.authority_str(), target.path()).ok_or(ProxyError::NoRoute)?.clone();
    outcome.route = Some(route.clone());
    // 4. Decide identity per the route's policy (may refresh and set cookies).
    let sessions = snap.sessions.as_ref();
    let admitted: Admitted =
        auth::authenticate(&req, conn, &target, &route, sessions, shared, &mut outcome.set_cookies).await?;
    outcome.claims = admitted.claims();
    // The proxy's cookies never reach an upstream.
    if let Some(sessions) = &snap.sessions {
        sessions.scrub_upstream_cookies(req.headers_mut());
    }
    // 5. Forward.
    let sent = forward::send(req, &target, &route.settings, &route.upstream, conn, &admitted).await?;
    outcome.upstream_time = Some(sent.upstream_time);
    Ok(sent.response)
}

fn log_error(e: &ProxyError, route: &str) {
    match e {
        ProxyError::Forward(f) => {
            let cause = std::error::Error::source(f).map(|s| s.to_string());
            tracing::warn!(route, error = %f, cause, "upstream failure")
        }
        ProxyError::Auth(a) => tracing::info!(route, reason = a.code(), detail = %a, "request rejected"),
        ProxyError::NoRoute => tracing::debug!("no route"),
        ProxyError::BadRequest(m) => {
            tracing::info!(route, reason = "bad_request", detail = m, "request rejected")
        }
    }
}

/// Accepts a well-formed client `X-Request-Id`, else makes one; it goes upstream and back.
fn request_id(req: &mut Request<Incoming>) -> HeaderValue {
    let ok = req.headers().get(&X_REQUEST_ID).filter(|v| {
        let b = v.as_bytes();
        !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
    });
    let value = match ok {
        Some(v) => v.clone(),
        None => new_request_id(),
    };
    req.headers_mut().insert(X_REQUEST_ID.clone(), value.clone());
    value
}

fn new_request_id() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let mut b = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
        u64::from_le_bytes(b)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    HeaderValue::try_from(format!("{prefix:016x}-{n:x}")).unwrap_or(HeaderValue::from_static("0"))
}
