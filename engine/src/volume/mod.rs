//! A volume: a named byte range of an image file, block device or NBD export that the guest
//! sees as a disk.
//!
//! The volume owns the open backing file(s) and the settings that every queue shares
//! (read-only, cache mode, the guest's write-cache setting), the observer list
//! (mirror, journal) and the counters. Per-thread I/O goes through [`queue::VolumeQueue`].

pub(crate) mod completion_sink;
pub mod nbd_export;
pub mod nbd_queue;
pub mod open;
pub mod queue;
pub mod stats;

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::observer::{ObserverList, ObserverSet, WriteObserver};
use crate::tls::TlsCredentials;
pub use nbd_export::NbdExport;
pub use stats::VolumeStats;

/// How the image is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Through the host page cache; a guest flush is an `fdatasync`.
    #[default]
    Writeback,
    /// `O_DIRECT`, bypassing the host page cache; a guest flush is still an `fdatasync`
    /// (for metadata such as a sparse file's allocation).
    None,
}

/// What the operator asked for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeConfig {
    pub name: String,
    pub path: PathBuf,
    /// Create a sparse image of this size if `path` is missing; if it exists it must
    /// have this size (of the whole file, or of the slice when `length_bytes` is given).
    pub size_bytes: Option<u64>,
    pub read_only: bool,
    pub cache: CacheMode,
    /// Where the volume starts inside the image (for merged migration targets).
    pub offset_bytes: u64,
    /// The volume's length inside the image; default: from `offset_bytes` to the end.
    pub length_bytes: Option<u64>,
    /// What every request of the volume is whole multiples of: the guest's logical block
    /// (0, the default: a 512-byte sector). An NBD export that needs larger blocks is
    /// refused unless this covers them.
    pub request_block_bytes: u64,
    /// The TLS credentials of a volume on an NBD export (`tls-creds=`): with them every
    /// connection to the export uses TLS, whatever the URI's scheme; an `nbds://` URI
    /// needs them.
    pub nbd_tls: Option<Arc<TlsCredentials>>,
}

impl VolumeConfig {
    /// [`VolumeConfig::request_block_bytes`], a sector if unset.
    pub fn request_block_bytes(&self) -> u64 {
        self.request_block_bytes.max(crate::SECTOR_SIZE)
    }
}

/// The open image under a volume: a file, block device or NBD export, and the slice of
/// it in use.
#[derive(Debug)]
pub struct Backing {
    /// The path of a file, or the URI of an NBD export (`nbd://…`, `nbd+unix://…`,
    /// `nbds://…`, `nbds+unix://…`).
    pub path: PathBuf,
    pub kind: BackingKind,
    pub base_offset_bytes: u64,
    pub len_bytes: u64,
}

/// Where a volume's data lives.
#[derive(Debug)]
pub enum BackingKind {
    File(FileImage),
    /// An NBD export; each queue connects to it on its own (see [`nbd_queue`]).
    Nbd(Arc<NbdExport>),
}

/// An open image file or block device.
#[derive(Debug)]
pub struct FileImage {
    /// The descriptor requests go to (`O_DIRECT` with `cache=none`).
    pub file: File,
    /// A buffered descriptor of the same image, for requests whose guest buffers are not
    /// aligned for `O_DIRECT`; `None` when `file` is already buffered.
    pub buffered: Option<File>,
    pub is_block_device: bool,
    /// The image lives in memory (tmpfs, ramfs): its reads and writes never wait for a
    /// device, so the queues do them inline instead of through io_uring (which hands such
    /// files' buffered I/O to io-wq worker threads, since they lack `RWF_NOWAIT`;
    /// `benches/perf-notes.md`, *Images on tmpfs and ramfs are served inline*).
    pub memory_backed: bool,
}

impl Backing {
    /// The image file, unless the volume lives on an NBD export.
    pub fn file(&self) -> Option<&FileImage> {
        match &self.kind {
            BackingKind::File(image) => Some(image),
            BackingKind::Nbd(_) => None,
        }
    }

    /// The NBD export, if the volume lives on one.
    pub fn nbd(&self) -> Option<&Arc<NbdExport>> {
        match &self.kind {
            BackingKind::File(_) => None,
            BackingKind::Nbd(export) => Some(export),
        }
    }

    pub fn is_block_device(&self) -> bool {
        self.file().is_some_and(|f| f.is_block_device)
    }

    /// Makes completed writes durable: `fdatasync` of the image, or `NBD_CMD_FLUSH` on a
    /// connection of its own (used on shutdown; the queues flush through their own paths).
    pub fn sync(&self) -> std::io::Result<()> {
        match &self.kind {
            BackingKind::File(image) => image.file.sync_data(),
            BackingKind::Nbd(export) => export.flush(),
        }
    }

    /// Reads `buf.len()` bytes at `offset_bytes` of the image (absolute, not volume
    /// relative) outside the queues: the mirror's copier reads its source so.
    pub fn read_exact_at(&self, buf: &mut [u8], offset_bytes: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match &self.kind {
            BackingKind::File(image) => image
                .buffered
                .as_ref()
                .unwrap_or(&image.file)
                .read_exact_at(buf, offset_bytes),
            BackingKind::Nbd(export) => export.read_exact_at(buf, offset_bytes),
        }
    }
}

