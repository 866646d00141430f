//! The group commit: a batch taken from the state is appended to the medium and made durable
//! by whichever thread holds the appender (the writer thread, or a queue thread with
//! `committer=queue`), its records then count as durable and the guest writes held for them
//! are released; a failure stops the journal, full media pause it (`on-full=pause`).

use std::time::Instant;

use super::state::{State, Tail};
use super::{JournalState, Shared, PAUSE_RETRY};
use crate::journal::catalog::{RunRecord, RunState, COUNT_UNKNOWN};
use crate::journal::entry::LogEntry;
use crate::journal::options::{JournalMode, OnFull};
use crate::journal::prologue::Prologue;
use crate::journal::writer::{AppendPath, MediumWriter, PendingRecord, WriteFailure};
use crate::observer::ObserverTicket;

/// Async mode appends a long trail in pieces of at most this, so that writes held at
/// `lag-max` wait for one piece, not for the whole trail (up to `lag-max`;
/// `benches/journal-notes.md`, *The async trail goes out in 1 MiB pieces*).
const ASYNC_APPEND_BYTES: usize = 1 << 20;

/// A batch taken from the state for writing.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) bytes: Vec<u8>,
    pub(super) records: Vec<PendingRecord>,
    pub(super) tickets: Vec<ObserverTicket>,
    pub(super) last_seq: u64,
}

impl Batch {
    /// Appends what is pending in `st` (the carried, unwritten part of an earlier batch
    /// comes first).
    pub(super) fn take_from(&mut self, st: &mut State) {
        let base = self.bytes.len();
        if base == 0 {
            std::mem::swap(&mut self.bytes, &mut st.batch);
            std::mem::swap(&mut self.records, &mut st.records);
        } else {
            self.bytes.extend_from_slice(&st.batch);
            st.batch.clear();
            self.records.extend(st.records.drain(..).map(|mut r| {
                r.batch_offset += base;
                r
            }));
        }
        self.tickets.append(&mut st.tickets);
        self.last_seq = st.next_seq - 1;
    }

    /// Drops the first `n` records (written), keeping the rest.
    pub(super) fn keep_after(&mut self, n: usize) {
        let Some(first) = self.records.get(n).map(|r| r.batch_offset) else {
            self.bytes.clear();
            self.records.clear();
            return;
        };
        self.bytes.drain(..first);
        self.records.drain(..n);
        for r in &mut self.records {
            r.batch_offset -= first;
        }
    }
}

/// Writes the carried batch. Returns when to retry if the media are full and the journal
/// pauses; otherwise the batch is consumed (written, or lost to a recorded gap).
pub(super) fn write_carry(
    shared: &Shared,
    writer: &mut MediumWriter,
    carry: &mut Batch,
    prologue: &Prologue,
) -> Option<Instant> {
    if carry.records.is_empty() {
        ObserverTicket::complete_all(&mut carry.tickets, true);
        return None;
    }
    let mut written = Vec::with_capacity(carry.records.len());
    let (result, accounted) = append_in_pieces(shared, writer, carry, prologue, &mut written);
    let mut st = shared.lock();
    account(&mut st, writer, carry, &written[accounted..], accounted);
    let pause = matches!(result, Err(WriteFailure::Full))
        && shared.options.on_full == OnFull::Pause
        && !st.writer.is_stopping();
    if pause {
        carry.keep_after(written.len());
        st.phase = JournalState::Paused;
        st.reason =
            Some("every allowed medium is full: guest writes are held (on-full=pause)".into());
        st.processed_seq = st.durable_seq;
        shared.wake_progress();
        return Some(Instant::now() + PAUSE_RETRY);
    }
    if let Err(e) = result {
        let written_bytes = carry
            .records
            .get(written.len())
            .map_or(carry.bytes.len(), |r| r.batch_offset) as u64;
        let first_lost = carry.records.get(written.len()).map(|r| r.entry.seq);
        let lost_bytes = carry.bytes.len() as u64 - written_bytes;
        st.durable_bytes += lost_bytes;
        stop(&mut st, writer, e.to_string(), first_lost);
    } else if st.phase == JournalState::Paused {
        st.phase = JournalState::Running;
        st.reason = None;
    }
    st.processed_seq = carry.last_seq;
    carry.bytes.clear();
    carry.records.clear();
    lend_tail(shared, &mut st, writer);
    drop(st);
    ObserverTicket::complete_all(&mut carry.tickets, true);
    shared.wake_progress();
    None
}

/// Appends the carried batch, oldest records first, in appends of at most
/// `ASYNC_APPEND_BYTES` in async mode (one append in sync mode), and makes every append but
/// the last count at once. Returns how the last append went and how many of the entries in
/// `written` were accounted.
///
/// Async mode: writes held at `lag-max` wait only until the trail is back under it, not for
/// the whole trail (up to `lag-max` bytes) to be written: after each append that leaves the
/// lag under `lag-max` the held writes are released (those held while it was written too).
fn append_in_pieces(
    shared: &Shared,
    writer: &mut MediumWriter,
    carry: &mut Batch,
    prologue: &Prologue,
    written: &mut Vec<LogEntry>,
) -> (Result<(), WriteFailure>, usize) {
    let chunk_bytes = match shared.options.mode {
        JournalMode::Async => ASYNC_APPEND_BYTES,
        JournalMode::Sync => usize::MAX,
    };
    let mut accounted = 0;
    let mut start = 0;
    loop {
        let end = chunk_end(&carry.records, start, chunk_bytes);
        let end_off = carry
            .records
            .get(end)
            .map_or(carry.bytes.len(), |r| r.batch_offset);
        let result = writer.write_batch(
            &carry.bytes[..end_off],
            &carry.records[start..end],
            prologue,
            written,
        );
        if result.is_err() || end == carry.records.len() {
            return (result, accounted);
        }
        start = end;
        let mut st = shared.lock();
        account(&mut st, writer, carry, &written[accounted..], accounted);
        accounted = written.len();
        if st.lag_bytes() <= shared.options.lag_max_bytes && st.phase == JournalState::Running {
            carry.tickets.append(&mut st.tickets);
            drop(st);
            ObserverTicket::complete_all(&mut carry.tickets, true);
        } else {
            drop(st);
        }
        shared.wake_progress();
    }
}

