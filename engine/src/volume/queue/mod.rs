//! One worker thread's view of a volume: submits block operations to its own io_uring
//! and hands back completions tagged with the caller's `u64`.
//!
//! Each request lives in a `Slot` (`slot.rs`) of a fixed slab (`inflight_max` slots,
//! allocated once) keyed by the ring's `user_data`. A slot owns a copy of the caller's iovec
//! array and is released only when every part of the request has ended: the volume's own
//! I/O (on a file, `file_io.rs`: inline or ring operations, continued after a short
//! transfer; on NBD, the queue's [`super::nbd_queue`] connection), any write held back by
//! an observer (`observers.rs`), and the write's *leg* to an observer's file (`leg.rs`).
//! The end of the volume's own I/O always goes through `VolumeQueue::source_done`.

mod file_io;
mod leg;
mod observers;
mod path;
pub(super) mod slot;

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nix::poll::{PollFd, PollFlags};

use super::completion_sink::CompletionSink;
use super::nbd_queue::{NbdPath, Started, NBD_USER_DATA};
use super::Volume;
use crate::observer::ObserverList;
use crate::reactor::Ring;
use crate::{EngineError, IoFailure};
use leg::LEG_USER_DATA;
use path::{PathSnapshot, RetiredBackings};
use slot::{Kind, Slot};

/// One block operation on a volume's byte range.
#[derive(Debug, Clone, Copy)]
pub enum BlockOp<'a> {
    Read {
        offset_bytes: u64,
        iovecs: &'a [libc::iovec],
    },
    Write {
        offset_bytes: u64,
        iovecs: &'a [libc::iovec],
    },
    Flush,
    Discard {
        offset_bytes: u64,
        len_bytes: u64,
    },
    WriteZeroes {
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
    },
}

/// A finished request: the caller's tag and the bytes transferred, or why it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    pub result: Result<u64, IoFailure>,
}

/// Why a request was not taken; the caller keeps it and offers it again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Every slot is in use: reap completions first.
    Full,
    /// A cutover holds the volume's I/O; wait for the resume wake-up.
    Paused,
}

/// A worker thread's submission and completion queue for one volume.
///
/// Fields drop in declaration order, after [`Drop::drop`] has waited for the ring's
/// operations: the ring goes first, so that no operation it still holds can name a
/// descriptor of `path`, `retired` or `nbd` once those close.
pub struct VolumeQueue {
    ring: Ring,
    volume: Arc<Volume>,
    queue_index: u16,
    sink: Arc<CompletionSink>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    path: PathSnapshot,
    retired: RetiredBackings,
    ready: Vec<Completion>,
    cqe_scratch: Vec<(u64, i32)>,
    released_scratch: Vec<(u32, bool)>,
    ring_ops_inflight: u32,
    inline_misses: u32,
    inline_backoff: u32,
    /// The queue's NBD path: made when the volume first lives on an NBD export, then kept
    /// (its connection ended while the volume is on a file) for as long as the queue.
    nbd: Option<NbdPath>,
    nbd_done: Vec<(u32, Option<IoFailure>)>,
    /// The observers that saw a write since the last `commit`, told `batch_submitted` there.
    observers_to_tell: Option<ObserverList>,
}

impl VolumeQueue {
    /// Creates a queue with `inflight_max` request slots, each with room for `segments_max`
    /// iovecs; a larger request grows its slot's array once, and the slot keeps it.
    pub fn new(
        volume: Arc<Volume>,
        queue_index: u16,
        inflight_max: u32,
        segments_max: usize,
    ) -> Result<Self, EngineError> {
        let ring = Ring::new(inflight_max).map_err(EngineError::Ring)?;
        // The sink owns a duplicate, so that tickets can signal it after the ring is gone.
        let notify_fd = ring.notify_fd().try_clone_to_owned();
        let sink = Arc::new(CompletionSink::new(notify_fd.map_err(EngineError::Ring)?));
        let slots = (0..inflight_max).map(|_| Slot::new(segments_max)).collect();
        let free_slots = (0..inflight_max).rev().collect();
        let path = PathSnapshot::load(&volume);
        let mut queue = Self {
            ring,
            volume,
            queue_index,
            sink,
            slots,
            free_slots,
            path,
            retired: RetiredBackings::default(),
            ready: Vec::with_capacity(inflight_max as usize),
            cqe_scratch: Vec::with_capacity(inflight_max as usize),
            released_scratch: Vec::new(),
            ring_ops_inflight: 0,
            inline_misses: 0,
            inline_backoff: 0,
            nbd: None,
            nbd_done: Vec::new(),
            observers_to_tell: None,
        };
        queue.sync_nbd_path();
        Ok(queue)
    }

