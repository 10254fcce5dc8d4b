//! `[tracing]`: finished spans go into a bounded queue (never waited for: a full
//! queue drops the span and counts it); one background task takes them in
//! batches (up to `MAX_BATCH`, or what came within `BATCH_DELAY`), encodes an
//! OTLP `ExportTraceServiceRequest` (protobuf) and POSTs it to
//! `{otlp_endpoint}/v1/traces` with the proxy's own outbound client. A batch the
//! collector does not take (unreachable, slow, non-2xx) is dropped and counted in
//! `portcullis_trace_export_errors_total`; nothing is retried, so a collector
//! outage costs the request path nothing and memory stays bounded. On shutdown,
//! after the drain, what is queued is sent once more (bounded by `FLUSH_TIMEOUT`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Uri};
use http_body_util::Full;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Status};
use prost::Message as _;
use tokio::sync::mpsc;

use super::{Attr, Kind, Span};
use crate::config::TracingSettings;
use crate::metrics::Metrics;
use crate::oauth::HttpsClient;

/// Spans waiting for export; past this they are dropped.
const QUEUE: usize = 4096;
const MAX_BATCH: usize = 512;
const BATCH_DELAY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a shutdown waits for the last spans to go out.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Where finished spans go; cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Exporter {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Span>,
    /// Asks the task to send what it holds now; answered when it is sent.
    flush: mpsc::Sender<Flushed>,
    /// New traces are sampled when a random u64 falls below this.
    threshold: u64,
    metrics: Arc<Metrics>,
    settings: TracingSettings,
}

impl Exporter {
    /// Starts the export task; must run inside a Tokio runtime. The task ends
    /// when the last `Exporter` is dropped, after sending what it holds.
    pub fn start(settings: TracingSettings, metrics: Arc<Metrics>) -> Result<Self, rustls::Error> {
        let client = crate::oauth::outbound_client(EXPORT_TIMEOUT)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let (flush, flushes) = mpsc::channel(1);
        let url = traces_url(&settings.otlp_endpoint);
        let task = Task { client, url, resource: resource(&settings.service_name), metrics: metrics.clone() };
        tokio::spawn(task.run(rx, flushes));
        Ok(Self::with_queue(tx, flush, settings, metrics))
    }

    /// An exporter whose spans go to `tx` (the benchmarks drain it themselves).
    pub(crate) fn with_queue(
        tx: mpsc::Sender<Span>,
        flush: mpsc::Sender<Flushed>,
        settings: TracingSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let threshold = threshold(settings.sample_ratio);
        Self { inner: Arc::new(Inner { tx, flush, threshold, metrics, settings }) }
    }

    /// Sends what is queued now and waits (at most `within`) until it went out.
    pub async fn flush(&self, within: Duration) {
        let (done, sent) = tokio::sync::oneshot::channel();
        if self.inner.flush.try_send(done).is_ok() {
            let _ = tokio::time::timeout(within, sent).await;
        }
    }

    /// Whether a new trace is recorded (`sample_ratio`).
    pub fn sample(&self) -> bool {
        let t = self.inner.threshold;
        t == u64::MAX || fastrand::u64(..) < t
    }

    pub fn settings(&self) -> &TracingSettings {
        &self.inner.settings
    }

    /// Hands `span` to the export task, or drops and counts it if the queue is full.
    pub fn queue(&self, span: Span) {
        if self.inner.tx.try_send(span).is_err() {
            self.inner.metrics.trace_export_errors.fetch_add(1, Relaxed);
        }
    }
}

fn threshold(ratio: f64) -> u64 {
    match ratio {
        r if r >= 1.0 => u64::MAX,
        r if r <= 0.0 => 0,
        r => (r * u64::MAX as f64) as u64,
    }
}

/// `{endpoint}/v1/traces`, whether or not the endpoint ends in `/`.
fn traces_url(endpoint: &Uri) -> Uri {
    let base = endpoint.to_string();
    let url = format!("{}/v1/traces", base.trim_end_matches('/'));
    url.parse().unwrap_or_else(|_| endpoint.clone())
}

fn resource(service_name: &str) -> Resource {
    Resource {
        attributes: vec![kv("service.name", str_value(service_name.to_owned()))],
        ..Default::default()
    }
}

type Flushed = tokio::sync::oneshot::Sender<()>;

struct Task {
    client: HttpsClient<Full<Bytes>>,
    url: Uri,
    resource: Resource,
    metrics: Arc<Metrics>,
}

impl Task {
    async fn run(self, mut rx: mpsc::Receiver<Span>, mut flushes: mpsc::Receiver<Flushed>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // Log the first failure of a run of them, and the recovery: not every batch.
        let mut failing = false;
        loop {
            let mut flushed = None;
            tokio::select! {
                n = rx.recv_many(&mut batch, MAX_BATCH) => if n == 0 { return },
                Some(f) = flushes.recv() => flushed = Some(f),
            }
            if flushed.is_none() {
                let deadline = tokio::time::sleep(BATCH_DELAY);
                tokio::pin!(deadline);
                while batch.len() < MAX_BATCH && flushed.is_none() {
                    let room = MAX_BATCH - batch.len();
                    tokio::select! {
                        _ = &mut deadline => break,
                        n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                        Some(f) = flushes.recv() => flushed = Some(f),
                    }
                }
            }
            if flushed.is_some() {
                while batch.len() < MAX_BATCH * 4 {
                    match rx.try_recv() {
                        Ok(s) => batch.push(s),
                        Err(_) => break,
                    }
                }
            }
            if !batch.is_empty() {
                failing = self.export(std::mem::take(&mut batch), failing).await;
            }
            if let Some(done) = flushed {
                let _ = done.send(());
            }
            batch = Vec::with_capacity(MAX_BATCH);
        }
    }

