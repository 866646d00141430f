//! What the observing threads and the committing thread share under the journal's state
//! lock: the sequence numbers, the pending batch, the durable progress, the writer's and the
//! mapped tail's states, and how records are encoded into the batch or onto the tail.

use super::{JournalState, MarkResult, JOURNAL_STREAM_ID};
use crate::journal::catalog::{RunRecord, RunState};
use crate::journal::entry::{now_ns, LogEntry};
use crate::journal::format::{
    encode_record_with, record_bytes, GapInfo, Op, RecordHeader, StreamDef, FLAG_GAP_ESTIMATED,
};
use crate::journal::mapped::MappedTail;
use crate::journal::memory_log::MemoryLog;
use crate::journal::options::{JournalMode, JournalOptions};
use crate::journal::recovery::Recovered;
use crate::journal::writer::{AppendPath, MediumWriter, PendingRecord};
use crate::observer::ObserverTicket;

/// Everything the journal's threads share, under the state lock (see the module comment).
pub(super) struct State {
    pub(super) next_seq: u64,
    pub(super) log_id: u32,
    pub(super) label: String,
    pub(super) stream_list: Vec<(u32, StreamDef)>,
    /// The pending batch: encoded records, where each starts, the guest writes held for them.
    pub(super) batch: Vec<u8>,
    pub(super) records: Vec<PendingRecord>,
    pub(super) tickets: Vec<ObserverTicket>,
    pub(super) observed_bytes: u64,
    pub(super) durable_bytes: u64,
    pub(super) durable_seq: u64,
    /// The last sequence number the committer dealt with (made durable or lost to a gap).
    pub(super) processed_seq: u64,
    pub(super) seal_requests: u64,
    pub(super) seals_done: u64,
    pub(super) last_sealed: Option<u32>,
    /// Running, stopped, or paused (`on-full=pause`): then the appender holds records it
    /// could not write, and only the writer thread may go on, when it retries.
    pub(super) phase: JournalState,
    pub(super) reason: Option<String>,
    pub(super) gap_open: Option<u64>,
    pub(super) gaps: Vec<GapInfo>,
    pub(super) log: MemoryLog,
    pub(super) medium: Option<(u32, u64)>,
    pub(super) records_written: u64,
    /// Batches made durable (a batch spanning two media counts once).
    pub(super) group_commits: u64,
    pub(super) writer: WriterState,
    /// The catalog's run record as the writer should store it next.
    pub(super) run: RunRecord,
    /// Someone waits for the pending records to be durable (mark, init): no gathering.
    pub(super) commit_now: bool,
    /// Media opened by taking a formatted spare.
    pub(super) spares_taken: u64,
    /// The last medium opened was opened with `O_DIRECT`.
    pub(super) medium_direct: Option<bool>,
    /// How the writer's appends are made (the last path known).
    pub(super) appends: Option<AppendPath>,
    /// Group commits made by queue threads.
    pub(super) queue_commits: u64,
    pub(super) tail: Tail,
    /// Records appended through a mapped tail.
    pub(super) mapped_records: u64,
}

/// What the writer thread is doing, as far as the other threads must know it: whether a new
/// record must wake it, and whether it is to stop or gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriterState {
    /// Between two looks at the state: it looks again before it sleeps, so nothing needs to
    /// wake it.
    Working,
    /// Asleep on `work` until there is work (or the pause retry is due): a new record wakes
    /// it. Only then is it notified: a condvar notification is a system call even without a
    /// waiter.
    Idle,
    /// Async mode: asleep until `ASYNC_GATHER` has passed since the first pending record;
    /// only a batch of `ASYNC_GATHER_BYTES` or a held write wakes it early.
    Gathering,
    /// `close`: it writes what is pending, seals the medium and exits; writes observed while
    /// it closes are not journaled.
    Closing,
    /// `crash_for_test`: it exits without writing or sealing anything.
    Crashing,
    /// The thread has exited: nothing more becomes durable.
    Exited,
}

impl WriterState {
    /// Asked to close or crash, or gone: it takes no new records.
    pub(super) fn is_stopping(self) -> bool {
        matches!(
            self,
            WriterState::Closing | WriterState::Crashing | WriterState::Exited
        )
    }

    /// The writer is being notified (or has woken up): it counts as awake. A stop asked for
    /// stays asked for.
    pub(super) fn wake(&mut self) {
        if matches!(self, WriterState::Idle | WriterState::Gathering) {
            *self = WriterState::Working;
        }
    }

