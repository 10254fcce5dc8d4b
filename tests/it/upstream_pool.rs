//! The keep-alive pool to HTTP/1.1 upstreams: sequential requests share one
//! upstream connection; a connection the upstream closed while it sat idle is
//! never used for a request (the next one opens a fresh connection and answers
//! 200, not 502); an upstream answering `Connection: close` gets a new
//! connection per request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::kit::*;

/// What the stub does after each answer.
#[derive(Clone, Copy, PartialEq)]
enum After {
    /// Waits for the next request on the same connection.
    KeepAlive,
    /// Closes the connection without saying so (as an idle timeout would).
    SilentClose,
    /// Says `Connection: close`, then closes.
    SaidClose,
}

/// A minimal HTTP/1.1 upstream for bodiless GETs that counts connections and
/// announces each connection it closed.
struct Stub {
    url: String,
    accepted: Arc<AtomicUsize>,
    closed: watch::Receiver<usize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Stub {
    async fn start(after: After) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let (closed_tx, closed) = watch::channel(0);
        let closed_tx = Arc::new(closed_tx);
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while let Ok(n @ 1..) = s.read(&mut chunk).await {
                        buf.extend_from_slice(&chunk[..n]);
                        // Each request ends at its blank line (GETs without a body).
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let close = if after == After::SaidClose { "Connection: close\r\n" } else { "" };
                            let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{close}\r\nok");
                            if s.write_all(answer.as_bytes()).await.is_err() || after != After::KeepAlive {
                                let _ = s.shutdown().await;
                                drop(s);
                                closed_tx.send_modify(|n| *n += 1);
                                return;
                            }
                        }
                    }
                    closed_tx.send_modify(|n| *n += 1);
                });
            }
        });
        Stub { url, accepted, closed, _task: task }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    async fn wait_closed(&mut self, n: usize) {
        tokio::time::timeout(DEADLINE, self.closed.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("the stub never closed {n} connections"))
            .unwrap();
    }
}

async fn proxy_to(stub: &Stub) -> Proxy {
    Proxy::start(&format!("[[routes]]\nname = \"open\"\nupstream = \"{}\"\nauth = \"none\"\n", stub.url))
        .await
}

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let stub = Stub::start(After::KeepAlive).await;
    let proxy = proxy_to(&stub).await;
    // One client connection: one worker, whose pool the requests share.
    let tcp = tokio::net::TcpStream::connect(proxy.http_addr()).await.unwrap();
    let (mut client, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    for i in 0..20 {
        let req = hyper::Request::get("/x")
            .header("host", proxy.http_addr().to_string())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let r = client.send_request(req).await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        let body = http_body_util::BodyExt::collect(r.into_body()).await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }
    assert_eq!(stub.accepted(), 1, "twenty requests in turn, one upstream connection");
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_used_again() {
    let mut stub = Stub::start(After::SilentClose).await;
    let proxy = proxy_to(&stub).await;
    for i in 1..=5 {
        let r = get(proxy.url("/x")).send().await;
        assert_eq!(r.status, 200, "request {i} after the upstream closed the last connection: {}", r.text());
        stub.wait_closed(i).await;
    }
    assert_eq!(stub.accepted(), 5);
}

#[tokio::test]
async fn an_upstream_saying_connection_close_gets_a_connection_per_request() {
    let stub = Stub::start(After::SaidClose).await;
    let proxy = proxy_to(&stub).await;
    for i in 0..5 {
        assert_eq!(get(proxy.url("/x")).send().await.status, 200, "request {i}");
    }
    assert_eq!(stub.accepted(), 5);
}
