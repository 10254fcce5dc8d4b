//! W3C trace context on every request, and the spans the proxy records.
//!
//! ```text
//! request ─► traceparent valid? ── yes ─► same trace id, parent = the client's span, its sampled flag
//!              └ no ─► new trace id; sampled by `sample_ratio` (every new trace without [tracing]);
//!                      the client's tracestate is dropped with its traceparent
//!   the proxy's server span id is fresh; upstream gets `00-{trace}-{server span}-{flags}`
//!   recorded (sampled and [tracing]) ─► the request runs inside `CURRENT`, so the upstream,
//!     refresh, introspection and JWKS calls made for it become child spans
//!   finish ─► one server span; all of them queued for `export` (never waited for)
//! ```
//!
//! Reading the header and making ids allocates nothing; the outgoing header is
//! formatted in a 55-byte buffer. A span holds only fixed names, numbers and
//! shared handles (`Arc`s to the route and the claims), so recording copies no
//! text; which attribute a handle becomes is decided at export, where `sub` is the
//! only claim ever read.

pub mod export;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::Either;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::task::futures::TaskLocalFuture;

pub use export::Exporter;

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

const HEX: &[u8; 16] = b"0123456789abcdef";

/// 16 bytes naming a trace; never all zero.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceId(pub [u8; 16]);

/// 8 bytes naming a span; never all zero.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    fn random() -> Self {
        // Non-zero: a zero id is invalid in W3C trace context.
        Self(fastrand::u128(1..).to_be_bytes())
    }
}

impl SpanId {
    fn random() -> Self {
        Self(fastrand::u64(1..).to_be_bytes())
    }
}

pub(crate) fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 32];
        hex_into(&mut buf, &self.0);
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 16];
        hex_into(&mut buf, &self.0);
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

