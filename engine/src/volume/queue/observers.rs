//! What a queue tells a volume's observers (mirror, journal) about a request: the write
//! as it is taken (`observe`, which may hold the request back), the end of the volume's
//! own I/O of it (`source_done`), and the batch handed to the kernel (`batch_submitted`).

use super::{BlockOp, VolumeQueue};
use crate::iovec::iovec_bytes;
use crate::observer::{Observed, ObserverList, ObserverTicket, WriteEvent, WriteKind};
use crate::IoFailure;

/// What the observers of a request saw, kept to tell them when the volume's own I/O ends.
pub(super) struct ObservedWrite {
    observers: ObserverList,
    kind: WriteKind,
    offset_bytes: u64,
    len_bytes: u64,
}

impl VolumeQueue {
    /// Shows a taken request to every observer; an observer that keeps the ticket, or asks
    /// for a leg (started by `submit` once the volume's own I/O is), adds a part the request
    /// waits for.
    pub(super) fn notify_observers(&mut self, slot_index: u32, op: &BlockOp<'_>) {
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
        let observers = self.path.observers.clone();
        for observer in observers.iter() {
            let ticket = ObserverTicket::new(self.sink.clone(), slot_index);
            match observer.observe(&event, ticket) {
                Observed::Done(handed_back) => handed_back.disarm(),
                Observed::Held => self.slots[slot_index as usize].hold_for_observer(),
                Observed::Leg(handed_back, target) => {
                    handed_back.disarm();
                    let slot = &mut self.slots[slot_index as usize];
                    if slot.leg_mut().arm(observer, target, &event) {
                        slot.hold_for_observer();
                    } else {
                        log::error!("volume {}: a second leg for one request", event.volume);
                        observer.leg_done(&event, Some(IoFailure::Busy));
                    }
                }
            }
        }
        if kind != WriteKind::Flush {
            self.slots[slot_index as usize].set_observed(ObservedWrite {
                observers,
                kind,
                offset_bytes,
                len_bytes,
            });
        }
    }

    /// Tells the observers that saw the slot's write that the volume's own I/O has ended.
    pub(super) fn settle_observers(&mut self, slot_index: u32) {
        let Some(observed) = self.slots[slot_index as usize].take_observed() else {
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

    /// Tells the observers that saw a request since the last call that the batch is with
    /// the kernel: an observer committing here overlaps the volume's own I/O.
    pub(super) fn tell_batch_submitted(&mut self) {
        if let Some(observers) = self.observers_to_tell.take() {
            for observer in observers.iter() {
                observer.batch_submitted();
            }
        }
    }
}
