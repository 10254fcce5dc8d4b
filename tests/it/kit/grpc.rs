//! gRPC for the tests: a real gRPC upstream (tonic's server-side codec on an
//! HTTP/2-only hyper server, plain or TLS with ALPN `h2`, that counts the
//! connections it accepts) and a tonic
//! client that reaches the proxy over TLS with ALPN `h2`, as gRPC clients reach an
//! edge proxy. The messages are `prost` derives, so there is no `.proto` file, no
//! protoc and no build script.
//!
//! The upstream dispatches on the method name alone, so any service name reaches it
//! (one route per service in the suites):
//! - `Who` (unary): answers the request headers it saw; adds trailer
//!   `x-probe-trailer: who` to the OK status;
//! - `Count` (server streaming): `n` replies, the first carrying the headers seen;
//!   with `gated`, each later reply waits for [`GrpcUpstream::next`]; ends with the
//!   status `code` (metadata `x-probe-final: done` when not OK) and trailer
//!   `x-probe-trailer: count`;
//! - `Hold` (unary): counted as held until [`GrpcUpstream::release`];
//! - `Trailers` (not gRPC): reads the request body and answers `200` with the
//!   request's trailer fields as `x-got-NAME` headers.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};
use tonic_prost::ProstCodec;

use super::tls::{tls_connect, Leaf, TestCa};
use super::DEADLINE;

/// The service the suites call; routes match it by path prefix.
pub const PROBE: &str = "portcullis.test.Probe";

// === messages ===

#[derive(Clone, PartialEq, prost::Message)]
pub struct WhoRequest {
    #[prost(string, tag = "1")]
    pub note: String,
}

/// What the upstream saw of a request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Seen {
    /// Every header field, `name: value`, names lower-case, in order.
    #[prost(string, repeated, tag = "1")]
    pub headers: Vec<String>,
    /// `HTTP/2.0` for every request this upstream can serve.
    #[prost(string, tag = "2")]
    pub version: String,
    /// The request's `:authority`.
    #[prost(string, tag = "3")]
    pub authority: String,
    #[prost(string, tag = "4")]
    pub note: String,
}

impl Seen {
    fn of(req: &Request<Incoming>) -> Self {
        let headers = req
            .headers()
            .iter()
            .map(|(n, v)| format!("{}: {}", n.as_str(), String::from_utf8_lossy(v.as_bytes())))
            .collect();
        let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
        Self { headers, version: format!("{:?}", req.version()), authority, note: String::new() }
    }

    /// Every value of header `name` (lower-case).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter_map(|h| h.split_once(": "))
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).into_iter().next()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CountRequest {
    #[prost(uint32, tag = "1")]
    pub n: u32,
    /// The gRPC status the stream ends with (0 = OK).
    #[prost(int32, tag = "2")]
    pub code: i32,
    #[prost(bool, tag = "3")]
    pub gated: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CountReply {
    #[prost(uint32, tag = "1")]
    pub i: u32,
    #[prost(message, optional, tag = "2")]
    pub seen: Option<Seen>,
}

// === GrpcUpstream ===

struct State {
    connections: AtomicUsize,
    /// The ALPN protocol each TLS connection chose (`-` for none).
    alpn: Mutex<Vec<String>>,
    held: watch::Sender<usize>,
    released: watch::Sender<bool>,
    next: Notify,
}

/// A gRPC server on `127.0.0.1:0`, HTTP/2 only (prior knowledge, or ALPN over
/// TLS); stops when dropped.
pub struct GrpcUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
    tls: bool,
}

impl GrpcUpstream {
    pub async fn start() -> Self {
        Self::serve(None).await
    }

    /// Over TLS with `leaf` (for `127.0.0.1`), offering ALPN `h2` only.
    pub async fn start_tls(leaf: &Leaf) -> Self {
        Self::serve(Some(leaf.server_config(&["h2"]))).await
    }

