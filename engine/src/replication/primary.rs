//! The primary's side of a replication group: the group's sequencer, fed by the observer on
//! each volume's completion path ([`PrimaryObserver`]), which numbers records in completion order across the group's
//! volumes and holds them in a bounded queue until the DR site acknowledges them.
//!
//! A write is numbered when the volume's own I/O of it has finished (`source_done`), before
//! the guest sees its completion: a write the guest issues after another completed gets a
//! higher number, so the order of records respects every dependency the guests can see. A
//! flush is numbered when it is submitted: every write completed before it is numbered
//! already. Nothing here blocks or fails a guest request: past `queue_bytes_max` the group
//! stops numbering records and degrades to a dirty bitmap of what changed (status says so),
//! and the DR site keeps the prefix it has.
//!
//! Past `--max-lag` (bytes or time, [`LagPolicy`]) the group degrades too, or slows the guest's
//! writes down (`lag`); a degraded group whose link works again resends the ranges its bitmap
//! marks (`resync`) and streams again.
//!
//! A group in sync mode holds each guest write's completion (its [`ObserverTicket`]) until
//! the DR site's durable sequence covers the write's last record. If the DR site acknowledges
//! nothing for the sync timeout, the group degrades to async: held writes complete and later
//! ones no longer wait (and past the queue's bound it degrades to its bitmap as above).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::frame::{Ack, Record, RecordOp, PAYLOAD_MAX_BYTES};
use crate::observer::ObserverTicket;

pub use super::primary_observer::PrimaryObserver;
pub use lag::{LagPolicy, OnLag};
pub use resync::ResyncStep;
pub use status::PrimaryStatus;

mod controls;
mod lag;
mod resync;
mod status;

/// The granularity of the dirty bitmap of a degraded group: a guest's 4 KiB block, so a
/// resync after scattered small writes sends what they changed and not the 64 KiB around
/// each (as DRBD's bitmap does). The bitmap costs 32 KiB per GiB of volume; a resync
/// coalesces consecutive chunks into runs of up to 1 MiB.
pub const DIRTY_CHUNK_BYTES: u64 = 4 << 10;

struct Held {
    record: Record,
    completed: Instant,
    bytes: usize,
    /// The guest's completion of a sync write, on the write's last record.
    ticket: Option<ObserverTicket>,
}

struct State {
    next_seq: u64,
    /// Records numbered and not acknowledged, in order; `shipped` of them were sent.
    held: VecDeque<Held>,
    held_bytes: usize,
    shipped_seq: u64,
    acknowledged_seq: u64,
    applied_seq: u64,
    degraded_reason: Option<String>,
    /// Per volume, one bit per [`DIRTY_CHUNK_BYTES`] changed while degraded.
    dirty: Vec<Vec<u64>>,
    copy_done: u64,
    copy_total: u64,
    copying: bool,
    stopped: bool,
    last_error: Option<String>,
    sync: bool,
    sync_degraded_reason: Option<String>,
    /// The last record of the initial copy, once it is numbered whole.
    copy_end_seq: Option<u64>,
    /// The sequence and numbering time of each record holding a ticket, oldest first.
    sync_waiting: VecDeque<(u64, Instant)>,
    policy: LagPolicy,
    /// The shipper's last attempt failed; cleared when it connects.
    link_lost: bool,
    /// When the DR site last answered (connected or acknowledged).
    last_answer: Instant,
    /// The spacing of throttled completions now, and when the last one is due.
    throttle_delay: Duration,
    throttle_last_due: Instant,
    /// Guest completions the throttle delays, with when each is due.
    throttled: Vec<(Instant, ObserverTicket)>,
    throttled_writes: u64,
    resync: resync::Resync,
    /// Paused by the operator: degraded, and no resync until resumed.
    paused: bool,
    copy_speed_bytes_per_s: Option<u64>,
    link_rate: status::LinkRate,
}

