//! State shared by a fleet of instances: the revocation list and refresh
//! coordination. `Fleet::Alone` is one process (the default); `Fleet::Redis`
//! shares through Redis when `[state] redis_url` is set.
//!
//! The request path never waits on Redis for a valid access token: revocations
//! are applied to the in-memory list (`auth::revocation`) as they arrive by
//! pub/sub, with a full resync every 30 s and after every reconnect
//! (`revocations`). Redis is used on the request path only to coordinate a
//! refresh (`refresh_lock`), where a round trip is cheap next to the call to the
//! authorization server. The fleet stores opaque bytes the caller has sealed; it
//! knows nothing of sessions.
//!
//! When Redis is unreachable the instance carries on alone: local single-flight,
//! the revocations it has, new revocations queued and written when Redis returns.
//! The loss is logged once (and the return once), each failed operation counted in
//! `portcullis_state_errors_total`.

mod refresh_lock;
mod revocations;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::auth::revocation::{Revocation, Revocations};
use crate::config::RedisSettings;
use crate::metrics::Metrics;
pub use refresh_lock::{Coordinated, Publish};

const OP_TIMEOUT: Duration = Duration::from_millis(1000);

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("Redis failed")]
    Redis(#[from] redis::RedisError),
    #[error("Redis did not answer within {OP_TIMEOUT:?}")]
    Timeout,
    #[error("cannot encode a revocation")]
    Encode(#[from] serde_json::Error),
    #[error("the revocation subscription was lost")]
    SubscriptionLost,
}

pub enum Fleet {
    Alone { revocations: Arc<Revocations>, seen: Seen },
    Redis(Arc<RedisFleet>),
}

/// Ids seen once (logout tokens' `jti`), until they go stale.
#[derive(Default)]
pub struct Seen(dashmap::DashMap<String, i64>);

impl Seen {
    /// `true` the first time `id` is offered before `until` (Unix seconds).
    fn first(&self, id: &str, until: i64) -> bool {
        let now = crate::clock::unix_now();
        if self.0.len() > 10_000 {
            self.0.retain(|_, u| *u > now);
        }
        match self.0.entry(id.to_owned()) {
            dashmap::mapref::entry::Entry::Occupied(mut e) if *e.get() <= now => {
                e.insert(until);
                true
            }
            dashmap::mapref::entry::Entry::Occupied(_) => false,
            dashmap::mapref::entry::Entry::Vacant(v) => {
                v.insert(until);
                true
            }
        }
    }
}

impl Fleet {
    pub fn new(
        settings: Option<&RedisSettings>,
        revocations: Arc<Revocations>,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, redis::RedisError> {
        match settings {
            None => Ok(Fleet::Alone { revocations, seen: Seen::default() }),
            Some(s) => Ok(Fleet::Redis(RedisFleet::new(s, revocations, metrics.clone())?)),
        }
    }

    /// Starts background work (Redis sync); nothing when alone.
    pub fn start(&self) {
        if let Fleet::Redis(r) = self {
            tokio::spawn(revocations::sync_loop(Arc::downgrade(r)));
        }
    }

    /// Whether the shared revocation list has been loaded (`/readyz`).
    pub fn ready(&self) -> bool {
        match self {
            Fleet::Alone { .. } => true,
            Fleet::Redis(r) => r.loaded.load(Ordering::Acquire),
        }
    }

    /// `true` the first time `id` is seen by any instance before `until` (Unix
    /// seconds); with Redis away, by this instance.
    pub async fn first_use(&self, kind: &str, id: &str, until: i64) -> bool {
        match self {
            Fleet::Alone { seen, .. } => seen.first(&format!("{kind}:{id}"), until),
            Fleet::Redis(r) => {
                let local = r.seen.first(&format!("{kind}:{id}"), until);
                let key = format!("{}seen:{kind}:{}", r.prefix, hex(&crate::auth::cache::hash(id)));
                let ms = until.saturating_mul(1000).max(1);
                let claimed: Result<Option<String>, FleetError> = r
                    .query("claim once", redis::cmd("SET").arg(&key).arg("1").arg("NX").arg("PXAT").arg(ms))
                    .await;
                match claimed {
                    Ok(Some(_)) => local,
                    Ok(None) => false,
                    Err(_) => local,
                }
            }
        }
    }

    /// Denies `entry` here at once, then shares it (queued if Redis is away).
    pub async fn revoke(&self, entry: &Revocation) {
        match self {
            Fleet::Alone { revocations, .. } => revocations.insert(entry),
            Fleet::Redis(r) => {
                r.revocations.insert(entry);
                if r.write_revocation(entry).await.is_err() {
                    r.lock_pending().push(entry.clone());
                }
            }
        }
    }
}

pub struct RedisFleet {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    healthy: AtomicBool,
    loaded: AtomicBool,
    /// Revocations posted while Redis was away, written when it returns.
    pending: Mutex<Vec<Revocation>>,
    revocations: Arc<Revocations>,
    seen: Seen,
    metrics: Arc<Metrics>,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

impl RedisFleet {
    fn new(
        s: &RedisSettings,
        revocations: Arc<Revocations>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, redis::RedisError> {
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
            revocations,
            seen: Seen::default(),
            metrics,
        }))
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Vec<Revocation>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a failed operation; logs only the transition to unhealthy.
    fn failed(&self, what: &str, e: &FleetError) {
        self.metrics.state_errors.fetch_add(1, Ordering::Relaxed);
        if self.healthy.swap(false, Ordering::AcqRel) {
            let cause = std::error::Error::source(e).map(ToString::to_string);
            tracing::warn!(operation = what, error = %e, cause, "Redis unreachable; carrying on alone until it returns");
        }
    }

    fn recovered(&self) {
        if !self.healthy.swap(true, Ordering::AcqRel) {
            tracing::info!("Redis reachable; shared state in use");
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Result<T, FleetError> {
        let mut conn = self.conn.clone();
        let result = match tokio::time::timeout(OP_TIMEOUT, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(FleetError::Redis(e)),
            Err(_) => Err(FleetError::Timeout),
        };
        if let Err(e) = &result {
            self.failed(what, e);
        }
        result
    }
}
