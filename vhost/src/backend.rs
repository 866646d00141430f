//! The vhost-user-blk device of one volume: features, configuration space and the
//! `VhostUserBackend` callbacks that route events to the queue workers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_engine::{EngineError, Volume, VolumeQueue};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config;
use crate::dirty_log::{LogBitmap, LogState};
use crate::gate::{DeviceGate, StopCause};
use crate::queue_worker::{GuestMemory, QueueWorker, Vring, WorkerSettings};
use crate::request::ID_BYTES;

/// The largest virtqueue ferry accepts. libblkio uses three descriptors per request, so a
/// 1024-entry ring carries 341 requests in flight.
pub const QUEUE_SIZE_MAX: u16 = 1024;
/// The number of virtqueues (and so of queue threads by default) a volume offers.
pub const QUEUES_MAX: u16 = 64;
/// The most virtqueues one thread serves: its io_uring holds `QUEUE_SIZE_MAX` entries per
/// queue, and the kernel's limit is 32768 entries per ring.
pub const QUEUES_PER_THREAD_MAX: u16 = 32;
const _: () = assert!(QUEUE_SIZE_MAX as u32 * QUEUES_PER_THREAD_MAX as u32 <= 32768);
/// iovecs preallocated per request slot: a 4 KiB-page guest sends at most a few per
/// request; a slot that sees a longer request grows once (up to `request::IOVECS_MAX`).
const SEGMENTS_PREALLOCATED: usize = 16;

/// How a volume's device is laid out over threads.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    /// Virtqueues offered to the guest.
    pub queues: u16,
    /// Virtqueues served by one worker thread.
    pub queues_per_thread: u16,
    /// The `GET_ID` serial (at most 20 bytes; default: the volume name).
    pub serial: String,
    /// The longest adaptive busy-poll window of the workers, in microseconds (0: never poll).
    pub poll_us: u64,
    /// Requests a worker takes from one ring per pass before submitting them and handing
    /// back completions (at least 1).
    pub batch: u16,
    /// The logical block size the guest sees (`logical-block-size=`, checked by
    /// [`config::check_logical_block_bytes`]); requests not in whole blocks fail.
    pub logical_block_bytes: u32,
}

/// The device backend. Cheap to clone: the vhost-user-backend crate hands a clone to
/// every worker thread; all clones share the workers.
#[derive(Clone)]
pub struct BlockDevice {
    inner: Arc<Inner>,
}

struct Inner {
    volume: Arc<Volume>,
    settings: DeviceSettings,
    workers: Vec<Mutex<QueueWorker>>,
    log: LogState,
    /// The volume's gate: requests are taken only while it is open.
    gate: Arc<DeviceGate>,
    /// The rings kicked since the connection began and those stopped (`GET_VRING_BASE`)
    /// since the frontend last set its features, one bit per queue (`QUEUES_MAX` is 64):
    /// every kicked ring stopped is the device stopped. (QEMU stops only the rings the
    /// guest set up, and a guest may use fewer rings than the device offers.)
    kicked_rings: AtomicU64,
    stopped_rings: AtomicU64,
    /// The frontend logged dirty pages when it last set its features.
    was_logging: AtomicBool,
    /// The consumer ends of the exit events handed to vhost-user-backend, which turns each
    /// into a raw descriptor for its epoll and never closes it (0.24): closed by
    /// [`BlockDevice::close_exit_events`] when the connection is over.
    exit_consumers: Mutex<Vec<RawFd>>,
}

/// Checks that `settings` fit `volume`: the logical block size is one ferry offers, and the
/// volume (its size, and where it starts in its image) is whole logical blocks.
pub fn check_settings(volume: &Volume, settings: &DeviceSettings) -> Result<(), EngineError> {
    let block = settings.logical_block_bytes;
    let bad = |reason: String| EngineError::BadGeometry {
        volume: volume.name().to_string(),
        reason,
    };
    config::check_logical_block_bytes(block).map_err(bad)?;
    let size = volume.size_bytes();
    if !size.is_multiple_of(u64::from(block)) {
        return Err(bad(format!(
            "its size ({size} bytes) is not a multiple of logical-block-size={block}"
        )));
    }
    let offset = volume.backing().base_offset_bytes;
    if !offset.is_multiple_of(u64::from(block)) {
        return Err(bad(format!(
            "offset={offset} is not a multiple of logical-block-size={block}"
        )));
    }
    Ok(())
}

