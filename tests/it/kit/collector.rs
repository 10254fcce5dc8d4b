//! A test OpenTelemetry collector: OTLP/HTTP on `127.0.0.1:0`, `POST /v1/traces`
//! with a protobuf `ExportTraceServiceRequest`, decoded with the
//! `opentelemetry-proto` message types. It keeps every request's raw bytes (for
//! secret scans) and every span it decoded.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
pub use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{eventually, DEADLINE};

#[derive(Default)]
struct Seen {
    raw: Vec<Vec<u8>>,
    spans: Vec<Span>,
    /// The `service.name` of each request's resource.
    services: Vec<String>,
}

pub struct Collector {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Collector {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind collector");
        let addr = listener.local_addr().expect("collector address");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let st = seen.clone();
        let task = super::serve::http1(listener, move |req| {
            let st = st.clone();
            async move { receive(req, &st).await }
        });
        Self { addr, seen, task }
    }

    /// `http://127.0.0.1:PORT`: the `otlp_endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.seen.lock().unwrap().spans.clone()
    }

    pub fn services(&self) -> Vec<String> {
        self.seen.lock().unwrap().services.clone()
    }

    /// Every byte of every export request received so far.
    pub fn raw(&self) -> Vec<u8> {
        self.seen.lock().unwrap().raw.concat()
    }

    /// Waits until a span matching `f` arrived, and returns it.
    pub async fn wait_for(&self, what: &str, f: impl Fn(&Span) -> bool) -> Span {
        eventually(what, DEADLINE, || async { self.spans().iter().any(&f) }).await;
        self.spans().into_iter().find(|s| f(s)).expect("span just seen")
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(req: Request<Incoming>, seen: &Mutex<Seen>) -> Response<Full<Bytes>> {
    let ok_path = req.uri().path() == "/v1/traces";
    let ok_type = req.headers().get("content-type").is_some_and(|v| v == "application/x-protobuf");
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    if !ok_path {
        return status(StatusCode::NOT_FOUND);
    }
    if !ok_type {
        return status(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    let Ok(decoded) = ExportTraceServiceRequest::decode(body.as_ref()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let mut seen = seen.lock().unwrap();
    seen.raw.push(body.to_vec());
    for rs in decoded.resource_spans {
        let service =
            rs.resource.iter().flat_map(|r| &r.attributes).find(|kv| kv.key == "service.name").and_then(
                |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                },
            );
        seen.services.push(service.unwrap_or_default());
        for ss in rs.scope_spans {
            seen.spans.extend(ss.spans);
        }
    }
    let answer = ExportTraceServiceResponse::default().encode_to_vec();
    Response::builder()
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::from(answer)))
        .unwrap()
}

fn status(s: StatusCode) -> Response<Full<Bytes>> {
    Response::builder().status(s).body(Full::new(Bytes::new())).unwrap()
}

/// A span's attribute as text (strings as-is, integers formatted).
pub fn attr(span: &Span, key: &str) -> Option<String> {
    let kv = span.attributes.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Lower-case hex of an id, as `traceparent` writes it.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