    /// Reloads the data path after the volume's generation moved.
    fn reload_path(&mut self) {
        let old = std::mem::replace(&mut self.path, PathSnapshot::load(&self.volume));
        // The request being taken is counted in `inflight` already.
        let inflight_others = self.inflight() > 1;
        self.retired.retire(old, &self.path, inflight_others);
        self.sync_nbd_path();
    }

    /// Follows the snapshot's backing: keeps the NBD connection while the export stays the
    /// same, connects to a new export instead, ends the connection for a file (the volume
    /// is idle then). The NBD path, once made, lives as long as the queue: operations of
    /// its earlier connections may still be in the ring.
    fn sync_nbd_path(&mut self) {
        match (&self.path.nbd, &mut self.nbd) {
            (Some(export), Some(path)) if Arc::ptr_eq(export, path.export()) => {}
            (Some(export), Some(path)) => path.switch_export(&mut self.ring, export.clone()),
            (Some(export), None) => {
                self.nbd = Some(NbdPath::new(export.clone(), self.slots.len()));
            }
            (None, Some(path)) => path.close_connection(&mut self.ring),
            (None, None) => {}
        }
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// The eventfd that becomes readable when completions are ready to [`reap`](Self::reap).
    pub fn notify_fd(&self) -> BorrowedFd<'_> {
        self.ring.notify_fd()
    }

    /// Requests taken and not yet reaped.
    pub fn inflight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// True when another request can be taken.
    pub fn has_room(&self) -> bool {
        !self.free_slots.is_empty()
    }

    /// Takes one request. Failures found at once (out of range, read-only) come back
    /// through [`reap`](Self::reap) like any other completion.
    ///
    /// # Safety
    /// Every iovec must point to memory that stays valid, and is not otherwise accessed
    /// in a conflicting way, until the completion carrying `tag` has been reaped:
    /// writable for a read, readable for a write.
    pub unsafe fn submit(&mut self, op: BlockOp<'_>, tag: u64) -> Result<(), Rejected> {
        let Some(&slot_index) = self.free_slots.last() else {
            return Err(Rejected::Full);
        };
        // Count the request before looking at the pause flag, so that a cutover that sees
        // no request in flight can be sure none slips past it (the pair of SeqCst accesses).
        self.volume.inflight_add(1);
        if self.volume.paused.load(Ordering::SeqCst) {
            self.volume.inflight_sub(1);
            return Err(Rejected::Paused);
        }
        self.free_slots.pop();
        if self.volume.generation() != self.path.generation {
            self.reload_path();
        }
        let slot = &mut self.slots[slot_index as usize];
        slot.begin(tag, self.path.fd);
        if let Err(failure) = slot.prepare(&op, &self.volume, &self.path) {
            self.source_done(slot_index, Some(failure));
            return Ok(());
        }
        if !self.path.observers.is_empty() {
            self.notify_observers(slot_index, &op);
        }
        if self.path.nbd.is_some() {
            self.start_nbd(slot_index);
        } else {
            self.start_op(slot_index);
        }
        // After the volume's own I/O, so that its ring operation is queued first.
        if self.slots[slot_index as usize].leg_mut().is_armed() {
            self.start_leg(slot_index);
        }
        Ok(())
    }

    /// Hands every queued operation to the kernel (one `io_uring_enter`); on NBD, also
    /// sends the queued requests.
    pub fn commit(&mut self) -> io::Result<()> {
        if let Some(nbd) = &mut self.nbd {
            nbd.send(&mut self.ring, &mut self.slots);
        }
        let submitted = self.ring.submit();
        self.tell_batch_submitted();
        submitted
    }

    /// Starts a request on the NBD path.
    fn start_nbd(&mut self, slot_index: u32) {
        let Some(nbd) = &mut self.nbd else {
            return self.source_done(slot_index, Some(IoFailure::Os(libc::ENOTCONN)));
        };
        let slot = &mut self.slots[slot_index as usize];
        if let Started::Done(failure) = nbd.begin(&mut self.ring, slot_index, slot) {
            self.source_done(slot_index, failure);
        }
    }

