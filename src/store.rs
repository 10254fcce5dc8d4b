//! State shared by a fleet of instances: the revocation list and refresh
//! coordination. `Store::Memory` is one process (the default); `Store::Redis`
//! shares through Redis when `[state] redis_url` is set.
//!
//! The request path never waits on Redis for a valid access token: revocations
//! are applied to the in-memory list (`auth::revocation`) as they arrive by
//! pub/sub, with a full resync every 30 s and after every reconnect. Redis is
//! used on the request path only to coordinate a refresh, where a round trip
//! is cheap next to the call to the authorization server.
//!
//! Refresh across instances (keys are `{prefix}lock:HASH` and `{prefix}refresh:HASH`,
//! HASH = SHA-256 of the refresh token, never the token):
//!
//! ```text
//! outcome stored? ── yes ─► use it (grace)
//!   └ no ─► SET lock NX PX(timeout+1s) ── won ─► call token_url, SET outcome (sealed) PX grace, DEL lock
//!                                      └ lost ─► poll the outcome every 20 ms until it appears,
//!                                                the lock frees (its holder died: try to win it),
//!                                                or timeout+1s passes (503)
//! ```
//!
//! When Redis is unreachable the instance carries on alone: local single-flight,
//! the revocations it has, new revocations queued and written when Redis returns.
//! The loss is logged once (and the return once), each failed operation counted in
//! `portcullis_state_errors_total`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use crate::auth::cache::TokenHash;
use crate::auth::revocation::{Revocation, Revocations};
use crate::config::RedisSettings;
use crate::metrics::Metrics;
use crate::session::refresh::{Fresh, Outcome};
use crate::session::{RefreshCookie, Sealer};

const OP_TIMEOUT: Duration = Duration::from_millis(1000);
const RESYNC: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);
/// How long an auth-server error outcome is shared: long enough for the waiters,
/// short enough that the next attempt calls again.
const ERROR_TTL: Duration = Duration::from_secs(2);
const OUTCOME_CONTEXT: &str = "portcullis-refresh-outcome";

pub enum Store {
    Memory,
    Redis(Arc<RedisStore>),
}

impl Store {
    pub fn new(settings: Option<&RedisSettings>, metrics: &Arc<Metrics>) -> Result<Self, redis::RedisError> {
        match settings {
            None => Ok(Store::Memory),
            Some(s) => Ok(Store::Redis(RedisStore::new(s, metrics.clone())?)),
        }
    }

    /// Starts background work (Redis sync); a no-op in memory.
    pub fn start(&self, revocations: Weak<Revocations>) {
        if let Store::Redis(r) = self {
            tokio::spawn(sync_loop(Arc::downgrade(r), revocations));
        }
    }

    /// Whether the shared revocation list has been loaded (`/readyz`).
    pub fn ready(&self) -> bool {
        match self {
            Store::Memory => true,
            Store::Redis(r) => r.loaded.load(Ordering::Acquire),
        }
    }

    /// Shares a revocation already applied locally; queued if Redis is away.
    pub async fn publish_revocation(&self, entry: &Revocation) {
        if let Store::Redis(r) = self {
            if r.write_revocation(entry).await.is_err() {
                r.lock_pending().push(entry.clone());
            }
        }
    }

    /// Runs `call` once across the fleet for this refresh-token hash.
    pub async fn coordinate<F, Fut>(
        &self,
        key: &TokenHash,
        sealer: &Sealer,
        bound: Duration,
        grace: Duration,
        call: F,
    ) -> Outcome
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Outcome>,
    {
        match self {
            Store::Memory => call().await,
            Store::Redis(r) => r.coordinate(key, sealer, bound, grace, call).await,
        }
    }
}

pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    healthy: AtomicBool,
    loaded: AtomicBool,
    pending: Mutex<Vec<Revocation>>,
    metrics: Arc<Metrics>,
}

