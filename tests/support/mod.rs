//! Test support: start portcullis from a TOML string on `127.0.0.1:0` (in process,
//! or the real binary), talk to it over real sockets, and wait on events or poll
//! with a deadline — never sleep and hope.
//!
//! ```ignore
//! let up = Upstream::start().await;
//! let proxy = Proxy::start(&format!(r#"
//!     [[routes]]
//!     name = "api"
//!     upstream = "{}"
//! "#, up.url())).await;
//! let reply = get(proxy.url("/x")).header("x-auth-subject", "spoof").send().await;
//! assert!(!reply.echo().has_header("x-auth-subject"));
//! ```
// Helpers panic with a message on purpose: a broken fixture is a failed test.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

pub mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

pub use upstream::{
    channel_body, count_pattern, full, garbage_upstream, Blackhole, Body, Echo, Pattern, PatternCheck,
    Refused, Upstream,
};

/// How long any single wait in a test may take before it fails loudly.
pub const DEADLINE: Duration = Duration::from_secs(15);

// === TempDir ===

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let name =
            format!("portcullis-test-{}-{}-{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `text` to `name` inside the directory and returns the full path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A port that was free a moment ago (bind `127.0.0.1:0`, read it, release it).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind for a free port");
    l.local_addr().expect("local address").port()
}

/// Polls `check` every 20 ms until it returns true; panics naming `what` after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === Proxy (in process) ===

/// portcullis running in this process on `127.0.0.1:0`. Without a `[listen]` table the
/// config gets `http` and `admin` listeners on port 0. Dropping it stops the server.
pub struct Proxy {
    addrs: portcullis::Addrs,
    shared: Arc<portcullis::state::Shared>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(toml: &str) -> Self {
        Self::start_with(toml, &HashMap::new(), Path::new(".")).await
    }

    /// `env` answers `*_env` keys; relative file paths resolve against `base_dir`.
    pub async fn start_with(toml: &str, env: &HashMap<String, String>, base_dir: &Path) -> Self {
        let text = with_default_listen(toml);
        let config = portcullis::config::from_toml(&text, "test.toml", base_dir, env)
            .unwrap_or_else(|e| panic!("the test configuration is invalid:\n{e}\n--- config ---\n{text}"));
        let server = portcullis::Server::bind(config).await.expect("proxy binds its listeners");
        let addrs = server.addrs();
        let shared = server.shared();
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Self { addrs, shared, stop: Some(tx), done: Some(done) }
    }

    /// The server's shared state, e.g. for `portcullis::reload::reload(proxy.shared(), path)`.
    pub fn shared(&self) -> &portcullis::state::Shared {
        &self.shared
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.addrs.http.expect("config has listen.http")
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.addrs.https.expect("config has listen.https")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs.admin.expect("config has listen.admin")
    }

    /// `http://127.0.0.1:PORT`
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr())
    }

    /// `http://127.0.0.1:PORT` + `path`
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.http_url())
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr())
    }

    /// Starts the graceful shutdown; the handle resolves when `Server::run` returned.
    pub fn begin_shutdown(&mut self) -> JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.done.take().expect("shutdown begun only once")
    }

    /// Stops accepting, drains, and waits until the server has returned.
    pub async fn shutdown(mut self) {
        let done = self.begin_shutdown();
        tokio::time::timeout(Duration::from_secs(60), done)
            .await
            .expect("server stops within 60 s")
            .expect("server task did not panic");
    }
}

fn with_default_listen(toml: &str) -> String {
    if toml.contains("[listen]") {
        toml.to_owned()
    } else {
        format!("[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n{toml}")
    }
}

// === ProxyProcess (the real binary) ===

/// `portcullis run` as a child process, on fixed ports found free just before, with
/// its stderr captured in a file. Killed on drop if still running.
pub struct ProxyProcess {
    child: tokio::process::Child,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    dir: TempDir,
}

impl ProxyProcess {
    /// `toml` must not have a `[listen]` table; one is added. Waits until `/healthz` answers.
    pub async fn start(toml: &str) -> Self {
        Self::start_with_env(toml, &[]).await
    }

    /// Like `start`, with extra environment variables (e.g. for `*_env` keys, `PORTCULLIS_LOG`).
    pub async fn start_with_env(toml: &str, env: &[(&str, &str)]) -> Self {
        // A port found free can be taken by someone else before the child binds it
        // (outgoing connections draw from the same range): then try other ports.
        for _ in 0..5 {
            if let Some(p) = Self::try_start(toml, env).await {
                return p;
            }
        }
        panic!("portcullis could not bind free ports in 5 attempts");
    }

