//! Test upstreams on `127.0.0.1:0`: an echo server that reports everything it
//! received (so tests can assert on `x-auth-subject`, `authorization`, `cookie`,
//! `x-forwarded-*` …), plus a few misbehaving servers, and the lazily generated
//! bodies both sides use for streaming tests.
//!
//! Echo endpoints (any method; the path may sit under a base path such as `/base/slow`):
//! - anything else: consumes the request body frame by frame, answers JSON [`Echo`];
//! - `…/slow?ms=N`: waits N ms before answering the echo;
//! - `…/stream?bytes=N`: answers N bytes of [`Pattern`], produced lazily;
//! - `…/gate`: sends `first\n`, waits for [`Upstream::open_gate`], then sends `second\n`;
//! - `…/events`: the same as server-sent events (`text/event-stream`): event `1`,
//!   the gate, event `2`;
//! - `…/hop-headers`: answers with hop-by-hop headers the proxy must remove;
//! - any request with `Upgrade: websocket`: a WebSocket echo, counted while open
//!   ([`Upstream::websockets`]) so a test can see the proxy closed the upstream side too;
//!   on `…/slow?ms=N` its `101` comes N ms late.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// What the echo upstream saw, as it reports it in its JSON answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Echo {
    /// The name the upstream was started with (tells round-robin targets apart).
    pub upstream: String,
    pub method: String,
    /// Path and query, exactly as received.
    pub path: String,
    /// Every header line received, in order, names lower-case.
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    /// The body was exactly [`Pattern`] output (true for an empty body).
    pub body_is_pattern: bool,
}

impl Echo {
    /// The first value of `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).into_iter().next()
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }

    /// Header names starting with `prefix` (lower-case compare).
    pub fn names_starting_with(&self, prefix: &str) -> Vec<&str> {
        let prefix = prefix.to_ascii_lowercase();
        self.headers.iter().map(|(n, _)| n.as_str()).filter(|n| n.starts_with(&prefix)).collect()
    }
}

struct State {
    name: String,
    /// `(method, path-and-query)` of every request, in arrival order.
    seen: Mutex<Vec<(String, String)>>,
    arrived: watch::Sender<usize>,
    gate: Notify,
    body_started: Notify,
    /// WebSocket echoes whose connection is still open.
    websockets: watch::Sender<usize>,
}