    /// Sends one batch, counting its spans if it fails; returns whether it failed.
    async fn export(&self, spans: Vec<Span>, was_failing: bool) -> bool {
        let n = spans.len();
        match self.send(spans).await {
            Ok(()) => {
                if was_failing {
                    tracing::info!(url = %self.url, "span export recovered");
                }
                false
            }
            Err(e) => {
                self.metrics.trace_export_errors.fetch_add(n as u64, Relaxed);
                if !was_failing {
                    tracing::warn!(url = %self.url, error = %e, spans = n, "span export failed; spans dropped");
                }
                true
            }
        }
    }

    async fn send(&self, spans: Vec<Span>) -> Result<(), ExportError> {
        let body = encode(&self.resource, spans);
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .header(header::USER_AGENT, "portcullis")
            .body(Full::new(Bytes::from(body)))
            .map_err(ExportError::Build)?;
        let (status, _, _) = crate::oauth::exchange(&self.client, req, EXPORT_TIMEOUT, 64 * 1024)
            .await
            .map_err(ExportError::Call)?;
        if !status.is_success() {
            return Err(ExportError::Status(status));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("cannot build the export request")]
    Build(#[source] http::Error),
    #[error("the collector call failed")]
    Call(#[source] crate::oauth::GrantError),
    #[error("the collector answered {0}")]
    Status(http::StatusCode),
}

// === encoding ===

/// One OTLP request: the proxy's resource, one scope, every span.
pub fn encode(resource: &Resource, spans: Vec<Span>) -> Vec<u8> {
    let spans = spans.into_iter().map(encode_span).collect();
    let scope = InstrumentationScope {
        name: "portcullis".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..Default::default()
    };
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans { scope: Some(scope), spans, ..Default::default() }],
            ..Default::default()
        }],
    };
    req.encode_to_vec()
}

fn encode_span(s: Span) -> opentelemetry_proto::tonic::trace::v1::Span {
    let kind = match s.kind {
        Kind::Server => span::SpanKind::Server,
        Kind::Client => span::SpanKind::Client,
    };
    let attributes = s.attrs.into_iter().filter_map(encode_attr).collect();
    let code = if s.error { status::StatusCode::Error } else { status::StatusCode::Unset };
    opentelemetry_proto::tonic::trace::v1::Span {
        trace_id: s.trace_id.0.to_vec(),
        span_id: s.span_id.0.to_vec(),
        parent_span_id: s.parent.map(|p| p.0.to_vec()).unwrap_or_default(),
        // W3C trace flags: sampled (it is exported).
        flags: 1,
        name: s.name.to_owned(),
        kind: kind as i32,
        start_time_unix_nano: s.start_ns,
        end_time_unix_nano: s.end_ns.max(s.start_ns),
        attributes,
        status: Some(Status { code: code as i32, ..Default::default() }),
        ..Default::default()
    }
}

fn encode_attr(a: Attr) -> Option<KeyValue> {
    Some(match a {
        Attr::Str(k, v) => kv(k, str_value(v.to_owned())),
        Attr::Int(k, v) => kv(k, AnyValue { value: Some(any_value::Value::IntValue(v)) }),
        Attr::Shared(k, v) => kv(k, str_value(v.text()?.to_owned())),
        Attr::Owned(k, v) => kv(k, str_value(v)),
        Attr::Authority(k, v) => kv(k, str_value(v.as_str().to_owned())),
    })
}

fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue { key: key.to_owned(), value: Some(value), ..Default::default() }
}

fn str_value(s: String) -> AnyValue {
    AnyValue { value: Some(any_value::Value::StringValue(s)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{SpanId, TraceId};

    #[test]
    fn traces_url_appends_the_otlp_path() {
        let u = |s: &str| traces_url(&s.parse().unwrap()).to_string();
        assert_eq!(u("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(u("http://127.0.0.1:4318/"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(u("https://otel.example/base/"), "https://otel.example/base/v1/traces");
    }

    #[test]
    fn a_span_encodes_as_otlp() {
        let span = Span {
            trace_id: TraceId([1; 16]),
            span_id: SpanId([2; 8]),
            parent: Some(SpanId([3; 8])),
            name: "GET",
            kind: Kind::Server,
            start_ns: 10,
            end_ns: 20,
            error: false,
            attrs: vec![Attr::Int("http.response.status_code", 200), Attr::Str("k", "v")],
        };
        let bytes = encode(&resource("svc"), vec![span]);
        let req = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let rs = &req.resource_spans[0];
        let name = rs.resource.as_ref().unwrap().attributes[0].clone();
        assert_eq!(name.key, "service.name");
        let s = &rs.scope_spans[0].spans[0];
        assert_eq!(s.trace_id, vec![1; 16]);
        assert_eq!(s.parent_span_id, vec![3; 8]);
        assert_eq!(s.kind, span::SpanKind::Server as i32);
        assert_eq!(s.attributes.len(), 2);
    }
}
