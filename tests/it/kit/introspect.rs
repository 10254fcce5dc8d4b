//! A test RFC 7662 introspection endpoint on `127.0.0.1:0`: it answers each POST
//! from a table of token → answer that a test changes at runtime (an unknown token
//! is `{"active": false}`), records every call (the token, the whole form, the
//! `Authorization` header it came with, when it arrived), and goes down on demand:
//! refusing connections ([`IntrospectionServer::stop`]), answering 503, answering
//! too slowly, hanging up without an answer, or answering garbage ([`Down`]). It
//! can also hold every answer until the test releases it
//! ([`IntrospectionServer::hold`]), so concurrent requests pile up on one call.
//!
//! ```ignore
//! let ins = IntrospectionServer::start().await;
//! let token = opaque_token();
//! ins.set(&token, active("carol", 300));
//! let toml = Config::new().table(ins.issuer_table("legacy", r#"cache = "1s""#)).raw(ROUTE).toml();
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::config::Table;
use super::idp::{now, AUDIENCE};

/// The `issuer` of the introspecting issuer (opaque tokens carry no `iss` of their own).
pub const ISSUER: &str = "https://legacy-id.example.com";
/// The client the proxy authenticates as at the introspection endpoint.
pub const CLIENT_ID: &str = "edge-introspect";
/// Its secret, in the `INTROSPECTION_SECRET` variable of the proxy's environment.
pub const CLIENT_SECRET: &str = "intro-s3cret+/=&";
/// The variable [`IntrospectionServer::issuer_table`] names in `client_secret_env`.
pub const SECRET_ENV: &str = "INTROSPECTION_SECRET";

/// A fresh opaque token: no dots (so not a JWT), unique within the test process.
pub fn opaque_token() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("opq_{nanos:08x}{:06x}_Zk9", N.fetch_add(1, Ordering::Relaxed))
}

/// An active answer for `sub`: audience [`AUDIENCE`], scopes `orders:read
/// orders:write`, `exp` in `ttl` seconds, issued 10 s ago, with `username` and
/// `client_id` members.
pub fn active(sub: &str, ttl: i64) -> Value {
    let n = now();
    json!({
        "active": true, "sub": sub, "username": format!("{sub}-name"), "client_id": "legacy-spa",
        "scope": "orders:read orders:write", "aud": AUDIENCE, "exp": n + ttl, "iat": n - 10,
        "token_type": "Bearer",
    })
}

/// How the endpoint misbehaves; [`Down::No`] answers from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    No,
    /// `503 Service Unavailable`.
    Unavailable,
    /// Waits this long before answering from the table.
    Slow(Duration),
    /// Reads the request and closes the connection without an answer.
    Hangup,
    /// `200` with a body that is not JSON.
    Garbage,
}

/// One introspection request as the endpoint received it.
#[derive(Debug, Clone)]
pub struct Call {
    /// The `token` form member.
    pub token: String,
    /// Every form member (decoded).
    pub form: HashMap<String, String>,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub method: String,
    pub at: Instant,
}

struct Inner {
    answers: HashMap<String, Value>,
    down: Down,
    calls: Vec<Call>,
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    /// The number of calls so far, to wait on.
    count: watch::Sender<usize>,
    /// `false` while answers are held.
    open: watch::Sender<bool>,
}

/// Sets the endpoint's answers; see [`IntrospectionServer::answers`].
#[derive(Clone)]
pub struct Answers(Arc<Mutex<Inner>>);

impl Answers {
    pub fn set(&self, token: &str, answer: Value) {
        self.0.lock().unwrap().answers.insert(token.to_owned(), answer);
    }
}

