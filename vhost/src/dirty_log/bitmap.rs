//! [`LogBitmap`]: the dirty bitmap of one guest memory region, cheap while no log is installed.
//!
//! vhost-user-backend's `BitmapMmapRegion` does the logging (it maps the frontend's log and
//! sets the page bits), but every vm-memory access pays for it even when no migration is
//! running: each guest memory slice clones its `Arc` and each write takes its `RwLock`, atomic
//! read-modify-writes on a cache line every queue thread shares. This wrapper borrows instead
//! of cloning (`RefSlice`) and checks one flag before marking, so a region without a log costs
//! a load per write; once `SET_LOG_BASE` installs the log, marks go to `BitmapMmapRegion`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;

/// The bitmap of one guest memory region (`GuestMemoryMmap<LogBitmap>`). Clones share state.
#[derive(Debug, Clone, Default)]
pub struct LogBitmap {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Set once the frontend's log is installed; never cleared (the mapping stays valid, and
    /// marks after the migration are harmless).
    installed: AtomicBool,
    log: BitmapMmapRegion,
}

impl LogBitmap {
    /// True once `SET_LOG_BASE` installed the frontend's log for this region.
    pub fn is_installed(&self) -> bool {
        self.shared.installed.load(Ordering::Acquire)
    }
}

impl<'a> WithBitmapSlice<'a> for LogBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for LogBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.is_installed() {
            self.shared.log.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.is_installed() && self.shared.log.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for LogBitmap {
    fn with_len(_len_bytes: usize) -> Self {
        Self::default()
    }
}

impl BitmapReplace for LogBitmap {
    type InnerBitmap = AtomicBitmapMmap;

    fn replace(&self, bitmap: AtomicBitmapMmap) {
        self.shared.log.replace(bitmap);
        // Release: a thread that sees the flag also sees the installed log.
        self.shared.installed.store(true, Ordering::Release);
    }
}
