//! Arrays of iovecs that are handed to the kernel (io_uring, `preadv2`, `sendmsg`), and the
//! one place that says why such an array may move between threads.

use std::ops::{Deref, DerefMut};

/// A growable array of `iovec`s describing memory owned by someone else (guest memory, a
/// caller's buffers, a static buffer of zeros). It stores addresses and lengths and never
/// reads or writes through them itself.
#[derive(Debug)]
pub struct IovecArray(Vec<libc::iovec>);

// SAFETY: an `IovecArray` holds only addresses and lengths; moving it to another thread
// dereferences nothing. The memory behind the addresses is owned by whoever built the
// array, and every dereference (the kernel's, through an operation submitted with the
// array, or a copy into the iovecs) happens under the contract of the call that took the
// addresses: `VolumeQueue::submit` makes its caller keep that memory valid until the
// request's completion is reaped, on whichever thread the queue then runs. The array is
// not `Sync`: only its current owner touches it.
unsafe impl Send for IovecArray {}

impl IovecArray {
    /// An empty array with room for `capacity` iovecs (allocated once, here).
    pub fn with_capacity(capacity: usize) -> Self {
        Self(Vec::with_capacity(capacity))
    }

    #[inline]
    pub fn clear(&mut self) {
        self.0.clear();
    }

    #[inline]
    pub fn push(&mut self, iovec: libc::iovec) {
        self.0.push(iovec);
    }

    #[inline]
    pub fn extend_from_slice(&mut self, iovecs: &[libc::iovec]) {
        self.0.extend_from_slice(iovecs);
    }

    /// The array's start, for a call that takes `*mut iovec` (`msghdr.msg_iov`) but does
    /// not write through it.
    #[inline]
    pub fn as_mut_ptr(&mut self) -> *mut libc::iovec {
        self.0.as_mut_ptr()
    }

    /// Total bytes the array describes.
    #[inline]
    pub fn total_bytes(&self) -> u64 {
        iovec_bytes(&self.0)
    }

    /// Drops `done` transferred bytes from the front of `self[*start..]`: whole iovecs by
    /// moving `*start` past them, part of one by shortening it.
    #[inline]
    pub fn advance(&mut self, start: &mut usize, mut done: usize) {
        while done > 0 && *start < self.0.len() {
            let iov = &mut self.0[*start];
            if done >= iov.iov_len {
                done -= iov.iov_len;
                *start += 1;
            } else {
                // SAFETY: `done < iov_len`, so the advanced pointer stays inside the same
                // buffer; nothing is dereferenced here.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(done) }.cast();
                iov.iov_len -= done;
                done = 0;
            }
        }
    }
}

impl Deref for IovecArray {
    type Target = [libc::iovec];

    #[inline]
    fn deref(&self) -> &[libc::iovec] {
        &self.0
    }
}

impl DerefMut for IovecArray {
    #[inline]
    fn deref_mut(&mut self) -> &mut [libc::iovec] {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a IovecArray {
    type Item = &'a libc::iovec;
    type IntoIter = std::slice::Iter<'a, libc::iovec>;

    #[inline]
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Total bytes of an iovec array.
#[inline]
pub fn iovec_bytes(iovecs: &[libc::iovec]) -> u64 {
    iovecs.iter().map(|v| v.iov_len as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn is_send_and_counts_its_bytes() {
        assert_send::<IovecArray>();
        let mut bytes = [0u8; 8];
        let mut array = IovecArray::with_capacity(2);
        array.push(libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: 3,
        });
        array.extend_from_slice(&[libc::iovec {
            iov_base: bytes[3..].as_mut_ptr().cast(),
            iov_len: 5,
        }]);
        assert_eq!(array.len(), 2);
        assert_eq!(array.total_bytes(), 8);
        array.clear();
        assert!(array.is_empty());
    }
}
