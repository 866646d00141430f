//! The journal's writer thread: it sleeps until there is work (records, a seal, a carried
//! batch to retry, the close), gathers records for a while in async mode, then makes the group
//! commit, seals media when asked, and on close writes what is pending and seals.

use std::time::{Duration, Instant};

use super::group_commit::{stop, write_carry};
use super::{Appender, JournalState, Shared, ASYNC_GATHER_BYTES, PAUSE_RETRY};
use crate::journal::format::{StopCause, StopInfo};
use crate::journal::options::JournalMode;

/// In async mode the writer gathers records for at most this long after the first one of a
/// batch before appending them (unless `ASYNC_GATHER_BYTES` are pending first): one wake-up
/// and one append per interval instead of one per handful of records.
const ASYNC_GATHER: Duration = Duration::from_micros(500);

pub(super) fn writer_main(shared: &Shared) {
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
