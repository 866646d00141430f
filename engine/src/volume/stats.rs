//! Per-volume I/O counters, read by the control socket's `query-volumes`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of completed requests. Updated with relaxed atomics: they are statistics,
/// not synchronisation.
#[derive(Debug, Default)]
pub struct VolumeStats {
    pub read_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_ops: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_ops: AtomicU64,
    pub discard_ops: AtomicU64,
    pub discard_bytes: AtomicU64,
    pub write_zeroes_ops: AtomicU64,
    pub write_zeroes_bytes: AtomicU64,
    /// Every request that failed or was refused: the sum of the counts by kind below.
    pub errors: AtomicU64,
    pub read_errors: AtomicU64,
    pub write_errors: AtomicU64,
    pub flush_errors: AtomicU64,
    pub discard_errors: AtomicU64,
    pub write_zeroes_errors: AtomicU64,
    /// Requests the device refused before the engine saw them (malformed, not in whole
    /// logical blocks, unsupported).
    pub refused: AtomicU64,
}

/// A plain copy of [`VolumeStats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flush_ops: u64,
    pub discard_ops: u64,
    pub discard_bytes: u64,
    pub write_zeroes_ops: u64,
    pub write_zeroes_bytes: u64,
    pub errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub flush_errors: u64,
    pub discard_errors: u64,
    pub write_zeroes_errors: u64,
    pub refused: u64,
}

impl VolumeStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            read_ops: self.read_ops.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            write_ops: self.write_ops.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            flush_ops: self.flush_ops.load(Relaxed),
            discard_ops: self.discard_ops.load(Relaxed),
            discard_bytes: self.discard_bytes.load(Relaxed),
            write_zeroes_ops: self.write_zeroes_ops.load(Relaxed),
            write_zeroes_bytes: self.write_zeroes_bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            read_errors: self.read_errors.load(Relaxed),
            write_errors: self.write_errors.load(Relaxed),
            flush_errors: self.flush_errors.load(Relaxed),
            discard_errors: self.discard_errors.load(Relaxed),
            write_zeroes_errors: self.write_zeroes_errors.load(Relaxed),
            refused: self.refused.load(Relaxed),
        }
    }

    /// Counts a request the device refused before the engine saw it.
    pub fn count_refused(&self) {
        self.errors.fetch_add(1, Relaxed);
        self.refused.fetch_add(1, Relaxed);
    }
}
