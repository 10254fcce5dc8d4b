//! The request pipeline, each stage entered once, in the order of SPEC §4:
//!
//! ```text
//! target → strip inbound identity → session endpoint? → route
//!   → credential (bearer, else session: fresh token, maybe refreshed) → authenticate
//!   → forward → finish (Set-Cookie, metrics, server span, access log; Err → error::into_response)
//! ```
//!
//! Before the first stage the request's trace context is read or started
//! (`trace::Context::start`): the upstream's `traceparent` names the proxy's span.
//!
//! Stages return values or errors; only `finish` turns an error into an answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;

use crate::auth::{self, Admitted, AuthError, Claims, Credential};
use crate::body::Body;
use crate::config::{AuthMode, RuleAction};
use crate::conn::Conn;
use crate::error::ProxyError;
use crate::forward::{identity, Tunnels};
use crate::route::RouteTable;
use crate::session::{csrf, endpoints, SessionCtx};
use crate::state::{Route, Runtime, Snapshot};
use crate::target::Target;
use crate::trace;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the access log line and the metrics report about one request.
#[derive(Default)]
struct Record<'s> {
    /// The matched route, borrowed from the request's snapshot.
    route: Option<&'s Route>,
    /// Set for the session endpoints, which are not routes.
    endpoint: bool,
    claims: Option<Arc<Claims>>,
    upstream_time: Option<Duration>,
    error: Option<&'static str>,
    set_cookies: Vec<HeaderValue>,
}

impl Record<'_> {
    fn route_name(&self) -> &str {
        match &self.route {
            Some(r) => &r.name,
            None if self.endpoint => "session",
            None => "-",
        }
    }
}

pub async fn handle(
    mut req: Request<Incoming>,
    conn: &Conn,
    snap: &Snapshot,
    rt: &Runtime,
) -> Response<Body> {
    let begun = Begun::now(&mut req, rt);
    let method = req.method().clone();
    let uri = req.uri().clone();
    let mut record = Record::default();
    let grpc = is_grpc(req.headers());
    // Built where it is awaited, not bound to a local: a moved-from local keeps
    // its room in this future's state, which would then hold the pipeline twice.
    let rec = begun.recording.clone();
    let resp = match trace::in_scope(rec, pipeline(req, conn, snap, rt, &mut record)).await {
        Ok(resp) => resp,
        Err(e) => failed(e, &mut record, rt, grpc),
    };
    finish(resp, record, begun, &method, &uri, rt)
}

/// What is known from a request's first moment: when, its request id, its trace.
struct Begun {
    at: Instant,
    request_id: HeaderValue,
    trace: trace::Context,
    /// Sampled with `[tracing]`: its server span is exported.
    recording: Option<trace::Recording>,
    start_ns: u64,
}

impl Begun {
    fn now(req: &mut Request<Incoming>, rt: &Runtime) -> Self {
        let at = Instant::now();
        let request_id = request_id(req);
        let trace = trace::Context::start(req.headers_mut(), rt.exporter.as_ref());
        let recording = trace::Recording::of(&trace, rt.exporter.as_ref());
        let start_ns = if recording.is_some() { trace::unix_nanos() } else { 0 };
        Self { at, request_id, trace, recording, start_ns }
    }
}

/// A forward-auth subrequest: the same stages as `handle` for the original
/// request it describes, up to the decision; `200` with the identity headers
/// instead of forwarding. Refusals are the answers a proxied request would get.
pub async fn authorize_only(
    mut req: Request<Incoming>,
    conn: &Conn,
    snap: &Snapshot,
    rt: &Runtime,
) -> Response<Body> {
    let begun = Begun::now(&mut req, rt);
    let mut record = Record::default();
    let (resp, method, uri) = match crate::forward_auth::read(&req, conn) {
        Ok(original) => {
            let rec = begun.recording.clone();
            let resp =
                match trace::in_scope(rec, decide_only(&req, &original, snap, rt, conn, &mut record)).await {
                    Ok(resp) => resp,
                    Err(e) => failed(e, &mut record, rt, false),
                };
            (resp, original.method, original.target.uri().clone())
        }
        Err(why) => {
            let resp = failed(ProxyError::BadRequest(why), &mut record, rt, false);
            (resp, req.method().clone(), req.uri().clone())
        }
    };
    let mut resp = resp;
    crate::forward_auth::number_cookies(resp.headers_mut(), &record.set_cookies);
    finish(resp, record, begun, &method, &uri, rt)
}

