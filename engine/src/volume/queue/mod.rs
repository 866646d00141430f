//! One worker thread's view of a volume: submits block operations to its own io_uring
//! and hands back completions tagged with the caller's `u64`.
//!
//! Each request lives in a slot of a fixed slab (`inflight_max` slots, allocated once)
//! keyed by the ring's `user_data`. A slot owns a copy of the caller's iovec array and
//! is released only when every part of the request has completed: its ring operation
//! (resubmitted after a short transfer) and any write held back by an observer.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use super::completion_sink::CompletionSink;
use super::nbd_queue::{NbdPath, Started, NBD_USER_DATA};
use super::{NbdExport, Volume};
use crate::observer::{ObserverList, ObserverTicket, WriteEvent, WriteKind};
use crate::reactor::Ring;
use crate::{EngineError, IoFailure};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Read,
    Write,
    Flush,
    /// Discard and write-zeroes: fallocate, falling back as the file system requires.
    Zero {
        stage: ZeroStage,
    },
}

/// How a range is being zeroed; each stage falls back to the next on `EOPNOTSUPP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ZeroStage {
    ZeroRange,
    PunchHole,
    WriteZeros,
}

/// The largest single write of zeros in the write-zeros fallback.
pub(super) const ZERO_BUFFER_BYTES: usize = 64 * 1024;
pub(super) const ZERO_IOVECS_MAX: usize = 16;
pub(super) static ZEROS: [u8; ZERO_BUFFER_BYTES] = [0; ZERO_BUFFER_BYTES];

/// A request's state while in flight.
pub(super) struct Slot {
    pub(super) tag: u64,
    pub(super) kind: Kind,
    /// Parts outstanding: the ring operation (0 or 1) plus held observer tickets.
    pub(super) pending: u32,
    pub(super) ring_busy: bool,
    pub(super) failure: Option<IoFailure>,
    /// The iovecs of a read or write, advanced past what has been transferred.
    pub(super) iovecs: Vec<libc::iovec>,
    pub(super) iov_start: usize,
    /// Absolute offset in the backing image of the next byte to transfer.
    pub(super) file_offset: u64,
    pub(super) remaining_bytes: u64,
    pub(super) total_bytes: u64,
    pub(super) fd: RawFd,
    /// Writes carry `RWF_DSYNC` (the guest turned its write cache off).
    pub(super) dsync: bool,
    /// The observers that saw this write, told by `source_done` when the ring part ends.
    observed: Option<ObservedWrite>,
    /// A discard (counted apart from write-zeroes, which share `Kind::Zero`).
    pub(super) discard: bool,
}

/// What the observers of a request saw, kept to tell them when the volume's own I/O ends.
struct ObservedWrite {
    observers: ObserverList,
    kind: WriteKind,
    offset_bytes: u64,
    len_bytes: u64,
}

impl Slot {
    fn new(segments_max: usize) -> Self {
        Self {
            tag: 0,
            kind: Kind::Flush,
            pending: 0,
            ring_busy: false,
            failure: None,
            iovecs: Vec::with_capacity(segments_max.max(ZERO_IOVECS_MAX)),
            iov_start: 0,
            file_offset: 0,
            remaining_bytes: 0,
            total_bytes: 0,
            fd: -1,
            dsync: false,
            observed: None,
            discard: false,
        }
    }

    /// Drops `done` transferred bytes from the front of the iovecs.
    pub(super) fn advance(&mut self, mut done: usize) {
        while done > 0 && self.iov_start < self.iovecs.len() {
            let iov = &mut self.iovecs[self.iov_start];
            if done >= iov.iov_len {
                done -= iov.iov_len;
                self.iov_start += 1;
            } else {
                // SAFETY: `done < iov_len`, so the advanced pointer stays inside the same buffer.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(done) }.cast();
                iov.iov_len -= done;
                done = 0;
            }
        }
    }
}

/// The data path as a queue last saw it; reloaded when the volume's generation moves.
struct PathSnapshot {
    generation: u64,
    fd: RawFd,
    buffered_fd: Option<RawFd>,
    base_offset_bytes: u64,
    len_bytes: u64,
    memory_backed: bool,
    observers: ObserverList,
    /// The export of a volume that lives on NBD (`fd` is then -1).
    nbd: Option<Arc<NbdExport>>,
    /// Keeps the descriptors above open.
    _backing: Arc<super::Backing>,
}

