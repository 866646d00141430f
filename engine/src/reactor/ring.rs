//! One io_uring instance with an eventfd that becomes readable when completions arrive.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use io_uring::{squeue, IoUring};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// Rounds of "move the completions the kernel kept aside into the queue, take them" per
/// [`Ring::reap`]; what is left waits for the next reap.
const OVERFLOW_FLUSHES_MAX: u32 = 8;

/// An io_uring instance owned by one thread.
pub struct Ring {
    ring: IoUring,
    eventfd: EventFd,
    /// Entries pushed but not yet handed to the kernel.
    unsubmitted: u32,
    /// Completions taken off the completion queue so that a submission could go on (the
    /// kernel refuses to submit while completions it kept aside wait for room); handed out
    /// first by [`Ring::reap`].
    stashed: Vec<(u64, i32)>,
}

impl Ring {
    /// Creates a ring with room for `entries` submissions, and registers an eventfd on it.
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder().build(entries.next_power_of_two().max(8))?;
        let eventfd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        ring.submitter()
            .register_eventfd(std::os::fd::AsRawFd::as_raw_fd(&eventfd))?;
        let stashed = Vec::with_capacity(ring.params().cq_entries() as usize);
        Ok(Self {
            ring,
            eventfd,
            unsubmitted: 0,
            stashed,
        })
    }

    /// The eventfd that the kernel signals on completion; also signalled with
    /// [`wake_eventfd`] for completions that come from other threads.
    pub fn notify_fd(&self) -> BorrowedFd<'_> {
        self.eventfd.as_fd()
    }

    /// The number of submission entries the ring holds.
    pub fn capacity(&self) -> u32 {
        self.ring.params().sq_entries()
    }

    /// Queues one entry; when the submission queue is full, hands what is queued to the
    /// kernel (taking completions off the completion queue if that is what it waits for)
    /// and tries again. An error means the entry was not queued.
    ///
    /// # Safety
    /// Until the completion carrying the entry's `user_data` has been taken from
    /// [`Ring::reap`]:
    /// - every buffer and iovec array the entry points to must stay valid;
    /// - every file descriptor the entry names must stay open. The kernel looks a descriptor
    ///   up by number when it starts the operation, which may be after this call returns; a
    ///   descriptor closed before then may have been reused for another file by then.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller upholds the contract stated above.
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            if self.enter(0)? == 0 {
                // Nothing left the full queue: retrying could spin.
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
        }
    }

    /// Hands every queued entry to the kernel with one `io_uring_enter`.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        self.enter(0).map(|_| ())
    }

    /// Hands queued entries to the kernel and sleeps until at least `want` completions are ready.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        self.enter(want).map(|_| ())
    }

    /// One `io_uring_enter`, retried when interrupted, and after taking completions off the
    /// queue when the kernel waits for room to post the ones it kept aside (`EBUSY`).
    /// Returns the entries the kernel took.
    fn enter(&mut self, want: usize) -> io::Result<usize> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(taken) => {
                    self.unsubmitted = self.unsubmitted.saturating_sub(taken as u32);
                    return Ok(taken);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && self.stash_completions() => {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the completion queue's entries into `stashed`; false when it was empty.
    #[cold]
    fn stash_completions(&mut self) -> bool {
        let before = self.stashed.len();
        let completions = self.ring.completion();
        self.stashed
            .extend(completions.map(|cqe| (cqe.user_data(), cqe.result())));
        self.stashed.len() > before
    }

    /// Moves every ready completion into `out` as `(user_data, result)`.
    #[inline]
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        if !self.stashed.is_empty() {
            out.append(&mut self.stashed);
        }
        self.take_completions(out);
        if self.ring.submission().cq_overflow() {
            self.reap_overflow(out);
        }
    }

    #[inline]
    fn take_completions(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
    }

    /// Completions the kernel kept aside while the completion queue was full move into it
    /// only during an `io_uring_enter`: enters and takes them, a bounded number of rounds.
    #[cold]
    #[inline(never)]
    fn reap_overflow(&mut self, out: &mut Vec<(u64, i32)>) {
        for _ in 0..OVERFLOW_FLUSHES_MAX {
            if self.enter(0).is_err() {
                return;
            }
            self.take_completions(out);
            if !self.ring.submission().cq_overflow() {
                return;
            }
        }
    }

    /// Clears the eventfd's counter so that the next completion wakes the thread again.
    pub fn clear_notification(&self) {
        // A counter already at zero reads as EAGAIN (the eventfd does not block): nothing to clear.
        let _ = self.eventfd.read();
    }
}

/// Signals an eventfd (used by other threads to wake a ring's owner). The borrow keeps the
/// descriptor open for the call, so the write cannot reach a file that reused its number.
pub fn wake_eventfd(fd: BorrowedFd<'_>) {
    // A full counter (EAGAIN) already wakes the owner.
    let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{opcode, types};
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn reads_a_file_through_the_ring() -> io::Result<()> {
        let mut file = tempfile::tempfile()?;
        file.write_all(b"hello ring")?;
        let mut ring = Ring::new(8)?;
        let mut buf = [0u8; 10];
        let entry = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), 10)
            .offset(0)
            .build()
            .user_data(7);
        // SAFETY: `buf` and `file` live until the completion is reaped below.
        unsafe { ring.push(&entry)? };
        ring.submit_and_wait(1)?;
        let mut done = Vec::new();
        ring.reap(&mut done);
        assert_eq!(done, vec![(7, 10)]);
        assert_eq!(&buf, b"hello ring");
        Ok(())
    }

    /// More entries than the submission queue holds, and more completions than the
    /// completion queue holds, without a reap in between: every push succeeds and every
    /// completion comes back once.
    #[test]
    fn full_queues_lose_nothing() -> io::Result<()> {
        let mut ring = Ring::new(8)?;
        let count = 8 * ring.capacity() as u64;
        for user_data in 0..count {
            let entry = opcode::Nop::new().build().user_data(user_data);
            // SAFETY: a no-op points to no memory and names no descriptor.
            unsafe { ring.push(&entry)? };
        }
        ring.submit()?;
        let mut done = Vec::new();
        while (done.len() as u64) < count {
            ring.reap(&mut done);
            if (done.len() as u64) < count {
                ring.submit_and_wait(1)?;
            }
        }
        let mut tags: Vec<u64> = done.iter().map(|&(user_data, _)| user_data).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..count).collect::<Vec<_>>());
        assert!(done.iter().all(|&(_, result)| result == 0));
        Ok(())
    }

    #[test]
    fn a_wake_up_is_cleared_once_read() -> io::Result<()> {
        let ring = Ring::new(8)?;
        wake_eventfd(ring.notify_fd());
        wake_eventfd(ring.notify_fd());
        assert_eq!(ring.eventfd.read()?, 2);
        wake_eventfd(ring.notify_fd());
        ring.clear_notification();
        let cleared = ring.eventfd.read();
        assert_eq!(cleared.err(), Some(nix::errno::Errno::EAGAIN));
        Ok(())
    }
}
