//! A 4 KiB-aligned heap buffer that the cases hand to the engine as iovecs (`O_DIRECT`
//! needs aligned memory).

/// The alignment of every buffer: a page, enough for any `O_DIRECT` device.
const ALIGN_BYTES: usize = 4096;

/// A zeroed, 4 KiB-aligned heap buffer of a fixed length.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, ALIGN_BYTES).expect("layout");
        assert!(len > 0, "an empty buffer has no allocation");
        // SAFETY: the layout has a non-zero size (asserted above).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self { ptr, len }
    }

    pub fn slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of `len` bytes, initialised (zeroed) at birth.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `len` bytes, borrowed mutably once.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The iovec of `len` bytes at `offset` of the buffer; it points into the buffer, so the
    /// buffer must outlive every request that carries it.
    pub fn iovec(&self, offset: usize, len: usize) -> libc::iovec {
        assert!(offset + len <= self.len);
        libc::iovec {
            // SAFETY: `offset` is inside the allocation (checked above).
            iov_base: unsafe { self.ptr.add(offset) }.cast(),
            iov_len: len,
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, ALIGN_BYTES).expect("layout");
        // SAFETY: allocated in `new` with this layout, and freed once.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}
