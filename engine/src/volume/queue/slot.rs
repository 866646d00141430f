//! One request's state while it is in flight: what it is, how far its transfer has got,
//! and which of its parts (the volume's own I/O, writes held by observers) are still out.
//!
//! A slot belongs to one [`super::VolumeQueue`] and is reused request after request; its
//! iovec array is allocated once. The queue's file path and the NBD path move a request on
//! through these methods only.

use std::os::fd::RawFd;

use super::leg::Leg;
use super::observers::ObservedWrite;
use super::path::PathSnapshot;
use super::BlockOp;
use crate::iovec::{iovec_bytes, IovecArray};
use crate::{IoFailure, Volume};

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::volume) enum Kind {
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
pub(in crate::volume) enum ZeroStage {
    ZeroRange,
    PunchHole,
    WriteZeros,
}

/// The largest single write of zeros in the write-zeros fallback.
const ZERO_BUFFER_BYTES: usize = 64 * 1024;
/// Iovecs of one write of zeros (each at most [`ZERO_BUFFER_BYTES`]).
const ZERO_IOVECS_MAX: usize = 16;
static ZEROS: [u8; ZERO_BUFFER_BYTES] = [0; ZERO_BUFFER_BYTES];

/// A request's state while in flight.
pub(in crate::volume) struct Slot {
    tag: u64,
    kind: Kind,
    /// A discard (counted apart from write-zeroes, which share `Kind::Zero`).
    discard: bool,
    /// Parts outstanding: the volume's own I/O (1 until it ends) plus held observer tickets
    /// and the leg.
    parts_pending: u32,
    /// A ring operation of this slot is in the kernel.
    ring_busy: bool,
    /// The first failure of any part; the request fails with it.
    failure: Option<IoFailure>,
    /// The iovecs of a read or write (or of the zeros written), advanced past what has
    /// been transferred.
    iovecs: IovecArray,
    iov_start: usize,
    /// Absolute offset in the backing image of the next byte to transfer.
    file_offset: u64,
    remaining_bytes: u64,
    total_bytes: u64,
    /// The descriptor the request's file I/O goes to.
    fd: RawFd,
    /// Writes carry `RWF_DSYNC` (the guest turned its write cache off).
    dsync: bool,
    /// The observers that saw this write, told when the volume's own I/O ends.
    observed: Option<ObservedWrite>,
    /// The write made to an observer's file as well (`leg.rs`).
    leg: Leg,
}

impl Slot {
    pub(super) fn new(segments_max: usize) -> Self {
        Self {
            tag: 0,
            kind: Kind::Flush,
            discard: false,
            parts_pending: 0,
            ring_busy: false,
            failure: None,
            iovecs: IovecArray::with_capacity(segments_max.max(ZERO_IOVECS_MAX)),
            iov_start: 0,
            file_offset: 0,
            remaining_bytes: 0,
            total_bytes: 0,
            fd: -1,
            dsync: false,
            observed: None,
            leg: Leg::new(segments_max),
        }
    }

    /// Takes a new request: its tag and, for file I/O, the descriptor. One part is
    /// pending from here on, the volume's own I/O, until [`Slot::end_part`] ends it.
    #[inline]
    pub(super) fn begin(&mut self, tag: u64, fd: RawFd) {
        self.tag = tag;
        self.parts_pending = 1;
        self.ring_busy = false;
        self.failure = None;
        self.iovecs.clear();
        self.iov_start = 0;
        self.fd = fd;
        self.dsync = false;
        self.observed = None;
    }

    /// Validates `op` against the volume and fills the kind, range and iovecs.
    #[inline]
    pub(super) fn prepare(
        &mut self,
        op: &BlockOp<'_>,
        volume: &Volume,
        path: &PathSnapshot,
    ) -> Result<(), IoFailure> {
        let (kind, offset_bytes, len_bytes) = match *op {
            BlockOp::Read {
                offset_bytes,
                iovecs,
            } => {
                self.iovecs.extend_from_slice(iovecs);
                (Kind::Read, offset_bytes, iovec_bytes(iovecs))
            }
            BlockOp::Write {
                offset_bytes,
                iovecs,
            } => {
                self.iovecs.extend_from_slice(iovecs);
                self.dsync = !volume.write_cache_enabled();
                (Kind::Write, offset_bytes, iovec_bytes(iovecs))
            }
            BlockOp::Flush => (Kind::Flush, 0, 0),
            BlockOp::Discard {
                offset_bytes,
                len_bytes,
            } => {
                let stage = ZeroStage::PunchHole;
                (Kind::Zero { stage }, offset_bytes, len_bytes)
            }
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
        self.kind = kind;
        self.discard = matches!(op, BlockOp::Discard { .. });
        self.total_bytes = len_bytes;
        self.remaining_bytes = len_bytes;
        if kind != Kind::Read && kind != Kind::Flush && volume.read_only() {
            return Err(IoFailure::ReadOnly);
        }
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= path.len_bytes => {}
            _ => return Err(IoFailure::OutOfRange),
        }
        self.file_offset = path.base_offset_bytes + offset_bytes;
        Ok(())
    }

    #[inline]
    pub(in crate::volume) fn tag(&self) -> u64 {
        self.tag
    }

    #[inline]
    pub(in crate::volume) fn kind(&self) -> Kind {
        self.kind
    }

    #[inline]
    pub(in crate::volume) fn is_discard(&self) -> bool {
        self.discard
    }

    /// Writes must reach stable storage before they complete.
    #[inline]
    pub(in crate::volume) fn dsync(&self) -> bool {
        self.dsync
    }

    #[inline]
    pub(in crate::volume) fn file_offset(&self) -> u64 {
        self.file_offset
    }

    #[inline]
    pub(in crate::volume) fn remaining_bytes(&self) -> u64 {
        self.remaining_bytes
    }

    #[inline]
    pub(in crate::volume) fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    #[inline]
    pub(super) fn fd(&self) -> RawFd {
        self.fd
    }

    /// Sends the rest of the request's file I/O to `fd` (the buffered descriptor, when
    /// `O_DIRECT` refused the request's alignment).
    #[inline]
    pub(super) fn use_fd(&mut self, fd: RawFd) {
        self.fd = fd;
    }

    /// Moves a zeroing request to the next way of zeroing.
    #[inline]
    pub(in crate::volume) fn set_zero_stage(&mut self, stage: ZeroStage) {
        self.kind = Kind::Zero { stage };
    }

    /// The iovecs not yet transferred.
    #[inline]
    pub(in crate::volume) fn pending_iovecs(&self) -> &[libc::iovec] {
        &self.iovecs[self.iov_start..]
    }

    /// Points the iovecs at the static zeros buffer, for at most `max_bytes` (and at most
    /// [`ZERO_IOVECS_MAX`] buffers); returns the bytes they cover.
    #[inline]
    pub(in crate::volume) fn fill_zero_iovecs(&mut self, max_bytes: u64) -> u64 {
        self.iovecs.clear();
        self.iov_start = 0;
        let mut len = 0u64;
        while len < max_bytes && self.iovecs.len() < ZERO_IOVECS_MAX {
            let n = (max_bytes - len).min(ZERO_BUFFER_BYTES as u64);
            self.iovecs.push(libc::iovec {
                iov_base: ZEROS.as_ptr() as *mut libc::c_void,
                iov_len: n as usize,
            });
            len += n;
        }
        len
    }

    /// Drops `done` transferred bytes from the front of the iovecs.
    #[inline]
    pub(in crate::volume) fn advance(&mut self, done: usize) {
        self.iovecs.advance(&mut self.iov_start, done);
    }

    /// Counts `bytes` of the range as done (at most what remains) and moves the file
    /// offset past them; the iovecs are advanced apart, by whoever moved the data.
    #[inline]
    pub(in crate::volume) fn consume(&mut self, bytes: u64) {
        let bytes = bytes.min(self.remaining_bytes);
        self.remaining_bytes -= bytes;
        self.file_offset += bytes;
    }

    /// Ends the range without doing the rest (an advisory discard the backing cannot do).
    #[inline]
    pub(in crate::volume) fn skip_remaining(&mut self) {
        self.remaining_bytes = 0;
    }

    /// Copies received read data into the iovecs, advancing them.
    pub(in crate::volume) fn copy_into_iovecs(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.iov_start < self.iovecs.len() {
            let iov = self.iovecs[self.iov_start];
            let n = iov.iov_len.min(data.len());
            // SAFETY: a read's iovecs point to writable memory valid until the request
            // completes (`VolumeQueue::submit`'s contract), and `n` stays within this iovec.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), iov.iov_base.cast::<u8>(), n) };
            self.advance(n);
            data = &data[n..];
        }
    }

    /// An observer kept the request's ticket: one more part to wait for.
    #[inline]
    pub(super) fn hold_for_observer(&mut self) {
        self.parts_pending += 1;
    }

    /// True when no part is pending: the slot is free, or was never taken.
    #[inline]
    pub(super) fn is_idle(&self) -> bool {
        self.parts_pending == 0
    }

    /// Ends one part, keeping the first failure of any part; true when it was the last.
    #[inline]
    pub(super) fn end_part(&mut self, failure: Option<IoFailure>) -> bool {
        if self.failure.is_none() {
            self.failure = failure;
        }
        self.parts_pending -= 1;
        self.parts_pending == 0
    }

    /// The request's outcome once every part has ended.
    #[inline]
    pub(super) fn result(&self) -> Result<u64, IoFailure> {
        match self.failure {
            Some(f) => Err(f),
            None => Ok(self.total_bytes),
        }
    }

    /// A ring operation of the slot went to the kernel.
    #[inline]
    pub(super) fn ring_op_started(&mut self) {
        self.ring_busy = true;
    }

    /// The slot's ring operation completed; false when none was in the kernel.
    #[inline]
    pub(super) fn ring_op_ended(&mut self) -> bool {
        std::mem::replace(&mut self.ring_busy, false)
    }

    #[inline]
    pub(super) fn set_observed(&mut self, observed: ObservedWrite) {
        self.observed = Some(observed);
    }

    #[inline]
    pub(super) fn take_observed(&mut self) -> Option<ObservedWrite> {
        self.observed.take()
    }

    #[inline]
    pub(super) fn leg_mut(&mut self) -> &mut Leg {
        &mut self.leg
    }
}

#[cfg(test)]
impl Slot {
    /// A slot in the middle of a request without data buffers, for tests of the code that
    /// moves requests on.
    pub(super) fn in_flight(kind: Kind, fd: RawFd, file_offset: u64, remaining_bytes: u64) -> Self {
        let mut slot = Self::new(1);
        slot.begin(1, fd);
        slot.kind = kind;
        slot.file_offset = file_offset;
        slot.remaining_bytes = remaining_bytes;
        slot.total_bytes = remaining_bytes;
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_with(buffers: &mut [[u8; 4]]) -> Slot {
        let mut slot = Slot::new(4);
        slot.begin(7, -1);
        for buffer in buffers.iter_mut() {
            slot.iovecs.push(libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: buffer.len(),
            });
        }
        slot
    }

    #[test]
    fn advance_and_copy_walk_the_iovecs() {
        let mut buffers = [[0u8; 4]; 2];
        let mut slot = slot_with(&mut buffers);
        slot.advance(1);
        assert_eq!(slot.pending_iovecs().len(), 2);
        assert_eq!(slot.pending_iovecs()[0].iov_len, 3);
        slot.copy_into_iovecs(&[1, 2, 3, 4, 5]);
        assert_eq!(slot.pending_iovecs().len(), 1);
        assert_eq!(slot.pending_iovecs()[0].iov_len, 2);
        drop(slot);
        assert_eq!(buffers, [[0, 1, 2, 3], [4, 5, 0, 0]]);
    }

    #[test]
    fn zero_iovecs_stop_at_their_bound() {
        let mut slot = Slot::new(1);
        let all = (ZERO_IOVECS_MAX * ZERO_BUFFER_BYTES) as u64;
        assert_eq!(slot.fill_zero_iovecs(all + 512), all);
        assert_eq!(slot.pending_iovecs().len(), ZERO_IOVECS_MAX);
        assert_eq!(slot.fill_zero_iovecs(1000), 1000);
        assert_eq!(slot.pending_iovecs().len(), 1);
    }

    #[test]
    fn the_first_failure_of_any_part_wins() {
        let mut slot = Slot::new(1);
        slot.begin(1, -1);
        slot.hold_for_observer();
        assert!(!slot.end_part(Some(IoFailure::Observer)));
        assert!(slot.end_part(Some(IoFailure::Os(libc::EIO))));
        assert!(slot.is_idle());
        assert_eq!(slot.result(), Err(IoFailure::Observer));
    }

    #[test]
    fn consume_never_passes_the_end() {
        let mut slot = Slot::new(1);
        slot.begin(1, -1);
        slot.remaining_bytes = 100;
        slot.file_offset = 4096;
        slot.consume(60);
        slot.consume(60);
        assert_eq!((slot.remaining_bytes(), slot.file_offset()), (0, 4196));
    }
}
