//! `[tracing]`: finished spans go into a bounded queue (never waited for: a full
//! queue drops the span and counts it); one background task takes them in
//! batches (every `BATCH_DELAY`, or as soon as `MAX_BATCH` are waiting), encodes an
//! OTLP `ExportTraceServiceRequest` (protobuf) and POSTs it to
//! `{otlp_endpoint}/v1/traces` with the proxy's own outbound client. A batch the
//! collector does not take (unreachable, slow, non-2xx) is dropped and counted in
//! `portcullis_trace_export_errors_total`; nothing is retried, so a collector
//! outage costs the request path nothing and memory stays bounded. On shutdown,
//! after the drain, what is queued is sent once more (bounded by `FLUSH_TIMEOUT`).

use std::sync::atomic::AtomicBool;
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
use crate::outbound::HttpsClient;

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
    /// Wakes the task early when a batch is full. The task never waits on the
    /// queue itself: that would wake it (a thread switch) for every span.
    wake: Arc<Wake>,
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
        let client = crate::outbound::outbound_client(EXPORT_TIMEOUT)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let (flush, flushes) = mpsc::channel(1);
        let url = traces_url(&settings.otlp_endpoint);
        let wake = Arc::new(Wake::default());
        let resource = resource(&settings.service_name);
        let task = Task { client, url, resource, metrics: metrics.clone(), wake: wake.clone() };
        tokio::spawn(task.run(rx, flushes));
        Ok(Self::with_queue(tx, wake, flush, settings, metrics))
    }

    /// An exporter whose spans go to `tx` (the benchmarks drain it themselves).
    pub(crate) fn with_queue(
        tx: mpsc::Sender<Span>,
        wake: Arc<Wake>,
        flush: mpsc::Sender<Flushed>,
        settings: TracingSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let threshold = threshold(settings.sample_ratio);
        Self { inner: Arc::new(Inner { tx, wake, flush, threshold, metrics, settings }) }
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
        let i = &self.inner;
        if i.tx.try_send(span).is_err() {
            i.metrics.trace_export_errors.fetch_add(1, Relaxed);
        } else if i.tx.capacity() <= QUEUE - MAX_BATCH
            && !i.wake.asked.load(Relaxed)
            && !i.wake.asked.swap(true, Relaxed)
        {
            i.wake.notify.notify_one();
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

#[derive(Default)]
pub(crate) struct Wake {
    notify: tokio::sync::Notify,
    /// Set once a wake-up is asked for, until the task has drained the queue.
    asked: AtomicBool,
}

struct Task {
    client: HttpsClient<Full<Bytes>>,
    url: Uri,
    resource: Resource,
    metrics: Arc<Metrics>,
    wake: Arc<Wake>,
}

impl Task {
    async fn run(self, mut rx: mpsc::Receiver<Span>, mut flushes: mpsc::Receiver<Flushed>) {
        let mut tick = tokio::time::interval(BATCH_DELAY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Log the first failure of a run of them, and the recovery: not every batch.
        let mut failing = false;
        loop {
            let mut flushed = None;
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.wake.notify.notified() => {}
                Some(f) = flushes.recv() => flushed = Some(f),
            }
            self.wake.asked.store(false, Relaxed);
            // Only what is queued now: spans arriving meanwhile wait for the next round.
            let mut closed = false;
            let mut left = rx.len();
            while left > 0 {
                let mut batch = Vec::with_capacity(left.min(MAX_BATCH));
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(s) => batch.push(s),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
                left = left.saturating_sub(batch.len().max(1));
                if batch.is_empty() {
                    break;
                }
                failing = self.export(batch, failing).await;
            }
            if let Some(done) = flushed {
                let _ = done.send(());
            }
            if closed || rx.is_closed() && rx.is_empty() {
                return;
            }
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
        let (status, _, _) = crate::outbound::exchange(&self.client, req, EXPORT_TIMEOUT, 64 * 1024)
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
    Call(#[source] crate::outbound::CallError),
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
