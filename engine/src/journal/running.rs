//! The running journal: the write observer on the guest's hot path, the group-commit writer
//! thread behind it, and the control operations (init, status, retrieve, seal, clear, mark).
//!
//! `observe` assigns the sequence number and copies the write's data into the pending batch
//! under one mutex; the writer thread takes the whole batch, appends it to the medium with
//! one write + one `fdatasync` through io_uring, and then releases the guest writes it held.
//! With `committer=queue` the queue thread that submitted the writes makes that commit
//! itself at the end of its batch ([`WriteObserver::batch_submitted`]): whoever holds the
//! appender commits everything pending, the others leave their records to it. On a
//! memory-backed medium with `mapped=` on, the writer lends the medium's end whenever it is
//! idle, and `observe` encodes records straight onto it instead of into the batch
//! ([`super::mapped`]): durable at once, no commit at all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::catalog::{RunRecord, RunState, COUNT_UNKNOWN};
use super::entry::{now_ns, LogEntry};
use super::error::JournalError;
use super::format::{
    encode_record_with, record_bytes, GapInfo, Op, RecordHeader, StopCause, StopInfo, StreamDef,
    FLAG_GAP_ESTIMATED, FLAG_UNMAP,
};
use super::mapped::MappedTail;
use super::memory_log::{LogSnapshot, MemoryLog};
use super::options::{Committer, JournalMode, JournalOptions, OnFull};
use super::recovery::{recover, RecoveredTail};
use super::writer::{AppendPath, MediumWriter, PendingRecord, Prologue, WriteFailure};
use crate::observer::{ObserverTicket, WriteEvent, WriteKind, WriteObserver};

/// How often a paused journal (on-full=pause) retries to open a medium.
const PAUSE_RETRY: Duration = Duration::from_secs(1);
/// In async mode the writer gathers records for at most this long after the first one of a
/// batch before appending them (unless `ASYNC_GATHER_BYTES` are pending first): one wake-up
/// and one append per interval instead of one per handful of records.
const ASYNC_GATHER: Duration = Duration::from_micros(500);
/// In async mode, pending bytes that end the gathering at once. Small enough that under a
/// heavy stream the writer starts every ~100 µs on a batch still in cache and the trail stays
/// short (with 1 MiB it ran into `lag-max` and held the guest: 4K async 0.77x → 0.95x of
/// journal-off); a light stream is still gathered for `ASYNC_GATHER`, which keeps the
/// padding of each append's last block a small share of the medium.
const ASYNC_GATHER_BYTES: usize = 64 << 10;
/// Async mode appends a long trail in pieces of at most this, so that writes held at
/// `lag-max` wait for one piece (a few ms), not for the whole trail (up to `lag-max`).
const ASYNC_APPEND_BYTES: usize = 1 << 20;
/// With queue-thread commits, how many times one queue thread commits what others left
/// pending before it hands the rest to the writer thread and goes back to its own queue.
const INLINE_COMMIT_ROUNDS: usize = 4;
/// The stream id of records that belong to no volume (marks, log-init, gaps).
pub const JOURNAL_STREAM_ID: u32 = 0;

/// Whether the journal is taking writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalState {
    Running,
    /// Journaling stopped (write error or last medium full); guest writes go on unjournaled.
    Stopped,
    /// on-full=pause: the media are full; guest writes are held until room appears.
    Paused,
}

