//! The hook through which a migration mirror or the journal sees every guest write.
//!
//! A volume with no observers pays one branch per write for this hook. An observer
//! that must hold the guest's completion back (a `sync` journal, an `active` mirror to an
//! NBD export) keeps the [`ObserverTicket`] it is handed and completes it later, from any
//! thread; one that needs no wait hands the ticket straight back. An observer that only
//! needs the write's data written to a local file as well (an `active` mirror to a file)
//! asks for a *leg* instead ([`Observed::Leg`]): the queue writes the guest's own buffers
//! to that file on its own ring, beside the volume's own I/O, with no copy and no other
//! thread, and the guest's request completes when both have.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use crate::volume::completion_sink::CompletionSink;
use crate::IoFailure;

/// What a guest did to a byte range of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// Data written; [`WriteEvent::data`] holds it.
    Write,
    /// The range was discarded (reads back as zeros on ferry's volumes).
    Discard,
    /// The range was zeroed; `unmap` says the guest allowed deallocation.
    WriteZeroes { unmap: bool },
    /// The guest asked for everything completed so far to be made durable.
    Flush,
}

/// One guest write as an observer sees it.
pub struct WriteEvent<'a> {
    /// The volume's name.
    pub volume: &'a str,
    /// Which queue of the volume the write came from.
    pub queue_index: u16,
    pub kind: WriteKind,
    /// Volume-relative byte offset (0 for a flush).
    pub offset_bytes: u64,
    /// Length in bytes (0 for a flush).
    pub len_bytes: u64,
    /// The data of a [`WriteKind::Write`]: memory the guest owns, readable only until
    /// `observe` returns. An observer that needs the bytes later copies them.
    pub data: &'a [libc::iovec],
}

impl WriteEvent<'_> {
    /// The write's data, one slice per iovec (nothing for non-writes).
    pub fn data_slices(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.data.iter().map(|iov| {
            // SAFETY: the engine guarantees (see `VolumeQueue::submit`) that every iovec of a
            // write points to `iov_len` readable bytes that stay mapped until `observe` returns,
            // and the slices do not outlive `self`, which `observe` borrows.
            unsafe { std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len) }
        })
    }

    /// Copies the write's data into `out` (appending). For non-writes it appends nothing.
    pub fn copy_data_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.data_len());
        for bytes in self.data_slices() {
            out.extend_from_slice(bytes);
        }
    }

    /// How many bytes of data the write carries (0 for non-writes).
    pub fn data_len(&self) -> usize {
        self.data.iter().map(|iov| iov.iov_len).sum()
    }

    /// Copies the write's data into `out`, which is [`WriteEvent::data_len`] long.
    pub fn copy_data_to(&self, out: &mut [u8]) {
        let mut at = 0;
        for bytes in self.data_slices() {
            let Some(dst) = out.get_mut(at..at + bytes.len()) else {
                return;
            };
            dst.copy_from_slice(bytes);
            at += bytes.len();
        }
    }
}

/// A local file that a write's data also goes to, written by the volume's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegTarget {
    /// An open descriptor of the file, writable. It must stay open for as long as the
    /// observer that names it lives: the queue keeps the observer until the leg has ended.
    pub fd: RawFd,
    /// Where in the file the write's first byte goes.
    pub offset_bytes: u64,
    /// The file never waits for a device (tmpfs): its writes are made inline, without the
    /// ring, whose buffered writes would wait for a kernel worker thread.
    pub memory_backed: bool,
}

/// What an observer wants done about the write it was shown.
pub enum Observed {
    /// Nothing to wait for: the ticket handed in comes back.
    Done(ObserverTicket),
    /// The observer keeps the ticket and completes it later.
    Held,
    /// The ticket comes back, and the queue writes the write's data to `target` as well
    /// (only for [`WriteKind::Write`]); the guest's request completes when that write has,
    /// and [`WriteObserver::leg_done`] reports how it went. A failed leg never fails the
    /// guest's request: the source write is what the guest depends on.
    Leg(ObserverTicket, LegTarget),
}