/// A group's numbering and its queue of records for the DR site.
pub struct GroupSequencer {
    state: Mutex<State>,
    changed: Condvar,
    queue_bytes_max: usize,
    volume_sizes: Vec<u64>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn record_bytes(op: &RecordOp) -> usize {
    match op {
        RecordOp::Write { data, .. } => data.len() + super::frame::HEADER_BYTES,
        RecordOp::Mark { label } => label.len() + super::frame::HEADER_BYTES,
        _ => super::frame::HEADER_BYTES,
    }
}

impl GroupSequencer {
    /// A sequencer for volumes of these sizes, numbering from `first_seq`.
    pub fn new(volume_sizes: &[u64], first_seq: u64, queue_bytes_max: usize) -> Arc<Self> {
        let dirty = volume_sizes
            .iter()
            .map(|size| vec![0u64; size.div_ceil(DIRTY_CHUNK_BYTES).div_ceil(64) as usize])
            .collect();
        Arc::new(Self {
            state: Mutex::new(State {
                next_seq: first_seq,
                held: VecDeque::new(),
                held_bytes: 0,
                shipped_seq: first_seq - 1,
                acknowledged_seq: first_seq - 1,
                applied_seq: first_seq - 1,
                degraded_reason: None,
                dirty,
                copy_done: 0,
                copy_total: 0,
                copying: false,
                stopped: false,
                last_error: None,
                sync: false,
                sync_degraded_reason: None,
                copy_end_seq: None,
                sync_waiting: VecDeque::new(),
                policy: LagPolicy::default(),
                link_lost: false,
                last_answer: Instant::now(),
                throttle_delay: Duration::ZERO,
                throttle_last_due: Instant::now(),
                throttled: Vec::new(),
                throttled_writes: 0,
                resync: resync::Resync::default(),
                paused: false,
                copy_speed_bytes_per_s: None,
                link_rate: status::LinkRate::default(),
            }),
            changed: Condvar::new(),
            queue_bytes_max,
            volume_sizes: volume_sizes.to_vec(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the group sync: guest writes wait for the DR site (see the module's doc).
    pub fn set_sync(&self) {
        self.lock().sync = true;
    }

    /// Whether a guest write observed now may be held: a sync group not degraded.
    pub fn may_hold(&self) -> bool {
        let state = self.lock();
        state.degraded_reason.is_none()
            && ((state.sync && state.sync_degraded_reason.is_none())
                || !state.throttle_delay.is_zero())
    }

    /// Numbers a completed request of volume `volume_index` (a write's data split into
    /// records of at most [`PAYLOAD_MAX_BYTES`]); never waits.
    pub fn push(&self, volume_index: u32, op: RecordOp) {
        self.push_held(volume_index, op, None);
    }

    /// As [`push`](Self::push), for a request whose guest completion `ticket` is held: it
    /// completes once the DR site holds the request durably, or now when the group does not
    /// hold writes (async, catching up, degraded, stopped).
    pub fn push_held(&self, volume_index: u32, op: RecordOp, ticket: Option<ObserverTicket>) {
        let mut state = self.lock();
        if state.stopped {
            drop(state);
            complete(ticket.into_iter().collect());
            return;
        }
        let mut tickets = Vec::new();
        if state.degraded_reason.is_none() {
            let bytes = record_bytes(&op);
            if state.held_bytes + bytes > self.queue_bytes_max {
                let reason = format!(
                    "the queue for the DR site is full ({} bytes not acknowledged)",
                    state.held_bytes
                );
                degrade_locked(&mut state, reason, &mut tickets);
            } else {
                lag::apply_policy(&mut state, bytes, &mut tickets);
            }
        }
        if state.degraded_reason.is_some() {
            mark_dirty(&mut state, volume_index, &op);
            tickets.extend(ticket);
            drop(state);
            complete(tickets);
            self.changed.notify_all();
            return;
        }
        let holds = state.sync
            && state.sync_degraded_reason.is_none()
            && state
                .copy_end_seq
                .is_some_and(|end| state.acknowledged_seq >= end);
        let (ticket, mut now) = if holds {
            (ticket, None)
        } else {
            (None, ticket)
        };
        if let Some(delayed) = now.take() {
            if let Some(late) = lag::throttle(&mut state, delayed) {
                tickets.push(late);
            }
        }
        let ops = split(op);
        let last = ops.len().saturating_sub(1);
        let mut ticket = ticket;
        for (i, op) in ops.into_iter().enumerate() {
            let held = if i == last { ticket.take() } else { None };
            number(&mut state, volume_index, op, held);
        }
        drop(state);
        complete(tickets);
        self.changed.notify_all();
    }

    /// Degrades the group (as a full queue does), for a reason of the caller's.
    pub fn degrade(&self, reason: String) {
        let mut state = self.lock();
        let mut tickets = Vec::new();
        degrade_locked(&mut state, reason, &mut tickets);
        drop(state);
        complete(tickets);
        self.changed.notify_all();
    }

    /// Degrades a sync group to async: held writes complete now, later ones do not wait.
    pub fn degrade_sync(&self, reason: String) {
        let mut state = self.lock();
        if state.sync && state.sync_degraded_reason.is_none() {
            log::warn!("sync replication degraded to async: {reason}");
            state.sync_degraded_reason = Some(reason);
        }
        let mut tickets = Vec::new();
        take_all_tickets(&mut state, &mut tickets);
        drop(state);
        complete(tickets);
        self.changed.notify_all();
    }

    /// Watches a sync group until it stops or degrades: when a held write has waited
    /// `timeout` for the DR site, the group degrades to async. Runs on a thread of its own.
    pub fn watch_sync(&self, timeout: Duration) {
        let mut state = self.lock();
        loop {
            if state.stopped
                || state.sync_degraded_reason.is_some()
                || state.degraded_reason.is_some()
            {
                return;
            }
            let wait = match state.sync_waiting.front() {
                Some(&(seq, since)) => {
                    let waited = since.elapsed();
                    if waited >= timeout {
                        let cause = state
                            .last_error
                            .as_deref()
                            .map_or(String::new(), |e| format!(" (last error: {e})"));
                        let reason = format!(
                            "the DR site did not acknowledge record {seq} within {:.1} s{cause}",
                            timeout.as_secs_f64()
                        );
                        drop(state);
                        // As an async group whose link is lost: the bitmap tracks what
                        // changes from here, and a resync sends it once the DR site answers.
                        self.degrade_sync(reason.clone());
                        self.degrade(reason);
                        return;
                    }
                    timeout - waited
                }
                None => timeout,
            };
            state = self
                .changed
                .wait_timeout(state, wait)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Numbers a chunk of the initial copy read by `read` while no completion can be
    /// numbered: every write completed before has its data in the image and a lower number,
    /// every write completing after overwrites the chunk at the DR site later. Waits while
    /// the queue is full (the copy is no guest). False once the group stopped or degraded.
    pub fn push_copy(
        &self,
        volume_index: u32,
        offset_bytes: u64,
        read: impl FnOnce() -> std::io::Result<Vec<u8>>,
    ) -> std::io::Result<bool> {
        let mut state = self.lock();
        while !state.stopped
            && state.degraded_reason.is_none()
            && !self.has_room(&state, COPY_RUN_BYTES_HINT)
        {
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        if state.stopped || state.degraded_reason.is_some() {
            return Ok(false);
        }
        let data = read()?;
        state.copy_done += data.len() as u64;
        if !data.is_empty() {
            number(
                &mut state,
                volume_index,
                RecordOp::Write { offset_bytes, data },
                None,
            );
        }
        drop(state);
        self.changed.notify_all();
        Ok(true)
    }

    pub fn set_copy_progress(&self, copying: bool, total_bytes: u64) {
        let mut state = self.lock();
        state.copying = copying;
        state.copy_total = total_bytes;
        if !copying {
            state.copy_end_seq = Some(state.next_seq - 1);
        }
    }

    /// Records numbered and not shipped yet, up to `bytes_max` (at least one), waiting up to
    /// `wait` for one.
    pub fn take_unshipped(&self, bytes_max: usize, wait: Duration) -> Vec<Record> {
        let mut state = self.lock();
        let deadline = Instant::now() + wait;
        while !state.stopped && state.next_seq - 1 == state.shipped_seq {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Vec::new();
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        let first = state.shipped_seq + 1;
        let base = state.acknowledged_seq + 1;
        let skip = (first - base) as usize;
        for held in state.held.iter().skip(skip) {
            if !out.is_empty() && bytes + held.bytes > bytes_max {
                break;
            }
            bytes += held.bytes;
            out.push(held.record.clone());
        }
        if let Some(last) = out.last() {
            state.shipped_seq = last.seq;
        }
        out
    }

    /// Whether records of `bytes` more fit the window of an initial copy or a resync: a
    /// quarter of `--max-lag`'s bytes (so guest writes have room before the bound), at most
    /// the queue's bound less a frame; always when nothing is held.
    fn has_room(&self, state: &State, bytes: usize) -> bool {
        let queue = self
            .queue_bytes_max
            .saturating_sub(PAYLOAD_MAX_BYTES as usize);
        let window = state
            .policy
            .bytes_max
            .map_or(queue, |max| queue.min((max / 4) as usize));
        state.held_bytes == 0 || state.held_bytes + bytes <= window
    }

    /// Rewinds to the DR site's durable sequence after a reconnection: records after it are
    /// sent again. False when the DR site is behind what is still held (a resync is needed).
    pub fn resume_after(&self, durable_seq: u64) -> bool {
        let mut state = self.lock();
        if durable_seq < state.acknowledged_seq || durable_seq >= state.next_seq {
            return durable_seq == state.next_seq - 1 && state.held.is_empty();
        }
        let tickets = release(&mut state, durable_seq);
        state.shipped_seq = durable_seq;
        drop(state);
        complete(tickets);
        self.changed.notify_all();
        true
    }

    /// The DR site's acknowledgment: records up to its durable sequence are released.
    pub fn acknowledged(&self, ack: &Ack) {
        let mut state = self.lock();
        let through = ack.durable_seq.min(state.shipped_seq);
        let mut tickets = release(&mut state, through);
        state.applied_seq = state.applied_seq.max(ack.applied_seq);
        state.last_answer = Instant::now();
        if state.degraded_reason.is_none() {
            // The throttle eases as soon as the lag falls.
            lag::apply_policy(&mut state, 0, &mut tickets);
        }
        drop(state);
        complete(tickets);
        self.changed.notify_all();
    }

    pub fn shipped_seq(&self) -> u64 {
        self.lock().shipped_seq
    }

    pub fn set_error(&self, error: Option<String>) {
        self.lock().last_error = error;
    }

    /// Stops numbering; the shipper ends and held writes complete.
    pub fn stop(&self) {
        let mut state = self.lock();
        state.stopped = true;
        let mut tickets = Vec::new();
        take_all_tickets(&mut state, &mut tickets);
        drop(state);
        complete(tickets);
        self.changed.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        self.lock().stopped
    }
}

fn number(state: &mut State, volume_index: u32, op: RecordOp, ticket: Option<ObserverTicket>) {
    let bytes = record_bytes(&op);
    let record = Record {
        seq: state.next_seq,
        volume_index,
        timestamp_ns: now_ns(),
        op,
    };
    let completed = Instant::now();
    if ticket.is_some() {
        state.sync_waiting.push_back((record.seq, completed));
    }
    state.next_seq += 1;
    state.held_bytes += bytes;
    state.held.push_back(Held {
        record,
        completed,
        bytes,
        ticket,
    });
}

/// Drops the records up to `through` (acknowledged); returns the guest completions they held.
fn release(state: &mut State, through: u64) -> Vec<ObserverTicket> {
    let mut tickets = Vec::new();
    while state.held.front().is_some_and(|h| h.record.seq <= through) {
        if let Some(h) = state.held.pop_front() {
            state.held_bytes -= h.bytes;
            state.link_rate.acknowledged(h.bytes as u64);
            tickets.extend(h.ticket);
        }
    }
    while state
        .sync_waiting
        .front()
        .is_some_and(|&(seq, _)| seq <= through)
    {
        state.sync_waiting.pop_front();
    }
    state.acknowledged_seq = state.acknowledged_seq.max(through);
    tickets
}

/// Degrades the group to its bitmap for `reason` (the first reason stays) and takes every
/// held guest completion.
fn degrade_locked(state: &mut State, reason: String, tickets: &mut Vec<ObserverTicket>) {
    if state.degraded_reason.is_none() {
        log::warn!("replication degraded: {reason}; changes are tracked in a bitmap");
        state.degraded_reason = Some(reason);
    }
    state.resync.running = false;
    state.throttle_delay = Duration::ZERO;
    take_all_tickets(state, tickets);
}

/// Takes every held guest completion (the group stops holding them).
fn take_all_tickets(state: &mut State, out: &mut Vec<ObserverTicket>) {
    out.extend(state.throttled.drain(..).map(|(_, ticket)| ticket));
    if state.sync_waiting.is_empty() {
        return;
    }
    out.extend(state.held.iter_mut().filter_map(|h| h.ticket.take()));
    state.sync_waiting.clear();
}

/// Completes guest writes successfully: they are on the primary's volume.
fn complete(mut tickets: Vec<ObserverTicket>) {
    if !tickets.is_empty() {
        ObserverTicket::complete_all(&mut tickets, true);
    }
}

/// The initial copy reads at most this much at a time (the daemon's chunk).
const COPY_RUN_BYTES_HINT: usize = 1 << 20;

fn mark_dirty(state: &mut State, volume_index: u32, op: &RecordOp) {
    let (offset, len) = match op {
        RecordOp::Write { offset_bytes, data } => (*offset_bytes, data.len() as u64),
        RecordOp::Discard {
            offset_bytes,
            len_bytes,
        }
        | RecordOp::WriteZeroes {
            offset_bytes,
            len_bytes,
            ..
        } => (*offset_bytes, *len_bytes),
        RecordOp::Flush | RecordOp::Mark { .. } | RecordOp::ResyncBegin | RecordOp::ResyncEnd => {
            return
        }
    };
    mark_range(state, volume_index, offset, len);
}

/// Marks the chunks under `offset..offset + len` of a volume changed.
fn mark_range(state: &mut State, volume_index: u32, offset: u64, len: u64) {
    let Some(bits) = state.dirty.get_mut(volume_index as usize) else {
        return;
    };
    if len == 0 {
        return;
    }
    let first = offset / DIRTY_CHUNK_BYTES;
    let last = (offset.saturating_add(len) - 1) / DIRTY_CHUNK_BYTES;
    // Whole words at a time: a discard of a whole volume marks millions of chunks.
    let mut chunk = first;
    while chunk <= last {
        let Some(word) = bits.get_mut((chunk / 64) as usize) else {
            return;
        };
        let bit = chunk % 64;
        let count = (64 - bit).min(last - chunk + 1);
        let mask = if count == 64 {
            u64::MAX
        } else {
            ((1u64 << count) - 1) << bit
        };
        *word |= mask;
        chunk += count;
    }
}

/// A write larger than a frame's payload becomes several records.
fn split(op: RecordOp) -> Vec<RecordOp> {
    match op {
        RecordOp::Write { offset_bytes, data } if data.len() > PAYLOAD_MAX_BYTES as usize => data
            .chunks(PAYLOAD_MAX_BYTES as usize)
            .enumerate()
            .map(|(i, chunk)| RecordOp::Write {
                offset_bytes: offset_bytes + (i * PAYLOAD_MAX_BYTES as usize) as u64,
                data: chunk.to_vec(),
            })
            .collect(),
        op => vec![op],
    }
}
