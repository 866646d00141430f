//! What the primary reports about a group (`ferry replicate status`): its state, the
//! sequences, the lag against its bound, the throttle, the resyncs, the link's throughput.

use std::time::{Duration, Instant};

use super::{lag, resync, GroupSequencer, OnLag, State, DIRTY_CHUNK_BYTES};

/// The link's throughput is measured over at least this long.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// A throughput measured longer ago than this is reported as 0 (nothing acknowledged since).
const RATE_STALE_AFTER: Duration = Duration::from_secs(5);

/// What the primary reports.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PrimaryStatus {
    /// initial-copy, replicating, lagging, disconnected, degraded, resyncing, paused,
    /// stopped.
    pub state: &'static str,
    /// The last record numbered.
    pub numbered_seq: u64,
    /// The last record written to the DR site.
    pub shipped_seq: u64,
    /// The last record the DR site holds durably.
    pub acknowledged_seq: u64,
    /// The replicas equal this volume group after this record.
    pub applied_seq: u64,
    pub lag_records: u64,
    pub lag_bytes: u64,
    /// Since the oldest record not acknowledged was completed.
    pub lag_seconds: f64,
    pub degraded_reason: Option<String>,
    /// async or sync.
    pub mode: &'static str,
    /// Of a sync group: catching-up (its initial copy not acknowledged yet, writes do not
    /// wait), in-sync (writes complete once the DR site holds them durably) or degraded
    /// (writes no longer wait; `sync_degraded_reason` says why).
    pub sync_state: Option<&'static str>,
    pub sync_degraded_reason: Option<String>,
    /// Guest writes whose completion waits for the DR site.
    pub sync_held_writes: u64,
    /// Bytes marked in the dirty bitmaps of a degraded group.
    pub dirty_bytes: u64,
    /// The bound on the lag (`--max-lag`) and what the group does past it.
    pub max_lag_bytes: Option<u64>,
    pub max_lag_seconds: Option<f64>,
    pub on_lag: &'static str,
    /// The spacing of the guest's write completions now (`on-lag` throttle).
    pub throttle_delay_ms: f64,
    /// Guest writes whose completion the throttle delayed, since the start.
    pub throttled_writes: u64,
    /// Bitmap resyncs begun, and bytes of data they read and sent (both since the start).
    pub resyncs: u64,
    pub resync_bytes: u64,
    /// The bitmaps' marked bytes when each resync began, summed.
    pub resync_changed_bytes: u64,
    /// The speed limit of the initial copy and the resyncs (`set-speed`), if any.
    pub copy_speed_bytes_per_s: Option<u64>,
    /// Bytes of records the DR site acknowledged per second, over the last second or more.
    pub link_bytes_per_s: f64,
    pub initial_copy_bytes_done: u64,
    pub initial_copy_bytes_total: u64,
    pub last_error: Option<String>,
}

/// Acknowledged bytes and when: the link's throughput.
#[derive(Debug)]
pub(super) struct LinkRate {
    acked_bytes: u64,
    sample: (Instant, u64),
    bytes_per_s: f64,
}

impl Default for LinkRate {
    fn default() -> Self {
        Self {
            acked_bytes: 0,
            sample: (Instant::now(), 0),
            bytes_per_s: 0.0,
        }
    }
}

impl LinkRate {
    /// Counts `bytes` of records acknowledged now.
    pub(super) fn acknowledged(&mut self, bytes: u64) {
        self.acked_bytes += bytes;
        let elapsed = self.sample.0.elapsed();
        if elapsed >= RATE_WINDOW {
            self.bytes_per_s = (self.acked_bytes - self.sample.1) as f64 / elapsed.as_secs_f64();
            self.sample = (Instant::now(), self.acked_bytes);
        }
    }

    fn now(&self) -> f64 {
        if self.sample.0.elapsed() > RATE_STALE_AFTER {
            0.0
        } else {
            self.bytes_per_s
        }
    }
}

fn state_name(state: &State) -> &'static str {
    if state.stopped {
        "stopped"
    } else if state.paused {
        "paused"
    } else if state.degraded_reason.is_some() {
        "degraded"
    } else if !lag::link_ok(state) {
        "disconnected"
    } else if state.resync.running {
        "resyncing"
    } else if state.copying {
        "initial-copy"
    } else if !state.throttle_delay.is_zero() || lag::ratio(state) > 0.5 {
        "lagging"
    } else {
        "replicating"
    }
}

impl GroupSequencer {
    pub fn status(&self) -> PrimaryStatus {
        let state = self.lock();
        let dirty_chunks = resync::dirty_chunks(&state);
        PrimaryStatus {
            state: state_name(&state),
            numbered_seq: state.next_seq - 1,
            shipped_seq: state.shipped_seq,
            acknowledged_seq: state.acknowledged_seq,
            applied_seq: state.applied_seq,
            lag_records: state.held.len() as u64,
            lag_bytes: state.held_bytes as u64,
            lag_seconds: state
                .held
                .front()
                .map_or(0.0, |h| h.completed.elapsed().as_secs_f64()),
            degraded_reason: state.degraded_reason.clone(),
            mode: if state.sync { "sync" } else { "async" },
            sync_state: state.sync.then(|| {
                if state.sync_degraded_reason.is_some() || state.degraded_reason.is_some() {
                    "degraded"
                } else if state
                    .copy_end_seq
                    .is_some_and(|end| state.acknowledged_seq >= end)
                {
                    "in-sync"
                } else {
                    "catching-up"
                }
            }),
            sync_degraded_reason: state
                .sync_degraded_reason
                .clone()
                .or_else(|| state.degraded_reason.clone().filter(|_| state.sync)),
            sync_held_writes: state.sync_waiting.len() as u64,
            dirty_bytes: dirty_chunks * DIRTY_CHUNK_BYTES,
            max_lag_bytes: state.policy.bytes_max,
            max_lag_seconds: state.policy.time_max.map(|t| t.as_secs_f64()),
            on_lag: match state.policy.on_lag {
                OnLag::Degrade => "degrade",
                OnLag::Throttle => "throttle",
            },
            throttle_delay_ms: state.throttle_delay.as_secs_f64() * 1e3,
            throttled_writes: state.throttled_writes,
            resyncs: state.resync.count,
            resync_bytes: state.resync.bytes_sent,
            resync_changed_bytes: state.resync.changed_bytes,
            copy_speed_bytes_per_s: state.copy_speed_bytes_per_s,
            link_bytes_per_s: state.link_rate.now(),
            initial_copy_bytes_done: state.copy_done,
            initial_copy_bytes_total: state.copy_total,
            last_error: state.last_error.clone(),
        }
    }
}
