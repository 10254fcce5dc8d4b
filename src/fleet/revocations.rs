//! Revocation replication: every revocation is `SET {prefix}rev:{jti|sub}:HASH
//! json PXAT exp` and PUBLISHed; every instance subscribes, applies what arrives
//! to its in-memory list, resyncs the whole list every 30 s and after every
//! reconnect (writing back its own entries with `SET NX`, in case Redis came back
//! empty), and reports ready only after the first full load.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;

use super::{hex, FleetError, RedisFleet, OP_TIMEOUT};
use crate::auth::revocation::Revocation;
use crate::clock::unix_now;

const RESYNC: Duration = Duration::from_secs(30);

impl RedisFleet {
    fn channel(&self) -> String {
        format!("{}revocations", self.prefix)
    }

    fn revocation_key(&self, r: &Revocation) -> String {
        let (kind, id) = r.key();
        format!("{}rev:{kind}:{}", self.prefix, hex(&crate::auth::cache::hash(id)))
    }

    pub(super) async fn write_revocation(&self, r: &Revocation) -> Result<(), FleetError> {
        let until_ms = r.expires_at().saturating_mul(1000);
        if until_ms <= unix_now() * 1000 {
            return Ok(());
        }
        let json = serde_json::to_string(r)?;
        let key = self.revocation_key(r);
        let _: () = self
            .query("write revocation", redis::cmd("SET").arg(&key).arg(&json).arg("PXAT").arg(until_ms))
            .await?;
        let _: i64 =
            self.query("publish revocation", redis::cmd("PUBLISH").arg(self.channel()).arg(&json)).await?;
        Ok(())
    }

    /// Writes queued revocations (and, after a reconnect, every one this instance
    /// holds, in case Redis came back empty), then loads every shared one.
    async fn full_sync(&self, reconnected: bool) -> Result<(), FleetError> {
        if reconnected {
            let now_ms = unix_now() * 1000;
            for r in self.revocations.list() {
                let until_ms = r.expires_at().saturating_mul(1000);
                if until_ms <= now_ms {
                    continue;
                }
                let json = serde_json::to_string(&r)?;
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
            if let Err(e) = self.write_revocation(r).await {
                self.lock_pending().extend(queued[i..].iter().cloned());
                return Err(e);
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
                        self.revocations.insert(&r);
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

    async fn subscribe(&self) -> Result<redis::aio::PubSub, FleetError> {
        let mut ps = tokio::time::timeout(OP_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| FleetError::Timeout)??;
        ps.subscribe(self.channel()).await?;
        Ok(ps)
    }
}

/// Keeps this instance's list in step with the fleet's for as long as the fleet lives.
pub(super) async fn sync_loop(fleet: Weak<RedisFleet>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let Some(f) = fleet.upgrade() else { return };
        // Subscribe first, then load, so nothing published in between is missed.
        let pubsub = match f.subscribe().await {
            Ok(ps) => ps,
            Err(e) => {
                f.failed("subscribe", &e);
                drop(f);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if f.full_sync(true).await.is_err() {
            drop((f, pubsub));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        backoff = Duration::from_millis(250);
        let mut messages = pubsub.into_on_message();
        let mut resync = tokio::time::interval(RESYNC);
        resync.tick().await;
        let revocations = Arc::downgrade(&f.revocations);
        drop(f);
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
                    let Some(f) = fleet.upgrade() else { return };
                    if f.full_sync(false).await.is_err() {
                        break;
                    }
                }
            }
        }
        if let Some(f) = fleet.upgrade() {
            f.failed("subscription", &FleetError::SubscriptionLost);
        }
        tokio::time::sleep(backoff).await;
    }
}
