//! The bound on a group's lag (`--max-lag`, bytes or time) and what the group does past it:
//! degrade to its bitmap (the default), or slow the guest's writes down by delaying their
//! completions, more the further past the bound (`throttle`). Neither fails nor stalls a
//! guest request: a throttled write waits at most [`THROTTLE_WAIT_MAX`], and a throttling
//! group whose link is lost degrades instead of throttling a guest that cannot catch up.
//!
//! The throttle spaces completions rather than delaying each by the same time: throttled
//! completions are released one after the other, `spacing` apart (from 0 at the bound to
//! [`THROTTLE_SPACING_MAX`] at twice the bound), so the guest's write rate falls whatever its
//! queue depth (a fixed delay per write lets a guest with 64 writes in flight go 64 times
//! as fast). The rate settles where the guest writes as fast as the link drains.

use std::time::{Duration, Instant};

use super::{complete, degrade_locked, GroupSequencer, State};
use crate::observer::ObserverTicket;

/// The largest spacing between two throttled completions, reached at twice the bound.
pub const THROTTLE_SPACING_MAX: Duration = Duration::from_millis(100);
/// The longest a throttled write waits (past it the throttle lets writes through at this
/// pace whatever the spacing).
pub const THROTTLE_WAIT_MAX: Duration = Duration::from_secs(1);
/// Records shipped and no answer from the DR site for this long: the link counts as lost
/// (a link set down keeps its TCP connection open, and nothing fails until it is back).
pub const LINK_SILENCE_MAX: Duration = Duration::from_secs(10);
/// How often the watcher looks at the lag when no throttled write is due sooner.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

const _: () = assert!(THROTTLE_SPACING_MAX.as_millis() < THROTTLE_WAIT_MAX.as_millis());

/// What a group does past its bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnLag {
    /// Stop numbering records; track changes in the dirty bitmap.
    #[default]
    Degrade,
    /// Delay guest completions in proportion to how far past the bound the lag is.
    Throttle,
}

/// The bound on the lag between the primary and the DR site's durable log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LagPolicy {
    /// Bytes of records not acknowledged.
    pub bytes_max: Option<u64>,
    /// Age of the oldest record not acknowledged. Not applied while an initial copy or a
    /// resync runs over a working link, nor until the DR site has acknowledged its last
    /// record (their records are the lag then; their window is bounded by bytes instead).
    pub time_max: Option<Duration>,
    pub on_lag: OnLag,
}

impl GroupSequencer {
    /// Sets the group's bound; before the group starts.
    pub fn set_lag_policy(&self, policy: LagPolicy) {
        self.lock().policy = policy;
    }

    pub fn lag_policy(&self) -> LagPolicy {
        self.lock().policy.clone()
    }

    /// The shipper reached the DR site.
    pub fn link_up(&self) {
        let mut state = self.lock();
        state.link_lost = false;
        state.last_answer = Instant::now();
        drop(state);
        self.changed.notify_all();
    }

    /// The shipper's connection failed (it retries).
    pub fn link_down(&self, error: String) {
        let mut state = self.lock();
        state.link_lost = true;
        state.last_error = Some(error);
        drop(state);
        self.changed.notify_all();
    }

    /// Watches the lag until the group stops: applies the policy as time passes (a record
    /// ages without any write to notice it) and completes throttled writes when due. Runs on
    /// a thread of its own.
    pub fn watch_lag(&self) {
        let mut state = self.lock();
        while !state.stopped {
            let mut tickets = Vec::new();
            if state.degraded_reason.is_none() {
                apply_policy(&mut state, 0, &mut tickets);
            }
            let now = Instant::now();
            let mut i = 0;
            while i < state.throttled.len() {
                if state.throttled[i].0 <= now {
                    tickets.push(state.throttled.swap_remove(i).1);
                } else {
                    i += 1;
                }
            }
            if !tickets.is_empty() {
                drop(state);
                complete(tickets);
                state = self.lock();
                continue;
            }
            // Until the next throttled write is due (a few ms), or the interval.
            let next_due = state.throttled.iter().map(|(due, _)| *due).min();
            let wait = next_due.map_or(WATCH_INTERVAL, |due| {
                due.saturating_duration_since(now)
                    .clamp(Duration::from_millis(1), WATCH_INTERVAL)
            });
            state = self
                .changed
                .wait_timeout(state, wait)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

/// Whether the DR site answers: connected, and not silent for [`LINK_SILENCE_MAX`] while
/// records it has not acknowledged are on their way.
pub(super) fn link_ok(state: &State) -> bool {
    !state.link_lost
        && (state.shipped_seq <= state.acknowledged_seq
            || state.last_answer.elapsed() < LINK_SILENCE_MAX)
}

/// The lag against the bound (1.0 at the bound; 0 without one), counting `extra_bytes` about
/// to be queued.
pub(super) fn ratio_with(state: &State, extra_bytes: usize) -> f64 {
    let policy = &state.policy;
    let mut ratio = 0.0f64;
    if let Some(max) = policy.bytes_max.filter(|&m| m > 0) {
        ratio = ratio.max((state.held_bytes + extra_bytes) as f64 / max as f64);
    }
    // The initial copy's and a resync's records are the lag until the DR site has the last
    // of them.
    let caught_up = |end: Option<u64>| end.is_none_or(|end| state.acknowledged_seq >= end);
    let catching_up = state.copying
        || state.resync.running
        || !caught_up(state.copy_end_seq)
        || !caught_up(state.resync.end_seq);
    let time_max = policy.time_max.filter(|_| !catching_up || !link_ok(state));
    if let (Some(max), Some(oldest)) = (time_max, state.held.front()) {
        ratio = ratio.max(oldest.completed.elapsed().as_secs_f64() / max.as_secs_f64());
    }
    ratio
}

pub(super) fn ratio(state: &State) -> f64 {
    ratio_with(state, 0)
}

/// Applies the policy to the lag (with `extra_bytes` about to be queued): past the bound a
/// degrading group degrades (as does a throttling one whose link is lost), a throttling one
/// sets the delay of the next guest completions.
pub(super) fn apply_policy(
    state: &mut State,
    extra_bytes: usize,
    tickets: &mut Vec<ObserverTicket>,
) {
    let ratio = ratio_with(state, extra_bytes);
    if ratio <= 1.0 {
        state.throttle_delay = Duration::ZERO;
        return;
    }
    if state.policy.on_lag == OnLag::Throttle && link_ok(state) && !state.sync {
        let past = (ratio - 1.0).min(1.0);
        state.throttle_delay = THROTTLE_SPACING_MAX.mul_f64(past);
        return;
    }
    let reason = format!(
        "the lag passed --max-lag ({} bytes, oldest record {:.1} s{})",
        state.held_bytes,
        state
            .held
            .front()
            .map_or(0.0, |h| h.completed.elapsed().as_secs_f64()),
        if link_ok(state) {
            ""
        } else {
            ", the DR site does not answer"
        },
    );
    degrade_locked(state, reason, tickets);
}

/// Delays a guest completion: released the throttle's spacing after the previous throttled
/// one, at most [`THROTTLE_WAIT_MAX`] from now; handed back when the group does not throttle.
pub(super) fn throttle(state: &mut State, ticket: ObserverTicket) -> Option<ObserverTicket> {
    if state.throttle_delay.is_zero() {
        return Some(ticket);
    }
    state.throttled_writes += 1;
    let now = Instant::now();
    let after = state.throttle_last_due.max(now) + state.throttle_delay;
    let due = after.min(now + THROTTLE_WAIT_MAX);
    state.throttle_last_due = due;
    state.throttled.push((due, ticket));
    None
}
