//! Which worker thread runs the current code, so per-worker state (upstream
//! pools, request counters) is reached without touching another core's cache
//! lines.

use std::cell::Cell;
use std::sync::OnceLock;

thread_local! {
    /// This thread's worker number; worker threads set it at start, every
    /// other thread (admin, background tasks) shares shard 0.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as worker `n`.
pub fn set(n: usize) {
    INDEX.with(|i| i.set(n));
}

/// The current thread's shard among `len` (`len` > 0).
pub fn shard(len: usize) -> usize {
    INDEX.with(Cell::get) % len
}

/// How many shards per-worker state has: one per core the process may use
/// (the default worker count).
pub fn shards() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).max(1))
}

/// Workers: `PORTCULLIS_WORKERS`, else one per core the process may run on.
pub fn count() -> usize {
    std::env::var("PORTCULLIS_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(shards)
}
