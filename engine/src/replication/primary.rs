//! The primary's side of a replication group: the observer on each volume's completion path
//! and the group's sequencer, which numbers records in completion order across the group's
//! volumes and holds them in a bounded queue until the DR site acknowledges them.
//!
//! A write is numbered when the volume's own I/O of it has finished (`source_done`), before
//! the guest sees its completion: a write the guest issues after another completed gets a
//! higher number, so the order of records respects every dependency the guests can see. A
//! flush is numbered when it is submitted: every write completed before it is numbered
//! already. Nothing here blocks or fails a guest request: past `queue_bytes_max` the group
//! stops numbering records and degrades to a dirty bitmap of what changed (status says so),
//! and the DR site keeps the prefix it has.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::frame::{Ack, Record, RecordOp, PAYLOAD_MAX_BYTES};
use crate::observer::{Observed, ObserverTicket, WriteEvent, WriteKind, WriteObserver};

/// The granularity of the dirty bitmap of a degraded group.
pub const DIRTY_CHUNK_BYTES: u64 = 64 << 10;
/// Writes whose data waits between submission and completion, per volume, at most: past it
/// the group degrades (a guest with more in flight than this is not replicated record by
/// record).
const PENDING_WRITES_MAX: usize = 4096;

/// What the primary reports.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PrimaryStatus {
    /// initial-copy, replicating, degraded, stopped.
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
    /// Bytes marked in the dirty bitmaps of a degraded group.
    pub dirty_bytes: u64,
    pub initial_copy_bytes_done: u64,
    pub initial_copy_bytes_total: u64,
    pub last_error: Option<String>,
}

struct Held {
    record: Record,
    completed: Instant,
    bytes: usize,
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
}