    /// Continues or completes the requests whose NBD commands ended, until none is left.
    fn reap_nbd(&mut self) {
        let mut done = std::mem::take(&mut self.nbd_done);
        while let Some(nbd) = &mut self.nbd {
            if !nbd.has_done() {
                nbd.send(&mut self.ring, &mut self.slots);
                if !nbd.has_done() {
                    break;
                }
            }
            nbd.take_done(&mut done);
            for (slot_index, failure) in done.drain(..) {
                let step = match (failure, &mut self.nbd) {
                    (Some(f), _) => Started::Done(Some(f)),
                    (None, Some(nbd)) => {
                        let slot = &mut self.slots[slot_index as usize];
                        nbd.next(&mut self.ring, slot_index, slot)
                    }
                    (None, None) => Started::Done(Some(IoFailure::Os(libc::ECONNRESET))),
                };
                if let Started::Done(failure) = step {
                    self.source_done(slot_index, failure);
                }
            }
        }
        self.nbd_done = done;
    }

    /// Clears the wake-up eventfd; call it before reaping after an epoll wake-up.
    pub fn clear_notification(&self) {
        self.ring.clear_notification();
    }

    /// Moves every finished request into `out`. Resubmits continuations of short
    /// transfers (and commits them) on the way.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut cqes = std::mem::take(&mut self.cqe_scratch);
        self.ring.reap(&mut cqes);
        let resubmitted = !cqes.is_empty() || self.nbd.is_some();
        for &(user_data, result) in &cqes {
            if user_data & NBD_USER_DATA != 0 {
                if let Some(nbd) = &mut self.nbd {
                    nbd.on_completion(&mut self.ring, user_data, &mut self.slots);
                }
                continue;
            }
            if user_data & LEG_USER_DATA != 0 {
                self.on_leg_completion(user_data, result);
                continue;
            }
            self.on_ring_completion(user_data as u32, result);
        }
        if self.nbd.is_some() {
            self.reap_nbd();
        }
        cqes.clear();
        self.cqe_scratch = cqes;

        let mut released = std::mem::take(&mut self.released_scratch);
        self.sink.drain_into(&mut released);
        for &(slot_index, ok) in &released {
            self.end_part(
                slot_index,
                if ok { None } else { Some(IoFailure::Observer) },
            );
        }
        released.clear();
        self.released_scratch = released;

        if resubmitted {
            if let Err(e) = self.ring.submit() {
                log::error!("volume {}: io_uring submit failed: {e}", self.volume.name());
            }
        }
        if self.retired.holds_any() && self.inflight() == 0 {
            self.retired.release();
        }
        out.append(&mut self.ready);
    }

    /// The volume's own I/O of a request has ended (every exit of the file and NBD paths,
    /// and a request refused before it started): tells the observers that saw it, then
    /// ends that part of the request.
    #[inline]
    fn source_done(&mut self, slot_index: u32, failure: Option<IoFailure>) {
        self.settle_observers(slot_index);
        self.end_part(slot_index, failure);
    }

    /// One part of a request ended; completes the request when it was the last.
    #[inline]
    fn end_part(&mut self, slot_index: u32, failure: Option<IoFailure>) {
        let Some(slot) = self.slots.get_mut(slot_index as usize) else {
            return;
        };
        if slot.is_idle() {
            log::error!("completion for idle slot {slot_index}");
            return;
        }
        if slot.end_part(failure) {
            self.finish(slot_index);
        }
    }

    fn finish(&mut self, slot_index: u32) {
        let slot = &self.slots[slot_index as usize];
        let result = slot.result();
        self.count(slot, result.is_ok());
        self.ready.push(Completion {
            tag: slot.tag(),
            result,
        });
        self.free_slots.push(slot_index);
        self.volume.inflight_sub(1);
    }

    fn count(&self, slot: &Slot, ok: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.volume.stats;
        if !ok {
            s.errors.fetch_add(1, Relaxed);
            let by_kind = match slot.kind() {
                Kind::Read => &s.read_errors,
                Kind::Write => &s.write_errors,
                Kind::Flush => &s.flush_errors,
                Kind::Zero { .. } if slot.is_discard() => &s.discard_errors,
                Kind::Zero { .. } => &s.write_zeroes_errors,
            };
            by_kind.fetch_add(1, Relaxed);
            return;
        }
        let bytes = slot.total_bytes();
        match slot.kind() {
            Kind::Read => {
                s.read_ops.fetch_add(1, Relaxed);
                s.read_bytes.fetch_add(bytes, Relaxed);
            }
            Kind::Write => {
                s.write_ops.fetch_add(1, Relaxed);
                s.write_bytes.fetch_add(bytes, Relaxed);
            }
            Kind::Flush => {
                s.flush_ops.fetch_add(1, Relaxed);
            }
            Kind::Zero { .. } if slot.is_discard() => {
                s.discard_ops.fetch_add(1, Relaxed);
                s.discard_bytes.fetch_add(bytes, Relaxed);
            }
            Kind::Zero { .. } => {
                s.write_zeroes_ops.fetch_add(1, Relaxed);
                s.write_zeroes_bytes.fetch_add(bytes, Relaxed);
            }
        }
    }

    /// Waits until every request in flight has completed, moving completions into `out`.
    /// Used when a queue stops (vhost-user `GET_VRING_BASE`) and on shutdown.
    pub fn drain(&mut self, out: &mut Vec<Completion>, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            self.reap(out);
            if self.inflight() == 0 {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            if self.ring_ops_inflight > 0 {
                if let Err(e) = self.ring.submit_and_wait(1) {
                    log::error!("volume {}: io_uring wait failed: {e}", self.volume.name());
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            } else {
                // Only observer-held writes remain; they signal the eventfd.
                wait_readable(self.notify_fd(), 10);
                self.clear_notification();
            }
        }
    }
}

