//! The journal's writer thread: it sleeps until there is work (records, a seal, a carried
//! batch to retry, the close), gathers records for a while in async mode, then makes the group
//! commit, seals media when asked, and on close writes what is pending and seals.

use std::time::{Duration, Instant};

use super::group_commit::{stop, write_carry, Batch};
use super::state::WriterState;
use super::{Appender, JournalState, Shared, ASYNC_GATHER_BYTES, PAUSE_RETRY};
use crate::journal::format::{StopCause, StopInfo};
use crate::journal::options::JournalMode;
use crate::journal::prologue::Prologue;
use crate::journal::writer::MediumWriter;

/// In async mode the writer gathers records for at most this long after the first one of a
/// batch before appending them (unless `ASYNC_GATHER_BYTES` are pending first): one wake-up
/// and one append per interval instead of one per handful of records
/// (`benches/journal-notes.md`, *Async mode gathers for 500 µs or 64 KiB*).
const ASYNC_GATHER: Duration = Duration::from_micros(500);

pub(super) fn writer_main(shared: &Shared) {
    let mut retry_at: Option<Instant> = None;
    loop {
        wait_for_work(shared, retry_at);
        // The appender first, then the state (the lock order everywhere): a queue thread
        // may have committed the pending records meanwhile.
        let mut app = shared.appender();
        let Some(round) = take_round(shared, &mut app) else {
            return;
        };
        let Appender { writer, carry } = &mut *app;
        retry_at = write_carry(shared, writer, carry, &round.prologue);
        if retry_at.is_some() && !round.closing {
            continue;
        }
        if end_round(shared, writer, carry, &round) {
            return;
        }
    }
}

/// Sleeps until there is work for a round: pending records (in async mode, once they have
/// gathered for `ASYNC_GATHER`, unless something needs them sooner), a seal, the retry of a
/// paused journal's carried batch (due at `retry_at`), or the close.
fn wait_for_work(shared: &Shared, retry_at: Option<Instant>) {
    let gathers = shared.options.mode == JournalMode::Async;
    let mut st = shared.lock();
    let mut gather_until: Option<Instant> = None;
    loop {
        let ready = retry_at.is_none_or(|t| Instant::now() >= t);
        let paused = st.phase == JournalState::Paused;
        let seal_waits = st.seal_requests > st.seals_done;
        let has_work = !st.batch.is_empty() || paused || seal_waits;
        if st.writer.is_stopping() {
            return;
        }
        if ready && has_work {
            // Async: let more records join the batch unless it is big already, a write is
            // held, or something other than records waits (seal, a carried batch, a mark).
            let until = *gather_until.get_or_insert_with(|| Instant::now() + ASYNC_GATHER);
            let now = Instant::now();
            let write_now = !gathers
                || st.tail.lendable()
                || !st.tickets.is_empty()
                || paused
                || seal_waits
                || st.commit_now
                || st.batch.len() >= ASYNC_GATHER_BYTES
                || now >= until;
            if write_now {
                return;
            }
            st.writer = WriterState::Gathering;
            st = shared
                .work
                .wait_timeout(st, until - now)
                .map(|r| r.0)
                .unwrap_or_else(|p| p.into_inner().0);
            st.writer.wake();
            continue;
        }
        let wait = retry_at.map_or(PAUSE_RETRY, |t| t.saturating_duration_since(Instant::now()));
        st.writer = WriterState::Idle;
        st = shared
            .work
            .wait_timeout(st, wait)
            .map(|r| r.0)
            .unwrap_or_else(|p| p.into_inner().0);
        st.writer.wake();
    }
}

/// What a round of the writer takes from the state.
struct Round {
    /// What a medium opened by this round restates.
    prologue: Prologue,
    /// The seal requests made so far: the round seals the medium if some are not done.
    seal_requests: u64,
    /// The journal closes: the round writes what is pending, seals, and the thread exits.
    closing: bool,
    /// A clean close says so on the medium, before the trailer.
    stop_info: Option<StopInfo>,
}

/// Takes everything pending into the appender's carry for a round; `None` when the thread
/// is to exit at once (`crash_for_test`).
fn take_round(shared: &Shared, app: &mut Appender) -> Option<Round> {
    let mut st = shared.lock();
    if st.writer == WriterState::Crashing {
        st.writer = WriterState::Exited;
        shared.wake_progress();
        return None;
    }
    let prologue = shared.take_pending(&mut st, app);
    let closing = st.writer.is_stopping();
    let stop_info = (closing && st.phase != JournalState::Stopped).then(|| {
        let run = st.closing_run();
        StopInfo {
            cause: StopCause::Closed,
            first_unjournaled_seq: run.first_unjournaled_seq,
            unjournaled_count: run.unjournaled_count,
            reason: "closed".into(),
        }
    });
    Some(Round {
        prologue,
        seal_requests: st.seal_requests,
        closing,
        stop_info,
    })
}

/// Seals the medium if asked to (or closing) and, when closing, releases every held write
/// and marks the thread gone. Returns whether the thread is to exit.
fn end_round(shared: &Shared, writer: &mut MediumWriter, carry: &mut Batch, round: &Round) -> bool {
    let mut st = shared.lock();
    if round.seal_requests > st.seals_done || round.closing {
        let sealing = writer.position().map(|p| p.0);
        drop(st);
        let stop_info = if round.closing {
            round.stop_info.as_ref()
        } else {
            None
        };
        let result = writer.seal(round.prologue.last_seq, stop_info);
        st = shared.lock();
        match result {
            Ok(()) => st.last_sealed = sealing,
            Err(e) => stop(&mut st, writer, e.to_string(), None),
        }
        st.seals_done = round.seal_requests;
        st.note_writer(writer);
    }
    if round.closing {
        st.writer = WriterState::Exited;
        for t in std::mem::take(&mut carry.tickets)
            .into_iter()
            .chain(st.tickets.drain(..))
        {
            t.complete(true);
        }
    }
    shared.wake_progress();
    round.closing
}
