//! The running journal's in-memory log: its entries in fixed-size chunks, bounded by the
//! `log-memory=` option. When the bound is reached the oldest chunk is dropped (the media
//! still hold those entries, in their trailers and by scanning) and its memory is reused for
//! the next one, so a long-running journal neither grows without limit nor keeps touching
//! fresh memory. A retrieve takes a [`LogSnapshot`] that shares the full chunks instead of
//! copying them, so the journal's lock is held only for the partly filled last chunk.
//!
//! Until the bound is reached the log needs a fresh chunk every 4096 entries. A helper thread
//! ([`ChunkSupply`]) allocates them and faults their pages in ahead of need, so the queue
//! thread that appends an entry under the journal's lock does not take those page faults
//! (fresh memory is what a growing log costs, and on a VM whose host backs guest memory
//! lazily a fresh page costs far more than the entry it holds; `benches/journal-notes.md`,
//! *The log's chunks come from a helper thread*).

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use super::entry::LogEntry;
use super::format::Op;
use crate::confine::{self, Allowlist};

/// The chunk supplier maps memory and faults it in, nothing else.
const CHUNK_SUPPLY_SYSCALLS: Allowlist = Allowlist {
    kind: "journal-log-supply",
    groups: &[confine::RUNTIME],
    extra: &[],
};

/// Entries per chunk (224 KiB of entries).
pub const CHUNK_ENTRIES: usize = 4096;

/// Bytes one entry takes in memory.
pub const ENTRY_BYTES: u64 = std::mem::size_of::<LogEntry>() as u64;

/// The in-memory log: entries in ascending sequence order.
pub struct MemoryLog {
    full: VecDeque<Arc<Vec<LogEntry>>>,
    filling: Vec<LogEntry>,
    /// Entries held, full chunks and the filling one.
    len: usize,
    /// How many entries are kept at most (a whole number of chunks, at least two).
    max_entries: usize,
    /// Entries dropped to the bound since the journal started or was last cleared.
    dropped: u64,
    /// A dropped chunk's memory, cleared, for the next chunk to fill.
    reusable: Option<Vec<LogEntry>>,
    /// Fresh chunks faulted in ahead of need ([`MemoryLog::with_chunk_supply`]).
    supply: Option<ChunkSupply>,
    /// Chunks taken from the supply.
    supplied_chunks: u64,
}

/// Chunks the log has not needed yet, allocated and with their pages faulted in by a helper
/// thread (`ferry-jlog`) that stays [`CHUNKS_SUPPLIED_AHEAD`] ahead of the log. The thread
/// ends when the log has taken every chunk its bound allows, or is dropped.
struct ChunkSupply {
    ready: Receiver<Vec<LogEntry>>,
}

/// Chunks kept ready by the supply.
const CHUNKS_SUPPLIED_AHEAD: usize = 2;

impl ChunkSupply {
    fn start(chunks: usize) -> std::io::Result<Self> {
        let (ready_tx, ready) = sync_channel(CHUNKS_SUPPLIED_AHEAD);
        std::thread::Builder::new()
            .name("ferry-jlog".into())
            .spawn(move || {
                confine::enter(&CHUNK_SUPPLY_SYSCALLS);
                for _ in 0..chunks {
                    if ready_tx.send(faulted_in_chunk()).is_err() {
                        return; // the log is gone
                    }
                }
            })?;
        Ok(Self { ready })
    }

    /// A ready chunk, if the helper has one.
    fn take(&self) -> Option<Vec<LogEntry>> {
        self.ready.try_recv().ok()
    }
}

/// An empty chunk whose memory has been written once, so that its pages exist.
fn faulted_in_chunk() -> Vec<LogEntry> {
    let blank = LogEntry {
        seq: 0,
        stream_id: 0,
        log_id: 0,
        timestamp_ns: 0,
        op: Op::Padding,
        offset_bytes: 0,
        len_bytes: 0,
        medium: 0,
        position_bytes: 0,
    };
    let mut chunk = vec![blank; CHUNK_ENTRIES];
    chunk.clear();
    chunk
}

