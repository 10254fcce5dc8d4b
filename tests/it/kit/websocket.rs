//! A WebSocket client through any running instance, as a browser or a script
//! opens one: the handshake with the test's headers, echo round trips, and the
//! end of the tunnel as the client sees it.
//!
//! ```ignore
//! let mut ws = WebSocket::open(&proxy, "/api/ws", &[("authorization", &bearer)]).await.expect("101");
//! ws.assert_echoes("hello").await;
//! let took = ws.assert_dropped(Duration::from_secs(3), "after the revocation").await;
//! ```

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::HeaderValue;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::WebSocketStream;

use super::client::Reply;
use super::proxy::Instance;
use super::DEADLINE;

/// An answer other than `101` to a WebSocket handshake.
#[derive(Debug)]
pub struct Rejected {
    pub status: u16,
    pub body: String,
}

impl Rejected {
    /// Asserts the proxy's JSON error: `status` and `{"error": code}`.
    pub fn assert_error(&self, status: u16, code: &str, what: &str) {
        assert_eq!(self.status, status, "{what}: {}", self.body);
        let json: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{what}: the body is not JSON ({e}): {}", self.body));
        assert_eq!(json["error"], code, "{what}: {}", self.body);
    }
}

/// An open WebSocket through the proxy.
pub struct WebSocket {
    /// The `101` answer (its `Set-Cookie`s, when the handshake refreshed the session).
    pub handshake: Reply,
    ws: WebSocketStream<TcpStream>,
    sent: u64,
}

impl WebSocket {
    /// Opens `ws://` + the instance's HTTP listener + `path`, with `headers` added to the
    /// handshake (no `Origin` unless given). `Err` carries any answer but `101`.
    pub async fn open(p: &impl Instance, path: &str, headers: &[(&str, &str)]) -> Result<Self, Rejected> {
        let authority = p.http_url().strip_prefix("http://").expect("a plain-HTTP listener").to_owned();
        let mut req = format!("ws://{authority}{path}").into_client_request().expect("a WebSocket URL");
        for (name, value) in headers {
            let name = http::HeaderName::from_bytes(name.as_bytes()).expect("a header name");
            req.headers_mut().append(name, HeaderValue::from_str(value).expect("a header value"));
        }
        let tcp = TcpStream::connect(&authority).await.expect("connect to the proxy");
        let Ok(handshake) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(req, tcp)).await
        else {
            panic!("no answer to the WebSocket handshake on {path} within {DEADLINE:?}");
        };
        match handshake {
            Ok((ws, resp)) => {
                assert_eq!(resp.status(), 101);
                let handshake = Reply {
                    status: resp.status(),
                    headers: resp.headers().clone(),
                    body: Default::default(),
                };
                Ok(Self { handshake, ws, sent: 0 })
            }
            Err(Error::Http(resp)) => Err(Rejected {
                status: resp.status().as_u16(),
                body: String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
            }),
            Err(e) => panic!("WebSocket handshake on {path} failed: {e}"),
        }
    }

    /// Sends a text message and asserts the upstream echoes it back.
    pub async fn assert_echoes(&mut self, what: &str) {
        self.sent += 1;
        let msg = Message::text(format!("{what} #{}", self.sent));
        self.ws.send(msg.clone()).await.unwrap_or_else(|e| panic!("{what}: send over the tunnel: {e}"));
        let back = tokio::time::timeout(DEADLINE, self.ws.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: no echo within {DEADLINE:?}"));
        match back {
            Some(Ok(m)) => assert_eq!(m, msg, "{what}"),
            Some(Err(e)) => panic!("{what}: the tunnel failed instead of echoing: {e}"),
            None => panic!("{what}: the tunnel closed instead of echoing"),
        }
    }

    /// Ends the WebSocket from the client's side: a close frame, the upstream's answer.
    pub async fn close(mut self, what: &str) {
        self.ws.close(None).await.unwrap_or_else(|e| panic!("{what}: close: {e}"));
        let end = async { while let Some(Ok(_)) = self.ws.next().await {} };
        tokio::time::timeout(DEADLINE, end)
            .await
            .unwrap_or_else(|_| panic!("{what}: the closing handshake did not end within {DEADLINE:?}"));
    }

    /// Waits until the proxy drops the client's TCP connection — SPEC §4 closes a
    /// tunnel by closing both connections and names no WebSocket close code — and returns
    /// how long that took; fails if it takes longer than `within` or if anything
    /// else (a message, a close frame) arrives first.
    pub async fn assert_dropped(&mut self, within: Duration, what: &str) -> Duration {
        let start = Instant::now();
        let next = tokio::time::timeout(within, self.ws.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: the tunnel is still open after {within:?}"));
        let took = start.elapsed();
        match next {
            // EOF without a closing handshake, or a reset: the TCP connection ended.
            None | Some(Err(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {}
            Some(Err(Error::Io(e)))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::UnexpectedEof
                ) => {}
            Some(Ok(m)) => panic!("{what}: expected the connection to end, got a message: {m:?}"),
            Some(Err(e)) => panic!("{what}: expected the connection to end, got: {e}"),
        }
        took
    }
}