impl BlockDevice {
    /// Creates the device and one engine queue (one io_uring) per worker thread.
    pub fn new(
        volume: Arc<Volume>,
        settings: DeviceSettings,
        gate: Arc<DeviceGate>,
    ) -> Result<Self, EngineError> {
        check_settings(&volume, &settings)?;
        let queues = settings.queues.clamp(1, QUEUES_MAX);
        let per_thread = settings
            .queues_per_thread
            .clamp(1, queues.min(QUEUES_PER_THREAD_MAX));
        let threads = queues.div_ceil(per_thread);
        let mut serial = [0u8; ID_BYTES];
        let bytes = settings.serial.as_bytes();
        let n = bytes.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&bytes[..n]);
        let log = LogState::default();
        let worker_settings = WorkerSettings {
            serial,
            poll_max: std::time::Duration::from_micros(settings.poll_us),
            batch: usize::from(settings.batch.max(1)),
            log: log.clone(),
            logical_block_bytes: settings.logical_block_bytes,
        };
        let capacity = u32::from(QUEUE_SIZE_MAX) * u32::from(per_thread);
        let mut workers = Vec::with_capacity(threads as usize);
        for thread in 0..threads {
            let engine = VolumeQueue::new(
                volume.clone(),
                thread * per_thread,
                capacity,
                SEGMENTS_PREALLOCATED,
            )?;
            workers.push(Mutex::new(QueueWorker::new(
                engine,
                worker_settings.clone(),
                capacity,
            )));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                volume,
                settings: DeviceSettings {
                    queues,
                    queues_per_thread: per_thread,
                    ..settings
                },
                workers,
                log,
                gate,
                kicked_rings: AtomicU64::new(0),
                stopped_rings: AtomicU64::new(0),
                was_logging: AtomicBool::new(false),
                exit_consumers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The epoll event number used for engine completions on every worker thread.
    pub fn completion_event(&self) -> u64 {
        u64::from(self.inner.settings.queues) + 1
    }

    /// The eventfd each worker's engine signals, by thread.
    pub fn completion_fds(&self) -> Vec<BorrowedFd<'_>> {
        (0..self.inner.workers.len())
            .map(|i| {
                let fd = std::os::fd::AsRawFd::as_raw_fd(&self.worker(i).engine().notify_fd());
                // SAFETY: the descriptor is the eventfd of the worker's engine queue, which
                // owns it for its whole life; the worker never replaces its engine queue and
                // the device keeps its workers for as long as it lives; the borrow cannot
                // outlive `&self`.
                unsafe { BorrowedFd::borrow_raw(fd) }
            })
            .collect()
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.inner.volume
    }

    fn worker(&self, thread: usize) -> MutexGuard<'_, QueueWorker> {
        match self.inner.workers[thread].lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Closes the exit events' consumer descriptors that vhost-user-backend leaves open.
    /// Call only once the `VhostUserDaemon` that used this device is dropped (its epoll
    /// threads joined), and only with vhost-user-backend 0.24, whose
    /// `VringEpollHandler::new` takes each consumer with `into_raw_fd` and never closes it.
    /// Without this, every frontend connection would leak one descriptor per queue thread.
    pub fn close_exit_events(&self) {
        let consumers = match self.inner.exit_consumers.lock() {
            Ok(mut consumers) => std::mem::take(&mut *consumers),
            Err(_) => return,
        };
        for fd in consumers {
            // `fd` is a descriptor this device created in `exit_event` and that nobody owns
            // any more (see above); it is closed exactly once, here. Nothing is left to do
            // if closing fails.
            let _ = nix::unistd::close(fd);
        }
    }

    /// Records the rings of worker `thread` as kicked (one load once they are).
    fn ring_kicked(&self, thread: usize) {
        let queues = u64::from(self.inner.settings.queues);
        let per = u64::from(self.inner.settings.queues_per_thread);
        let first = thread as u64 * per;
        let count = per.min(queues.saturating_sub(first));
        if count == 0 {
            return;
        }
        let mask = (u64::MAX >> (64 - count)) << first;
        if self.inner.kicked_rings.load(Ordering::Relaxed) & mask != mask {
            self.inner.kicked_rings.fetch_or(mask, Ordering::SeqCst);
        }
    }