/// Something that must see every write of a volume: a migration mirror, the journal.
pub trait WriteObserver: Send + Sync {
    /// Sees a write as it is submitted, before the volume's own I/O is queued: hand the
    /// ticket back ([`Observed::Done`]) if the guest need not wait for this observer, keep
    /// it ([`Observed::Held`]) to hold the guest's completion until
    /// [`ObserverTicket::complete`] is called, or ask for a leg ([`Observed::Leg`]). A
    /// dropped ticket completes as a failure.
    fn observe(&self, event: &WriteEvent<'_>, ticket: ObserverTicket) -> Observed;

    /// Called on the queue's thread once the leg asked for in [`observe`](Self::observe)
    /// has ended: the same range, an empty `data`, and the leg's failure if it failed.
    /// Called exactly once per leg. The default does nothing.
    fn leg_done(&self, _event: &WriteEvent<'_>, _failure: Option<IoFailure>) {}

    /// Called once the volume's own I/O of a write, discard or write-zeroes that this
    /// observer saw in [`observe`](Self::observe) has finished (successfully or not), with
    /// the same range and an empty `data`. Not called for flushes. A mirror uses it to know
    /// when the source holds a write, so that it never copies a range whose write is still
    /// in flight. The default does nothing.
    fn source_done(&self, _event: &WriteEvent<'_>) {}

    /// Called on a queue's thread once the queue has handed the kernel a batch of requests
    /// (`VolumeQueue::commit`) among which this observer saw at least one: an observer that
    /// gathers writes (a `sync` journal on a memory-backed medium) may commit them here, on
    /// this thread, instead of waking a thread of its own. The default does nothing.
    fn batch_submitted(&self) {}
}

/// The right to complete one held-back guest write, exactly once, from any thread.
pub struct ObserverTicket {
    sink: Option<Arc<CompletionSink>>,
    request_slot: u32,
}

impl ObserverTicket {
    pub(crate) fn new(sink: Arc<CompletionSink>, request_slot: u32) -> Self {
        Self {
            sink: Some(sink),
            request_slot,
        }
    }

    /// Releases the guest's completion. `ok = false` fails the guest's request with an I/O error;
    /// observers use it only where losing the write is the alternative.
    pub fn complete(mut self, ok: bool) {
        if let Some(sink) = self.sink.take() {
            sink.push(self.request_slot, ok);
        }
    }

    /// Releases many tickets at once: one lock and one wake-up per queue instead of one per
    /// ticket (tickets of the same queue are usually adjacent). Drains `tickets`.
    pub fn complete_all(tickets: &mut Vec<ObserverTicket>, ok: bool) {
        let mut run: Vec<u32> = Vec::new();
        let mut run_sink: Option<Arc<CompletionSink>> = None;
        for mut t in tickets.drain(..) {
            let Some(sink) = t.sink.take() else {
                continue;
            };
            if let Some(current) = run_sink.as_ref().filter(|c| !Arc::ptr_eq(c, &sink)) {
                current.push_many(&run, ok);
                run.clear();
            }
            run.push(t.request_slot);
            run_sink = Some(sink);
        }
        if let Some(current) = run_sink {
            current.push_many(&run, ok);
        }
    }

    /// Forgets the ticket without signalling: used by the engine for tickets handed back.
    pub(crate) fn disarm(mut self) {
        self.sink = None;
    }
}

impl Drop for ObserverTicket {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            log::error!(
                "an observer dropped a held write without completing it; failing the write"
            );
            sink.push(self.request_slot, false);
        }
    }
}

/// The observers of a volume, swapped as a whole when one is added or removed.
pub type ObserverList = Arc<Vec<Arc<dyn WriteObserver>>>;

/// Holds the current observer list of a volume.
#[derive(Default)]
pub struct ObserverSet {
    list: Mutex<ObserverList>,
}

impl ObserverSet {
    pub fn snapshot(&self) -> ObserverList {
        self.list.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub(crate) fn replace(&self, f: impl FnOnce(&mut Vec<Arc<dyn WriteObserver>>)) {
        if let Ok(mut guard) = self.list.lock() {
            let mut next: Vec<_> = guard.as_ref().clone();
            f(&mut next);
            *guard = Arc::new(next);
        }
    }
}