async fn decide_only<'s>(
    req: &Request<Incoming>,
    original: &crate::forward_auth::Original,
    snap: &'s Snapshot,
    rt: &Runtime,
    conn: &Conn,
    record: &mut Record<'s>,
) -> Result<Response<Body>, ProxyError> {
    let target = &original.target;
    let session = session_ctx(snap, rt);
    let own = csrf::Own { tls: original.tls, authority: target.authority_str() };
    let found = (&original.method, req.headers(), target, &snap.auth_routes);
    let admitted = admit(found, conn, own, snap, rt, session.as_ref(), record).await?;
    let route = record.route.ok_or(ProxyError::NoRoute)?;
    let mut resp = Response::new(crate::body::empty());
    // The answer carries what the upstream of a proxied request would get, so a
    // front proxy that sets Authorization from it (nginx) keeps a client's bearer.
    if let Some(a) = req.headers().get(http::header::AUTHORIZATION) {
        resp.headers_mut().insert(http::header::AUTHORIZATION, a.clone());
    }
    // The front proxy forwards the client's Cookie itself: this is it without the
    // proxy's own cookies, for the front proxy to send upstream instead.
    if req.headers().contains_key(http::header::COOKIE) {
        let mut cookies = http::HeaderMap::new();
        for v in req.headers().get_all(http::header::COOKIE) {
            cookies.append(http::header::COOKIE, v.clone());
        }
        crate::forward::headers::scrub_cookies(&mut cookies, &snap.own_cookies);
        crate::forward::headers::join_cookies(&mut cookies);
        let kept = cookies.remove(http::header::COOKIE).unwrap_or(http::HeaderValue::from_static(""));
        resp.headers_mut().insert(crate::forward_auth::UPSTREAM_COOKIE.clone(), kept);
    }
    route.identity.write(resp.headers_mut(), &admitted);
    record.claims = admitted.into_claims();
    Ok(resp)
}

fn session_ctx<'a>(snap: &'a Snapshot, rt: &'a Runtime) -> Option<SessionCtx<'a>> {
    snap.sessions.as_ref().map(|sessions| SessionCtx {
        sessions,
        verifier: &rt.verifier,
        broker: &rt.broker,
        fleet: &rt.fleet,
        metrics: &rt.metrics,
    })
}

/// A gRPC request (`content-type: application/grpc`, `application/grpc+proto`, …).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        let b = v.as_bytes();
        b.len() >= 16
            && b[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(b.get(16), None | Some(b'+' | b';'))
    })
}

/// An error becomes its answer (a gRPC one for gRPC requests), counted and logged once.
fn failed(e: ProxyError, record: &mut Record<'_>, rt: &Runtime, grpc: bool) -> Response<Body> {
    record.error = Some(e.code());
    match &e {
        ProxyError::Auth(a) => rt.metrics.rejection(a.code()),
        ProxyError::RateLimited(l) => rt.metrics.rate_limited(&l.limit),
        _ => {}
    }
    log_error(&e, record.route_name());
    if grpc {
        e.into_grpc_response()
    } else {
        e.into_response()
    }
}

/// What a request is routed and authenticated by: its method, headers, target
/// and the routes it may match (of the request's snapshot, `'s`).
type Asked<'a, 's> = (&'a Method, &'a HeaderMap, &'a Target, &'s RouteTable<Arc<Route>>);