    async fn serve(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC upstream");
        let addr = listener.local_addr().expect("gRPC upstream address");
        let state = Arc::new(State {
            connections: AtomicUsize::new(0),
            alpn: Mutex::new(Vec::new()),
            held: watch::channel(0).0,
            released: watch::channel(false).0,
            next: Notify::new(),
        });
        let st = state.clone();
        let acceptor = tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let (st, acceptor) = (st.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Some(acceptor) = acceptor else { return serve_h2(stream, st).await };
                    let Ok(Ok(tls)) = tokio::time::timeout(DEADLINE, acceptor.accept(stream)).await else {
                        return;
                    };
                    let alpn =
                        tls.get_ref().1.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
                    st.alpn.lock().expect("alpn lock").push(alpn.unwrap_or_else(|| "-".to_owned()));
                    serve_h2(tls, st).await
                });
            }
        });
        Self { addr, state, task, tls: tls.is_some() }
    }

    /// `http://127.0.0.1:PORT` (or `https://`), for a route with `upstream_protocol = "h2"`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The ALPN protocol each TLS connection chose so far (`-` for none).
    pub fn alpn(&self) -> Vec<String> {
        self.state.alpn.lock().expect("alpn lock").clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Lets one gated `Count` stream send its next reply.
    pub fn next(&self) {
        self.state.next.notify_one();
    }

    /// Waits (at most [`DEADLINE`]) until `n` `Hold` calls are held at once.
    pub async fn wait_held(&self, n: usize) {
        let mut rx = self.state.held.subscribe();
        if tokio::time::timeout(DEADLINE, rx.wait_for(|h| *h >= n)).await.is_err() {
            panic!("fewer than {n} Hold calls reached the upstream (held: {})", *rx.borrow());
        }
    }

    /// Answers every held `Hold` call, and any later one at once.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_h2<IO>(io: IO, st: Arc<State>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let st = st.clone();
        async move { Ok::<_, std::convert::Infallible>(serve(req, st).await) }
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<CountReply, Status>> + Send>>;

async fn serve(req: Request<Incoming>, st: Arc<State>) -> Response<tonic::body::Body> {
    let seen = Seen::of(&req);
    let method = req.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
    match method.as_str() {
        "Who" => {
            let svc = tower::service_fn(move |r: tonic::Request<WhoRequest>| {
                let mut seen = seen.clone();
                async move {
                    seen.note = r.into_inner().note;
                    Ok::<_, Status>(tonic::Response::new(seen))
                }
            });
            let codec = ProstCodec::<Seen, WhoRequest>::default();
            with_trailer(tonic::server::Grpc::new(codec).unary(svc, req).await, "who")
        }
        "Count" => {
            let svc = tower::service_fn(move |r: tonic::Request<CountRequest>| {
                let stream = count(r.into_inner(), seen.clone(), st.clone());
                async move { Ok::<_, Status>(tonic::Response::new(stream)) }
            });
            let codec = ProstCodec::<CountReply, CountRequest>::default();
            with_trailer(tonic::server::Grpc::new(codec).server_streaming(svc, req).await, "count")
        }
        "Hold" => {
            let svc = tower::service_fn(move |_: tonic::Request<WhoRequest>| {
                let st = st.clone();
                async move {
                    let mut released = st.released.subscribe();
                    st.held.send_modify(|n| *n += 1);
                    let _ = released.wait_for(|r| *r).await;
                    Ok::<_, Status>(tonic::Response::new(Seen::default()))
                }
            });
            let codec = ProstCodec::<Seen, WhoRequest>::default();
            tonic::server::Grpc::new(codec).unary(svc, req).await
        }
        "Trailers" => {
            let got = req.into_body().collect().await.ok().and_then(|b| b.trailers().cloned());
            let mut resp = Response::new(tonic::body::Body::empty());
            for (name, value) in got.iter().flatten() {
                if let Ok(name) = http::HeaderName::try_from(format!("x-got-{name}")) {
                    resp.headers_mut().append(name, value.clone());
                }
            }
            resp
        }
        _ => Status::unimplemented(format!("no method {method}")).into_http(),
    }
}

fn count(req: CountRequest, seen: Seen, st: Arc<State>) -> ReplyStream {
    let stream = futures_util::stream::unfold(0u32, move |i| {
        let (seen, st) = (seen.clone(), st.clone());
        async move {
            if i > req.n || (i == req.n && req.code == 0) {
                return None;
            }
            if i == req.n {
                let mut md = tonic::metadata::MetadataMap::new();
                md.insert("x-probe-final", "done".parse().expect("metadata value"));
                return Some((Err(Status::with_metadata(Code::from(req.code), "count ended", md)), i + 1));
            }
            if req.gated && i > 0 {
                st.next.notified().await;
            }
            Some((Ok(CountReply { i, seen: (i == 0).then_some(seen) }), i + 1))
        }
    });
    Box::pin(stream)
}

/// Adds `x-probe-trailer: VALUE` to the trailers tonic writes (with `grpc-status`).
fn with_trailer(resp: Response<tonic::body::Body>, value: &'static str) -> Response<tonic::body::Body> {
    resp.map(|body| {
        tonic::body::Body::new(body.map_frame(move |frame| match frame.into_trailers() {
            Ok(mut trailers) => {
                trailers.insert("x-probe-trailer", HeaderValue::from_static(value));
                Frame::trailers(trailers)
            }
            Err(frame) => frame,
        }))
    })
}

// === GrpcClient ===

/// A tonic client on one TLS connection (SNI `sni`, ALPN `h2` only) to `addr`;
/// clones share the connection.
#[derive(Clone)]
pub struct GrpcClient {
    inner: tonic::client::Grpc<Channel>,
}

impl GrpcClient {
    pub async fn connect(addr: SocketAddr, sni: &str, ca: &TestCa) -> Self {
        let config = ca.client_config(&["h2"]);
        let name = sni.to_owned();
        let connector = tower::service_fn(move |_: http::Uri| {
            let (config, name) = (config.clone(), name.clone());
            async move { tls_connect(addr, &name, config).await.map(TokioIo::new) }
        });
        let endpoint = Endpoint::from_shared(format!("https://{sni}")).expect("endpoint URI");
        let channel = tokio::time::timeout(DEADLINE, endpoint.connect_with_connector(connector))
            .await
            .expect("gRPC connection within the deadline")
            .expect("gRPC client connects to the proxy");
        Self { inner: tonic::client::Grpc::new(channel) }
    }

    pub async fn who(
        &mut self,
        service: &str,
        req: tonic::Request<WhoRequest>,
    ) -> Result<tonic::Response<Seen>, Status> {
        self.ready().await?;
        let codec = ProstCodec::<WhoRequest, Seen>::default();
        within(self.inner.unary(req, path(service, "Who"), codec)).await
    }

    pub async fn count(
        &mut self,
        service: &str,
        req: tonic::Request<CountRequest>,
    ) -> Result<tonic::Response<Streaming<CountReply>>, Status> {
        self.ready().await?;
        let codec = ProstCodec::<CountRequest, CountReply>::default();
        within(self.inner.server_streaming(req, path(service, "Count"), codec)).await
    }

    pub async fn hold(
        &mut self,
        service: &str,
        req: tonic::Request<WhoRequest>,
    ) -> Result<tonic::Response<Seen>, Status> {
        self.ready().await?;
        let codec = ProstCodec::<WhoRequest, Seen>::default();
        within(self.inner.unary(req, path(service, "Hold"), codec)).await
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.inner.ready().await.map_err(|e| Status::unavailable(format!("channel not ready: {e}")))
    }
}

fn path(service: &str, method: &str) -> PathAndQuery {
    PathAndQuery::try_from(format!("/{service}/{method}")).expect("gRPC path")
}

async fn within<T>(call: impl std::future::Future<Output = Result<T, Status>>) -> Result<T, Status> {
    tokio::time::timeout(DEADLINE, call).await.expect("gRPC call within the deadline")
}