    /// `close`: the writer is to finish and exit, unless it is crashing or gone already.
    pub(super) fn close(&mut self) {
        if !self.is_stopping() {
            *self = WriterState::Closing;
        }
    }
}

/// The open medium's end, as the writer lends it to the observing threads (`mapped=`, see
/// [`crate::journal::mapped`]).
pub(super) enum Tail {
    /// The writer holds it. `lendable`: tails can be lent (`mapped=` resolved on, a
    /// memory-backed directory, no refusal at the last try); the async writer then does not
    /// gather records, which would keep it from catching up with the stream and lending it.
    Held { lendable: bool },
    /// Lent: records go straight onto it and are durable at once.
    Lent(MappedTail),
    /// Given up because a record did not fit on it: that record and every later one go to
    /// the batch, and the writer takes the tail back before appending them.
    Returned(MappedTail),
}

impl Tail {
    pub(super) fn lendable(&self) -> bool {
        !matches!(self, Tail::Held { lendable: false })
    }

    /// A lent tail is given up: a record did not fit on it.
    fn give_back(&mut self) {
        *self = match std::mem::replace(self, Tail::Held { lendable: true }) {
            Tail::Lent(tail) => Tail::Returned(tail),
            other => other,
        };
    }

    /// Takes the tail back for the writer if it was given up, or, with `also_lent`, if it is
    /// lent (the medium is to be sealed or closed).
    pub(super) fn take_back(&mut self, also_lent: bool) -> Option<MappedTail> {
        let take = match self {
            Tail::Held { .. } => false,
            Tail::Lent(_) => also_lent,
            Tail::Returned(_) => true,
        };
        if !take {
            return None;
        }
        match std::mem::replace(self, Tail::Held { lendable: true }) {
            Tail::Lent(tail) | Tail::Returned(tail) => Some(tail),
            Tail::Held { .. } => None,
        }
    }
}

impl State {
    /// The state of a journal opened on what `rec` recovered: the previous run's unjournaled
    /// writes numbered and recorded as a gap, and a new log started if there is none.
    /// `lends_tail`: the directory takes mapped tails (`mapped=` on, memory-backed).
    pub(super) fn recovered(options: &JournalOptions, rec: &Recovered, lends_tail: bool) -> State {
        let mut state = State {
            next_seq: rec.last_seq + 1,
            log_id: rec.log_id,
            label: rec.label.clone(),
            stream_list: rec
                .streams
                .iter()
                .map(|(id, def)| (*id, def.clone()))
                .collect(),
            batch: Vec::new(),
            records: Vec::new(),
            tickets: Vec::new(),
            observed_bytes: 0,
            durable_bytes: 0,
            durable_seq: rec.last_seq,
            processed_seq: rec.last_seq,
            seal_requests: 0,
            seals_done: 0,
            last_sealed: None,
            phase: JournalState::Running,
            reason: None,
            gap_open: None,
            gaps: Vec::new(),
            log: MemoryLog::new(options.log_memory_bytes).with_chunk_supply(),
            medium: None,
            records_written: 0,
            group_commits: 0,
            writer: WriterState::Working,
            run: State::running(options.mode == JournalMode::Async),
            commit_now: false,
            spares_taken: 0,
            medium_direct: None,
            appends: None,
            queue_commits: 0,
            tail: Tail::Held {
                lendable: lends_tail,
            },
            mapped_records: 0,
        };
        if let Some((gap, estimated)) = rec.resume_gap {
            // The previous run's unjournaled writes: numbered, then recorded as a gap.
            state.next_seq = state
                .next_seq
                .max(gap.first_missing_seq + gap.missing_count);
            let mut header = state.header(Op::Gap, JOURNAL_STREAM_ID);
            if estimated {
                header.flags |= FLAG_GAP_ESTIMATED;
            }
            let payload = gap.encode();
            state.push(header, payload.len(), |out| out.copy_from_slice(&payload));
            state.gaps.push(gap);
        }
        if rec.fresh || rec.log_id == 0 {
            state.log_id += 1;
            state.label = options.label.clone();
            let label = state.label.clone();
            state.push_labelled(Op::LogInit, &label);
        }
        state
    }

    /// Copies what `status` reports of the writer: the append point, spares, direct I/O.
    pub(super) fn note_writer(&mut self, writer: &MediumWriter) {
        self.medium = writer.position();
        self.spares_taken = writer.spares_taken();
        self.medium_direct = writer.direct().or(self.medium_direct);
        self.appends = writer.append_path().or(self.appends);
    }

