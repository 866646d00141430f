//! The in-order publication of used entries: the chains taken from one vring, held until
//! every chain taken before them has finished too.
//!
//! Used entries are published in the order the chains were taken from the available ring,
//! whatever order the engine finishes them in (a request finished early waits for the ones
//! taken before it). That is what makes a daemon crash survivable without in-flight
//! tracking (`INFLIGHT_SHMFD`, which vhost-user-backend does not offer): a reconnecting QEMU
//! rewinds the ring to the used index and offers again exactly the chains from there on, so
//! with in-order publication it resubmits only requests the guest is still waiting for. With
//! out-of-order publication it would resubmit requests the guest had already seen complete
//! (whose buffers it may have reused: a stale write of new data) and never resubmit some that
//! had not (a guest I/O that never ends). The cost: a request that finishes early is
//! answered only when the ones taken before it are, so one slow request holds back the
//! used entries behind it.

use std::collections::VecDeque;

/// One taken chain waiting for its turn on the used ring.
#[derive(Clone, Copy)]
pub(super) struct Unpublished {
    pub(super) head: u16,
    pub(super) used_len: u32,
    pub(super) done: bool,
}

/// The chains taken from one vring and not yet on its used ring, in the order taken.
#[derive(Default)]
pub(super) struct PublicationOrder {
    /// The position (count of chains taken since the ring started) of `pending[0]`.
    front: u64,
    pending: VecDeque<Unpublished>,
}

impl PublicationOrder {
    /// Appends a taken chain, finished with `done`'s used length if it was answered at
    /// once; returns its position.
    pub(super) fn push(&mut self, head: u16, done: Option<u32>) -> u64 {
        let position = self.front + self.pending.len() as u64;
        self.pending.push_back(Unpublished {
            head,
            used_len: done.unwrap_or(0),
            done: done.is_some(),
        });
        position
    }

    /// Marks the chain at `position` finished with `used_len` bytes.
    pub(super) fn finish(&mut self, position: u64, used_len: u32) {
        let index = position.wrapping_sub(self.front);
        if let Some(entry) = usize::try_from(index)
            .ok()
            .and_then(|i| self.pending.get_mut(i))
        {
            entry.used_len = used_len;
            entry.done = true;
        }
    }

    /// Removes and returns the next chain if it is finished.
    pub(super) fn pop_finished(&mut self) -> Option<(u16, u32)> {
        let entry = self.pending.front().filter(|e| e.done)?;
        let out = (entry.head, entry.used_len);
        self.pending.pop_front();
        self.front += 1;
        Some(out)
    }

    /// The finished chains still held behind one that is not, in the order taken.
    pub(super) fn finished(&self) -> impl Iterator<Item = &Unpublished> {
        self.pending.iter().filter(|e| e.done)
    }
}

#[cfg(test)]
mod tests {
    use super::PublicationOrder;

    #[test]
    fn chains_finished_out_of_order_are_published_in_the_order_taken() {
        let mut order = PublicationOrder::default();
        let a = order.push(10, None);
        let b = order.push(11, None);
        let c = order.push(12, Some(1));
        let d = order.push(13, None);
        assert_eq!((a, b, c, d), (0, 1, 2, 3));
        // b and d finish first: nothing may be published while a is still running.
        order.finish(b, 1);
        order.finish(d, 513);
        assert_eq!(order.pop_finished(), None);
        assert_eq!(
            order.finished().map(|e| e.head).collect::<Vec<_>>(),
            [11, 12, 13]
        );
        order.finish(a, 4097);
        assert_eq!(order.pop_finished(), Some((10, 4097)));
        assert_eq!(order.pop_finished(), Some((11, 1)));
        assert_eq!(order.pop_finished(), Some((12, 1)));
        assert_eq!(order.pop_finished(), Some((13, 513)));
        assert_eq!(order.pop_finished(), None);
        // Positions keep counting after the queue empties.
        assert_eq!(order.push(14, Some(1)), 4);
        assert_eq!(order.pop_finished(), Some((14, 1)));
    }

    #[test]
    fn a_position_that_is_not_pending_is_ignored() {
        let mut order = PublicationOrder::default();
        let a = order.push(1, None);
        order.finish(a + 5, 1);
        order.finish(u64::MAX, 1);
        assert_eq!(order.pop_finished(), None);
        order.finish(a, 1);
        assert_eq!(order.pop_finished(), Some((1, 1)));
        order.finish(a, 1);
        assert_eq!(order.pop_finished(), None);
    }
}