/// The answer of `status()`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JournalStatus {
    pub state: JournalState,
    /// Why the journal is stopped or paused, loudly.
    pub reason: Option<String>,
    pub mode: JournalMode,
    pub dir: String,
    /// The medium being written and the append position on it.
    pub medium: Option<u32>,
    pub position_bytes: u64,
    /// Records made durable since the journal was opened.
    pub records: u64,
    /// Group commits (appends + flushes) that made those records durable.
    pub group_commits: u64,
    pub next_seq: u64,
    pub durable_seq: u64,
    /// Bytes observed but not yet durable.
    pub lag_bytes: u64,
    /// Gaps recorded in the journal, and the one still open while stopped.
    pub gaps: Vec<GapInfo>,
    pub open_gap: Option<GapInfo>,
    pub log_id: u32,
    pub label: String,
    /// Entries in the in-memory log, the oldest sequence number it holds, entries dropped
    /// from it to its bound (`log-memory=`) since the start or the last clear, and the bound.
    pub log_entries: usize,
    pub log_first_seq: Option<u64>,
    pub log_dropped: u64,
    pub log_max_entries: usize,
    pub recovered_torn_tail: Option<RecoveredTail>,
    /// Media opened by taking a formatted spare (`spares=N`).
    pub spares_taken: u64,
    /// Whether media are appended with `O_DIRECT` (`cache=`); unknown before the first
    /// medium is opened.
    pub medium_direct: Option<bool>,
    /// Whether group commits go through io_uring (`false`: the kernel refused a ring, the
    /// writer uses `pwritev` + `fdatasync`); unknown before the first append, and before
    /// any append to a medium that is not memory-backed.
    pub appends_io_uring: Option<bool>,
    /// How group commits are written: `io_uring`, `pwritev` (no ring) or `memory`
    /// (memory-backed media, `pwritev` on the committing thread); unknown before the first.
    pub appends: Option<AppendPath>,
    /// Who makes group commits: `writer` or `queue` (`committer=`, resolved).
    pub committer: Committer,
    /// Group commits made by queue threads (the rest were made by the writer thread).
    pub queue_commits: u64,
    /// Records the observing threads appended straight onto a mapped medium (`mapped=`:
    /// durable at once, in no group commit).
    pub mapped_records: u64,
}

/// The answer of `mark()` and `init()`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MarkResult {
    pub seq: u64,
    pub log_id: u32,
    pub label: String,
    pub timestamp_ns: u64,
}

/// The answer of `seal()`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SealResult {
    /// The medium that was sealed (none if no medium was open).
    pub sealed_medium: Option<u32>,
}

struct State {
    next_seq: u64,
    log_id: u32,
    label: String,
    stream_list: Vec<(u32, StreamDef)>,
    batch: Vec<u8>,
    records: Vec<PendingRecord>,
    tickets: Vec<ObserverTicket>,
    observed_bytes: u64,
    durable_bytes: u64,
    durable_seq: u64,
    processed_seq: u64,
    seal_requests: u64,
    seals_done: u64,
    last_sealed: Option<u32>,
    phase: JournalState,
    reason: Option<String>,
    gap_open: Option<u64>,
    gaps: Vec<GapInfo>,
    log: MemoryLog,
    medium: Option<(u32, u64)>,
    records_written: u64,
    /// Batches made durable (a batch spanning two media counts once).
    group_commits: u64,
    shutdown: bool,
    crashed: bool,
    writer_exited: bool,
    /// The catalog's run record as the writer should store it next.
    run: RunRecord,
    /// The writer sleeps on `work`: only then does a new record need to wake it (a
    /// condvar notification is a system call even without a waiter).
    writer_idle: bool,
    /// Async mode: the writer sleeps until `ASYNC_GATHER` has passed since the first
    /// pending record; only a batch of `ASYNC_GATHER_BYTES` or a held write wakes it early.
    writer_gathering: bool,
    /// Someone waits for the pending records to be durable (mark, init): no gathering.
    commit_now: bool,
    /// Media opened by taking a formatted spare.
    spares_taken: u64,
    /// The last medium opened was opened with `O_DIRECT`.
    medium_direct: Option<bool>,
    /// How the writer's appends are made (the last path known).
    appends: Option<AppendPath>,
    /// The appender holds records it could not write (media full, on-full=pause): only the
    /// writer thread may go on, when it retries.
    carry_waiting: bool,
    /// Group commits made by queue threads.
    queue_commits: u64,
    /// The open medium's end, lent by the writer (`mapped=`): records go straight onto
    /// it and are durable at once, while it is here.
    mapped: Option<MappedTail>,
    /// A lent tail given up because a record did not fit on it: that record and every later
    /// one go to the batch, and the writer takes the tail back before appending them.
    mapped_returned: Option<MappedTail>,
    /// Records appended through a mapped tail.
    mapped_records: u64,
    /// Tails can be lent (`mapped=` resolved on, a memory-backed directory, no refusal at
    /// the last try): the async writer then does not gather records, which would keep it
    /// from catching up with the stream and lending the tail.
    lends_tail: bool,
}