    /// Records a ring stopped (its requests drained); once every ring of the device has
    /// stopped while the frontend logs dirty pages, the frontend is at the switchover of a
    /// VM migration, and the gate is told before the last `GET_VRING_BASE` is answered.
    fn ring_stopped(&self, queue_index: u32) {
        let queues = u32::from(self.inner.settings.queues);
        if queue_index >= queues {
            return;
        }
        let stopped = self
            .inner
            .stopped_rings
            .fetch_or(1 << queue_index, Ordering::SeqCst)
            | (1 << queue_index);
        let kicked = self.inner.kicked_rings.load(Ordering::SeqCst);
        if kicked & !stopped == 0 && self.inner.log.is_active() {
            self.inner
                .gate
                .device_stopped(StopCause::RingsStoppedWhileLogging);
        }
    }

    /// Waits for every request in flight on every worker and completes it to the guest.
    pub fn drain_all(&self) {
        for thread in 0..self.inner.workers.len() {
            self.worker(thread).drain();
        }
    }
}

impl VhostUserBackend for BlockDevice {
    type Bitmap = LogBitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.settings.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE_MAX)
    }

    fn features(&self) -> u64 {
        // GET_FEATURES is a frontend's first message, handled on the protocol thread that
        // the backend library started for this frontend: its setup is done.
        ferry_engine::confine::enter_once(&crate::seccomp::PROTOCOL_SYSCALLS);
        config::device_features(self.inner.volume.read_only())
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        // LOG_ALL on: the frontend is migrating the VM and has sent its log (SET_LOG_BASE,
        // installed into the regions' bitmaps by vhost-user-backend); LOG_ALL off: done.
        self.inner.log.set_acked_features(features);
        // Features are set when the frontend starts the device: no ring is stopped then.
        self.inner.stopped_rings.store(0, Ordering::SeqCst);
        let logging = self.inner.log.is_active();
        if self.inner.was_logging.swap(logging, Ordering::SeqCst) && !logging {
            // Logging off while the device runs: the VM's migration ended before its
            // switchover (cancelled or failed), or it never stopped this device.
            self.inner.gate.logging_abandoned();
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        for thread in 0..self.inner.workers.len() {
            self.worker(thread).set_event_idx(enabled);
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let volume = &self.inner.volume;
        let space = config::config_space(
            volume.size_bytes() / ferry_engine::SECTOR_SIZE,
            self.inner.settings.queues,
            volume.write_cache_enabled(),
            self.inner.settings.logical_block_bytes,
        );
        config::read_config(&space, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the `writeback` byte is writable (VIRTIO_BLK_F_CONFIG_WCE).
        if offset as usize == config::offset::WRITEBACK && buf.len() == 1 {
            self.inner.volume.set_write_cache_enabled(buf[0] != 0);
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "read-only configuration field",
        ))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        for thread in 0..self.inner.workers.len() {
            self.worker(thread).set_memory(mem.clone());
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let queues = u64::from(self.inner.settings.queues);
        let per = u64::from(self.inner.settings.queues_per_thread);
        (0..self.inner.workers.len() as u64)
            .map(|t| {
                let first = t * per;
                let count = per.min(queues - first);
                (u64::MAX >> (64 - count)) << first
            })
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        if let Ok(mut consumers) = self.inner.exit_consumers.lock() {
            consumers.push(consumer.as_raw_fd());
        }
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: every request of this ring must be on the used ring before the
        // frontend reads the ring's state (vhost-user spec, "Ring states").
        let thread = queue_index as usize / usize::from(self.inner.settings.queues_per_thread);
        if thread < self.inner.workers.len() {
            self.worker(thread).drain();
        }
        self.ring_stopped(queue_index);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // The library's worker threads run no code of ours before their first event.
        ferry_engine::confine::enter_once(&crate::seccomp::QUEUE_WORKER_SYSCALLS);
        if thread_id >= self.inner.workers.len() {
            return Ok(());
        }
        if device_event < self.inner.settings.queues_per_thread {
            self.ring_kicked(thread_id);
        }
        // A closed gate holds the device's requests (bounded, then the frontend is
        // refused) before any of them is taken from the rings.
        if self.inner.gate.admit() {
            self.worker(thread_id).run(vrings);
        }
        Ok(())
    }
}