/// A refresh outcome as stored in Redis, sealed with the cookie key.
#[derive(Serialize, Deserialize)]
#[serde(tag = "k")]
enum Stored {
    Tokens { at: String, rt: String, login: i64, exp: Option<u64> },
    Over,
    Error,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl RedisStore {
    fn new(s: &RedisSettings, metrics: Arc<Metrics>) -> Result<Arc<Self>, redis::RedisError> {
        use redis::IntoConnectionInfo;
        let mut info = s.url.as_str().into_connection_info()?;
        if let Some(p) = &s.password {
            let settings = info.redis_settings().clone().set_password(p.expose());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Arc::new(Self {
            client,
            conn,
            prefix: s.key_prefix.clone(),
            healthy: AtomicBool::new(false),
            loaded: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
            metrics,
        }))
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Vec<Revocation>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn channel(&self) -> String {
        format!("{}revocations", self.prefix)
    }

    /// Records a failed operation; logs only the transition to unhealthy.
    fn failed(&self, what: &str, e: &dyn std::fmt::Display) {
        self.metrics.state_errors.fetch_add(1, Ordering::Relaxed);
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(operation = what, error = %e, "Redis unreachable; carrying on alone until it returns");
        }
    }

    fn recovered(&self) {
        if !self.healthy.swap(true, Ordering::AcqRel) {
            tracing::info!("Redis reachable; shared state in use");
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Result<T, ()> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(OP_TIMEOUT, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.failed(what, &e);
                Err(())
            }
            Err(_) => {
                self.failed(what, &"timed out");
                Err(())
            }
        }
    }

    fn revocation_key(&self, r: &Revocation) -> String {
        let (kind, id) = match r {
            Revocation::Jti { jti, .. } => ("jti", jti),
            Revocation::Sub { sub, .. } => ("sub", sub),
        };
        format!("{}rev:{kind}:{}", self.prefix, hex(&crate::auth::cache::hash(id)))
    }

    async fn write_revocation(&self, r: &Revocation) -> Result<(), ()> {
        let until_ms = r.expires_at().saturating_mul(1000);
        if until_ms <= crate::auth::unix_now() * 1000 {
            return Ok(());
        }
        let json = serde_json::to_string(r).map_err(|_| ())?;
        let key = self.revocation_key(r);
        let _: () = self
            .query("write revocation", redis::cmd("SET").arg(&key).arg(&json).arg("PXAT").arg(until_ms))
            .await?;
        let _: i64 =
            self.query("publish revocation", redis::cmd("PUBLISH").arg(self.channel()).arg(&json)).await?;
        Ok(())
    }

    /// Writes queued revocations (and, after a reconnect, every one this instance
    /// holds, in case Redis came back empty), then loads every shared one into `local`.
    async fn full_sync(&self, local: &Revocations, reconnected: bool) -> Result<(), ()> {
        if reconnected {
            let now_ms = crate::auth::unix_now() * 1000;
            for r in local.list() {
                let until_ms = r.expires_at().saturating_mul(1000);
                if until_ms <= now_ms {
                    continue;
                }
                let json = serde_json::to_string(&r).map_err(|_| ())?;
                let key = self.revocation_key(&r);
                let _: Option<String> = self
                    .query(
                        "restore revocation",
                        redis::cmd("SET").arg(&key).arg(&json).arg("NX").arg("PXAT").arg(until_ms),
                    )
                    .await?;
            }
        }
        let queued: Vec<Revocation> = std::mem::take(&mut *self.lock_pending());
        for (i, r) in queued.iter().enumerate() {
            if self.write_revocation(r).await.is_err() {
                self.lock_pending().extend(queued[i..].iter().cloned());
                return Err(());
            }
        }
        let pattern = format!("{}rev:*", self.prefix);
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .query(
                    "scan revocations",
                    redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(500),
                )
                .await?;
            if !keys.is_empty() {
                let values: Vec<Option<String>> =
                    self.query("load revocations", redis::cmd("MGET").arg(&keys)).await?;
                for v in values.into_iter().flatten() {
                    if let Ok(r) = serde_json::from_str::<Revocation>(&v) {
                        local.insert(&r);
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        self.loaded.store(true, Ordering::Release);
        self.recovered();
        Ok(())
    }

    async fn load_outcome(&self, key: &str, sealer: &Sealer) -> Result<Option<Outcome>, ()> {
        let v: Option<String> = self.query("read refresh outcome", redis::cmd("GET").arg(key)).await?;
        let Some(v) = v else { return Ok(None) };
        let stored: Option<Stored> =
            sealer.open(OUTCOME_CONTEXT, &v).and_then(|plain| serde_json::from_slice(&plain).ok());
        Ok(stored.map(|s| match s {
            Stored::Tokens { at, rt, login, exp } => Outcome::Tokens(Arc::new(Fresh {
                access_token: at,
                refresh: RefreshCookie { rt, login },
                expires_in: exp,
            })),
            Stored::Over => Outcome::SessionOver,
            Stored::Error => Outcome::Unavailable,
        }))
    }

    async fn store_outcome(&self, key: &str, sealer: &Sealer, outcome: &Outcome, grace: Duration) {
        let (stored, ttl) = match outcome {
            Outcome::Tokens(f) => (
                Stored::Tokens {
                    at: f.access_token.clone(),
                    rt: f.refresh.rt.clone(),
                    login: f.refresh.login,
                    exp: f.expires_in,
                },
                grace,
            ),
            Outcome::SessionOver => (Stored::Over, grace),
            Outcome::Unavailable => (Stored::Error, ERROR_TTL),
        };
        let Some(sealed) = serde_json::to_vec(&stored).ok().and_then(|j| sealer.seal(OUTCOME_CONTEXT, &j))
        else {
            return;
        };
        let ms = ttl.as_millis().max(1) as u64;
        let _: Result<(), ()> = self
            .query("store refresh outcome", redis::cmd("SET").arg(key).arg(sealed).arg("PX").arg(ms))
            .await;
    }

    async fn coordinate<F, Fut>(
        &self,
        key: &TokenHash,
        sealer: &Sealer,
        bound: Duration,
        grace: Duration,
        call: F,
    ) -> Outcome
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Outcome>,
    {
        if !self.healthy.load(Ordering::Acquire) {
            return call().await;
        }
        let h = hex(key);
        let outcome_key = format!("{}refresh:{h}", self.prefix);
        let lock_key = format!("{}lock:{h}", self.prefix);
        let lock_ms = (bound + Duration::from_secs(1)).as_millis() as u64;
        let deadline = Instant::now() + bound + Duration::from_secs(1);
        let mut call = Some(call);
        loop {
            match self.load_outcome(&outcome_key, sealer).await {
                Ok(Some(o)) => {
                    // Another instance made the call.
                    self.metrics.refresh("grace");
                    return o;
                }
                Ok(None) => {}
                Err(()) => break,
            }
            let won: Result<Option<String>, ()> = self
                .query(
                    "take refresh lock",
                    redis::cmd("SET").arg(&lock_key).arg("1").arg("NX").arg("PX").arg(lock_ms),
                )
                .await;
            match won {
                Ok(Some(_)) => {
                    // The previous holder may have stored its outcome and released the
                    // lock between our read and our SET: calling now would reuse a
                    // rotated token.
                    if let Ok(Some(o)) = self.load_outcome(&outcome_key, sealer).await {
                        let _: Result<i64, ()> =
                            self.query("release refresh lock", redis::cmd("DEL").arg(&lock_key)).await;
                        self.metrics.refresh("grace");
                        return o;
                    }
                    let Some(call) = call.take() else { return Outcome::Unavailable };
                    let outcome = call().await;
                    self.store_outcome(&outcome_key, sealer, &outcome, grace).await;
                    let _: Result<i64, ()> =
                        self.query("release refresh lock", redis::cmd("DEL").arg(&lock_key)).await;
                    return outcome;
                }
                Ok(None) => {}
                Err(()) => break,
            }
            if Instant::now() >= deadline {
                return Outcome::Unavailable;
            }
            tokio::time::sleep(POLL).await;
        }
        // Redis failed mid-way: carry on alone.
        match call.take() {
            Some(call) => call().await,
            None => Outcome::Unavailable,
        }
    }
}

async fn sync_loop(store: Weak<RedisStore>, revocations: Weak<Revocations>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let (Some(s), Some(local)) = (store.upgrade(), revocations.upgrade()) else { return };
        // Subscribe first, then load, so nothing published in between is missed.
        let pubsub = match tokio::time::timeout(OP_TIMEOUT, s.client.get_async_pubsub()).await {
            Ok(Ok(mut ps)) => match ps.subscribe(s.channel()).await {
                Ok(()) => Some(ps),
                Err(e) => {
                    s.failed("subscribe", &e);
                    None
                }
            },
            Ok(Err(e)) => {
                s.failed("subscribe", &e);
                None
            }
            Err(_) => {
                s.failed("subscribe", &"timed out");
                None
            }
        };
        let Some(pubsub) = pubsub.filter(|_| true) else {
            drop((s, local));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        };
        if s.full_sync(&local, true).await.is_err() {
            drop((s, local, pubsub));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        backoff = Duration::from_millis(250);
        let mut messages = pubsub.into_on_message();
        let mut resync = tokio::time::interval(RESYNC);
        resync.tick().await;
        drop((s, local));
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { break };
                    let Some(local) = revocations.upgrade() else { return };
                    if let Ok(r) = serde_json::from_slice::<Revocation>(msg.get_payload_bytes()) {
                        local.insert(&r);
                    }
                }
                _ = resync.tick() => {
                    let (Some(s), Some(local)) = (store.upgrade(), revocations.upgrade()) else { return };
                    if s.full_sync(&local, false).await.is_err() {
                        break;
                    }
                }
            }
        }
        if let Some(s) = store.upgrade() {
            s.failed("subscription", &"connection lost");
        }
        tokio::time::sleep(backoff).await;
    }
}
