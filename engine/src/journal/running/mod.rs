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
//!
//! The parts: `status` what the control operations answer, `state` what the observing
//! threads and the committer share under the state lock, `observer` the guest's write path,
//! `group_commit` making a batch durable, `writer_thread` the thread that does it (and
//! seals and closes), `control` opening the journal and its control operations. Whoever
//! takes both locks takes the appender before the state.

mod control;
mod group_commit;
mod observer;
mod state;
mod status;
mod writer_thread;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::dir_lock::DirLock;
use super::options::{Committer, JournalOptions};
use super::prologue::Prologue;
use super::recovery::RecoveredTail;
use super::writer::MediumWriter;
use group_commit::Batch;
use state::State;
pub use status::{JournalState, JournalStatus, MarkResult, SealResult};

/// How often a paused journal (on-full=pause) retries to open a medium.
const PAUSE_RETRY: Duration = Duration::from_secs(1);
/// In async mode, pending bytes that end the gathering at once. Small enough that under a
/// heavy stream the writer starts often, on a batch still in cache, and the trail stays well
/// short of `lag-max` (a threshold near `lag-max` lets the trail reach it, and the guest is
/// held); a light stream is still gathered for `ASYNC_GATHER`, which keeps the padding of
/// each append's last block a small share of the medium (`benches/journal-notes.md`, *Async
/// mode gathers for 500 µs or 64 KiB*).
const ASYNC_GATHER_BYTES: usize = 64 << 10;
/// The stream id of records that belong to no volume (marks, log-init, gaps).
pub const JOURNAL_STREAM_ID: u32 = 0;

/// What the journal's threads share: the options, the appender and the state (locked in that
/// order), and the condvars they wait on.
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
        let sealing = st.seal_requests > st.seals_done || st.writer.is_stopping();
        let reclaim = st.tail.take_back(sealing);
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

/// A write journal on a directory of media. Register it on volumes with
/// [`Journal::observer`]; call [`Journal::close`] on shutdown.
pub struct Journal {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    recovered_torn_tail: Option<RecoveredTail>,
    /// Held until [`Journal::close`] (or [`Journal::crash_for_test`], which releases it as
    /// a crash would): no other process appends to the directory meanwhile.
    dir_lock: Mutex<Option<DirLock>>,
}