/// A volume shared by all its queues, the control socket and any migration or journal.
pub struct Volume {
    config: VolumeConfig,
    backing: Mutex<Arc<Backing>>,
    /// Bumped whenever the backing or the observer list changes; queues compare it
    /// once per submission and reload only when it moved.
    generation: AtomicU64,
    observers: ObserverSet,
    write_cache_enabled: AtomicBool,
    paused: AtomicBool,
    inflight: AtomicU64,
    wakers: Mutex<Vec<(u64, std::os::fd::OwnedFd)>>,
    next_waker_id: AtomicU64,
    pub stats: VolumeStats,
}

impl Volume {
    /// Opens (or creates, with `size_bytes`) the image of `config`.
    /// A read-only NBD export makes the volume read-only.
    pub fn open(mut config: VolumeConfig) -> Result<Arc<Self>, crate::EngineError> {
        let backing = open::open_backing(&config)?;
        if backing.nbd().is_some_and(|e| e.read_only()) {
            config.read_only = true;
        }
        Ok(Arc::new(Self {
            config,
            backing: Mutex::new(Arc::new(backing)),
            generation: AtomicU64::new(1),
            observers: ObserverSet::default(),
            write_cache_enabled: AtomicBool::new(true),
            paused: AtomicBool::new(false),
            inflight: AtomicU64::new(0),
            wakers: Mutex::new(Vec::new()),
            next_waker_id: AtomicU64::new(0),
            stats: VolumeStats::default(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &VolumeConfig {
        &self.config
    }

    pub fn read_only(&self) -> bool {
        self.config.read_only
    }

    /// The guest-visible size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.backing().len_bytes
    }

    /// The current backing image.
    pub fn backing(&self) -> Arc<Backing> {
        match self.backing.lock() {
            Ok(b) => b.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn observers(&self) -> ObserverList {
        self.observers.snapshot()
    }

    /// Adds an observer that sees every write submitted from now on.
    pub fn add_observer(&self, observer: Arc<dyn WriteObserver>) {
        self.observers.replace(|list| list.push(observer));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Removes an observer (compared by pointer).
    pub fn remove_observer(&self, observer: &Arc<dyn WriteObserver>) {
        self.observers
            .replace(|list| list.retain(|o| !Arc::ptr_eq(o, observer)));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Replaces the backing image (cutover). Call only while the volume is paused and idle.
    pub fn replace_backing(&self, backing: Backing) -> Arc<Backing> {
        let new = Arc::new(backing);
        let old = match self.backing.lock() {
            Ok(mut b) => std::mem::replace(&mut *b, new),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), new),
        };
        self.generation.fetch_add(1, Ordering::AcqRel);
        old
    }

    /// The guest's write-cache setting (virtio-blk `writeback` config field). When off,
    /// every write is issued with `RWF_DSYNC`.
    pub fn write_cache_enabled(&self) -> bool {
        self.write_cache_enabled.load(Ordering::Relaxed)
    }

    pub fn set_write_cache_enabled(&self, enabled: bool) {
        self.write_cache_enabled.store(enabled, Ordering::Relaxed);
    }

    /// True while a cutover holds guest I/O: front ends stop taking new requests.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Requests in flight on all queues of this volume.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Acquire)
    }

    pub(crate) fn inflight_add(&self, n: u64) {
        self.inflight.fetch_add(n, Ordering::AcqRel);
    }

    pub(crate) fn inflight_sub(&self, n: u64) {
        self.inflight.fetch_sub(n, Ordering::AcqRel);
    }

    /// Registers an eventfd that is signalled when a pause ends, so that a front end that
    /// stopped taking requests looks at its queues again. It stays registered (and open)
    /// until the returned registration is dropped.
    pub fn register_resume_waker(
        self: &Arc<Self>,
        eventfd: std::os::fd::OwnedFd,
    ) -> ResumeWakerRegistration {
        let id = self.next_waker_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut wakers) = self.wakers.lock() {
            wakers.push((id, eventfd));
        }
        ResumeWakerRegistration {
            volume: Arc::downgrade(self),
            id,
        }
    }

    /// Stops new requests and waits until none is in flight, for at most `timeout`.
    /// Returns a guard that resumes I/O when dropped, or `None` (and resumes) on timeout.
    pub fn pause(self: &Arc<Self>, timeout: std::time::Duration) -> Option<PauseGuard> {
        self.paused.store(true, Ordering::SeqCst);
        let guard = PauseGuard {
            volume: self.clone(),
        };
        let deadline = std::time::Instant::now() + timeout;
        while self.inflight() > 0 {
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::yield_now();
        }
        Some(guard)
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        if let Ok(wakers) = self.wakers.lock() {
            for (_, fd) in wakers.iter() {
                crate::reactor::ring::wake_eventfd(std::os::fd::AsFd::as_fd(fd));
            }
        }
    }
}

/// A resume waker's place in its volume's list: dropping it unregisters (and closes) the
/// eventfd, when the front end whose queue thread it wakes goes away.
#[must_use = "dropping the registration unregisters the waker at once"]
pub struct ResumeWakerRegistration {
    volume: std::sync::Weak<Volume>,
    id: u64,
}

impl Drop for ResumeWakerRegistration {
    fn drop(&mut self) {
        if let Some(volume) = self.volume.upgrade() {
            if let Ok(mut wakers) = volume.wakers.lock() {
                wakers.retain(|(id, _)| *id != self.id);
            }
        }
    }
}

/// Held while guest I/O on a volume is paused; dropping it resumes I/O.
pub struct PauseGuard {
    volume: Arc<Volume>,
}

impl Drop for PauseGuard {
    fn drop(&mut self) {
        self.volume.resume();
    }
}
