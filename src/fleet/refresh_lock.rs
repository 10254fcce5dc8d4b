//! Refresh across instances: one call to `token_url` per refresh token, fleet-wide.
//! Keys are `{prefix}lock:HASH` and `{prefix}refresh:HASH` (HASH = SHA-256 of the
//! refresh token, never the token); the outcome is stored as the caller sealed it.
//!
//! ```text
//! outcome stored? ── yes ─► Published(bytes)
//!   └ no ─► SET lock NX PX(bound+1s) ── won ─► re-read the outcome (the last holder may have
//!                                               just finished), else call, SET outcome PX ttl, DEL lock
//!                                    └ lost ─► poll the outcome every 20 ms until it appears,
//!                                              the lock frees (its holder died: try to win it),
//!                                              or bound+1s passes (TimedOut)
//! Redis unhealthy or failing mid-way ─► call alone
//! ```

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{hex, Fleet, FleetError, RedisFleet};
use crate::auth::cache::TokenHash;

const POLL: Duration = Duration::from_millis(20);

/// What the caller's call produced for the other instances.
pub struct Publish {
    /// Sealed by the caller: the fleet stores it as it is.
    pub value: Vec<u8>,
    pub ttl: Duration,
}

pub enum Coordinated<T> {
    /// This instance made the call.
    Called(T),
    /// Another instance made it: its published value.
    Published(Vec<u8>),
    /// Another instance holds the lock and published nothing in time.
    TimedOut,
}

impl Fleet {
    /// Runs `call` once across the fleet for this refresh-token hash, waiting at
    /// most `bound` plus one second for another instance's outcome.
    pub async fn coordinate<T, F, Fut>(&self, key: &TokenHash, bound: Duration, call: F) -> Coordinated<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = (T, Option<Publish>)>,
    {
        match self {
            Fleet::Alone { .. } => Coordinated::Called(call().await.0),
            Fleet::Redis(r) => r.coordinate(key, bound, call).await,
        }
    }
}

impl RedisFleet {
    async fn load_outcome(&self, key: &str) -> Result<Option<Vec<u8>>, FleetError> {
        self.query("read refresh outcome", redis::cmd("GET").arg(key)).await
    }

    async fn release(&self, lock_key: &str) {
        let _: Result<i64, FleetError> =
            self.query("release refresh lock", redis::cmd("DEL").arg(lock_key)).await;
    }

    async fn coordinate<T, F, Fut>(&self, key: &TokenHash, bound: Duration, call: F) -> Coordinated<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = (T, Option<Publish>)>,
    {
        if !self.healthy.load(Ordering::Acquire) {
            return Coordinated::Called(call().await.0);
        }
        let h = hex(key);
        let outcome_key = format!("{}refresh:{h}", self.prefix);
        let lock_key = format!("{}lock:{h}", self.prefix);
        let lock_ms = (bound + Duration::from_secs(1)).as_millis() as u64;
        let deadline = Instant::now() + bound + Duration::from_secs(1);
        loop {
            match self.load_outcome(&outcome_key).await {
                Ok(Some(v)) => return Coordinated::Published(v),
                Ok(None) => {}
                Err(_) => break,
            }
            let won: Result<Option<String>, FleetError> = self
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
                    if let Ok(Some(v)) = self.load_outcome(&outcome_key).await {
                        self.release(&lock_key).await;
                        return Coordinated::Published(v);
                    }
                    let (outcome, publish) = call().await;
                    if let Some(p) = publish {
                        let ms = p.ttl.as_millis().max(1) as u64;
                        let _: Result<(), FleetError> = self
                            .query(
                                "store refresh outcome",
                                redis::cmd("SET").arg(&outcome_key).arg(p.value).arg("PX").arg(ms),
                            )
                            .await;
                    }
                    self.release(&lock_key).await;
                    return Coordinated::Called(outcome);
                }
                Ok(None) => {}
                Err(_) => break,
            }
            if Instant::now() >= deadline {
                return Coordinated::TimedOut;
            }
            tokio::time::sleep(POLL).await;
        }
        // Redis failed mid-way: carry on alone.
        Coordinated::Called(call().await.0)
    }
}
