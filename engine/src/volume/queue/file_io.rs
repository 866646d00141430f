//! A request's I/O on an image file: tried inline when a page-cache hit can finish it,
//! otherwise queued on the ring; after each result, the next step (the rest of a short
//! transfer, a buffered retry of an unaligned `O_DIRECT` request, the next way of zeroing)
//! or the end of the volume's own I/O.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};

use super::slot::{Kind, Slot, ZeroStage};
use super::VolumeQueue;
use crate::IoFailure;

/// What a result means for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// More to do: start the slot's next operation.
    Again,
    /// The volume's own I/O of the request has ended, with this failure if any.
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

impl VolumeQueue {
    /// Starts the slot's next operation: at once, when a page-cache hit can finish it
    /// without blocking, otherwise through the ring.
    ///
    /// Buffered reads and writes that io_uring cannot complete inline (tmpfs, for one) are
    /// handed to the kernel's io-wq worker threads, and waking one costs far more than a
    /// `preadv2`/`pwritev2` with `RWF_NOWAIT` that finishes a page-cache hit at once
    /// (`benches/perf-notes.md`, *Page-cache hits are served inline*). `O_DIRECT` and
    /// write-through requests always go through the ring.
    pub(super) fn start_op(&mut self, slot_index: u32) {
        loop {
            let result = match self.try_inline(slot_index) {
                Inline::NotTried => return self.start_ring_op(slot_index),
                Inline::Done(result) => result,
            };
            let buffered_fd = self.path.buffered_fd;
            match next_step(&mut self.slots[slot_index as usize], result, buffered_fd) {
                Step::Again => continue,
                Step::Done(failure) => return self.source_done(slot_index, failure),
            }
        }
    }

