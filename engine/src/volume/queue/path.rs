//! The data path as a queue last saw it (the volume's backing, its descriptors and
//! observers), and the backings a queue keeps open while its operations may still name
//! their descriptors.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use crate::observer::ObserverList;
use crate::volume::{Backing, NbdExport, Volume};

/// The volume's data path at one generation; reloaded when the volume's generation moves.
pub(super) struct PathSnapshot {
    pub(super) generation: u64,
    /// The descriptor requests go to (-1 when the volume lives on NBD).
    pub(super) fd: RawFd,
    /// A buffered descriptor of the same image, when `fd` is `O_DIRECT`.
    pub(super) buffered_fd: Option<RawFd>,
    pub(super) base_offset_bytes: u64,
    pub(super) len_bytes: u64,
    pub(super) memory_backed: bool,
    pub(super) observers: ObserverList,
    /// The export of a volume that lives on NBD.
    pub(super) nbd: Option<Arc<NbdExport>>,
    /// Owns the descriptors above: they stay open as long as this snapshot holds it.
    backing: Arc<Backing>,
}

impl PathSnapshot {
    pub(super) fn load(volume: &Volume) -> Self {
        let generation = volume.generation();
        let backing = volume.backing();
        let file = backing.file();
        Self {
            generation,
            fd: file.map_or(-1, |f| f.file.as_raw_fd()),
            buffered_fd: file.and_then(|f| f.buffered.as_ref().map(|b| b.as_raw_fd())),
            base_offset_bytes: backing.base_offset_bytes,
            len_bytes: backing.len_bytes,
            memory_backed: file.is_some_and(|f| f.memory_backed),
            observers: volume.observers(),
            nbd: backing.nbd().cloned(),
            backing,
        }
    }
}

/// Backings replaced while requests were in flight. A request keeps the descriptor it
/// started with (its continuations and fallbacks reuse it), so the backing that owns that
/// descriptor must stay open until no request is in flight: otherwise a closed descriptor's
/// number could be handed to another file and a queued operation would reach that file.
#[derive(Default)]
pub(super) struct RetiredBackings {
    backings: Vec<Arc<Backing>>,
}

impl RetiredBackings {
    /// Keeps `old`'s backing open if it differs from `new`'s and requests other than the
    /// one being taken (`inflight_others`) may still use its descriptors.
    pub(super) fn retire(&mut self, old: PathSnapshot, new: &PathSnapshot, inflight_others: bool) {
        if inflight_others && !Arc::ptr_eq(&old.backing, &new.backing) {
            self.backings.push(old.backing);
        }
    }

    /// True while a replaced backing is kept open.
    #[inline]
    pub(super) fn holds_any(&self) -> bool {
        !self.backings.is_empty()
    }

    /// Closes what was kept; call only when no request is in flight.
    pub(super) fn release(&mut self) {
        self.backings.clear();
    }
}