/// Lends the open medium's end to the observing threads (`mapped=` on) once the writer has
/// nothing left to write: no pending record, no seal or close waiting, the journal running.
fn lend_tail(shared: &Shared, st: &mut State, writer: &mut MediumWriter) {
    let idle = st.batch.is_empty()
        && st.phase == JournalState::Running
        && !st.writer.is_stopping()
        && st.seal_requests == st.seals_done;
    if !shared.options.maps_media() || !idle || !matches!(st.tail, Tail::Held { .. }) {
        return;
    }
    st.tail = match writer.lend_tail(st.next_seq - 1) {
        Some(tail) => {
            st.medium = Some((tail.medium, tail.position_bytes));
            st.appends = Some(AppendPath::Mapped);
            Tail::Lent(tail)
        }
        None => Tail::Held { lendable: false },
    };
}

/// The exclusive end of the records from `start` that fill at most `chunk_bytes` (at least
/// one record).
fn chunk_end(records: &[PendingRecord], start: usize, chunk_bytes: usize) -> usize {
    let Some(first) = records.get(start) else {
        return start;
    };
    let limit = first.batch_offset.saturating_add(chunk_bytes);
    let mut end = start + 1;
    while end < records.len() && records[end].batch_offset < limit {
        end += 1;
    }
    end
}

/// Makes `written` (the carry's records from index `from` on, just made durable) count in
/// the journal's state: durable sequence and bytes, the log, the writer's position.
fn account(
    st: &mut State,
    writer: &MediumWriter,
    carry: &Batch,
    written: &[LogEntry],
    from: usize,
) {
    st.note_writer(writer);
    if written.is_empty() {
        return;
    }
    let start_off = carry.records.get(from).map_or(0, |r| r.batch_offset);
    let end_off = carry
        .records
        .get(from + written.len())
        .map_or(carry.bytes.len(), |r| r.batch_offset);
    st.records_written += written.len() as u64;
    st.group_commits += 1;
    if let Some(last) = written.last() {
        st.durable_seq = st.durable_seq.max(last.seq);
    }
    st.log.extend(written);
    st.durable_bytes += (end_off - start_off) as u64;
}

/// Stops journaling after a failure: the guest goes on, the lost range becomes a gap.
pub(super) fn stop(
    st: &mut State,
    writer: &mut MediumWriter,
    reason: String,
    first_lost: Option<u64>,
) {
    log::error!("journal stopped: {reason}; guest writes continue UNJOURNALED until journal-init");
    writer.abandon();
    st.phase = JournalState::Stopped;
    st.reason = Some(reason);
    if st.gap_open.is_none() {
        st.gap_open = Some(first_lost.unwrap_or(st.next_seq));
    }
    // The catalog says so at once (the medium may be full or unwritable); the count is
    // final only at close.
    st.run = RunRecord {
        state: RunState::Stopped,
        first_unjournaled_seq: st.gap_open.unwrap_or(st.next_seq),
        unjournaled_count: COUNT_UNKNOWN,
        ..st.run
    };
    writer.set_run(st.run);
    if let Err(e) = writer.store_catalog() {
        log::error!("journal: cannot record the stop in the catalog: {e}");
    }
    // Records observed after the failed batch are lost too.
    st.durable_bytes += st.batch.len() as u64;
    st.batch.clear();
    st.records.clear();
    for t in st.tickets.drain(..) {
        t.complete(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::format::Op;

    fn records_at(offsets: &[usize]) -> Vec<PendingRecord> {
        offsets
            .iter()
            .enumerate()
            .map(|(i, &batch_offset)| PendingRecord {
                batch_offset,
                entry: LogEntry {
                    seq: i as u64 + 1,
                    stream_id: 1,
                    log_id: 1,
                    timestamp_ns: 0,
                    op: Op::Write,
                    offset_bytes: 0,
                    len_bytes: 0,
                    medium: 0,
                    position_bytes: 0,
                },
            })
            .collect()
    }

    /// Pieces cover every record once, in order, and start no record past the limit; a
    /// record bigger than the limit is a piece of its own.
    #[test]
    fn chunk_end_cuts_pieces_at_record_boundaries() {
        let records = records_at(&[0, 100, 200, 250, 900, 1000, 1100]);
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < records.len() {
            let end = chunk_end(&records, start, 300);
            assert!(end > start);
            pieces.push((start, end));
            start = end;
        }
        assert_eq!(pieces, [(0, 4), (4, 7)]);
        assert_eq!(
            chunk_end(&records, 3, 300),
            4,
            "250..900 alone exceeds the limit"
        );
        assert_eq!(chunk_end(&records, 0, usize::MAX), records.len());
        assert_eq!(chunk_end(&records, records.len(), 300), records.len());
    }
}
