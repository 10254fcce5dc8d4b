//! Configuration reload on `SIGHUP` and on a change of the file (polled once a
//! second, debounced). The new file is validated completely and built into a
//! `Snapshot` before it is swapped in; in-flight requests keep the snapshot they
//! started with. A file that fails is logged with the same messages as `check`,
//! counted, and the running configuration stays. Listener addresses, connection
//! limits, the token-cache size and `[tracing]` are fixed at start.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::config::ConfigErrors;
use crate::state::{BuildError, Runtime, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Loads, validates and swaps in `path`; on failure the running configuration stays.
pub fn reload(rt: &Runtime, path: &Path) -> Result<(), ReloadError> {
    let result = crate::config::load(path).map_err(ReloadError::from).and_then(|config| {
        let old = rt.current.hold();
        if config.listen != old.listen {
            tracing::warn!("[listen] changed; listener addresses take effect only on restart");
        }
        if config.tracing.as_ref() != rt.exporter.as_ref().map(|e| e.settings()) {
            tracing::warn!("[tracing] changed; it takes effect only on restart (the running one stays)");
        }
        for w in &config.warnings {
            tracing::warn!(problem = %w, "configuration warning");
        }
        Ok(Snapshot::build(config, &rt.registry, &rt.limit_registry, &rt.metrics)?)
    });
    match result {
        Ok(snap) => {
            rt.current.store(Arc::new(snap));
            rt.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
            tracing::info!(config = %path.display(), "configuration reloaded");
            Ok(())
        }
        Err(e) => {
            rt.metrics.reloads_error.fetch_add(1, Ordering::Relaxed);
            for line in e.to_string().lines() {
                tracing::error!(problem = line, "configuration rejected; the running configuration stays");
            }
            Err(e)
        }
    }
}

/// Fingerprint of the file as it is now (content hash); `None` if unreadable.
fn fingerprint(path: &Path) -> Option<[u8; 32]> {
    let bytes = std::fs::read(path).ok()?;
    Some(crate::auth::cache::hash_bytes(&bytes))
}

/// Reloads when `path` changes: polled every `interval`, applied once the content
/// has been stable for one more poll (editors write in several steps).
pub async fn watch(runtime: std::sync::Weak<Runtime>, path: PathBuf, interval: Duration) {
    let mut applied = fingerprint(&path);
    let mut pending: Option<[u8; 32]> = None;
    loop {
        tokio::time::sleep(interval).await;
        let Some(rt) = runtime.upgrade() else { return };
        let now = fingerprint(&path);
        match (now, pending) {
            (Some(fp), _) if Some(fp) == applied => pending = None,
            (Some(fp), Some(p)) if fp == p => {
                applied = Some(fp);
                pending = None;
                tracing::info!(config = %path.display(), "configuration file changed; reloading");
                let _ = reload(&rt, &path);
            }
            (Some(fp), _) => pending = Some(fp),
            (None, _) => {}
        }
    }
}