impl State {
    /// Copies what `status` reports of the writer: the append point, spares, direct I/O.
    fn note_writer(&mut self, writer: &MediumWriter) {
        self.medium = writer.position();
        self.spares_taken = writer.spares_taken();
        self.medium_direct = writer.direct().or(self.medium_direct);
        self.appends = writer.append_path().or(self.appends);
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Encodes a sequenced record whose payload (`payload_len` bytes) `fill` writes: onto
    /// the mapped tail if one is lent and the record fits there (it is durable then: returns
    /// `true`), else into the pending batch for the next group commit.
    fn push(
        &mut self,
        header: RecordHeader,
        payload_len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> bool {
        let mut header = header;
        header.payload_len_bytes = payload_len as u32;
        let fill = match self.mapped.as_mut() {
            Some(tail) => match tail.append(header, fill) {
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
                    self.mapped_returned = self.mapped.take();
                    fill
                }
            },
            None => fill,
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

    fn header(&mut self, op: Op, stream_id: u32) -> RecordHeader {
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
    fn stream_for(&mut self, volume: &str, queue_index: u16) -> u32 {
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

    fn push_labelled(&mut self, op: Op, label: &str) -> MarkResult {
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

    fn lag_bytes(&self) -> u64 {
        self.observed_bytes.saturating_sub(self.durable_bytes)
    }

    /// The run record for a journal that is running.
    fn running(async_mode: bool) -> RunRecord {
        RunRecord {
            state: RunState::Running,
            async_mode,
            first_unjournaled_seq: 0,
            unjournaled_count: 0,
        }
    }

    /// The run record at close: cleanly closed, or stopped with the final count.
    fn closing_run(&self) -> RunRecord {
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

    fn open_gap(&self) -> Option<GapInfo> {
        self.gap_open.map(|first| GapInfo {
            first_missing_seq: first,
            missing_count: self.next_seq - first,
        })
    }
}

struct Shared {
    options: JournalOptions,
    /// `committer=` resolved: `Writer` or `Queue` (queue threads commit in `sync` mode).
    committer: Committer,
    /// The medium writer and what it carries between commits; taken before `state`.
    appender: Mutex<Appender>,
    state: Mutex<State>,
    /// Signalled when there is work for the writer.
    work: Condvar,
    /// Signalled when the writer finished a batch or a seal.
    progress: Condvar,
    /// Threads waiting on `progress` (marks, seals, close): commits notify only when some
    /// wait (a condvar notification is a system call even without a waiter).
    progress_waiters: AtomicUsize,
}

/// What a group commit needs besides the state: whoever holds it makes the commit.
struct Appender {
    writer: MediumWriter,
    carry: Batch,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn appender(&self) -> MutexGuard<'_, Appender> {
        self.appender.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The appender if nobody else holds it.
    fn try_appender(&self) -> Option<MutexGuard<'_, Appender>> {
        match self.appender.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Waits on `progress` (the caller rechecks its condition).
    fn wait_progress<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.progress_waiters.fetch_add(1, Ordering::SeqCst);
        let st = self.progress.wait(st).unwrap_or_else(|p| p.into_inner());
        self.progress_waiters.fetch_sub(1, Ordering::SeqCst);
        st
    }

    /// Wakes the threads waiting on `progress`, if any. Callers changed the state under its
    /// lock before: a waiter either saw the change or had counted itself before this looks.
    fn wake_progress(&self) {
        if self.progress_waiters.load(Ordering::SeqCst) > 0 {
            self.progress.notify_all();
        }
    }

    /// Queue threads make the group commits (`committer=queue`).
    fn queue_commits(&self) -> bool {
        self.committer == Committer::Queue
    }

    /// Takes everything pending in `st` into the appender's carry and says what the
    /// medium must restate if the append opens a new one.
    fn take_pending(&self, st: &mut State, app: &mut Appender) -> Prologue {
        // A lent tail comes back before the writer touches the medium: when a record did not
        // fit on it, or the medium is to be sealed or closed.
        let reclaim = st.mapped_returned.take().or_else(|| {
            let sealing = st.seal_requests > st.seals_done || st.shutdown;
            sealing.then(|| st.mapped.take()).flatten()
        });
        if let Some(tail) = reclaim {
            app.writer.reclaim_tail(tail);
            st.note_writer(&app.writer);
        }
        app.carry.take_from(st);
        st.commit_now = false;
        app.writer.set_run(st.run);
        Prologue {
            streams: st.stream_list.clone(),
            log_id: st.log_id,
            label: st.label.clone(),
            last_seq: app.carry.last_seq,
        }
    }
}

/// Resolves `committer=auto`: the writer thread, whose commits overlap the queues' work
/// (`committer=queue` is for hosts with no CPU to spare for it; see docs/journal.md).
fn resolve_committer(options: &JournalOptions) -> Committer {
    match options.committer {
        Committer::Auto => Committer::Writer,
        chosen => chosen,
    }
}

/// A write journal on a directory of media. Register it on volumes with
/// [`Journal::observer`]; call [`Journal::close`] on shutdown.
pub struct Journal {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    recovered_torn_tail: Option<RecoveredTail>,
}

impl Journal {
    /// Opens (creating or recovering) the journal in `options.dir` and starts its writer.
    pub fn open(options: JournalOptions) -> Result<Arc<Journal>, JournalError> {
        options.validate()?;
        let rec = recover(&options.dir)?;
        let mut stream_list = Vec::new();
        for (id, def) in &rec.streams {
            stream_list.push((*id, def.clone()));
        }
        let mut state = State {
            next_seq: rec.last_seq + 1,
            log_id: rec.log_id,
            label: rec.label.clone(),
            stream_list,
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
            shutdown: false,
            crashed: false,
            writer_exited: false,
            run: State::running(options.mode == JournalMode::Async),
            writer_idle: false,
            writer_gathering: false,
            commit_now: false,
            spares_taken: 0,
            medium_direct: None,
            appends: None,
            carry_waiting: false,
            queue_commits: 0,
            mapped: None,
            mapped_returned: None,
            mapped_records: 0,
            lends_tail: options.maps_media() && dir_is_memory_backed(&options.dir),
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
        let mut writer = MediumWriter::new(
            options.clone(),
            rec.journal_id,
            rec.next_medium_index,
            rec.prev_valid_end_bytes,
            rec.catalog.clone(),
        );
        writer.set_run(state.run);
        writer.store_catalog()?;
        let shared = Arc::new(Shared {
            committer: resolve_committer(&options),
            options,
            appender: Mutex::new(Appender {
                writer,
                carry: Batch::default(),
            }),
            state: Mutex::new(state),
            work: Condvar::new(),
            progress: Condvar::new(),
            progress_waiters: AtomicUsize::new(0),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-journal".into())
            .spawn(move || writer_main(&thread_shared))
            .map_err(JournalError::Thread)?;
        Ok(Arc::new(Journal {
            shared,
            thread: Mutex::new(Some(thread)),
            recovered_torn_tail: rec.torn_tail,
        }))
    }

    /// The journal as a volume's write observer (the same object serves every volume: the
    /// event names its volume and queue).
    pub fn observer(self: &Arc<Self>) -> Arc<dyn WriteObserver> {
        self.clone()
    }

    /// Same as [`Journal::observer`]; `volume` is only checked for being non-empty.
    pub fn observer_for(self: &Arc<Self>, volume: &str) -> Arc<dyn WriteObserver> {
        debug_assert!(!volume.is_empty());
        self.clone()
    }

    pub fn options(&self) -> &JournalOptions {
        &self.shared.options
    }

    /// Starts a new log labelled `label`, ending the current one. A stopped journal is
    /// restarted on a new medium, recording the gap first.
    pub fn init(&self, label: &str) -> Result<MarkResult, JournalError> {
        let mut st = self.shared.lock();
        if st.phase == JournalState::Stopped {
            st.phase = JournalState::Running;
            st.reason = None;
            st.run = State::running(self.shared.options.mode == JournalMode::Async);
            if let Some(gap) = st.open_gap() {
                let header = st.header(Op::Gap, JOURNAL_STREAM_ID);
                let gap = GapInfo {
                    missing_count: header.seq - gap.first_missing_seq,
                    ..gap
                };
                let payload = gap.encode();
                st.push(header, payload.len(), |out| out.copy_from_slice(&payload));
                st.gaps.push(gap);
                st.gap_open = None;
            }
        }
        st.log_id += 1;
        st.label = label.to_string();
        let result = st.push_labelled(Op::LogInit, label);
        self.wait_durable(st, result.seq)?;
        Ok(result)
    }

    /// Records a named point; returns once it is durable.
    pub fn mark(&self, label: &str) -> Result<MarkResult, JournalError> {
        let mut st = self.shared.lock();
        if st.phase == JournalState::Stopped {
            return Err(JournalError::Stopped(st.reason.clone().unwrap_or_default()));
        }
        let result = st.push_labelled(Op::Mark, label);
        self.wait_durable(st, result.seq)?;
        Ok(result)
    }

    fn wait_durable(&self, mut st: MutexGuard<'_, State>, seq: u64) -> Result<(), JournalError> {
        if st.processed_seq < seq {
            st.commit_now = true;
            self.shared.work.notify_one();
        }
        while st.processed_seq < seq && !st.writer_exited {
            st = self.shared.wait_progress(st);
        }
        if st.durable_seq >= seq {
            Ok(())
        } else {
            Err(JournalError::Stopped(
                st.reason.clone().unwrap_or_else(|| "journal closed".into()),
            ))
        }
    }

    /// Writes the current medium's log as a trailer, closes it; the journal continues on
    /// the next medium.
    pub fn seal(&self) -> Result<SealResult, JournalError> {
        let mut st = self.shared.lock();
        st.seal_requests += 1;
        let target = st.seal_requests;
        self.shared.work.notify_one();
        while st.seals_done < target && !st.writer_exited {
            st = self.shared.wait_progress(st);
        }
        if st.phase == JournalState::Stopped {
            return Err(JournalError::Stopped(st.reason.clone().unwrap_or_default()));
        }
        Ok(SealResult {
            sealed_medium: st.last_sealed,
        })
    }

    /// Drops the in-memory log; returns how many entries were dropped.
    pub fn clear(&self) -> usize {
        let mut st = self.shared.lock();
        st.log.clear()
    }

    /// At most `limit` log entries with `seq >= since_seq` (durable records only) as far as
    /// the in-memory log still holds them (see [`JournalStatus::log_first_seq`]); the
    /// snapshot says where the next page starts.
    pub fn retrieve(&self, since_seq: u64, limit: usize) -> LogSnapshot {
        self.shared.lock().log.snapshot_since(since_seq, limit)
    }

    pub fn status(&self) -> JournalStatus {
        let st = self.shared.lock();
        JournalStatus {
            state: st.phase,
            reason: st.reason.clone(),
            mode: self.shared.options.mode,
            dir: self.shared.options.dir.display().to_string(),
            medium: st.medium.map(|m| m.0),
            position_bytes: st.medium.map_or(0, |m| m.1),
            records: st.records_written,
            group_commits: st.group_commits,
            next_seq: st.next_seq,
            durable_seq: st.durable_seq,
            lag_bytes: st.lag_bytes(),
            gaps: st.gaps.clone(),
            open_gap: st.open_gap(),
            log_id: st.log_id,
            label: st.label.clone(),
            log_entries: st.log.len(),
            log_first_seq: st.log.first_seq(),
            log_dropped: st.log.dropped(),
            log_max_entries: st.log.max_entries(),
            recovered_torn_tail: self.recovered_torn_tail,
            spares_taken: st.spares_taken,
            medium_direct: st.medium_direct,
            appends_io_uring: match st.appends {
                Some(AppendPath::IoUring) => Some(true),
                Some(AppendPath::Pwritev) => Some(false),
                Some(AppendPath::Memory | AppendPath::Mapped) | None => None,
            },
            appends: st.appends,
            committer: self.shared.committer,
            queue_commits: st.queue_commits,
            mapped_records: st.mapped_records,
        }
    }

    /// Writes what is pending, seals the current medium and stops the writer. Idempotent.
    pub fn close(&self) {
        {
            let mut st = self.shared.lock();
            st.shutdown = true;
        }
        self.shared.work.notify_all();
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        let Some(h) = handle else {
            return;
        };
        if h.join().is_err() {
            log::error!("the journal writer thread panicked");
            return;
        }
        // How the run ended, for the next start and for restore.
        let mut app = self.shared.appender();
        app.writer.set_run(self.shared.lock().closing_run());
        if let Err(e) = app.writer.store_catalog() {
            log::error!("journal: cannot record the close in the catalog: {e}");
        }
    }

    /// Test hook: stops the writer thread without writing what is pending or sealing,
    /// as a crash would (held guest writes are released as failed).
    #[doc(hidden)]
    pub fn crash_for_test(&self) {
        let mut st = self.shared.lock();
        st.batch.clear();
        st.records.clear();
        st.tickets.clear();
        // A lent tail stays as the crash leaves it: unmapped, unpadded, unsealed.
        st.mapped = None;
        st.mapped_returned = None;
        st.shutdown = true;
        st.crashed = true;
        st.phase = JournalState::Stopped;
        st.reason = Some("crashed (test)".into());
        drop(st);
        self.shared.work.notify_all();
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

impl WriteObserver for Journal {
    fn observe(&self, event: &WriteEvent<'_>, ticket: ObserverTicket) -> Option<ObserverTicket> {
        let mut st = self.shared.lock();
        if st.phase == JournalState::Stopped || st.shutdown {
            if st.gap_open.is_none() {
                st.gap_open = Some(st.next_seq);
            }
            st.next_seq += 1;
            return Some(ticket);
        }
        let (op, flags) = match event.kind {
            WriteKind::Write => (Op::Write, 0),
            WriteKind::Discard => (Op::Discard, 0),
            WriteKind::WriteZeroes { unmap } => {
                (Op::WriteZeroes, if unmap { FLAG_UNMAP } else { 0 })
            }
            WriteKind::Flush => (Op::Flush, 0),
        };
        let stream_id = st.stream_for(event.volume, event.queue_index);
        let mut header = st.header(op, stream_id);
        header.flags = flags;
        header.offset_bytes = event.offset_bytes;
        header.len_bytes = event.len_bytes;
        // The CRC covers the copy, not the guest's buffer: a guest may change its buffer
        // while the write is in flight, and the record must still be whole.
        let durable = if op == Op::Write {
            st.push(header, event.data_len(), |out| event.copy_data_to(out))
        } else {
            st.push(header, 0, |_| {})
        };
        if durable {
            return Some(ticket);
        }
        let options = &self.shared.options;
        let hold = match options.mode {
            JournalMode::Sync => true,
            JournalMode::Async => st.lag_bytes() > options.lag_max_bytes,
        } || st.phase == JournalState::Paused;
        // With queue-thread commits this thread commits at the end of its batch
        // (`batch_submitted`); the writer thread is woken only when the journal is paused.
        let queue_commits = self.shared.queue_commits() && st.phase == JournalState::Running;
        let wake = !queue_commits
            && (st.writer_idle
                || (st.writer_gathering && (hold || st.batch.len() >= ASYNC_GATHER_BYTES)));
        if wake {
            st.writer_idle = false;
            st.writer_gathering = false;
            self.shared.work.notify_one();
        }
        if hold {
            st.tickets.push(ticket);
            None
        } else {
            Some(ticket)
        }
    }

    fn batch_submitted(&self) {
        if !self.shared.queue_commits() {
            return;
        }
        let shared = &*self.shared;
        for _ in 0..INLINE_COMMIT_ROUNDS {
            // Whoever holds the appender takes these records too: it looks at the state
            // again after letting go (below), after any record pushed before this attempt.
            let Some(mut app) = shared.try_appender() else {
                return;
            };
            let mut st = shared.lock();
            if st.batch.is_empty() {
                return;
            }
            let writer_only = st.phase != JournalState::Running
                || st.shutdown
                || st.carry_waiting
                || st.seal_requests > st.seals_done;
            if writer_only {
                st.writer_idle = false;
                shared.work.notify_one();
                return;
            }
            let prologue = shared.take_pending(&mut st, &mut app);
            st.queue_commits += 1;
            drop(st);
            let Appender { writer, carry } = &mut *app;
            if write_carry(shared, writer, carry, &prologue).is_some() {
                // Paused on full media: the writer thread retries.
                shared.work.notify_one();
                return;
            }
            drop(app);
            if shared.lock().batch.is_empty() {
                return;
            }
        }
        // Others keep adding: the writer thread takes the rest.
        let mut st = shared.lock();
        st.writer_idle = false;
        shared.work.notify_one();
    }
}

/// A batch taken from the state for writing.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    records: Vec<PendingRecord>,
    tickets: Vec<ObserverTicket>,
    last_seq: u64,
}

impl Batch {
    /// Appends what is pending in `st` (the carried, unwritten part of an earlier batch
    /// comes first).
    fn take_from(&mut self, st: &mut State) {
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
    fn keep_after(&mut self, n: usize) {
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

fn writer_main(shared: &Shared) {
    let mut retry_at: Option<Instant> = None;
    let gathers = shared.options.mode == JournalMode::Async;
    loop {
        {
            let mut st = shared.lock();
            let mut gather_until: Option<Instant> = None;
            loop {
                let ready = retry_at.is_none_or(|t| Instant::now() >= t);
                let has_work =
                    !st.batch.is_empty() || st.carry_waiting || st.seal_requests > st.seals_done;
                if st.shutdown {
                    break;
                }
                if ready && has_work {
                    // Async: let more records join the batch unless it is big already, a
                    // write is held, or something other than records waits (seal, a carried
                    // batch, a mark).
                    let until = *gather_until.get_or_insert_with(|| Instant::now() + ASYNC_GATHER);
                    let now = Instant::now();
                    let write_now = !gathers
                        || st.lends_tail
                        || !st.tickets.is_empty()
                        || st.carry_waiting
                        || st.seal_requests > st.seals_done
                        || st.commit_now
                        || st.batch.len() >= ASYNC_GATHER_BYTES
                        || now >= until;
                    if write_now {
                        break;
                    }
                    st.writer_gathering = true;
                    st = shared
                        .work
                        .wait_timeout(st, until - now)
                        .map(|r| r.0)
                        .unwrap_or_else(|p| p.into_inner().0);
                    st.writer_gathering = false;
                    continue;
                }
                let wait =
                    retry_at.map_or(PAUSE_RETRY, |t| t.saturating_duration_since(Instant::now()));
                st.writer_idle = true;
                st = shared
                    .work
                    .wait_timeout(st, wait)
                    .map(|r| r.0)
                    .unwrap_or_else(|p| p.into_inner().0);
                st.writer_idle = false;
            }
        }
        // The appender first, then the state (the lock order everywhere): a queue thread
        // may have committed the pending records meanwhile.
        let mut app = shared.appender();
        let (prologue, seal, shutdown, stop_info) = {
            let mut st = shared.lock();
            if st.crashed {
                st.writer_exited = true;
                shared.wake_progress();
                return;
            }
            let prologue = shared.take_pending(&mut st, &mut app);
            st.carry_waiting = false;
            // A clean close says so on the medium, before the trailer.
            let stop = (st.shutdown && st.phase != JournalState::Stopped).then(|| {
                let run = st.closing_run();
                StopInfo {
                    cause: StopCause::Closed,
                    first_unjournaled_seq: run.first_unjournaled_seq,
                    unjournaled_count: run.unjournaled_count,
                    reason: "closed".into(),
                }
            });
            (prologue, st.seal_requests, st.shutdown, stop)
        };
        let Appender { writer, carry } = &mut *app;
        retry_at = write_carry(shared, writer, carry, &prologue);
        if retry_at.is_some() && !shutdown {
            continue;
        }
        let mut st = shared.lock();
        if seal > st.seals_done || shutdown {
            let sealing = writer.position().map(|p| p.0);
            drop(st);
            let stop_info = if shutdown { stop_info.as_ref() } else { None };
            let result = writer.seal(prologue.last_seq, stop_info);
            st = shared.lock();
            match result {
                Ok(()) => st.last_sealed = sealing,
                Err(e) => stop(&mut st, writer, e.to_string(), None),
            }
            st.seals_done = seal;
            st.note_writer(writer);
        }
        if shutdown {
            st.writer_exited = true;
            for t in std::mem::take(&mut carry.tickets)
                .into_iter()
                .chain(st.tickets.drain(..))
            {
                t.complete(true);
            }
            shared.wake_progress();
            return;
        }
        shared.wake_progress();
    }
}

/// Writes the carried batch. Returns when to retry if the media are full and the journal
/// pauses; otherwise the batch is consumed (written, or lost to a recorded gap).
///
/// Async mode: writes held at `lag-max` wait only until the trail is back under it, not for
/// the whole trail (up to `lag-max` bytes) to be written: the batch goes out oldest records
/// first in appends of at most `ASYNC_APPEND_BYTES`, and after each append that leaves the
/// lag under `lag-max` the held writes are released (those held while it was written too).
fn write_carry(
    shared: &Shared,
    writer: &mut MediumWriter,
    carry: &mut Batch,
    prologue: &Prologue,
) -> Option<Instant> {
    if carry.records.is_empty() {
        ObserverTicket::complete_all(&mut carry.tickets, true);
        return None;
    }
    let chunk_bytes = match shared.options.mode {
        JournalMode::Async => ASYNC_APPEND_BYTES,
        JournalMode::Sync => usize::MAX,
    };
    let mut written = Vec::with_capacity(carry.records.len());
    let mut accounted = 0;
    let mut start = 0;
    let result = loop {
        let end = chunk_end(&carry.records, start, chunk_bytes);
        let end_off = carry
            .records
            .get(end)
            .map_or(carry.bytes.len(), |r| r.batch_offset);
        let result = writer.write_batch(
            &carry.bytes[..end_off],
            &carry.records[start..end],
            prologue,
            &mut written,
        );
        if result.is_err() || end == carry.records.len() {
            break result;
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
    };
    let mut st = shared.lock();
    account(&mut st, writer, carry, &written[accounted..], accounted);
    let written_bytes = carry
        .records
        .get(written.len())
        .map_or(carry.bytes.len(), |r| r.batch_offset) as u64;
    let pause = matches!(result, Err(WriteFailure::Full))
        && shared.options.on_full == OnFull::Pause
        && !st.shutdown;
    if pause {
        carry.keep_after(written.len());
        st.carry_waiting = true;
        st.phase = JournalState::Paused;
        st.reason =
            Some("every allowed medium is full: guest writes are held (on-full=pause)".into());
        st.processed_seq = st.durable_seq;
        shared.wake_progress();
        return Some(Instant::now() + PAUSE_RETRY);
    }
    if let Err(e) = result {
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

/// Whether the journal directory is on tmpfs or ramfs (where media can be lent mapped).
fn dir_is_memory_backed(dir: &std::path::Path) -> bool {
    std::fs::File::open(dir).is_ok_and(|d| crate::volume::open::is_memory_backed(&d))
}

/// Lends the open medium's end to the observing threads (`mapped=` on) once the writer has
/// nothing left to write: no pending record, no seal or close waiting, the journal running.
fn lend_tail(shared: &Shared, st: &mut State, writer: &mut MediumWriter) {
    let idle = st.batch.is_empty()
        && st.phase == JournalState::Running
        && !st.shutdown
        && !st.crashed
        && !st.carry_waiting
        && st.seal_requests == st.seals_done;
    if !shared.options.maps_media() || !idle || st.mapped.is_some() || st.mapped_returned.is_some()
    {
        return;
    }
    st.mapped = writer.lend_tail(st.next_seq - 1);
    st.lends_tail = st.mapped.is_some();
    if let Some(tail) = &st.mapped {
        st.medium = Some((tail.medium, tail.position_bytes));
        st.appends = Some(AppendPath::Mapped);
    }
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
fn stop(st: &mut State, writer: &mut MediumWriter, reason: String, first_lost: Option<u64>) {
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