    pub(super) fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Encodes a sequenced record whose payload (`payload_len` bytes) `fill` writes: onto
    /// the mapped tail if one is lent and the record fits there (it is durable then: returns
    /// `true`), else into the pending batch for the next group commit.
    pub(super) fn push(
        &mut self,
        header: RecordHeader,
        payload_len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> bool {
        let mut header = header;
        header.payload_len_bytes = payload_len as u32;
        let fill = match &mut self.tail {
            Tail::Lent(tail) => match tail.append(header, fill) {
                Ok(entry) => {
                    let bytes = record_bytes(payload_len) as u64;
                    self.observed_bytes += bytes;
                    self.durable_bytes += bytes;
                    self.durable_seq = self.durable_seq.max(entry.seq);
                    self.processed_seq = self.processed_seq.max(entry.seq);
                    self.records_written += 1;
                    self.mapped_records += 1;
                    self.log.extend(std::slice::from_ref(&entry));
                    self.medium = Some((tail.medium, tail.position_bytes));
                    return true;
                }
                Err(fill) => {
                    self.tail.give_back();
                    fill
                }
            },
            Tail::Held { .. } | Tail::Returned(_) => fill,
        };
        let offset = self.batch.len();
        encode_record_with(&mut self.batch, header, payload_len, fill);
        self.observed_bytes += (self.batch.len() - offset) as u64;
        self.records.push(PendingRecord {
            batch_offset: offset,
            // Medium and position are filled in when the writer appends it.
            entry: LogEntry::of(&header, 0, 0),
        });
        false
    }

    pub(super) fn header(&mut self, op: Op, stream_id: u32) -> RecordHeader {
        RecordHeader {
            op,
            flags: 0,
            seq: self.take_seq(),
            stream_id,
            log_id: self.log_id,
            timestamp_ns: now_ns(),
            offset_bytes: 0,
            len_bytes: 0,
            payload_len_bytes: 0,
            payload_crc: 0,
        }
    }

    /// The stream id of (volume, queue), defining it (a stream-def record) on first use.
    pub(super) fn stream_for(&mut self, volume: &str, queue_index: u16) -> u32 {
        // A scan of the few streams: no allocation per write (a map keyed by an owned
        // name would need one per lookup).
        if let Some((id, _)) = self
            .stream_list
            .iter()
            .find(|(_, d)| d.queue_index == queue_index && d.volume == volume)
        {
            return *id;
        }
        let id = self
            .stream_list
            .iter()
            .map(|(id, _)| *id)
            .max()
            .unwrap_or(0)
            + 1;
        let def = StreamDef {
            volume: volume.to_string(),
            queue_index,
        };
        let header = self.header(Op::StreamDef, id);
        let payload = def.encode();
        self.push(header, payload.len(), |out| out.copy_from_slice(&payload));
        self.stream_list.push((id, def));
        id
    }

    pub(super) fn push_labelled(&mut self, op: Op, label: &str) -> MarkResult {
        let header = self.header(op, JOURNAL_STREAM_ID);
        self.push(header, label.len(), |out| {
            out.copy_from_slice(label.as_bytes())
        });
        MarkResult {
            seq: header.seq,
            log_id: header.log_id,
            label: label.to_string(),
            timestamp_ns: header.timestamp_ns,
        }
    }

    pub(super) fn lag_bytes(&self) -> u64 {
        self.observed_bytes.saturating_sub(self.durable_bytes)
    }

    /// The run record for a journal that is running.
    pub(super) fn running(async_mode: bool) -> RunRecord {
        RunRecord {
            state: RunState::Running,
            async_mode,
            first_unjournaled_seq: 0,
            unjournaled_count: 0,
        }
    }

    /// The run record at close: cleanly closed, or stopped with the final count.
    pub(super) fn closing_run(&self) -> RunRecord {
        let (first, count) = match self.open_gap() {
            Some(g) => (g.first_missing_seq, g.missing_count),
            None => (self.next_seq, 0),
        };
        RunRecord {
            state: if self.phase == JournalState::Stopped {
                RunState::Stopped
            } else {
                RunState::Closed
            },
            first_unjournaled_seq: first,
            unjournaled_count: count,
            ..self.run
        }
    }

    pub(super) fn open_gap(&self) -> Option<GapInfo> {
        self.gap_open.map(|first| GapInfo {
            first_missing_seq: first,
            missing_count: self.next_seq - first,
        })
    }
}