pub struct IntrospectionServer {
    pub addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for IntrospectionServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl IntrospectionServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind introspection server");
        let addr = listener.local_addr().expect("introspection server address");
        let shared = Shared {
            inner: Arc::new(Mutex::new(Inner { answers: HashMap::new(), down: Down::No, calls: Vec::new() })),
            count: watch::channel(0).0,
            open: watch::channel(true).0,
        };
        let server = shared.clone();
        let task = super::serve::accept_loop(listener, move |stream| {
            let server = server.clone();
            async move {
                let svc = hyper::service::service_fn(move |req| {
                    let server = server.clone();
                    async move { server.handle(req).await }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        });
        Self { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT/introspect`
    pub fn url(&self) -> String {
        format!("http://{}/introspect", self.addr)
    }

    /// `[[issuers]]` `name` with `issuer` [`ISSUER`] and an `introspection` table for
    /// this endpoint, client [`CLIENT_ID`] with its secret in [`SECRET_ENV`];
    /// `extra` adds inline members, e.g. `client_auth = "client_secret_post", cache = "1s"`.
    pub fn issuer_table(&self, name: &str, extra: &str) -> Table {
        let mut members = format!(
            r#"url = "{}", client_id = "{CLIENT_ID}", client_secret_env = "{SECRET_ENV}""#,
            self.url()
        );
        if !extra.trim().is_empty() {
            members.push_str(", ");
            members.push_str(extra);
        }
        Table::new("[[issuers]]")
            .set("name", name)
            .set("issuer", ISSUER)
            .lines(&format!("introspection = {{ {members} }}"))
    }

    /// Answers `answer` for `token` from now on (rotating an earlier answer).
    pub fn set(&self, token: &str, answer: Value) {
        self.shared.inner.lock().unwrap().answers.insert(token.to_owned(), answer);
    }

    /// A handle that sets answers from elsewhere (e.g. the test IdP as it issues tokens).
    pub fn answers(&self) -> Answers {
        Answers(self.shared.inner.clone())
    }

    /// Forgets `token`: it is inactive from now on.
    pub fn forget(&self, token: &str) {
        self.shared.inner.lock().unwrap().answers.remove(token);
    }

    /// How the endpoint behaves from now on.
    pub fn set_down(&self, down: Down) {
        self.shared.inner.lock().unwrap().down = down;
    }

    /// Closes the listener and every open connection (the proxy's pooled ones too):
    /// from now on connections are refused.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Holds every answer (calls are still recorded on arrival) until [`Self::release`].
    pub fn hold(&self) {
        self.shared.open.send_replace(false);
    }

    pub fn release(&self) {
        self.shared.open.send_replace(true);
    }

    /// Calls received so far, whatever was answered.
    pub fn calls(&self) -> usize {
        self.shared.inner.lock().unwrap().calls.len()
    }

    /// Calls received so far for `token`.
    pub fn calls_for(&self, token: &str) -> usize {
        self.shared.inner.lock().unwrap().calls.iter().filter(|c| c.token == token).count()
    }

    /// Every call, in arrival order.
    pub fn log(&self) -> Vec<Call> {
        self.shared.inner.lock().unwrap().calls.clone()
    }

    /// The latest call; panics if there was none.
    pub fn last(&self) -> Call {
        self.shared.inner.lock().unwrap().calls.last().cloned().expect("at least one introspection call")
    }

    /// Waits (at most [`super::DEADLINE`]) until `n` calls have arrived.
    pub async fn wait_for_calls(&self, n: usize) {
        let mut rx = self.shared.count.subscribe();
        tokio::time::timeout(super::DEADLINE, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} introspection calls arrived ({} did)", self.calls()))
            .expect("introspection server alive");
    }
}

fn json_resp(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    r
}

impl Shared {
    async fn handle(
        &self,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Full<Bytes>>, std::io::Error> {
        let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let (authorization, content_type) = (header("authorization"), header("content-type"));
        let method = req.method().to_string();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
        let token = form.get("token").cloned().unwrap_or_default();
        let (down, answer) = {
            let mut g = self.inner.lock().unwrap();
            g.calls.push(Call {
                token: token.clone(),
                form,
                authorization,
                content_type,
                method,
                at: Instant::now(),
            });
            let answer = g.answers.get(&token).cloned().unwrap_or_else(|| json!({"active": false}));
            (g.down, answer)
        };
        self.count.send_modify(|n| *n += 1);
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|o| *o).await;
        match down {
            Down::No => {}
            Down::Unavailable => {
                return Ok(json_resp(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"down"}"#.into()))
            }
            Down::Slow(d) => tokio::time::sleep(d).await,
            // An error from the service makes hyper drop the connection unanswered.
            Down::Hangup => return Err(std::io::Error::other("hang up")),
            Down::Garbage => return Ok(json_resp(StatusCode::OK, "<html>not an answer".into())),
        }
        Ok(json_resp(StatusCode::OK, answer.to_string()))
    }
}