    /// The configuration file the process runs on.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("portcullis.toml")
    }

    /// Replaces the configuration file (keeping the `[listen]` table), atomically by rename.
    pub fn rewrite_config(&self, toml: &str) {
        let text = format!("[listen]\nhttp = \"{}\"\nadmin = \"{}\"\n\n{toml}", self.http, self.admin);
        let tmp = self.dir.write("portcullis.toml.new", &text);
        std::fs::rename(tmp, self.config_path()).expect("replace config");
    }

    /// `None` if a listener's port was taken meanwhile.
    async fn try_start(toml: &str, env: &[(&str, &str)]) -> Option<Self> {
        let dir = TempDir::new();
        let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let text = format!("[listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n{toml}");
        let config = dir.write("portcullis.toml", &text);
        let log = std::fs::File::create(dir.path().join("stderr.log")).expect("create log file");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .envs(env.iter().copied())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn portcullis");
        let mut p = Self { child, http, admin, dir };
        let healthz = format!("http://{admin}/healthz");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                let log = p.log();
                if log.contains("Address already in use") {
                    return None;
                }
                panic!("portcullis exited early with {status}; log:\n{log}");
            }
            if try_send(get(&healthz)).await.is_ok_and(|r| r.status == StatusCode::OK) {
                return Some(p);
            }
            assert!(start.elapsed() < DEADLINE, "portcullis did not answer /healthz; log:\n{}", p.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("child still running")
    }

    /// Sends a signal with the `kill` command, e.g. `"TERM"`.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait for portcullis"),
            Err(_) => panic!("portcullis did not exit within {within:?}; log:\n{}", self.log()),
        }
    }

    /// Peak resident memory of the process so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("read /proc status");
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM line");
        let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmHWM value");
        kib * 1024
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

/// The result of a finished `portcullis` command.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary with `args` to completion; kills it and panics after [`DEADLINE`].
pub fn portcullis(args: &[&str]) -> Finished {
    let dir = TempDir::new();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("spawn portcullis");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for portcullis") {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("portcullis {args:?} still running after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    Finished { code: status.code(), stdout: read(&out), stderr: read(&err) }
}

// === HTTP client ===

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

// === TLS ===

/// A private CA made with rcgen for one test.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A leaf certificate issued by a [`TestCa`].
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: rustls_pki_types::CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "portcullis test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-sign CA");
        Self { cert, key }
    }

    /// A leaf for `names` (DNS names), signed by this CA.
    pub fn issue(&self, names: &[&str]) -> Leaf {
        use rcgen::{CertificateParams, DnType, KeyPair};
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign leaf");
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
    }

    /// A rustls client that trusts only this CA and offers `alpn` (e.g. `["h2"]`).
    pub fn client_config(&self, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("add CA root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(cfg)
    }
}

impl Leaf {
    /// Writes `STEM.pem` and `STEM.key` into `dir`; returns both paths as TOML-ready strings.
    pub fn write_to(&self, dir: &TempDir, stem: &str) -> (String, String) {
        let cert = dir.write(&format!("{stem}.pem"), &self.cert_pem);
        let key = dir.write(&format!("{stem}.key"), &self.key_pem);
        (cert.display().to_string(), key.display().to_string())
    }
}

/// Connects with TLS, sending `sni` as the server name.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).expect("valid server name");
    tokio::time::timeout(DEADLINE, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// The ALPN protocol the server chose.
pub fn alpn(stream: &TlsStream<TcpStream>) -> Option<String> {
    stream.get_ref().1.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned())
}

/// The leaf certificate the server presented.
pub fn presented_leaf(stream: &TlsStream<TcpStream>) -> rustls_pki_types::CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().and_then(|c| c.first()).expect("server sent a certificate").clone()
}

/// Sends one request on an established TLS stream, in HTTP/2 if ALPN chose `h2`,
/// else HTTP/1.1, and reads the whole answer.
pub async fn send_over(stream: TlsStream<TcpStream>, mut req: Request<Body>) -> Reply {
    let io = TokioIo::new(stream);
    // A connection-level HTTP/1.1 client writes no Host of its own; every HTTP/1.1 request needs one.
    if let Some(a) = req.uri().authority().map(|a| a.to_string()) {
        req.headers_mut().entry(http::header::HOST).or_insert(a.parse().expect("authority as Host"));
    }
    let h2 = io.inner().get_ref().1.alpn_protocol() == Some(b"h2");
    let exchange = async {
        let resp = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("h2 handshake");
            tokio::spawn(conn);
            sender.send_request(req).await.expect("h2 request")
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.expect("h1 handshake");
            tokio::spawn(conn);
            sender.send_request(req).await.expect("h1 request")
        };
        Reply::read(resp).await.expect("read response")
    };
    tokio::time::timeout(DEADLINE, exchange).await.expect("TLS exchange within the deadline")
}