/// What a `traceparent` header says, if it is well-formed (W3C Trace Context §3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// Parses `traceparent`. Version `00` is exactly 55 bytes; a later version may be
/// longer and is read as far as `00` defines it; `ff`, upper-case hex and all-zero
/// ids are invalid.
pub fn parse_traceparent(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex_byte(&v[0..2])?;
    match version {
        0xff => return None,
        0 if v.len() != 55 => return None,
        0 => {}
        _ if v.len() > 55 && v[55] != b'-' => return None,
        _ => {}
    }
    let mut trace_id = [0u8; 16];
    for (i, b) in trace_id.iter_mut().enumerate() {
        *b = hex_byte(&v[3 + 2 * i..5 + 2 * i])?;
    }
    let mut span_id = [0u8; 8];
    for (i, b) in span_id.iter_mut().enumerate() {
        *b = hex_byte(&v[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&v[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent { trace_id, span_id, sampled: flags & 1 == 1 })
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    let d = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(d(two[0])? << 4 | d(two[1])?)
}

// === Context ===

/// One request's place in its trace: the trace, the client's span (if it sent
/// one) and the proxy's own server span.
#[derive(Clone, Copy)]
pub struct Context {
    pub trace_id: TraceId,
    /// The client's span, when the request continued a trace.
    pub parent: Option<SpanId>,
    /// The proxy's server span: the upstream's parent.
    pub span_id: SpanId,
    pub sampled: bool,
}

impl Context {
    /// Continues the request's trace or starts one, and rewrites the request's
    /// trace headers for the upstream: `traceparent` names the proxy's span;
    /// `tracestate` stays only with the trace it belongs to.
    pub fn start(headers: &mut HeaderMap, exporter: Option<&Exporter>) -> Self {
        let parent = headers.get(&TRACEPARENT).and_then(|v| parse_traceparent(v.as_bytes()));
        let cx = match parent {
            Some(p) => Self {
                trace_id: TraceId(p.trace_id),
                parent: Some(SpanId(p.span_id)),
                span_id: SpanId::random(),
                sampled: p.sampled,
            },
            None => {
                headers.remove(&TRACESTATE);
                Self {
                    trace_id: TraceId::random(),
                    parent: None,
                    span_id: SpanId::random(),
                    // Without [tracing], a new trace is marked sampled so an upstream
                    // that traces keeps recording as it did before the proxy.
                    sampled: exporter.is_none_or(Exporter::sample),
                }
            }
        };
        headers.insert(TRACEPARENT.clone(), cx.traceparent());
        cx
    }

    /// `00-{trace id}-{span id}-{flags}`.
    pub fn traceparent(&self) -> HeaderValue {
        let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex_into(&mut buf[3..35], &self.trace_id.0);
        hex_into(&mut buf[36..52], &self.span_id.0);
        buf[54] = if self.sampled { b'1' } else { b'0' };
        HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static(""))
    }
}

// === recording ===

/// A request being recorded: its server span, and where finished spans go.
#[derive(Clone)]
pub struct Recording {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    exporter: Exporter,
}

tokio::task_local! {
    /// The recorded request this task works for; child spans attach to it.
    static CURRENT: Recording;
}

impl Recording {
    /// `Some` when the request is sampled and spans are exported.
    pub fn of(cx: &Context, exporter: Option<&Exporter>) -> Option<Self> {
        let exporter = exporter.filter(|_| cx.sampled)?.clone();
        Some(Self { trace_id: cx.trace_id, span_id: cx.span_id, exporter })
    }

    /// Runs `f` as the work of this request (child spans attach to it).
    // Plain fns returning the future, not `async fn`: an async wrapper would hold
    // `f` a second time in its own state, and the request future hyper boxes
    // would grow by the whole pipeline's size (and be copied on every request).
    pub fn scope<F: Future>(self, f: F) -> TaskLocalFuture<Recording, F> {
        CURRENT.scope(self, f)
    }

    pub fn exporter(&self) -> &Exporter {
        &self.exporter
    }
}

/// The recording the current task works for, to carry into a task it spawns.
pub fn current() -> Option<Recording> {
    CURRENT.try_with(Recording::clone).ok()
}

/// Runs `f` in `rec`'s scope if there is one.
pub fn in_scope<F: Future>(rec: Option<Recording>, f: F) -> Either<TaskLocalFuture<Recording, F>, F> {
    match rec {
        Some(r) => Either::Left(r.scope(f)),
        None => Either::Right(f),
    }
}

/// Wall-clock nanoseconds, as OTLP wants its timestamps.
pub fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Text a span refers to without copying it: read only when the span is
/// exported (the `sub` claim).
pub trait Text: Send + Sync {
    fn text(&self) -> Option<&str>;
}

/// One attribute of a span: a fixed key and a value that cost no copy to keep.
pub enum Attr {
    Str(&'static str, &'static str),
    Int(&'static str, i64),
    Shared(&'static str, Arc<dyn Text>),
    Owned(&'static str, String),
    Authority(&'static str, http::uri::Authority),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Server,
    Client,
}

/// A finished span, queued for export.
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub name: &'static str,
    pub kind: Kind,
    pub start_ns: u64,
    pub end_ns: u64,
    pub error: bool,
    pub attrs: Vec<Attr>,
}

/// A call the proxy makes for a recorded request (upstream, refresh,
/// introspection, JWKS); `None` outside a recorded request, so unrecorded
/// requests pay one task-local read.
pub struct Child {
    rec: Recording,
    span_id: SpanId,
    name: &'static str,
    start_ns: u64,
    started: Instant,
}

impl Child {
    pub fn start(name: &'static str) -> Option<Self> {
        let rec = current()?;
        Some(Self { rec, span_id: SpanId::random(), name, start_ns: unix_nanos(), started: Instant::now() })
    }

    pub fn end(self, error: bool, attrs: Vec<Attr>) {
        let end_ns = self.start_ns + self.started.elapsed().as_nanos() as u64;
        self.rec.exporter.queue(Span {
            trace_id: self.rec.trace_id,
            span_id: self.span_id,
            parent: Some(self.rec.span_id),
            name: self.name,
            kind: Kind::Client,
            start_ns: self.start_ns,
            end_ns,
            error,
            attrs,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_table() {
        let p = parse_traceparent(GOOD.as_bytes()).unwrap();
        assert_eq!(TraceId(p.trace_id).to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(SpanId(p.span_id).to_string(), "00f067aa0ba902b7");
        assert!(p.sampled);
        let cases: &[(&str, bool)] = &[
            (GOOD, true),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", true),
            // A later version may carry more fields after a dash.
            ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", true),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", false),
            ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", false),
            ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", false),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", false),
            ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", false),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", false),
            ("00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", false),
            ("", false),
        ];
        for (v, ok) in cases {
            assert_eq!(parse_traceparent(v.as_bytes()).is_some(), *ok, "{v}");
        }
    }

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_static(GOOD));
        h.insert(&TRACESTATE, HeaderValue::from_static("vendor=x"));
        let cx = Context::start(&mut h, None);
        assert_eq!(cx.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(cx.parent.unwrap().to_string(), "00f067aa0ba902b7");
        let sent = h.get(&TRACEPARENT).unwrap().to_str().unwrap();
        assert_eq!(sent, format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", cx.span_id));
        assert_eq!(h.get(&TRACESTATE).unwrap(), "vendor=x");
    }

    #[test]
    fn a_broken_traceparent_starts_a_trace_and_drops_tracestate() {
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_static("garbage"));
        h.insert(&TRACESTATE, HeaderValue::from_static("vendor=x"));
        let cx = Context::start(&mut h, None);
        assert!(cx.parent.is_none());
        assert!(h.get(&TRACESTATE).is_none());
        let sent = h.get(&TRACEPARENT).unwrap().as_bytes();
        assert_eq!(sent.len(), 55);
        assert!(parse_traceparent(sent).is_some_and(|p| p.sampled));
    }
}