/// A group's numbering and its queue of records for the DR site.
pub struct GroupSequencer {
    state: Mutex<State>,
    changed: Condvar,
    queue_bytes_max: usize,
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
            }),
            changed: Condvar::new(),
            queue_bytes_max,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Numbers a completed request of volume `volume_index` (a write's data split into
    /// records of at most [`PAYLOAD_MAX_BYTES`]); never waits.
    pub fn push(&self, volume_index: u32, op: RecordOp) {
        let mut state = self.lock();
        if state.stopped {
            return;
        }
        if state.degraded_reason.is_none() {
            let bytes = record_bytes(&op);
            if state.held_bytes + bytes > self.queue_bytes_max {
                let reason = format!(
                    "the queue for the DR site is full ({} bytes not acknowledged)",
                    state.held_bytes
                );
                log::warn!("replication degraded: {reason}; changes are tracked in a bitmap");
                state.degraded_reason = Some(reason);
            }
        }
        if state.degraded_reason.is_some() {
            mark_dirty(&mut state, volume_index, &op);
            return;
        }
        for op in split(op) {
            number(&mut state, volume_index, op);
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Degrades the group (as a full queue does), for a reason of the caller's.
    pub fn degrade(&self, reason: String) {
        let mut state = self.lock();
        if state.degraded_reason.is_none() {
            log::warn!("replication degraded: {reason}");
            state.degraded_reason = Some(reason);
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
            && state.held_bytes + PAYLOAD_MAX_BYTES as usize > self.queue_bytes_max
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

    /// Rewinds to the DR site's durable sequence after a reconnection: records after it are
    /// sent again. False when the DR site is behind what is still held (a resync is needed).
    pub fn resume_after(&self, durable_seq: u64) -> bool {
        let mut state = self.lock();
        if durable_seq < state.acknowledged_seq || durable_seq >= state.next_seq {
            return durable_seq == state.next_seq - 1 && state.held.is_empty();
        }
        release(&mut state, durable_seq);
        state.shipped_seq = durable_seq;
        true
    }

    /// The DR site's acknowledgment: records up to its durable sequence are released.
    pub fn acknowledged(&self, ack: &Ack) {
        let mut state = self.lock();
        let through = ack.durable_seq.min(state.shipped_seq);
        release(&mut state, through);
        state.applied_seq = state.applied_seq.max(ack.applied_seq);
        drop(state);
        self.changed.notify_all();
    }

    pub fn shipped_seq(&self) -> u64 {
        self.lock().shipped_seq
    }

    pub fn set_error(&self, error: Option<String>) {
        self.lock().last_error = error;
    }

    /// Stops numbering; the shipper ends.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.changed.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        self.lock().stopped
    }

    pub fn status(&self) -> PrimaryStatus {
        let state = self.lock();
        let state_name = if state.stopped {
            "stopped"
        } else if state.degraded_reason.is_some() {
            "degraded"
        } else if state.copying {
            "initial-copy"
        } else {
            "replicating"
        };
        let dirty_chunks: u64 = state
            .dirty
            .iter()
            .flatten()
            .map(|w| w.count_ones() as u64)
            .sum();
        PrimaryStatus {
            state: state_name,
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
            dirty_bytes: dirty_chunks * DIRTY_CHUNK_BYTES,
            initial_copy_bytes_done: state.copy_done,
            initial_copy_bytes_total: state.copy_total,
            last_error: state.last_error.clone(),
        }
    }
}

fn number(state: &mut State, volume_index: u32, op: RecordOp) {
    let bytes = record_bytes(&op);
    let record = Record {
        seq: state.next_seq,
        volume_index,
        timestamp_ns: now_ns(),
        op,
    };
    state.next_seq += 1;
    state.held_bytes += bytes;
    state.held.push_back(Held {
        record,
        completed: Instant::now(),
        bytes,
    });
}

fn release(state: &mut State, through: u64) {
    while state.held.front().is_some_and(|h| h.record.seq <= through) {
        if let Some(h) = state.held.pop_front() {
            state.held_bytes -= h.bytes;
        }
    }
    state.acknowledged_seq = state.acknowledged_seq.max(through);
}

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
        RecordOp::Flush | RecordOp::Mark { .. } => return,
    };
    let Some(bits) = state.dirty.get_mut(volume_index as usize) else {
        return;
    };
    if len == 0 {
        return;
    }
    let first = offset / DIRTY_CHUNK_BYTES;
    let last = (offset + len - 1) / DIRTY_CHUNK_BYTES;
    for chunk in first..=last {
        if let Some(word) = bits.get_mut((chunk / 64) as usize) {
            *word |= 1 << (chunk % 64);
        }
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

/// Data of writes submitted and not completed, by (queue, offset, length), oldest first.
type PendingWrites = HashMap<(u16, u64, u64), VecDeque<Vec<u8>>>;

/// The observer on one volume of a group.
pub struct PrimaryObserver {
    group: Arc<GroupSequencer>,
    volume_index: u32,
    pending: Mutex<PendingWrites>,
}

impl PrimaryObserver {
    pub fn new(group: Arc<GroupSequencer>, volume_index: u32) -> Arc<Self> {
        Arc::new(Self {
            group,
            volume_index,
            pending: Mutex::default(),
        })
    }

    fn pending(&self) -> MutexGuard<'_, PendingWrites> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl WriteObserver for PrimaryObserver {
    fn observe(&self, event: &WriteEvent<'_>, ticket: ObserverTicket) -> Observed {
        match event.kind {
            WriteKind::Flush => self.group.push(self.volume_index, RecordOp::Flush),
            WriteKind::Write => {
                let mut data = Vec::new();
                event.copy_data_into(&mut data);
                let mut pending = self.pending();
                if pending.len() >= PENDING_WRITES_MAX {
                    drop(pending);
                    self.group
                        .degrade(format!("more than {PENDING_WRITES_MAX} writes in flight"));
                } else {
                    let key = (event.queue_index, event.offset_bytes, event.len_bytes);
                    pending.entry(key).or_default().push_back(data);
                }
            }
            WriteKind::Discard | WriteKind::WriteZeroes { .. } => {}
        }
        Observed::Done(ticket)
    }

    fn source_done(&self, event: &WriteEvent<'_>) {
        let op = match event.kind {
            WriteKind::Write => {
                let key = (event.queue_index, event.offset_bytes, event.len_bytes);
                let mut pending = self.pending();
                let data = pending.get_mut(&key).and_then(VecDeque::pop_front);
                if pending.get(&key).is_some_and(VecDeque::is_empty) {
                    pending.remove(&key);
                }
                drop(pending);
                match data {
                    Some(data) => RecordOp::Write {
                        offset_bytes: event.offset_bytes,
                        data,
                    },
                    None => {
                        // Seen before this observer was added, or dropped while degraded.
                        self.group
                            .degrade("a write completed whose data was not kept".into());
                        RecordOp::Discard {
                            offset_bytes: event.offset_bytes,
                            len_bytes: event.len_bytes,
                        }
                    }
                }
            }
            WriteKind::Discard => RecordOp::Discard {
                offset_bytes: event.offset_bytes,
                len_bytes: event.len_bytes,
            },
            WriteKind::WriteZeroes { unmap } => RecordOp::WriteZeroes {
                offset_bytes: event.offset_bytes,
                len_bytes: event.len_bytes,
                unmap,
            },
            WriteKind::Flush => return,
        };
        self.group.push(self.volume_index, op);
    }
}
