//! The journal on the guest's write path: `observe` numbers each write and encodes its
//! record (into the pending batch, or straight onto a lent mapped tail), and says whether the
//! guest's write must wait for it to be durable; `batch_submitted` makes the group commit on
//! the queue thread itself with `committer=queue`.

use super::group_commit::write_carry;
use super::state::WriterState;
use super::{Appender, Journal, JournalState, ASYNC_GATHER_BYTES};
use crate::journal::format::{Op, FLAG_UNMAP};
use crate::journal::options::JournalMode;
use crate::observer::{Observed, ObserverTicket, WriteEvent, WriteKind, WriteObserver};

/// With queue-thread commits, how many times one queue thread commits what others left
/// pending before it hands the rest to the writer thread and goes back to its own queue.
const INLINE_COMMIT_ROUNDS: usize = 4;

impl WriteObserver for Journal {
    fn observe(&self, event: &WriteEvent<'_>, ticket: ObserverTicket) -> Observed {
        let mut st = self.shared.lock();
        if st.phase == JournalState::Stopped || st.writer.is_stopping() {
            if st.gap_open.is_none() {
                st.gap_open = Some(st.next_seq);
            }
            st.next_seq += 1;
            return Observed::Done(ticket);
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
            return Observed::Done(ticket);
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
            && match st.writer {
                WriterState::Idle => true,
                WriterState::Gathering => hold || st.batch.len() >= ASYNC_GATHER_BYTES,
                WriterState::Working
                | WriterState::Closing
                | WriterState::Crashing
                | WriterState::Exited => false,
            };
        if wake {
            st.writer.wake();
            self.shared.work.notify_one();
        }
        if hold {
            st.tickets.push(ticket);
            Observed::Held
        } else {
            Observed::Done(ticket)
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
                || st.writer.is_stopping()
                || st.seal_requests > st.seals_done;
            if writer_only {
                st.writer.wake();
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
        st.writer.wake();
        shared.work.notify_one();
    }
}
