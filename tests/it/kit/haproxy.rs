//! A real HAProxy for the rollout tests: `examples/rollout/haproxy.cfg` with its
//! placeholders filled in, run in the foreground as the current user from a temp
//! dir, killed on drop; its runtime API (`show stat`) read over the stats socket.
//!
//! The tests need Debian's `haproxy` (`apt-get install -y haproxy`); without it
//! they fail with that advice rather than skip.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{stable_port, TempDir, DEADLINE};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/rollout/haproxy.cfg");

/// `haproxy` on the `PATH`, else Debian's `/usr/sbin/haproxy` (a user's `PATH`
/// often lacks `/usr/sbin`).
fn binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("haproxy")).find(|b| b.is_file()));
    on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"))
}

/// One `show stat` row: column name (`svname`, `status`, `econ`, …) to value.
pub type StatRow = HashMap<String, String>;

pub struct Haproxy {
    child: tokio::process::Child,
    port: u16,
    socket: PathBuf,
    dir: TempDir,
}

impl Haproxy {
    /// The example configuration in front of `backends`, each `(http port, admin
    /// port)` of one instance, as `app1`, `app2`, …; waits until the runtime API
    /// answers and every server has passed a health check.
    pub async fn start(backends: &[(u16, u16)]) -> Self {
        let template = std::fs::read_to_string(EXAMPLE).expect("read examples/rollout/haproxy.cfg");
        for _ in 0..5 {
            if let Some(h) = Self::try_start(&template, backends).await {
                h.wait_all_up().await;
                return h;
            }
        }
        panic!("haproxy could not bind a free port in 5 attempts");
    }

    /// `None` if the frontend's port was taken meanwhile.
    async fn try_start(template: &str, backends: &[(u16, u16)]) -> Option<Self> {
        let dir = TempDir::new();
        let port = stable_port();
        let socket = dir.path().join("haproxy.sock");
        let mut vars = vec![("LB_PORT".to_owned(), port.to_string())];
        vars.push(("STATS_SOCKET".to_owned(), socket.display().to_string()));
        for (i, (http, admin)) in backends.iter().enumerate() {
            vars.push((format!("APP{}_PORT", i + 1), http.to_string()));
            vars.push((format!("APP{}_ADMIN_PORT", i + 1), admin.to_string()));
        }
        let mut text = template.to_owned();
        for (name, value) in &vars {
            text = text.replace(&format!("${{{name}}}"), value);
        }
        let left: Vec<&str> =
            text.lines().filter(|l| !l.trim_start().starts_with('#') && l.contains("${")).collect();
        assert!(left.is_empty(), "placeholders the test does not fill: {left:?}");
        let config = dir.write("haproxy.cfg", &text);
        let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("create haproxy log");
        let log2 = log.try_clone().expect("clone haproxy log");
        let child = tokio::process::Command::new(binary())
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `haproxy` ({e}). The rollout tests need a real HAProxy: \
                     install it with `apt-get install -y haproxy` (Debian/Ubuntu)."
                )
            });
        let mut h = Self { child, port, socket, dir };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = h.child.try_wait() {
                let log = h.log();
                if log.contains("cannot bind socket") {
                    return None;
                }
                panic!("haproxy exited early with {status}; log:\n{log}");
            }
            if h.try_stats().await.is_some() {
                return Some(h);
            }
            assert!(start.elapsed() < DEADLINE, "haproxy's stats socket did not answer; log:\n{}", h.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://127.0.0.1:PORT` + `path`, through the balancer.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Everything HAProxy logged so far (alerts, and the requests that went wrong).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    async fn try_stats(&self) -> Option<Vec<StatRow>> {
        let ask = async {
            let mut s = tokio::net::UnixStream::connect(&self.socket).await.ok()?;
            s.write_all(b"show stat\n").await.ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).await.ok()?;
            Some(out)
        };
        let csv = tokio::time::timeout(Duration::from_secs(2), ask).await.ok()??;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next()?.strip_prefix("# ")?.split(',').collect();
        let rows = lines
            .filter(|l| !l.is_empty())
            .map(|l| header.iter().zip(l.split(',')).map(|(k, v)| ((*k).to_owned(), v.to_owned())).collect())
            .collect();
        Some(rows)
    }

    /// `show stat`, every proxy, frontend, server and backend row.
    pub async fn stats(&self) -> Vec<StatRow> {
        self.try_stats()
            .await
            .unwrap_or_else(|| panic!("haproxy's stats socket did not answer; log:\n{}", self.log()))
    }

    /// The row of server `name` (`app1`, …) in the `portcullis` backend.
    pub async fn server(&self, name: &str) -> StatRow {
        self.stats()
            .await
            .into_iter()
            .find(|r| r["pxname"] == "portcullis" && r["svname"] == name)
            .unwrap_or_else(|| panic!("haproxy has no server {name}"))
    }

    /// Waits until HAProxy's health checks call server `name` `status` (`UP`, `DOWN`).
    pub async fn wait_status(&self, name: &str, status: &str, within: Duration) {
        let start = Instant::now();
        loop {
            let row = self.server(name).await;
            if row["status"] == status {
                return;
            }
            assert!(
                start.elapsed() < within,
                "haproxy did not see {name} {status} within {within:?}: {row:?}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_all_up(&self) {
        let start = Instant::now();
        loop {
            let servers: Vec<StatRow> = self
                .stats()
                .await
                .into_iter()
                .filter(|r| r["pxname"] == "portcullis" && r["type"] == "2")
                .collect();
            // L7OK: a check has actually passed, not just the initial state.
            if !servers.is_empty()
                && servers.iter().all(|r| r["status"] == "UP" && r["check_status"] == "L7OK")
            {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "haproxy's servers did not come up: {servers:?}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
