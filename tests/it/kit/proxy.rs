//! portcullis under test: in this process ([`Proxy`]) or as the real binary
//! ([`ProxyProcess`], [`portcullis`]), and what every running instance answers on its
//! admin listener.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::client::{get, post, try_send, Reply};
use super::metrics::metric;
use super::{eventually, free_port, TempDir, DEADLINE};

// === any running instance ===

/// Where a running portcullis answers: a [`Proxy`], a [`ProxyProcess`], or any handle
/// on one (the fleet suite's nodes).
pub trait Instance {
    /// `http://127.0.0.1:PORT` of the plain-HTTP listener: also the proxy's own origin.
    fn http_url(&self) -> String;

    /// `http://127.0.0.1:PORT` of the admin listener.
    fn admin_url(&self) -> String;

    /// `http://127.0.0.1:PORT` + `path`
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.http_url())
    }
}

impl<T: Instance + ?Sized> Instance for &T {
    fn http_url(&self) -> String {
        (**self).http_url()
    }

    fn admin_url(&self) -> String {
        (**self).admin_url()
    }
}

/// `GET /readyz` on the admin listener.
pub async fn readyz(p: &impl Instance) -> Reply {
    get(format!("{}/readyz", p.admin_url())).send().await
}

/// Waits until `/readyz` answers 200: every issuer's keys (and, with `[state]`, the
/// shared revocation list) are loaded.
pub async fn wait_ready(p: &impl Instance) {
    let url = format!("{}/readyz", p.admin_url());
    let what = format!("{url} answers 200");
    eventually(&what, DEADLINE, || async { try_send(get(&url)).await.is_ok_and(|r| r.status == 200) }).await;
}

/// `POST /revocations` with `entry` as JSON.
pub async fn revoke(p: &impl Instance, entry: &Value) -> Reply {
    post(format!("{}/revocations", p.admin_url()), entry.to_string())
        .header("content-type", "application/json")
        .send()
        .await
}

/// `GET /revocations`: every entry the instance holds.
pub async fn revocations(p: &impl Instance) -> Vec<Value> {
    let reply = get(format!("{}/revocations", p.admin_url())).send().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json().as_array().expect("GET /revocations answers a JSON array").clone()
}

// === Proxy (in process) ===

/// portcullis running in this process on `127.0.0.1:0`. Without a `[listen]` table the
/// config gets `http` and `admin` listeners on port 0. Dropping it stops the server.
pub struct Proxy {
    addrs: portcullis::Addrs,
    runtime: Arc<portcullis::Runtime>,
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
        let runtime = server.runtime();
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Self { addrs, runtime, stop: Some(tx), done: Some(done) }
    }

    /// The server's runtime, e.g. for `portcullis::reload::reload(proxy.runtime(), path)`.
    pub fn runtime(&self) -> &portcullis::Runtime {
        &self.runtime
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

    pub fn forward_auth_addr(&self) -> SocketAddr {
        self.addrs.forward_auth.expect("config has [forward_auth] listen")
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

impl Instance for Proxy {
    fn http_url(&self) -> String {
        format!("http://{}", self.http_addr())
    }

    fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr())
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
/// its stderr captured in a file (so a test can read everything it logged, at the
/// level its `PORTCULLIS_LOG` asks for). Killed on drop if still running.
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
        Self::start_picking(toml, env, free_port).await
    }

    /// Like `start_with_env`, on ports drawn by `pick` (e.g. [`stable_port`](super::stable_port)).
    pub async fn start_picking(toml: &str, env: &[(&str, &str)], pick: fn() -> u16) -> Self {
        // A port found free can be taken by someone else before the child binds it
        // (outgoing connections draw from the same range): then try other ports.
        for _ in 0..5 {
            let http: SocketAddr = ([127, 0, 0, 1], pick()).into();
            let admin: SocketAddr = ([127, 0, 0, 1], pick()).into();
            if let Some(p) = Self::try_start(http, admin, toml, env).await {
                return p;
            }
        }
        panic!("portcullis could not bind free ports in 5 attempts");
    }

    /// On the given addresses, e.g. a replacement taking over the ports of an
    /// instance that just exited; retries while they are still held, up to [`DEADLINE`].
    pub async fn start_on(http: SocketAddr, admin: SocketAddr, toml: &str, env: &[(&str, &str)]) -> Self {
        let start = Instant::now();
        loop {
            if let Some(p) = Self::try_start(http, admin, toml, env).await {
                return p;
            }
            assert!(start.elapsed() < DEADLINE, "portcullis could not bind {http} and {admin} again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

    /// Rewrites the configuration, sends SIGHUP, and waits until one more reload succeeded.
    pub async fn reload(&self, toml: &str) {
        let ok = "portcullis_config_reloads_total{outcome=\"ok\"}";
        let before = metric(self, ok).await;
        self.rewrite_config(toml);
        self.signal("HUP");
        eventually("the configuration reloaded", DEADLINE, || async { metric(self, ok).await > before })
            .await;
    }

    /// `None` if a listener's port was taken meanwhile.
    async fn try_start(
        http: SocketAddr,
        admin: SocketAddr,
        toml: &str,
        env: &[(&str, &str)],
    ) -> Option<Self> {
        let dir = TempDir::new();
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

impl Instance for ProxyProcess {
    fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }
}

// === one command to completion ===

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
