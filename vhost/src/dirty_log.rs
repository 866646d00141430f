//! Dirty-page logging for the frontend's live migration of the VM (vhost-user
//! `VHOST_F_LOG_ALL` + `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! The frontend hands the log (one bit per 4 KiB guest page) with `SET_LOG_BASE`;
//! vhost-user-backend installs it into the [`LogBitmap`] of every guest memory region.
//! From then on every write made through vm-memory (status bytes, used-ring entries,
//! `GET_ID` data) marks its pages itself. Read data does not: the kernel writes it into
//! guest memory through raw iovecs (io_uring, `preadv2`). So the queue worker keeps each
//! read's guest segments with the request and calls [`mark_written`] when the read
//! completes, before the used entry is published, while the frontend has `LOG_ALL` set
//! ([`LogState`]). Marking at completion also covers a read submitted before logging began.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

mod bitmap;

/// The bitmap type of ferry's guest memory regions: empty until `SET_LOG_BASE`, then a view
/// of the frontend's shared log.
pub use bitmap::LogBitmap;

/// Guest segments the device writes into, kept per request in flight.
pub type Segment = (GuestAddress, u32);

/// Whether the frontend has acked `VHOST_F_LOG_ALL`: shared by the device (which sees
/// `SET_FEATURES`) and every queue worker (which marks at completion).
#[derive(Debug, Clone, Default)]
pub struct LogState {
    active: Arc<AtomicBool>,
}

impl LogState {
    /// Records the features the frontend acked (`SET_FEATURES`).
    pub fn set_acked_features(&self, features: u64) {
        let active = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        // SeqCst: the frontend starts reading the log only after our reply to SET_FEATURES;
        // a worker that still sees `false` finished its guest writes before this store.
        self.active.store(active, Ordering::SeqCst);
    }

    /// True while the frontend wants device writes logged.
    #[inline]
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }
}

/// Marks every page of `segments` dirty in the memory's region bitmaps (a no-op for regions
/// without a log). Segments outside guest memory are skipped: the request that named them
/// was refused at parse time, and nothing was written there.
pub fn mark_written<M: GuestMemoryBackend + ?Sized>(mem: &M, segments: &[Segment]) {
    for &(addr, len) in segments {
        for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
            let Ok(slice) = slice else {
                break;
            };
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

#[cfg(test)]
mod tests;