/// An echo upstream; stops when dropped.
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        Self::named("echo").await
    }

    pub async fn named(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo upstream");
        let addr = listener.local_addr().expect("echo upstream address");
        let state = Arc::new(State {
            name: name.to_owned(),
            seen: Mutex::new(Vec::new()),
            arrived: watch::channel(0).0,
            gate: Notify::new(),
            body_started: Notify::new(),
            websockets: watch::channel(0).0,
        });
        let st = state.clone();
        let task = super::serve::http1(listener, move |req| handle(req, st.clone()));
        Self { addr, state, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, ready for a route's `upstream`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `(method, path-and-query)` of every request received so far.
    pub fn seen(&self) -> Vec<(String, String)> {
        self.state.seen.lock().expect("seen lock").clone()
    }

    /// Waits (at most 10 s) until `n` requests have arrived, counting from start.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut rx = self.state.arrived.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("upstream {}: fewer than {n} requests arrived", self.state.name))
            .expect("upstream state alive");
    }

    /// Lets one `/gate` response send its second part.
    pub fn open_gate(&self) {
        self.state.gate.notify_one();
    }

    /// Resolves once a request body's first bytes have reached the upstream.
    pub async fn body_started(&self) {
        self.state.body_started.notified().await;
    }

    /// WebSocket connections open at the upstream now.
    pub fn websockets(&self) -> usize {
        *self.state.websockets.borrow()
    }

    /// Waits (at most `within`) until exactly `n` WebSocket connections are open at the upstream.
    pub async fn wait_websockets(&self, n: usize, within: Duration) {
        let mut rx = self.state.websockets.subscribe();
        let got = tokio::time::timeout(within, rx.wait_for(|open| *open == n)).await;
        assert!(
            got.is_ok(),
            "upstream {}: {} WebSocket connections open, not {n}, after {within:?}",
            self.state.name,
            self.websockets()
        );
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(req: Request<Incoming>, st: Arc<State>) -> Response<Body> {
    let path = req.uri().path_and_query().map_or_else(|| req.uri().path().to_owned(), |p| p.to_string());
    st.seen.lock().expect("seen lock").push((req.method().to_string(), path.clone()));
    st.arrived.send_modify(|n| *n += 1);
    let endpoint = req.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
    if req.headers().get(header::UPGRADE).is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket")) {
        if endpoint == "slow" {
            let ms = query_u64(&req, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        return websocket(req, st);
    }
    match endpoint.as_str() {
        "stream" => {
            let n = query_u64(&req, "bytes").unwrap_or(0);
            let mut resp = Response::new(Pattern::new(n).boxed_body());
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            resp
        }
        "gate" => {
            let (tx, body) = channel_body();
            let st = st.clone();
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"first\n")).await;
                st.gate.notified().await;
                let _ = tx.send(Bytes::from_static(b"second\n")).await;
            });
            Response::new(body.boxed_body())
        }
        "events" => {
            let (tx, body) = channel_body();
            let st = st.clone();
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"id: 1\ndata: one\n\n")).await;
                st.gate.notified().await;
                let _ = tx.send(Bytes::from_static(b"id: 2\ndata: two\n\n")).await;
            });
            let mut resp = Response::new(body.boxed_body());
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
        "hop-headers" => {
            let mut resp = Response::new(full("hop"));
            let h = resp.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("x-resp-hop"));
            h.insert("x-resp-hop", HeaderValue::from_static("secret"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"inner\""));
            h.insert("x-end-to-end", HeaderValue::from_static("kept"));
            resp
        }
        _ => {
            if endpoint == "slow" {
                let ms = query_u64(&req, "ms").unwrap_or(1000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            echo(req, path, &st).await
        }
    }
}

async fn echo(req: Request<Incoming>, path: String, st: &State) -> Response<Body> {
    let method = req.method().to_string();
    let headers = req
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let mut body = req.into_body();
    let mut check = PatternCheck::default();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    if check.len == 0 && !d.is_empty() {
                        st.body_started.notify_one();
                    }
                    check.feed(d);
                }
            }
            Err(e) => {
                let mut resp = Response::new(full(format!("body error: {e}")));
                *resp.status_mut() = StatusCode::BAD_REQUEST;
                return resp;
            }
        }
    }
    let echo = Echo {
        upstream: st.name.clone(),
        method,
        path,
        headers,
        body_len: check.len,
        body_is_pattern: check.matches,
    };
    let mut resp = Response::new(full(serde_json::to_vec(&echo).expect("echo serializes")));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn websocket(req: Request<Incoming>, st: Arc<State>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key") else {
        let mut resp = Response::new(full("missing sec-websocket-key"));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        return resp;
    };
    let accept = derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else { return };
        let _open = OpenWebSocket::count(st);
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::new(full(""));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert("sec-websocket-accept", HeaderValue::try_from(accept).expect("accept key is ASCII"));
    resp
}

/// Counts one open WebSocket until dropped (also when the task is aborted).
struct OpenWebSocket(Arc<State>);

impl OpenWebSocket {
    fn count(st: Arc<State>) -> Self {
        st.websockets.send_modify(|n| *n += 1);
        Self(st)
    }
}

impl Drop for OpenWebSocket {
    fn drop(&mut self) {
        self.0.websockets.send_modify(|n| *n -= 1);
    }
}

