//! The running journal's life and control operations: open (recovering the directory and
//! starting the writer thread), init, mark, seal, clear, retrieve, status, close.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::group_commit::Batch;
use super::state::{State, Tail, WriterState};
use super::writer_thread::writer_main;
use super::{
    Appender, Journal, JournalState, JournalStatus, MarkResult, SealResult, Shared,
    JOURNAL_STREAM_ID,
};
use crate::confine::{self, Allowlist};
use crate::journal::dir_lock::DirLock;
use crate::journal::error::JournalError;
use crate::journal::format::{GapInfo, Op};
use crate::journal::memory_log::LogSnapshot;
use crate::journal::options::{Committer, JournalMode, JournalOptions};
use crate::journal::recovery::recover;
use crate::journal::writer::{AppendPath, MediumWriter};
use crate::observer::WriteObserver;

/// The journal writer writes and flushes its media (with `pwritev`/`fdatasync` or through
/// an io_uring it sets up), rotates onto a new medium (opening, creating and renaming files
/// in the journal directory) and starts the spare formatter and prefaulter when it does.
const WRITER_SYSCALLS: Allowlist = Allowlist {
    kind: "journal-writer",
    groups: &[
        confine::RUNTIME,
        confine::SPAWN,
        confine::FILE_IO,
        confine::FILE_PATHS,
        confine::URING_SETUP,
    ],
    extra: &[libc::SYS_sched_setscheduler, libc::SYS_ioprio_set],
};

/// Resolves `committer=auto`: the writer thread, whose commits overlap the queues' work
/// (`committer=queue` is for hosts with no CPU to spare for it; see docs/journal.md).
fn resolve_committer(options: &JournalOptions) -> Committer {
    match options.committer {
        Committer::Auto => Committer::Writer,
        chosen => chosen,
    }
}

impl Journal {
    /// Opens (creating or recovering) the journal in `options.dir` and starts its writer.
    /// Refused while another process holds the directory.
    pub fn open(options: JournalOptions) -> Result<Arc<Journal>, JournalError> {
        let lock = DirLock::acquire(&options.dir)?;
        Self::open_locked(options, lock)
    }

    /// [`Journal::open`] on a directory the caller has locked already (a daemon locks it
    /// before it creates anything else, so that a refusal leaves nothing behind).
    pub fn open_locked(
        options: JournalOptions,
        lock: DirLock,
    ) -> Result<Arc<Journal>, JournalError> {
        debug_assert_eq!(lock.dir(), options.dir, "the lock is on another directory");
        options.validate()?;
        let rec = recover(&options.dir)?;
        let lends_tail = options.maps_media() && dir_is_memory_backed(&options.dir);
        let state = State::recovered(&options, &rec, lends_tail);
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
            .spawn(move || {
                confine::enter(&WRITER_SYSCALLS);
                writer_main(&thread_shared)
            })
            .map_err(JournalError::Thread)?;
        Ok(Arc::new(Journal {
            shared,
            thread: Mutex::new(Some(thread)),
            recovered_torn_tail: rec.torn_tail,
            dir_lock: Mutex::new(Some(lock)),
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
        while st.processed_seq < seq && st.writer != WriterState::Exited {
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
        while st.seals_done < target && st.writer != WriterState::Exited {
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
            st.writer.close();
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
        // Nothing more is appended: the directory is free for the next holder.
        if let Ok(mut lock) = self.dir_lock.lock() {
            lock.take();
        }
    }

    /// Test hook: stops the writer thread without writing what is pending or sealing,
    /// as a crash would (held guest writes are released as failed).
    #[doc(hidden)]
    pub fn crash_for_test(&self) {
        // A crashed process's flock is gone with it: a test reopens the directory.
        if let Ok(mut lock) = self.dir_lock.lock() {
            lock.take();
        }
        let mut st = self.shared.lock();
        st.batch.clear();
        st.records.clear();
        st.tickets.clear();
        // A lent tail stays as the crash leaves it: unmapped, unpadded, unsealed.
        st.tail = Tail::Held {
            lendable: st.tail.lendable(),
        };
        if st.writer != WriterState::Exited {
            st.writer = WriterState::Crashing;
        }
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

/// Whether the journal directory is on tmpfs or ramfs (where media can be lent mapped).
fn dir_is_memory_backed(dir: &std::path::Path) -> bool {
    std::fs::File::open(dir).is_ok_and(|d| crate::volume::open::is_memory_backed(&d))
}
