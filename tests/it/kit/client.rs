//! The client side: a request builder that opens a fresh connection per request,
//! whole answers, and raw TCP exchanges for what no well-behaved client would send.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::upstream::{full, Body, Echo};
use super::DEADLINE;

/// A request under construction; `send` opens a fresh connection for it.
pub struct Req {
    builder: http::request::Builder,
    body: Body,
}

pub fn get(url: impl AsRef<str>) -> Req {
    request("GET", url)
}

pub fn post(url: impl AsRef<str>, body: impl Into<Bytes>) -> Req {
    request("POST", url).body(body)
}

pub fn request(method: &str, url: impl AsRef<str>) -> Req {
    Req { builder: Request::builder().method(method).uri(url.as_ref()), body: full(Bytes::new()) }
}

impl Req {
    pub fn header(mut self, name: &str, value: impl AsRef<str>) -> Self {
        self.builder = self.builder.header(name, value.as_ref());
        self
    }

    /// `Authorization: Bearer TOKEN`.
    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", format!("Bearer {token}"))
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = full(body.into());
        self
    }

    /// A streamed body, e.g. `Pattern::new(n).boxed_body()` or a `channel_body()`.
    pub fn stream(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    pub fn into_request(self) -> Request<Body> {
        self.builder.body(self.body).expect("valid test request")
    }

    /// Sends and reads the whole answer; panics if that takes longer than [`DEADLINE`].
    pub async fn send(self) -> Reply {
        try_send(self).await.unwrap_or_else(|e| panic!("request failed: {e}"))
    }

    /// Sends and returns as soon as the response headers are in.
    pub async fn send_streaming(self) -> Response<Incoming> {
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http::<Body>();
        tokio::time::timeout(DEADLINE, client.request(self.into_request()))
            .await
            .expect("response headers within the deadline")
            .expect("request succeeds")
    }
}

/// Sends every request at once — each on its own task and connection, released
/// together by a barrier — and returns the answers in request order.
pub async fn send_together(reqs: Vec<Req>) -> Vec<Reply> {
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(reqs.len()));
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|req| {
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                req.send().await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

pub async fn try_send(req: Req) -> Result<Reply, String> {
    let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http::<Body>();
    let exchange = async {
        let resp = client.request(req.into_request()).await.map_err(|e| format!("{e:?}"))?;
        Reply::read(resp).await
    };
    tokio::time::timeout(DEADLINE, exchange).await.map_err(|_| "timed out".to_owned())?
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub async fn read<B>(resp: Response<B>) -> Result<Reply, String>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| format!("body: {e:?}"))?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {} {}", self.status, self.text()))
    }

    /// What the echo upstream received; panics if the answer is not from it.
    pub fn echo(&self) -> Echo {
        assert_eq!(self.status, StatusCode::OK, "expected the upstream's echo, got: {}", self.text());
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not an echo ({e}): {}", self.text()))
    }

    /// Asserts a proxy-made error: status, JSON `error` code and a description.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        let ct = self.header("content-type").unwrap_or_default();
        assert!(ct.starts_with("application/json"), "content-type {ct:?}");
        let json = self.json();
        assert_eq!(json["error"], code, "body: {json}");
        let desc = json["error_description"].as_str().unwrap_or_default();
        assert!(!desc.is_empty(), "error_description missing: {json}");
    }
}

// === raw TCP ===

/// What came back on a raw connection before it closed (or the read deadline passed).
#[derive(Debug)]
pub struct RawReply {
    pub bytes: Vec<u8>,
    /// The peer closed or reset the connection before the deadline.
    pub closed: bool,
}

impl RawReply {
    /// The status code of the first response, if one arrived.
    pub fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.bytes);
        text.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Writes `bytes` on a new connection (write errors are ignored: the server may close
/// early) and reads until the server closes, at most for `within`.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], within: Duration) -> RawReply {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    read_until_closed(&mut s, within).await
}

pub async fn read_until_closed(s: &mut TcpStream, within: Duration) -> RawReply {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return RawReply { bytes: out, closed: false },
            Ok(Ok(0) | Err(_)) => return RawReply { bytes: out, closed: true },
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Asserts the RFC 6750 refusal of a bad token: 401 `invalid_token`, with a
/// `WWW-Authenticate: Bearer realm="portcullis", error="invalid_token", error_description=…`.
pub fn assert_invalid_token(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 401, "{what}: {}", reply.text());
    reply.assert_error(401, "invalid_token");
    let www = reply.header("www-authenticate").unwrap_or_default();
    assert!(www.starts_with("Bearer realm=\"portcullis\""), "{what}: WWW-Authenticate {www:?}");
    assert!(www.contains("error=\"invalid_token\""), "{what}: WWW-Authenticate {www:?}");
    assert!(www.contains("error_description=\""), "{what}: WWW-Authenticate {www:?}");
}