fn query_u64(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

// === misbehaving upstreams ===

/// A port held bound but not listening: connections to it are refused, and no other
/// socket can take it while this value lives.
pub struct Refused {
    addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

impl Refused {
    pub fn reserve() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(([127, 0, 0, 1], 0).into()).expect("bind");
        let addr = socket.local_addr().expect("address");
        Self { addr, _socket: socket }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// An upstream that answers every connection with bytes that are not HTTP, then closes.
pub async fn garbage_upstream() -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind garbage upstream");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"\x16\x03\x01 this is not HTTP at all\r\n\r\n").await;
                let _ = s.shutdown().await;
            });
        }
    });
    (url, task)
}

/// An address that accepts no connection: a listener that never calls `accept`, its
/// queue filled until a further connect hangs (the kernel drops the SYN). The address
/// stays a black hole while this value lives.
pub struct Blackhole {
    addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<tokio::net::TcpStream>,
}

impl Blackhole {
    pub async fn start() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(([127, 0, 0, 1], 0).into()).expect("bind blackhole");
        let listener = socket.listen(1).expect("listen");
        let addr = listener.local_addr().expect("address");
        let mut fillers = Vec::new();
        for _ in 0..16 {
            let attempt =
                tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr));
            match attempt.await {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(e)) => panic!("blackhole connect failed: {e}"),
                Err(_) => return Self { addr, _listener: listener, _fillers: fillers },
            }
        }
        panic!("the accept queue of {addr} never filled up");
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

// === bodies ===

const PATTERN_MOD: usize = 251;
const CHUNK: usize = 64 * 1024;

fn pattern_bytes() -> &'static Bytes {
    static BUF: OnceLock<Bytes> = OnceLock::new();
    BUF.get_or_init(|| (0..CHUNK + PATTERN_MOD).map(|i| (i % PATTERN_MOD) as u8).collect::<Vec<u8>>().into())
}

/// `n` bytes where byte `i` is `i % 251`, produced 64 KiB at a time, never held whole.
pub struct Pattern {
    sent: u64,
    total: u64,
}

impl Pattern {
    pub fn new(total: u64) -> Self {
        Self { sent: 0, total }
    }

    pub fn boxed_body(self) -> Body {
        BodyExt::map_err(self, |never| match never {}).boxed()
    }
}

impl hyper::body::Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let left = self.total - self.sent;
        if left == 0 {
            return Poll::Ready(None);
        }
        let n = left.min(CHUNK as u64) as usize;
        let start = (self.sent % PATTERN_MOD as u64) as usize;
        self.sent += n as u64;
        Poll::Ready(Some(Ok(Frame::data(pattern_bytes().slice(start..start + n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.total
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.total - self.sent)
    }
}

/// Checks bytes against [`Pattern`] output as they arrive, keeping only a count.
pub struct PatternCheck {
    pub len: u64,
    pub matches: bool,
}

impl Default for PatternCheck {
    fn default() -> Self {
        Self { len: 0, matches: true }
    }
}

impl PatternCheck {
    pub fn feed(&mut self, data: &[u8]) {
        for piece in data.chunks(CHUNK) {
            let start = (self.len % PATTERN_MOD as u64) as usize;
            if self.matches && piece != &pattern_bytes()[start..start + piece.len()] {
                self.matches = false;
            }
            self.len += piece.len() as u64;
        }
    }
}

/// Counts a body frame by frame, checking it is [`Pattern`] output; never buffers it.
/// Returns the byte count, or a description of the first mismatch or error.
pub async fn count_pattern<B>(body: B) -> Result<u64, String>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut body = body;
    let mut check = PatternCheck::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body error after {} bytes: {e}", check.len))?;
        if let Some(data) = frame.data_ref() {
            check.feed(data);
            if !check.matches {
                return Err(format!("body differs from the pattern before byte {}", check.len));
            }
        }
    }
    Ok(check.len)
}

/// A body fed by the test through a channel: each `send` becomes one frame.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

pub fn channel_body() -> (mpsc::Sender<Bytes>, ChannelBody) {
    let (tx, rx) = mpsc::channel(4);
    (tx, ChannelBody { rx })
}

impl ChannelBody {
    pub fn boxed_body(self) -> Body {
        BodyExt::map_err(self, |never| match never {}).boxed()
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}