impl Drop for VolumeQueue {
    fn drop(&mut self) {
        // The kernel may still write into memory our slots point to: wait for every ring
        // operation before the slots (and the caller's buffers) go away.
        let mut sink = Vec::new();
        while self.ring_ops_inflight > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.reap(&mut sink);
        }
        let unfinished = self.inflight() as u64;
        if unfinished > 0 {
            self.volume.inflight_sub(unfinished);
        }
    }
}

/// Sleeps until `fd` is readable or `timeout_ms` passes (an interrupted wait just returns).
pub fn wait_readable(fd: BorrowedFd<'_>, timeout_ms: u16) {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let _ = nix::poll::poll(&mut fds, timeout_ms);
}

/// A queue moves to (or is locked by) the thread that runs it. `Send` comes from its fields:
/// the iovecs it keeps are [`crate::IovecArray`]s, the one type that asserts it.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<VolumeQueue>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::open::open_backing;
    use crate::VolumeConfig;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn flush(queue: &mut VolumeQueue, tag: u64) -> TestResult {
        // SAFETY: a flush carries no buffers.
        unsafe { queue.submit(BlockOp::Flush, tag) }.map_err(|e| format!("{e:?}").into())
    }

    /// A backing replaced while a request on it is still queued (here without the pause a
    /// cutover takes, so that one is) stays open until the request has completed: the
    /// queued operation names its descriptor by number.
    #[test]
    fn a_replaced_backing_stays_open_while_its_requests_are_in_flight() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (old_path, new_path) = (dir.path().join("old.img"), dir.path().join("new.img"));
        std::fs::write(&old_path, vec![0u8; 1 << 20])?;
        std::fs::write(&new_path, vec![0u8; 1 << 20])?;
        let config = VolumeConfig {
            name: "v".into(),
            path: old_path,
            ..Default::default()
        };
        let volume = Volume::open(config.clone())?;
        let mut queue = VolumeQueue::new(volume.clone(), 0, 4, 1)?;
        // A flush always goes through the ring: queued here, submitted by the drain below.
        flush(&mut queue, 1)?;
        let new = open_backing(&VolumeConfig {
            path: new_path,
            ..config
        })?;
        let old = volume.replace_backing(new);
        let old_weak = Arc::downgrade(&old);
        drop(old);
        flush(&mut queue, 2)?;
        assert!(old_weak.upgrade().is_some(), "closed with a flush queued");
        let mut out = Vec::new();
        assert!(queue.drain(&mut out, std::time::Duration::from_secs(10)));
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|c| c.result == Ok(0)), "{out:?}");
        assert!(old_weak.upgrade().is_none(), "kept once idle");
        Ok(())
    }
}
