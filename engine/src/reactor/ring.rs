//! One io_uring instance with an eventfd that becomes readable when completions arrive.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{squeue, IoUring};

/// An io_uring instance owned by one thread.
pub struct Ring {
    ring: IoUring,
    eventfd: OwnedFd,
    /// Entries pushed but not yet handed to the kernel.
    unsubmitted: u32,
}

impl Ring {
    /// Creates a ring with room for `entries` submissions, and registers an eventfd on it.
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder().build(entries.next_power_of_two().max(8))?;
        // SAFETY: eventfd(2) with valid flags has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd(2) and nobody else owns it.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Self {
            ring,
            eventfd,
            unsubmitted: 0,
        })
    }

    /// The eventfd that the kernel signals on completion; also signalled by
    /// [`Ring::wake`] for completions that come from other threads.
    pub fn notify_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// The number of submission entries the ring holds.
    pub fn capacity(&self) -> u32 {
        self.ring.params().sq_entries()
    }

    /// Queues one entry; when the submission queue is full, hands what is queued to
    /// the kernel and tries again.
    ///
    /// # Safety
    /// Every buffer and iovec array the entry points to must stay valid until the
    /// completion carrying the entry's `user_data` has been taken from [`Ring::reap`].
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller upholds the buffer-lifetime contract stated above.
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Hands every queued entry to the kernel with one `io_uring_enter`.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY: the completion queue is full; the caller must reap first.
                Err(e) => return Err(e),
            }
        }
    }

    /// Hands queued entries to the kernel and sleeps until at least `want` completions are ready.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves every ready completion into `out` as `(user_data, result)`.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
    }

    /// Clears the eventfd's counter so that the next completion wakes the thread again.
    pub fn clear_notification(&self) {
        let mut value = 0u64;
        // SAFETY: reading 8 bytes into a local u64 from an eventfd we own.
        let _ = unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                (&mut value as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// Signals an eventfd (used by other threads to wake a ring's owner).
pub fn wake_eventfd(fd: RawFd) {
    let one = 1u64;
    // SAFETY: writing 8 bytes from a local u64 to an eventfd; a stale fd only yields EBADF.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), std::mem::size_of::<u64>()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{opcode, types};
    use std::io::Write;

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
        // SAFETY: `buf` lives until the completion is reaped below.
        unsafe { ring.push(&entry)? };
        ring.submit_and_wait(1)?;
        let mut done = Vec::new();
        ring.reap(&mut done);
        assert_eq!(done, vec![(7, 10)]);
        assert_eq!(&buf, b"hello ring");
        Ok(())
    }
}