/// Steps 3 and 4: the route, rate limits, the deciding rule (token-free outcomes
/// first), then the credential (the Authorization header, else the session's,
/// maybe refreshed, token) and its checks. The route is left in `record`.
async fn admit<'s>(
    (method, headers, target, routes): Asked<'_, 's>,
    conn: &Conn,
    own: csrf::Own<'_>,
    snap: &Snapshot,
    rt: &Runtime,
    session: Option<&SessionCtx<'_>>,
    record: &mut Record<'s>,
) -> Result<Admitted, ProxyError> {
    let route: &'s Route = routes.find(target.authority_str(), target.path()).ok_or(ProxyError::NoRoute)?;
    record.route = Some(route);
    if !snap.rate_limits.is_empty() {
        snap.rate_limits.before_auth(Some(&route.name), false, conn.peer.ip(), headers)?;
    }
    let policy = &route.policy;
    let rule = policy.rule(method, target.path());
    let admitted = match rule.map(|r| &r.action) {
        Some(RuleAction::Deny) => {
            return Err(
                AuthError::Forbidden { rule: rule.map_or(0, |r| r.number), token_checked: false }.into()
            )
        }
        Some(RuleAction::Public) => Admitted::anonymous(),
        _ if policy.cors_preflight && is_preflight(method, headers) => Admitted::anonymous(),
        _ => {
            let mut credential = Credential::from_header(headers);
            if let (Credential::None, Some(cx), true) = (&credential, session, policy.mode != AuthMode::None)
            {
                credential = cx.credential(method, headers, own, policy, &mut record.set_cookies).await?;
            }
            auth::authenticate(credential, policy, rule, &rt.verifier).await?
        }
    };
    if !snap.rate_limits.is_empty() {
        if let Err(e) = snap.rate_limits.after_auth(&route.name, admitted.claims().map(|c| &**c)) {
            record.claims = admitted.into_claims();
            return Err(e.into());
        }
    }
    Ok(admitted)
}