impl MemoryLog {
    /// A log keeping at most about `max_bytes` of entries (at least two chunks).
    pub fn new(max_bytes: u64) -> Self {
        let chunks = (max_bytes / (CHUNK_ENTRIES as u64 * ENTRY_BYTES)).max(2);
        Self {
            full: VecDeque::new(),
            filling: Vec::new(),
            len: 0,
            max_entries: usize::try_from(chunks)
                .unwrap_or(usize::MAX / CHUNK_ENTRIES)
                .saturating_mul(CHUNK_ENTRIES),
            dropped: 0,
            reusable: None,
            supply: None,
            supplied_chunks: 0,
        }
    }

    /// The log with a [`ChunkSupply`] faulting its chunks in ahead of need (without one, when
    /// the helper thread cannot start: the log then takes the faults itself).
    pub fn with_chunk_supply(mut self) -> Self {
        match ChunkSupply::start(self.max_entries / CHUNK_ENTRIES) {
            Ok(supply) => self.supply = Some(supply),
            Err(e) => log::warn!("journal: no log chunk supply thread ({e})"),
        }
        self
    }

    /// Appends `entries` (their sequence numbers above every entry held).
    pub fn extend(&mut self, mut entries: &[LogEntry]) {
        while !entries.is_empty() {
            if self.filling.len() == CHUNK_ENTRIES {
                self.retire_filling();
            }
            if self.filling.capacity() == 0 {
                match self.supply.as_ref().and_then(ChunkSupply::take) {
                    Some(chunk) => {
                        self.filling = chunk;
                        self.supplied_chunks += 1;
                    }
                    None => self.filling.reserve_exact(CHUNK_ENTRIES),
                }
            }
            let room = CHUNK_ENTRIES - self.filling.len();
            let (now, later) = entries.split_at(room.min(entries.len()));
            self.filling.extend_from_slice(now);
            self.len += now.len();
            entries = later;
        }
    }

    /// Moves the full filling chunk to the shared ones and drops the oldest chunks past the
    /// bound, keeping the memory of one for reuse.
    fn retire_filling(&mut self) {
        self.full
            .push_back(Arc::new(std::mem::take(&mut self.filling)));
        while self.len > self.max_entries {
            let Some(oldest) = self.full.pop_front() else {
                break;
            };
            self.len -= oldest.len();
            self.dropped += oldest.len() as u64;
            // A retrieve still rendering the chunk keeps it; then the next chunk is new.
            if let Ok(mut chunk) = Arc::try_unwrap(oldest) {
                chunk.clear();
                self.reusable = Some(chunk);
            }
        }
        self.filling = self.reusable.take().unwrap_or_default();
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The oldest sequence number held.
    pub fn first_seq(&self) -> Option<u64> {
        self.full
            .front()
            .and_then(|c| c.first())
            .or_else(|| self.filling.first())
            .map(|e| e.seq)
    }

    /// Entries dropped to the bound since the start or the last [`MemoryLog::clear`].
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The most entries held at once.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Drops every entry and the memory they took; returns how many were held.
    pub fn clear(&mut self) -> usize {
        let held = self.len;
        *self = Self {
            max_entries: self.max_entries,
            supply: self.supply.take(),
            ..Self::new(0)
        };
        held
    }

    /// The newest sequence number held.
    pub fn last_seq(&self) -> Option<u64> {
        self.filling
            .last()
            .or_else(|| self.full.back().and_then(|c| c.last()))
            .map(|e| e.seq)
    }

    /// At most `limit` entries with `seq >= since_seq`, oldest first: full chunks shared,
    /// the filling one copied.
    pub fn snapshot_since(&self, since_seq: u64, limit: usize) -> LogSnapshot {
        let mut chunks = Vec::new();
        let mut taken = 0usize;
        for chunk in &self.full {
            if taken >= limit {
                break;
            }
            let newer = chunk.len() - chunk.partition_point(|e| e.seq < since_seq);
            if newer > 0 {
                taken += newer;
                chunks.push(Arc::clone(chunk));
            }
        }
        let from = self.filling.partition_point(|e| e.seq < since_seq);
        let room = limit.saturating_sub(taken).min(self.filling.len() - from);
        LogSnapshot {
            since_seq,
            limit,
            chunks,
            tail: self.filling[from..from + room].to_vec(),
            first_held_seq: self.first_seq(),
            last_held_seq: self.last_seq(),
            dropped: self.dropped,
        }
    }
}

/// A page of the log taken at one moment, readable without the journal's lock.
pub struct LogSnapshot {
    since_seq: u64,
    limit: usize,
    chunks: Vec<Arc<Vec<LogEntry>>>,
    tail: Vec<LogEntry>,
    /// The log's oldest and newest entries then, and how many it had dropped to its bound.
    pub first_held_seq: Option<u64>,
    pub last_held_seq: Option<u64>,
    pub dropped: u64,
}

impl LogSnapshot {
    /// The first sequence number asked for that the log dropped to its bound: entries from
    /// `since_seq` up to the oldest held are only on the media. `None` when the snapshot has
    /// all it was asked for.
    pub fn dropped_from(&self) -> Option<u64> {
        let first = self.first_held_seq.unwrap_or(u64::MAX);
        (self.dropped > 0 && self.since_seq < first).then_some(self.since_seq)
    }

