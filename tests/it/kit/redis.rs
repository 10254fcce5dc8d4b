//! A throwaway `redis-server` for the fleet tests: a child process on a free
//! loopback port, no persistence, killed on drop. (The module is private to the
//! kit, re-exported by name, so that it never shadows the `redis` crate.)
//!
//! The tests need Debian's `redis-server` (`apt-get install -y redis-server`);
//! without it they fail with that advice rather than skip.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, TempDir, DEADLINE};

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl RedisServer {
    /// A fresh, empty server on a free port; waits until it answers `PING`.
    pub async fn start() -> Self {
        // A port found free can be taken before redis-server binds it: try others.
        for _ in 0..5 {
            if let Some(s) = Self::try_start(free_port()).await {
                return s;
            }
        }
        panic!("redis-server could not bind a free port in 5 attempts");
    }

    /// A fresh, empty server on `port` (a restart after [`stop`](Self::stop)); retries
    /// while the port is still held, up to [`DEADLINE`].
    pub async fn start_on(port: u16) -> Self {
        let start = Instant::now();
        loop {
            if let Some(s) = Self::try_start(port).await {
                return s;
            }
            assert!(start.elapsed() < DEADLINE, "redis-server could not bind port {port} again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `None` if the port was in use.
    async fn try_start(port: u16) -> Option<Self> {
        let dir = TempDir::new();
        let log_path = dir.path().join("redis.log");
        let log = std::fs::File::create(&log_path).expect("create redis log file");
        let log2 = log.try_clone().expect("clone redis log file");
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `redis-server` ({e}). The fleet tests need a real Redis: \
                     install it with `apt-get install -y redis-server` (Debian/Ubuntu)."
                )
            });
        let mut s = Self { child: Some(child), port, dir };
        let start = Instant::now();
        loop {
            if let Some(status) = s.child.as_mut().and_then(|c| c.try_wait().expect("wait for redis-server"))
            {
                s.child = None;
                let log = s.log();
                if log.contains("Address already in use") {
                    return None;
                }
                panic!("redis-server exited early with {status}; log:\n{log}");
            }
            if s.ping().await {
                return Some(s);
            }
            assert!(start.elapsed() < DEADLINE, "redis-server did not answer PING; log:\n{}", s.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the server (SIGKILL: no goodbye to its clients) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn ping(&self) -> bool {
        let check = async {
            let mut c =
                ::redis::Client::open(self.url()).ok()?.get_multiplexed_async_connection().await.ok()?;
            let pong: String = ::redis::cmd("PING").query_async(&mut c).await.ok()?;
            Some(pong == "PONG")
        };
        matches!(tokio::time::timeout(Duration::from_secs(1), check).await, Ok(Some(true)))
    }

    /// A connection for inspecting the server from the test.
    pub async fn conn(&self) -> ::redis::aio::MultiplexedConnection {
        let client = ::redis::Client::open(self.url()).expect("redis URL");
        tokio::time::timeout(DEADLINE, client.get_multiplexed_async_connection())
            .await
            .expect("connect to redis-server within the deadline")
            .expect("connect to redis-server")
    }

    /// Every key matching `pattern` (`SCAN … MATCH`).
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut c = self.conn().await;
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .expect("SCAN");
            out.extend(keys);
            cursor = next;
            if cursor == 0 {
                return out;
            }
        }
    }

    /// Every key with its value as raw bytes (string keys; other types are
    /// rendered through `DUMP` so nothing escapes the scan).
    pub async fn dump_all(&self) -> Vec<(String, Vec<u8>)> {
        let mut c = self.conn().await;
        let mut out = Vec::new();
        for key in self.keys("*").await {
            let kind: String = ::redis::cmd("TYPE").arg(&key).query_async(&mut c).await.expect("TYPE");
            let value: Option<Vec<u8>> = if kind == "string" {
                ::redis::cmd("GET").arg(&key).query_async(&mut c).await.expect("GET")
            } else {
                ::redis::cmd("DUMP").arg(&key).query_async(&mut c).await.expect("DUMP")
            };
            // A key that expired between SCAN and GET has no value left to leak.
            if let Some(v) = value {
                out.push((key, v));
            }
        }
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// === a slow link to Redis ===

/// A TCP relay in front of a Redis server that holds every chunk, in both
/// directions, for `delay` before passing it on — a slow network between one
/// instance and Redis, to open race windows wide enough to hit every time.
/// It records what the client sent, as Redis received it (after the delay).
pub struct SlowLink {
    port: u16,
    sent: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowLink {
    pub async fn start(redis_port: u16, delay: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind slow link");
        let port = listener.local_addr().expect("slow link address").port();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = sent.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await else {
                    continue; // Redis down: the client sees its connection close
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(relay(cr, sw, delay, Some(record.clone())));
                tokio::spawn(relay(sr, cw, delay, None));
            }
        });
        Self { port, sent, task }
    }

    /// `redis://127.0.0.1:PORT/0` through the slow link.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// How often `needle` occurs in what clients sent and Redis has received so far.
    pub fn received(&self, needle: &str) -> usize {
        let sent = self.sent.lock().expect("slow link record");
        let needle = needle.as_bytes();
        sent.windows(needle.len()).filter(|w| *w == needle).count()
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read, in order.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    record: Option<std::sync::Arc<std::sync::Mutex<Vec<u8>>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if let Some(r) = &record {
                r.lock().expect("slow link record").extend_from_slice(&chunk);
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