async fn pipeline<'s>(
    mut req: Request<Incoming>,
    conn: &Conn,
    snap: &'s Snapshot,
    rt: &Runtime,
    record: &mut Record<'s>,
) -> Result<Response<Body>, ProxyError> {
    // 0. The path and host, read once for routing and forwarding alike.
    let target = Target::read(&req).map_err(|e| ProxyError::BadRequest(e.description()))?;
    // 1. Identity headers are the proxy's alone, on every route.
    identity::strip_inbound(req.headers_mut(), &snap.identity_names);
    let session = session_ctx(snap, rt);
    // 2. The session endpoints answer themselves (login and callback after their limits).
    if let Some(cx) = &session {
        if let Some(ep) = endpoints::which(cx.sessions, target.path()) {
            record.endpoint = true;
            let login = matches!(ep, endpoints::Endpoint::Login | endpoints::Endpoint::Callback);
            if login && !snap.rate_limits.is_empty() {
                snap.rate_limits.before_auth(None, true, conn.peer.ip(), req.headers())?;
            }
            return Ok(Box::pin(endpoints::serve(ep, req, conn, &target, cx, &mut record.set_cookies)).await?);
        }
    }
    // 3–4. Route by host and path; the deciding rule, the credential, its checks.
    let own = csrf::Own { tls: conn.tls, authority: target.authority_str() };
    let asked = (req.method(), req.headers(), &target, &snap.routes);
    let admitted = admit(asked, conn, own, snap, rt, session.as_ref(), record).await?;
    let route = record.route.ok_or(ProxyError::NoRoute)?;
    // 5. Forward (proxy listeners only match routes with an upstream).
    let forwarder = route.forwarder.as_ref().ok_or(ProxyError::NoRoute)?;
    let tunnels = Tunnels { revocations: &rt.verifier.revocations, metrics: &rt.metrics };
    let sent = forwarder.send(req, &target, conn, &admitted, &snap.own_cookies, &tunnels).await;
    // Moved, not cloned: the access log names the subject whatever the upstream did.
    record.claims = admitted.into_claims();
    let sent = sent?;
    record.upstream_time = Some(sent.upstream_time);
    Ok(sent.response)
}

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`,
/// which browsers send without credentials by design.
fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(http::header::ORIGIN)
        && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Set-Cookie, request id, metrics, the server span and the access log: once
/// per request, whatever happened.
fn finish(
    mut resp: Response<Body>,
    mut record: Record<'_>,
    begun: Begun,
    method: &http::Method,
    uri: &http::Uri,
    rt: &Runtime,
) -> Response<Body> {
    resp.headers_mut().insert(X_REQUEST_ID.clone(), begun.request_id.clone());
    // Cookies from a refresh go out whatever the upstream answered: the old
    // refresh token may already be rotated away.
    for c in record.set_cookies.drain(..) {
        resp.headers_mut().append(http::header::SET_COOKIE, c);
    }
    let status = resp.status().as_u16();
    match record.route.map(|r| &r.metrics) {
        Some(m) => {
            m.record_status(status);
            if let Some(t) = record.upstream_time {
                m.record_upstream(t);
            }
        }
        None => rt.metrics.unrouted.record_status(status),
    }
    let elapsed = begun.at.elapsed();
    tracing::info!(
        target: "portcullis::access",
        request_id = begun.request_id.to_str().unwrap_or(""),
        trace_id = %begun.trace.trace_id,
        method = %method,
        path = uri.path(),
        route = record.route_name(),
        status,
        duration_us = elapsed.as_micros() as u64,
        upstream_us = record.upstream_time.map(|d| d.as_micros() as u64),
        subject = record.claims.as_ref().and_then(|c| c.sub.as_deref()),
        error = record.error,
        "request"
    );
    if let Some(rec) = &begun.recording {
        rec.exporter().queue(server_span(&begun, elapsed, method, status, record));
    }
    resp
}

/// The server span: route, method, status, error code and `sub` (read at
/// export from the claims; no other claim, no token, no cookie).
fn server_span(
    begun: &Begun,
    elapsed: Duration,
    method: &Method,
    status: u16,
    record: Record,
) -> trace::Span {
    let mut attrs = Vec::with_capacity(5);
    attrs.push(trace::Attr::Str("http.request.method", method_name(method)));
    attrs.push(trace::Attr::Int("http.response.status_code", i64::from(status)));
    match record.route {
        Some(r) => attrs.push(trace::Attr::Owned("portcullis.route", r.name.clone())),
        None => {
            attrs.push(trace::Attr::Str("portcullis.route", if record.endpoint { "session" } else { "-" }))
        }
    }
    if let Some(c) = record.claims {
        attrs.push(trace::Attr::Shared("enduser.id", c));
    }
    if let Some(e) = record.error {
        attrs.push(trace::Attr::Str("error.type", e));
    }
    trace::Span {
        trace_id: begun.trace.trace_id,
        span_id: begun.trace.span_id,
        parent: begun.trace.parent,
        name: method_name(method),
        kind: trace::Kind::Server,
        start_ns: begun.start_ns,
        end_ns: begun.start_ns + elapsed.as_nanos() as u64,
        error: status >= 500,
        attrs,
    }
}

/// A method as a span names it; others are `_OTHER`, as OpenTelemetry's HTTP
/// conventions say (a client can send any token there).
fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
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
        ProxyError::RateLimited(l) => {
            tracing::info!(route, reason = "rate_limited", limit = %l.limit, "request rejected")
        }
        ProxyError::InvalidRequest(m) => {
            tracing::info!(route, reason = "invalid_request", detail = m, "request rejected")
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

thread_local! {
    /// Per thread, so no counter is shared by every request of every worker: a
    /// random prefix (0 until drawn), then this thread's next sequence number.
    static NEXT_ID: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

fn new_request_id() -> HeaderValue {
    let (prefix, n) = NEXT_ID.with(|c| {
        let (mut prefix, n) = c.get();
        if prefix == 0 {
            let mut b = [0u8; 8];
            let _ = aws_lc_rs::rand::fill(&mut b);
            prefix = u64::from_le_bytes(b) | 1;
        }
        c.set((prefix, n.wrapping_add(1)));
        (prefix, n)
    });
    // `{prefix:016x}-{n:x}` without a formatter or a String.
    let mut buf = [0u8; 33];
    trace::hex_into(&mut buf[..16], &prefix.to_be_bytes());
    buf[16] = b'-';
    trace::hex_into(&mut buf[17..], &n.to_be_bytes());
    // `n` without its leading zeros (one digit at least).
    let zeros = ((n.leading_zeros() / 4) as usize).min(15);
    buf.copy_within(17 + zeros.., 17);
    HeaderValue::from_bytes(&buf[..33 - zeros]).unwrap_or(HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_prefix_dash_sequence_in_hex() {
        let a = new_request_id();
        let b = new_request_id();
        let (pa, na) = a.to_str().unwrap().split_once('-').unwrap();
        let (pb, nb) = b.to_str().unwrap().split_once('-').unwrap();
        assert_eq!(pa.len(), 16);
        assert_eq!(pa, pb, "one prefix per thread");
        let n = u64::from_str_radix(na, 16).unwrap();
        assert_eq!(na, format!("{n:x}"), "no leading zeros");
        assert_eq!(nb, format!("{:x}", n + 1));
        // Through a digit boundary and at the widest.
        for n in [0u64, 0xf, 0x10, u64::MAX] {
            NEXT_ID.with(|c| c.set((c.get().0, n)));
            let id = new_request_id();
            assert_eq!(id.to_str().unwrap().split_once('-').unwrap().1, format!("{n:x}"));
        }
    }
}