/// A worker thread's submission and completion queue for one volume.
pub struct VolumeQueue {
    volume: Arc<Volume>,
    queue_index: u16,
    ring: Ring,
    sink: Arc<CompletionSink>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    path: PathSnapshot,
    ready: Vec<Completion>,
    cqe_scratch: Vec<(u64, i32)>,
    released_scratch: Vec<(u32, bool)>,
    ring_ops_inflight: u32,
    inline_misses: u32,
    inline_backoff: u32,
    /// The queue's NBD connection, while the volume lives on an NBD export.
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
        // SAFETY: dup(2) of the eventfd the ring owns; the duplicate is owned by the sink.
        let dup = unsafe { libc::fcntl(ring.notify_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(EngineError::Ring(io::Error::last_os_error()));
        }
        // SAFETY: `dup` is a fresh descriptor that nothing else owns.
        let sink = Arc::new(CompletionSink::new(unsafe { OwnedFd::from_raw_fd(dup) }));
        let slots = (0..inflight_max).map(|_| Slot::new(segments_max)).collect();
        let free_slots = (0..inflight_max).rev().collect();
        let path = Self::snapshot(&volume);
        let mut queue = Self {
            volume,
            queue_index,
            ring,
            sink,
            slots,
            free_slots,
            path,
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

    /// Follows the snapshot's backing: keeps the NBD connection while the export stays the
    /// same, makes a new path for a new export, drops it for a file (the volume is idle then).
    fn sync_nbd_path(&mut self) {
        // Entries the old path queued (a tick's timespec) must reach the kernel before it goes.
        if let Err(e) = self.ring.submit() {
            log::error!("volume {}: io_uring submit failed: {e}", self.volume.name());
        }
        match (&self.path.nbd, &self.nbd) {
            (Some(export), Some(path)) if Arc::ptr_eq(export, path.export()) => {}
            (Some(export), _) => self.nbd = Some(NbdPath::new(export.clone(), self.slots.len())),
            (None, Some(_)) => self.nbd = None,
            (None, None) => {}
        }
    }

    fn snapshot(volume: &Volume) -> PathSnapshot {
        let generation = volume.generation();
        let backing = volume.backing();
        let file = backing.file();
        PathSnapshot {
            generation,
            fd: file.map_or(-1, |f| f.file.as_raw_fd()),
            buffered_fd: file.and_then(|f| f.buffered.as_ref().map(|b| b.as_raw_fd())),
            base_offset_bytes: backing.base_offset_bytes,
            len_bytes: backing.len_bytes,
            memory_backed: file.is_some_and(|f| f.memory_backed),
            observers: volume.observers(),
            nbd: backing.nbd().cloned(),
            _backing: backing,
        }
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// The eventfd that becomes readable when completions are ready to [`reap`](Self::reap).
    pub fn notify_fd(&self) -> RawFd {
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
            self.path = Self::snapshot(&self.volume);
            self.sync_nbd_path();
        }
        let slot = &mut self.slots[slot_index as usize];
        slot.tag = tag;
        slot.pending = 0;
        slot.ring_busy = false;
        slot.failure = None;
        slot.iovecs.clear();
        slot.iov_start = 0;
        slot.fd = self.path.fd;
        slot.dsync = false;
        slot.observed = None;
        if let Err(failure) = self.prepare(slot_index, &op) {
            self.finish_now(slot_index, Err(failure));
            return Ok(());
        }
        if !self.path.observers.is_empty() {
            self.notify_observers(slot_index, &op);
        }
        if self.nbd.is_some() {
            self.start_nbd(slot_index);
        } else {
            self.start_op(slot_index);
        }
        Ok(())
    }

    /// Validates `op` and fills the slot's kind, range and iovecs.
    fn prepare(&mut self, slot_index: u32, op: &BlockOp<'_>) -> Result<(), IoFailure> {
        let read_only = self.volume.read_only();
        let write_cache = self.volume.write_cache_enabled();
        let path_len = self.path.len_bytes;
        let base = self.path.base_offset_bytes;
        let slot = &mut self.slots[slot_index as usize];
        let (kind, offset_bytes, len_bytes) = match *op {
            BlockOp::Read {
                offset_bytes,
                iovecs,
            } => {
                slot.iovecs.extend_from_slice(iovecs);
                (Kind::Read, offset_bytes, iovec_bytes(iovecs))
            }
            BlockOp::Write {
                offset_bytes,
                iovecs,
            } => {
                slot.iovecs.extend_from_slice(iovecs);
                slot.dsync = !write_cache;
                (Kind::Write, offset_bytes, iovec_bytes(iovecs))
            }
            BlockOp::Flush => (Kind::Flush, 0, 0),
            BlockOp::Discard {
                offset_bytes,
                len_bytes,
            } => (
                Kind::Zero {
                    stage: ZeroStage::PunchHole,
                },
                offset_bytes,
                len_bytes,
            ),
            BlockOp::WriteZeroes {
                offset_bytes,
                len_bytes,
                unmap,
            } => {
                let stage = if unmap {
                    ZeroStage::PunchHole
                } else {
                    ZeroStage::ZeroRange
                };
                (Kind::Zero { stage }, offset_bytes, len_bytes)
            }
        };
        slot.kind = kind;
        slot.discard = matches!(op, BlockOp::Discard { .. });
        slot.total_bytes = len_bytes;
        slot.remaining_bytes = len_bytes;
        if kind != Kind::Read && kind != Kind::Flush && read_only {
            return Err(IoFailure::ReadOnly);
        }
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= path_len => {}
            _ => return Err(IoFailure::OutOfRange),
        }
        slot.file_offset = base + offset_bytes;
        Ok(())
    }

    fn notify_observers(&mut self, slot_index: u32, op: &BlockOp<'_>) {
        let (kind, offset_bytes, len_bytes, data): (_, _, _, &[libc::iovec]) = match *op {
            BlockOp::Read { .. } => return,
            BlockOp::Write {
                offset_bytes,
                iovecs,
            } => (WriteKind::Write, offset_bytes, iovec_bytes(iovecs), iovecs),
            BlockOp::Flush => (WriteKind::Flush, 0, 0, &[]),
            BlockOp::Discard {
                offset_bytes,
                len_bytes,
            } => (WriteKind::Discard, offset_bytes, len_bytes, &[]),
            BlockOp::WriteZeroes {
                offset_bytes,
                len_bytes,
                unmap,
            } => (
                WriteKind::WriteZeroes { unmap },
                offset_bytes,
                len_bytes,
                &[],
            ),
        };
        let event = WriteEvent {
            volume: self.volume.name(),
            queue_index: self.queue_index,
            kind,
            offset_bytes,
            len_bytes,
            data,
        };
        if self.observers_to_tell.is_none() {
            self.observers_to_tell = Some(self.path.observers.clone());
        }
        for observer in self.path.observers.iter() {
            let ticket = ObserverTicket::new(self.sink.clone(), slot_index);
            match observer.observe(&event, ticket) {
                Some(handed_back) => handed_back.disarm(),
                None => self.slots[slot_index as usize].pending += 1,
            }
        }
        if kind != WriteKind::Flush {
            self.slots[slot_index as usize].observed = Some(ObservedWrite {
                observers: self.path.observers.clone(),
                kind,
                offset_bytes,
                len_bytes,
            });
        }
    }

    /// Tells the observers that saw the slot's write that the volume's own I/O has ended.
    fn settle_observers(&mut self, slot_index: u32) {
        let Some(observed) = self.slots[slot_index as usize].observed.take() else {
            return;
        };
        let event = WriteEvent {
            volume: self.volume.name(),
            queue_index: self.queue_index,
            kind: observed.kind,
            offset_bytes: observed.offset_bytes,
            len_bytes: observed.len_bytes,
            data: &[],
        };
        for observer in observed.observers.iter() {
            observer.source_done(&event);
        }
    }

    /// Starts the slot's next operation: at once, when a page-cache hit can finish it
    /// without blocking, otherwise through the ring.
    ///
    /// Buffered reads and writes that io_uring cannot complete inline (tmpfs, for one) are
    /// handed to the kernel's io-wq worker threads, and waking one costs tens of
    /// microseconds; a `preadv2`/`pwritev2` with `RWF_NOWAIT` finishes a page-cache hit in
    /// about one. `O_DIRECT` and write-through requests always go through the ring.
    fn start_op(&mut self, slot_index: u32) {
        loop {
            let result = match self.try_inline(slot_index) {
                Inline::NotTried => return self.start_ring_op(slot_index),
                Inline::Done(result) => result,
            };
            match self.next_step(slot_index, result) {
                Step::Again => continue,
                Step::Done(failure) => {
                    self.settle_observers(slot_index);
                    let slot = &mut self.slots[slot_index as usize];
                    if failure.is_some() && slot.failure.is_none() {
                        slot.failure = failure;
                    }
                    if slot.pending == 0 {
                        self.finish(slot_index);
                    }
                    return;
                }
            }
        }
    }

    fn try_inline(&mut self, slot_index: u32) -> Inline {
        let slot = &self.slots[slot_index as usize];
        let is_read = match slot.kind {
            Kind::Read => true,
            Kind::Write if !slot.dsync => false,
            _ => return Inline::NotTried,
        };
        // O_DIRECT to a device would block the thread for the device's latency.
        if !self.path.memory_backed && self.path.buffered_fd.is_some() && slot.fd == self.path.fd {
            return Inline::NotTried;
        }
        if self.inline_backoff > 0 {
            self.inline_backoff -= 1;
            return Inline::NotTried;
        }
        let iovecs = &slot.iovecs[slot.iov_start..];
        let count = iovecs.len() as libc::c_int;
        let offset = slot.file_offset as libc::off_t;
        // Memory-backed files never wait for a device (and refuse RWF_NOWAIT).
        let flags = if self.path.memory_backed {
            0
        } else {
            libc::RWF_NOWAIT
        };
        // SAFETY: the iovecs point to memory valid for this request (`submit`'s contract),
        // writable for a read; the call is synchronous, so nothing outlives it.
        let done = unsafe {
            if is_read {
                libc::preadv2(slot.fd, iovecs.as_ptr(), count, offset, flags)
            } else {
                libc::pwritev2(slot.fd, iovecs.as_ptr(), count, offset, flags)
            }
        };
        if done >= 0 {
            self.inline_misses = 0;
            return Inline::Done(done.min(i32::MAX as isize) as i32);
        }
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        if errno == libc::EAGAIN || errno == libc::EOPNOTSUPP {
            // Misses in a row mean the file system cannot serve us inline: stop trying for a while.
            self.inline_misses += 1;
            if self.inline_misses >= INLINE_MISSES_MAX {
                self.inline_misses = 0;
                self.inline_backoff = INLINE_BACKOFF_REQUESTS;
            }
            return Inline::NotTried;
        }
        Inline::Done(-errno)
    }

    /// Queues the slot's (next) ring operation.
    fn start_ring_op(&mut self, slot_index: u32) {
        let entry = self.ring_entry(slot_index);
        // SAFETY: the slot owns the iovec array and stays allocated until the completion
        // for `slot_index` is reaped; the iovecs' memory is guaranteed by `submit`'s caller;
        // the zeros buffer is static.
        match unsafe { self.ring.push(&entry) } {
            Ok(()) => {
                let slot = &mut self.slots[slot_index as usize];
                slot.pending += 1;
                slot.ring_busy = true;
                self.ring_ops_inflight += 1;
            }
            Err(e) => {
                log::error!(
                    "volume {}: io_uring submission failed: {e}",
                    self.volume.name()
                );
                self.settle_observers(slot_index);
                let slot = &mut self.slots[slot_index as usize];
                slot.failure = Some(IoFailure::Os(e.raw_os_error().unwrap_or(libc::EIO)));
                if slot.pending == 0 {
                    self.finish(slot_index);
                }
            }
        }
    }

    fn ring_entry(&mut self, slot_index: u32) -> squeue::Entry {
        let slot = &mut self.slots[slot_index as usize];
        let fd = types::Fd(slot.fd);
        let user_data = u64::from(slot_index);
        let entry = match slot.kind {
            Kind::Read => {
                let iovecs = &slot.iovecs[slot.iov_start..];
                opcode::Readv::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                    .offset(slot.file_offset)
                    .build()
            }
            Kind::Write => {
                let iovecs = &slot.iovecs[slot.iov_start..];
                let flags = if slot.dsync { libc::RWF_DSYNC } else { 0 };
                opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                    .offset(slot.file_offset)
                    .rw_flags(flags)
                    .build()
            }
            Kind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Kind::Zero {
                stage: ZeroStage::WriteZeros,
            } => {
                slot.iovecs.clear();
                slot.iov_start = 0;
                let mut left = slot.remaining_bytes;
                while left > 0 && slot.iovecs.len() < ZERO_IOVECS_MAX {
                    let len = left.min(ZERO_BUFFER_BYTES as u64);
                    slot.iovecs.push(libc::iovec {
                        iov_base: ZEROS.as_ptr() as *mut libc::c_void,
                        iov_len: len as usize,
                    });
                    left -= len;
                }
                opcode::Writev::new(fd, slot.iovecs.as_ptr(), slot.iovecs.len() as u32)
                    .offset(slot.file_offset)
                    .build()
            }
            Kind::Zero { stage } => {
                let mode = match stage {
                    ZeroStage::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                };
                opcode::Fallocate::new(fd, slot.remaining_bytes)
                    .offset(slot.file_offset)
                    .mode(mode)
                    .build()
            }
        };
        entry.user_data(user_data)
    }

    /// Hands every queued operation to the kernel (one `io_uring_enter`); on NBD, also
    /// sends the queued requests.
    pub fn commit(&mut self) -> io::Result<()> {
        if let Some(nbd) = &mut self.nbd {
            nbd.send(&mut self.ring, &mut self.slots);
        }
        let submitted = self.ring.submit();
        // After the volume's own I/O is on its way: an observer committing here overlaps it.
        if let Some(observers) = self.observers_to_tell.take() {
            for observer in observers.iter() {
                observer.batch_submitted();
            }
        }
        submitted
    }

    /// Starts a request on the NBD path.
    fn start_nbd(&mut self, slot_index: u32) {
        let Some(nbd) = &mut self.nbd else {
            return;
        };
        let slot = &mut self.slots[slot_index as usize];
        slot.pending += 1;
        if let Started::Done(failure) = nbd.begin(&mut self.ring, slot_index, slot) {
            self.settle_observers(slot_index);
            self.on_part_done(slot_index, failure);
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
                    self.settle_observers(slot_index);
                    self.on_part_done(slot_index, failure);
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
            self.on_part_done(
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
        out.append(&mut self.ready);
    }

    fn on_ring_completion(&mut self, slot_index: u32, result: i32) {
        let Some(slot) = self.slots.get_mut(slot_index as usize) else {
            log::error!("io_uring returned unknown user_data {slot_index}");
            return;
        };
        if !slot.ring_busy {
            log::error!("io_uring completed slot {slot_index} twice");
            return;
        }
        slot.ring_busy = false;
        self.ring_ops_inflight -= 1;
        match self.next_step(slot_index, result) {
            Step::Again => {
                self.slots[slot_index as usize].pending -= 1;
                self.start_op(slot_index);
            }
            Step::Done(failure) => {
                self.settle_observers(slot_index);
                self.on_part_done(slot_index, failure);
            }
        }
    }

    /// Decides what a ring completion means: done, failed, or more to do.
    fn next_step(&mut self, slot_index: u32, result: i32) -> Step {
        let buffered_fd = self.path.buffered_fd;
        let slot = &mut self.slots[slot_index as usize];
        if result < 0 {
            let errno = -result;
            return match (slot.kind, errno) {
                (_, libc::EINTR | libc::EAGAIN) => Step::Again,
                // O_DIRECT refuses buffers or offsets that are not aligned: retry buffered.
                (Kind::Read | Kind::Write, libc::EINVAL) if Some(slot.fd) != buffered_fd => {
                    match buffered_fd {
                        Some(fd) => {
                            slot.fd = fd;
                            Step::Again
                        }
                        None => Step::Done(Some(IoFailure::Os(errno))),
                    }
                }
                (Kind::Zero { stage }, libc::EOPNOTSUPP | libc::EINVAL | libc::ENODEV) => {
                    match stage {
                        ZeroStage::ZeroRange => {
                            slot.kind = Kind::Zero {
                                stage: ZeroStage::PunchHole,
                            };
                            Step::Again
                        }
                        ZeroStage::PunchHole => {
                            slot.kind = Kind::Zero {
                                stage: ZeroStage::WriteZeros,
                            };
                            Step::Again
                        }
                        ZeroStage::WriteZeros => Step::Done(Some(IoFailure::Os(errno))),
                    }
                }
                _ => Step::Done(Some(IoFailure::Os(errno))),
            };
        }
        let done = result as u64;
        match slot.kind {
            Kind::Read
            | Kind::Write
            | Kind::Zero {
                stage: ZeroStage::WriteZeros,
            } => {
                if done == 0 && slot.remaining_bytes > 0 {
                    return Step::Done(Some(IoFailure::NoProgress));
                }
                let done = done.min(slot.remaining_bytes);
                slot.remaining_bytes -= done;
                slot.file_offset += done;
                if slot.kind == Kind::Read || slot.kind == Kind::Write {
                    slot.advance(done as usize);
                }
                if slot.remaining_bytes > 0 {
                    Step::Again
                } else {
                    Step::Done(None)
                }
            }
            Kind::Flush | Kind::Zero { .. } => Step::Done(None),
        }
    }

    /// One part of a request finished; completes the request when it was the last.
    fn on_part_done(&mut self, slot_index: u32, failure: Option<IoFailure>) {
        let Some(slot) = self.slots.get_mut(slot_index as usize) else {
            return;
        };
        if slot.pending == 0 {
            log::error!("completion for idle slot {slot_index}");
            return;
        }
        if failure.is_some() && slot.failure.is_none() {
            slot.failure = failure;
        }
        slot.pending -= 1;
        if slot.pending == 0 {
            self.finish(slot_index);
        }
    }

    fn finish_now(&mut self, slot_index: u32, result: Result<u64, IoFailure>) {
        let slot = &mut self.slots[slot_index as usize];
        slot.failure = result.err();
        self.finish(slot_index);
    }

    fn finish(&mut self, slot_index: u32) {
        let slot = &self.slots[slot_index as usize];
        let result = match slot.failure {
            Some(f) => Err(f),
            None => Ok(slot.total_bytes),
        };
        self.count(slot.kind, slot.discard, slot.total_bytes, result.is_ok());
        self.ready.push(Completion {
            tag: slot.tag,
            result,
        });
        self.free_slots.push(slot_index);
        self.volume.inflight_sub(1);
    }

    fn count(&self, kind: Kind, discard: bool, bytes: u64, ok: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.volume.stats;
        if !ok {
            s.errors.fetch_add(1, Relaxed);
            return;
        }
        match kind {
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
            Kind::Zero { .. } if discard => {
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

enum Step {
    Again,
    Done(Option<IoFailure>),
}

/// The outcome of trying an operation without the ring.
enum Inline {
    NotTried,
    /// The syscall's result, in the ring's convention (bytes, or a negated errno).
    Done(i32),
}

/// Inline attempts that must miss in a row before the queue stops trying.
const INLINE_MISSES_MAX: u32 = 64;
/// Requests that go straight to the ring after that.
const INLINE_BACKOFF_REQUESTS: u32 = 4096;

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

/// Total bytes of an iovec array.
pub fn iovec_bytes(iovecs: &[libc::iovec]) -> u64 {
    iovecs.iter().map(|v| v.iov_len as u64).sum()
}

/// Sleeps until `fd` is readable or `timeout_ms` passes.
pub fn wait_readable(fd: RawFd, timeout_ms: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd that lives on our stack for the call.
    let _ = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

// SAFETY: the raw pointers a queue holds (iovecs of requests in flight) point to memory
// whose owner guaranteed it valid until completion (`submit`'s contract); the queue is
// used by one thread at a time (its owner, or a thread holding the owner's lock).
unsafe impl Send for VolumeQueue {}
