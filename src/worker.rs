//! Which worker thread runs the current code, so per-worker state (upstream
//! pools, request counters, verified tokens, the configuration handle) is
//! reached without touching another core's cache lines.

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

/// How many workers run, and so how many shards per-worker state has:
/// `PORTCULLIS_WORKERS`, else one per core the process may run on.
pub fn shards() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("PORTCULLIS_WORKERS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}