    /// The entries of the page in sequence order.
    pub fn iter(&self) -> impl Iterator<Item = &LogEntry> + '_ {
        let since = self.since_seq;
        self.chunks
            .iter()
            .flat_map(|c| c.iter())
            .skip_while(move |e| e.seq < since)
            .chain(self.tail.iter())
            .take(self.limit)
    }

    pub fn to_vec(&self) -> Vec<LogEntry> {
        self.iter().copied().collect()
    }

    /// Where the next page starts: after this page's last entry, when the log held newer
    /// entries than it when it was taken; `None` when this page reached the newest.
    pub fn next_seq(&self) -> Option<u64> {
        let last = self.iter().last()?.seq;
        (Some(last) < self.last_held_seq).then_some(last + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::format::Op;

    fn entries(seqs: std::ops::Range<u64>) -> Vec<LogEntry> {
        seqs.map(|seq| LogEntry {
            seq,
            stream_id: 1,
            log_id: 1,
            timestamp_ns: seq,
            op: Op::Write,
            offset_bytes: seq * 4096,
            len_bytes: 4096,
            medium: 0,
            position_bytes: seq * 4160,
        })
        .collect()
    }

    fn seqs(log: &MemoryLog, since: u64) -> Vec<u64> {
        log.snapshot_since(since, usize::MAX)
            .iter()
            .map(|e| e.seq)
            .collect()
    }

    /// The helper thread faults in as many chunks as it was asked for, then ends.
    #[test]
    fn the_supply_thread_delivers_its_chunks_then_ends() {
        let hang = std::time::Duration::from_secs(60);
        let supply = ChunkSupply::start(3).expect("supply thread");
        for _ in 0..3 {
            let chunk = supply
                .ready
                .recv_timeout(hang)
                .expect("a chunk from the supply");
            assert!(chunk.is_empty() && chunk.capacity() >= CHUNK_ENTRIES);
        }
        assert!(supply.ready.recv_timeout(hang).is_err(), "a chunk too many");
    }

    /// A log fed from a supply holds what a log that allocates its own chunks holds. The
    /// supply's chunks are made ready before the appends, so that the log takes them
    /// whatever the helper thread's pace.
    #[test]
    fn chunks_from_the_supply_hold_the_same_log() {
        let mut log = MemoryLog::new(4 * CHUNK_ENTRIES as u64 * ENTRY_BYTES);
        let (ready_tx, ready) = sync_channel(4);
        for _ in 0..4 {
            ready_tx.send(faulted_in_chunk()).expect("room for a chunk");
        }
        log.supply = Some(ChunkSupply { ready });
        let n = 9 * CHUNK_ENTRIES as u64 + 5;
        for start in (0..n).step_by(1000) {
            log.extend(&entries(start..(start + 1000).min(n)));
        }
        assert!(log.supplied_chunks > 0, "no chunk came from the supply");
        assert_eq!(log.len() as u64 + log.dropped(), n);
        let first = log.first_seq().unwrap_or(u64::MAX);
        assert_eq!(seqs(&log, 0), (first..n).collect::<Vec<_>>());
        assert_eq!(log.clear() as u64, n - first);
        log.extend(&entries(n..n + 10));
        assert_eq!(seqs(&log, 0), (n..n + 10).collect::<Vec<_>>());
    }

    #[test]
    fn keeps_everything_below_the_bound_in_order() {
        let mut log = MemoryLog::new(1 << 30);
        let n = 3 * CHUNK_ENTRIES as u64 + 17;
        for start in (0..n).step_by(100) {
            log.extend(&entries(start..(start + 100).min(n)));
        }
        assert_eq!(log.len() as u64, n);
        assert_eq!(log.first_seq(), Some(0));
        assert_eq!(log.dropped(), 0);
        assert_eq!(seqs(&log, 0), (0..n).collect::<Vec<_>>());
        let since = CHUNK_ENTRIES as u64 + 5;
        assert_eq!(seqs(&log, since), (since..n).collect::<Vec<_>>());
        assert!(seqs(&log, n).is_empty());
        assert_eq!(log.snapshot_since(0, usize::MAX).dropped_from(), None);
    }

    #[test]
    fn drops_the_oldest_chunks_past_the_bound_and_reuses_their_memory() {
        let mut log = MemoryLog::new(0);
        assert_eq!(log.max_entries(), 2 * CHUNK_ENTRIES);
        let n = 10 * CHUNK_ENTRIES as u64 + 3;
        log.extend(&entries(0..n));
        assert!(log.len() <= log.max_entries() + CHUNK_ENTRIES);
        assert_eq!(log.len() as u64 + log.dropped(), n);
        let first = log.first_seq().unwrap_or(u64::MAX);
        assert_eq!(first, log.dropped());
        assert_eq!(seqs(&log, 0), (first..n).collect::<Vec<_>>());
        assert_eq!(log.snapshot_since(0, usize::MAX).dropped_from(), Some(0));
        assert_eq!(log.snapshot_since(first, usize::MAX).dropped_from(), None);
    }

    #[test]
    fn the_next_chunk_is_filled_in_the_memory_of_the_dropped_one() {
        let chunk = CHUNK_ENTRIES as u64;
        let mut log = MemoryLog::new(0);
        log.extend(&entries(0..3 * chunk));
        let oldest = log.full.front().map(|c| c.as_ptr());
        log.extend(&entries(3 * chunk..3 * chunk + 1));
        assert_eq!(log.dropped(), chunk);
        assert_eq!(Some(log.filling.as_ptr()), oldest);
        assert_eq!(log.filling.len(), 1);
    }

    #[test]
    fn pages_follow_each_other_to_the_newest_entry() {
        let mut log = MemoryLog::new(1 << 30);
        let n = 2 * CHUNK_ENTRIES as u64 + 50;
        log.extend(&entries(1..n + 1));
        let mut got = Vec::new();
        let mut since = 0;
        let mut pages = 0;
        loop {
            let page = log.snapshot_since(since, 1000);
            got.extend(page.iter().map(|e| e.seq));
            pages += 1;
            match page.next_seq() {
                Some(next) => since = next,
                None => break,
            }
        }
        assert_eq!(got, (1..=n).collect::<Vec<_>>());
        assert_eq!(pages, (n as usize).div_ceil(1000));
        assert_eq!(log.snapshot_since(n, 1000).next_seq(), None);
        assert_eq!(log.snapshot_since(n + 1, 1000).to_vec(), Vec::new());
    }

    #[test]
    fn a_snapshot_outlives_the_chunks_it_shares() {
        let mut log = MemoryLog::new(0);
        log.extend(&entries(0..(3 * CHUNK_ENTRIES as u64)));
        let snapshot = log.snapshot_since(0, usize::MAX);
        let before = snapshot.to_vec();
        log.extend(&entries(
            (3 * CHUNK_ENTRIES as u64)..(9 * CHUNK_ENTRIES as u64),
        ));
        assert_eq!(snapshot.to_vec(), before);
        assert_eq!(before.first().map(|e| e.seq), Some(0));
    }

    #[test]
    fn clear_drops_everything_and_keeps_the_bound() {
        let mut log = MemoryLog::new(0);
        log.extend(&entries(0..(5 * CHUNK_ENTRIES as u64)));
        let held = log.len();
        assert_eq!(log.clear(), held);
        assert!(log.is_empty());
        assert_eq!(log.dropped(), 0);
        assert_eq!(log.first_seq(), None);
        assert_eq!(log.max_entries(), 2 * CHUNK_ENTRIES);
        log.extend(&entries(100..101));
        assert_eq!(seqs(&log, 0), vec![100]);
    }
}
