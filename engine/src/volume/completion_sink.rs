//! Completions that arrive from other threads (held writes released by observers).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use crate::reactor::ring::wake_eventfd;

/// A queue of `(request slot, ok)` released by observers, and the eventfd that wakes
/// the queue's owner (a duplicate of the ring's eventfd, owned here so that it stays
/// open for as long as any ticket can signal it). One wait covers both sources.
pub struct CompletionSink {
    released: Mutex<Vec<(u32, bool)>>,
    notify_fd: OwnedFd,
}

impl CompletionSink {
    pub(crate) fn new(notify_fd: OwnedFd) -> Self {
        Self {
            released: Mutex::new(Vec::new()),
            notify_fd,
        }
    }

    pub(crate) fn push(&self, request_slot: u32, ok: bool) {
        if let Ok(mut released) = self.released.lock() {
            released.push((request_slot, ok));
        }
        wake_eventfd(self.notify_fd.as_fd());
    }

    /// Releases several slots with one lock and one wake-up.
    pub(crate) fn push_many(&self, request_slots: &[u32], ok: bool) {
        if request_slots.is_empty() {
            return;
        }
        if let Ok(mut released) = self.released.lock() {
            released.extend(request_slots.iter().map(|&slot| (slot, ok)));
        }
        wake_eventfd(self.notify_fd.as_fd());
    }

    /// Moves every released slot into `out`.
    pub(crate) fn drain_into(&self, out: &mut Vec<(u32, bool)>) {
        if let Ok(mut released) = self.released.lock() {
            out.append(&mut released);
        }
    }
}