    fn try_inline(&mut self, slot_index: u32) -> Inline {
        let slot = &self.slots[slot_index as usize];
        let is_read = match slot.kind() {
            Kind::Read => true,
            Kind::Write if !slot.dsync() => false,
            _ => return Inline::NotTried,
        };
        // O_DIRECT to a device would block the thread for the device's latency.
        if !self.path.memory_backed && self.path.buffered_fd.is_some() && slot.fd() == self.path.fd
        {
            return Inline::NotTried;
        }
        if self.inline_backoff > 0 {
            self.inline_backoff -= 1;
            return Inline::NotTried;
        }
        let iovecs = slot.pending_iovecs();
        let count = iovecs.len() as libc::c_int;
        let offset = slot.file_offset() as libc::off_t;
        // Memory-backed files never wait for a device (and refuse RWF_NOWAIT).
        let flags = if self.path.memory_backed {
            0
        } else {
            libc::RWF_NOWAIT
        };
        // SAFETY: the iovecs point to memory valid for this request (`submit`'s contract),
        // writable for a read; the descriptor belongs to a backing the queue holds open
        // (`path`, or `retired` while requests are in flight); the call is synchronous, so
        // nothing outlives it.
        let done = unsafe {
            if is_read {
                libc::preadv2(slot.fd(), iovecs.as_ptr(), count, offset, flags)
            } else {
                libc::pwritev2(slot.fd(), iovecs.as_ptr(), count, offset, flags)
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
        let entry = ring_entry(&mut self.slots[slot_index as usize], slot_index);
        // SAFETY: the slot owns the iovec array and stays allocated (and in flight) until
        // the completion for `slot_index` is reaped; the iovecs' memory is guaranteed by
        // `submit`'s caller; the zeros buffer is static; the descriptor belongs to a backing
        // the queue holds open until no request is in flight (`path`, then `retired`), and
        // the queue's drop waits for the ring's operations before closing any.
        match unsafe { self.ring.push(&entry) } {
            Ok(()) => {
                self.slots[slot_index as usize].ring_op_started();
                self.ring_ops_inflight += 1;
            }
            Err(e) => {
                log::error!(
                    "volume {}: io_uring submission failed: {e}",
                    self.volume.name()
                );
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                self.source_done(slot_index, Some(IoFailure::Os(errno)));
            }
        }
    }

    /// Handles the completion of a slot's ring operation.
    pub(super) fn on_ring_completion(&mut self, slot_index: u32, result: i32) {
        let Some(slot) = self.slots.get_mut(slot_index as usize) else {
            log::error!("io_uring returned unknown user_data {slot_index}");
            return;
        };
        if !slot.ring_op_ended() {
            log::error!("io_uring completed slot {slot_index} twice");
            return;
        }
        self.ring_ops_inflight -= 1;
        match next_step(slot, result, self.path.buffered_fd) {
            Step::Again => self.start_op(slot_index),
            Step::Done(failure) => self.source_done(slot_index, failure),
        }
    }
}

/// The ring operation that moves the slot on, tagged with its index.
fn ring_entry(slot: &mut Slot, slot_index: u32) -> squeue::Entry {
    let fd = types::Fd(slot.fd());
    let entry = match slot.kind() {
        Kind::Read => {
            let iovecs = slot.pending_iovecs();
            opcode::Readv::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(slot.file_offset())
                .build()
        }
        Kind::Write => {
            let iovecs = slot.pending_iovecs();
            let flags = if slot.dsync() { libc::RWF_DSYNC } else { 0 };
            opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(slot.file_offset())
                .rw_flags(flags)
                .build()
        }
        Kind::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Kind::Zero {
            stage: ZeroStage::WriteZeros,
        } => {
            slot.fill_zero_iovecs(slot.remaining_bytes());
            let iovecs = slot.pending_iovecs();
            opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(slot.file_offset())
                .build()
        }
        Kind::Zero { stage } => {
            let mode = match stage {
                ZeroStage::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            };
            opcode::Fallocate::new(fd, slot.remaining_bytes())
                .offset(slot.file_offset())
                .mode(mode)
                .build()
        }
    };
    entry.user_data(u64::from(slot_index))
}

/// Decides what a result (bytes, or a negated errno) means: done, failed, or more to do.
fn next_step(slot: &mut Slot, result: i32, buffered_fd: Option<RawFd>) -> Step {
    if result < 0 {
        return after_error(slot, -result, buffered_fd);
    }
    let done = result as u64;
    match slot.kind() {
        Kind::Read
        | Kind::Write
        | Kind::Zero {
            stage: ZeroStage::WriteZeros,
        } => {
            if done == 0 && slot.remaining_bytes() > 0 {
                return Step::Done(Some(IoFailure::NoProgress));
            }
            let done = done.min(slot.remaining_bytes());
            slot.consume(done);
            if matches!(slot.kind(), Kind::Read | Kind::Write) {
                slot.advance(done as usize);
            }
            if slot.remaining_bytes() > 0 {
                Step::Again
            } else {
                Step::Done(None)
            }
        }
        Kind::Flush | Kind::Zero { .. } => Step::Done(None),
    }
}

/// A failed operation: retried, retried another way, or the request's failure.
fn after_error(slot: &mut Slot, errno: i32, buffered_fd: Option<RawFd>) -> Step {
    match (slot.kind(), errno) {
        (_, libc::EINTR | libc::EAGAIN) => Step::Again,
        // O_DIRECT refuses buffers or offsets that are not aligned: retry buffered.
        (Kind::Read | Kind::Write, libc::EINVAL) if Some(slot.fd()) != buffered_fd => {
            match buffered_fd {
                Some(fd) => {
                    slot.use_fd(fd);
                    Step::Again
                }
                None => Step::Done(Some(IoFailure::Os(errno))),
            }
        }
        (Kind::Zero { stage }, libc::EOPNOTSUPP | libc::EINVAL | libc::ENODEV) => match stage {
            ZeroStage::ZeroRange => {
                slot.set_zero_stage(ZeroStage::PunchHole);
                Step::Again
            }
            ZeroStage::PunchHole => {
                slot.set_zero_stage(ZeroStage::WriteZeros);
                Step::Again
            }
            ZeroStage::WriteZeros => Step::Done(Some(IoFailure::Os(errno))),
        },
        _ => Step::Done(Some(IoFailure::Os(errno))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIRECT_FD: RawFd = 10;
    const BUFFERED_FD: RawFd = 11;

    #[test]
    fn a_short_transfer_continues_where_it_stopped() {
        let mut slot = Slot::in_flight(Kind::Read, DIRECT_FD, 4096, 8192);
        assert_eq!(next_step(&mut slot, 4096, None), Step::Again);
        assert_eq!((slot.file_offset(), slot.remaining_bytes()), (8192, 4096));
        assert_eq!(next_step(&mut slot, 4096, None), Step::Done(None));
    }

    #[test]
    fn no_progress_fails_the_request() {
        let mut slot = Slot::in_flight(Kind::Write, DIRECT_FD, 0, 512);
        let failure = Some(IoFailure::NoProgress);
        assert_eq!(next_step(&mut slot, 0, None), Step::Done(failure));
    }

    #[test]
    fn unaligned_direct_io_is_retried_buffered_once() {
        let mut slot = Slot::in_flight(Kind::Read, DIRECT_FD, 0, 512);
        let buffered = Some(BUFFERED_FD);
        assert_eq!(next_step(&mut slot, -libc::EINVAL, buffered), Step::Again);
        assert_eq!(slot.fd(), BUFFERED_FD);
        let failure = Some(IoFailure::Os(libc::EINVAL));
        assert_eq!(
            next_step(&mut slot, -libc::EINVAL, buffered),
            Step::Done(failure)
        );
        let mut plain = Slot::in_flight(Kind::Read, DIRECT_FD, 0, 512);
        assert_eq!(
            next_step(&mut plain, -libc::EINVAL, None),
            Step::Done(failure)
        );
    }

    #[test]
    fn zeroing_falls_back_stage_by_stage() {
        let zero_range = Kind::Zero {
            stage: ZeroStage::ZeroRange,
        };
        let mut slot = Slot::in_flight(zero_range, DIRECT_FD, 0, 1 << 20);
        assert_eq!(next_step(&mut slot, -libc::EOPNOTSUPP, None), Step::Again);
        assert_eq!(next_step(&mut slot, -libc::EOPNOTSUPP, None), Step::Again);
        let write_zeros = Kind::Zero {
            stage: ZeroStage::WriteZeros,
        };
        assert_eq!(slot.kind(), write_zeros);
        let entry = ring_entry(&mut slot, 3);
        assert_eq!(entry.get_user_data(), 3);
        assert_eq!(slot.pending_iovecs().len(), 16);
        assert_eq!(next_step(&mut slot, 1 << 20, None), Step::Done(None));
        let failure = Some(IoFailure::Os(libc::EOPNOTSUPP));
        let mut last = Slot::in_flight(write_zeros, DIRECT_FD, 0, 512);
        assert_eq!(
            next_step(&mut last, -libc::EOPNOTSUPP, None),
            Step::Done(failure)
        );
    }

    #[test]
    fn interrupted_operations_are_retried() {
        let mut slot = Slot::in_flight(Kind::Flush, DIRECT_FD, 0, 0);
        assert_eq!(next_step(&mut slot, -libc::EINTR, None), Step::Again);
        assert_eq!(next_step(&mut slot, -libc::EAGAIN, None), Step::Again);
        assert_eq!(next_step(&mut slot, 0, None), Step::Done(None));
    }
}
