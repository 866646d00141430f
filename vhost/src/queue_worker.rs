//! One worker thread's share of a device: pops requests from its virtqueues, hands them
//! to the engine, and returns completions to the guest.
//!
//! The loop, written once for every queue of the thread: take completions from the
//! engine and put them on the used rings; pop the available chains the engine has room
//! for, at most `batch` per ring (with event-index notification suppression: disable, pop,
//! re-enable, re-check); submit them with one `io_uring_enter`; signal each used ring at
//! most once per pass. The `batch` bound keeps completions flowing back while the guest
//! is still adding requests. With a polling window set, the worker spins for that long
//! after the last work before sleeping, because waking a sleeping thread costs far more
//! than a short spin.
//!
//! Used entries are published in the order the chains were taken from the available ring
//! ([`publication_order`] says why).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::volume::queue::Rejected;
use ferry_engine::{BlockOp, Completion, IoFailure, VolumeQueue};
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::dirty_log::{self, LogBitmap, LogState, Segment};
use crate::guest_warnings::GuestWarnings;
use crate::request::action::Device;
use crate::request::{self, Parsed, Request, RequestAction, Status, ID_BYTES};
use ferry_engine::poll_window::PollWindow;
use publication_order::PublicationOrder;

mod publication_order;

pub type GuestMemory = GuestMemoryMmap<LogBitmap>;
/// The vrings of a device over [`GuestMemory`].
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;
/// The locked state of one [`Vring`].
type VringStateOf = VringState<GuestMemoryAtomic<GuestMemory>>;

/// Guest segments preallocated per request slot for dirty logging; a slot that sees a read
/// with more segments grows once (up to `request::DESCRIPTORS_MAX`).
const WRITTEN_SEGMENTS_PREALLOCATED: usize = 16;

/// The longest a drain (a ring stopping, a frontend gone) waits for the requests in flight;
/// one still running then becomes an orphan (see `InFlight::position`).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What one pass over a ring did.
struct Pass {
    popped_any: bool,
    /// The pass stopped before the ring was empty (batch done, engine full, volume paused).
    starved: bool,
}

/// A request handed to the engine, keyed by its tag.
struct InFlight {
    vring: u16,
    head_index: u16,
    status_addr: GuestAddress,
    /// Bytes the device writes into the guest's buffers on success (data read + status).
    used_len_ok: u32,
    /// Keeps the guest memory the request's iovecs point into mapped until the engine has
    /// returned the request's completion, even when the frontend replaces its memory table
    /// or goes away meanwhile (released in `answer`, or after the engine at drop).
    mem: Option<Arc<GuestMemory>>,
    /// The guest segments the engine writes into (a read's data buffers): marked dirty at
    /// completion while the frontend logs, because the kernel bypasses vm-memory's bitmap.
    written: Vec<Segment>,
    /// Where the request is in its vring's publication order. None for a request left over
    /// from a drain that timed out: the frontend has taken the ring back, so its completion
    /// touches neither guest memory nor the ring.
    position: Option<u64>,
}

/// Settings shared by every worker of a device.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub serial: [u8; ID_BYTES],
    /// The longest busy-poll window after the last piece of work; zero never polls.
    pub poll_max: Duration,
    /// Requests taken from one ring per pass: the worker then submits them, and the next pass
    /// hands back what has completed before taking more, so a guest that waits for
    /// completions refills its ring while the worker is still busy.
    pub batch: usize,
    /// Whether the frontend has dirty logging on (`VHOST_F_LOG_ALL`).
    pub log: LogState,
    /// The guest's logical block: reads, writes, discards and write-zeroes must be whole
    /// blocks (virtio-blk `blk_size`), or they fail.
    pub logical_block_bytes: u32,
}

/// The state of one worker thread.
///
/// Drop order, relied on: fields drop in declaration order, and `engine` comes first. Its
/// `Drop` waits until the kernel has finished every operation still in flight; only then do
/// the in-flight slots (`inflight`, each holding the guest memory snapshot its request's
/// iovecs point into) and `guest_memory` let go of the guest's mappings. The other way
/// round, a request left over from a drain that timed out could have the kernel read or
/// write memory already unmapped, or mapped again for something else. Keep `engine` the
/// first field.
pub struct QueueWorker {
    /// Dropped first: see the drop order above.
    engine: VolumeQueue,
    settings: WorkerSettings,
    guest_memory: Option<GuestMemoryAtomic<GuestMemory>>,
    event_idx: bool,
    /// Dropped after `engine`: see the drop order above.
    inflight: Vec<InFlight>,
    free_tags: Vec<u32>,
    request: Request,
    completions: Vec<Completion>,
    /// The thread's vrings, remembered for draining when a ring stops.
    vrings: Vec<Vring>,
    /// Per vring (index in `vrings`, below 64 like the bits of `to_signal`): taken chains
    /// not yet published.
    order: Vec<PublicationOrder>,
    /// Bit i set: vring i got used entries this pass and may need a notification.
    to_signal: u64,
    poll: PollWindow,
    /// Warnings the guest can cause (bad requests), rate-limited.
    guest_warnings: GuestWarnings,
    /// Bit i set: vring i was seen started (its start is logged once per connection).
    started: u64,
}

impl QueueWorker {
    pub fn new(engine: VolumeQueue, settings: WorkerSettings, capacity: u32) -> Self {
        Self {
            engine,
            guest_memory: None,
            event_idx: false,
            inflight: (0..capacity)
                .map(|_| InFlight {
                    vring: 0,
                    head_index: 0,
                    status_addr: GuestAddress(0),
                    used_len_ok: 0,
                    mem: None,
                    written: Vec::with_capacity(WRITTEN_SEGMENTS_PREALLOCATED),
                    position: None,
                })
                .collect(),
            free_tags: (0..capacity).rev().collect(),
            request: Request::with_capacity(),
            completions: Vec::with_capacity(capacity as usize),
            vrings: Vec::new(),
            order: (0..u64::BITS)
                .map(|_| PublicationOrder::default())
                .collect(),
            to_signal: 0,
            poll: PollWindow::new(settings.poll_max),
            guest_warnings: GuestWarnings::default(),
            started: 0,
            settings,
        }
    }

    pub fn engine(&self) -> &VolumeQueue {
        &self.engine
    }

    pub fn set_memory(&mut self, mem: GuestMemoryAtomic<GuestMemory>) {
        self.guest_memory = Some(mem);
    }

    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// Runs the worker loop until there is nothing left to do (and the polling window,
    /// if any, has passed without work).
    pub fn run(&mut self, vrings: &[Vring]) {
        if self.vrings.len() != vrings.len() {
            self.vrings = vrings.to_vec();
        }
        // First, even without a frontend: the eventfd is level-triggered in epoll, and a
        // wake-up left unread (a volume pause ending) would make this thread spin.
        self.engine.clear_notification();
        let Some(mem) = self.guest_memory.as_ref().map(|m| m.memory().into_inner()) else {
            return;
        };
        self.poll.on_wake(Instant::now());
        let mut idle_since = Instant::now();
        loop {
            let mut progressed = self.complete(&mem, vrings);
            for (index, vring) in vrings.iter().enumerate() {
                progressed |= self.pop_vring(index as u16, vring, &mem);
            }
            if let Err(e) = self.engine.commit() {
                log::error!(
                    "volume {}: io_uring submit failed: {e}",
                    self.engine.volume().name()
                );
            }
            self.signal(vrings);
            if progressed {
                idle_since = Instant::now();
                continue;
            }
            if idle_since.elapsed() >= self.poll.current() {
                if !self.poll.current().is_zero() {
                    self.poll.on_window_expired();
                }
                break;
            }
            std::hint::spin_loop();
        }
        self.poll.on_sleep(Instant::now());
    }

    /// Pops and submits every available chain of one vring that the engine has room for.
    /// Returns true if anything was popped.
    ///
    /// With `VIRTIO_RING_F_EVENT_IDX` (virtio 1.2, 2.7.10) the guest is asked not to kick
    /// while the worker is taking chains, and after re-enabling its kicks the ring is looked
    /// at once more, since a chain added in between came without a kick. This is the only
    /// place that loop is written.
    fn pop_vring(&mut self, index: u16, vring: &Vring, mem: &Arc<GuestMemory>) -> bool {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return false;
        }
        if self.started & (1 << index) == 0 {
            self.started |= 1 << index;
            self.announce_start(index, &mut state, mem);
        }
        let mut popped_any = false;
        loop {
            if self.event_idx {
                let _ = state.disable_notification();
            }
            let pass = self.take_chains(index, &mut state, mem);
            popped_any |= pass.popped_any;
            // When starved, completions (or the resume wake-up) bring the worker back
            // instead of a kick.
            if !self.event_idx || pass.starved {
                break;
            }
            match state.enable_notification() {
                Ok(true) => continue,
                _ => break,
            }
        }
        popped_any
    }

    /// Signals a ring the first time the worker finds it started, and logs where it starts.
    ///
    /// A daemon killed after putting entries on the used ring and before signalling them
    /// leaves a guest waiting for completions it will never be told about (the restarted
    /// device finds nothing to do: those requests are not offered again). One notification
    /// at start makes the guest look at its used ring; a spurious one costs the guest a
    /// glance.
    fn announce_start(&self, index: u16, state: &mut VringStateOf, mem: &GuestMemory) {
        let signalled = state.get_call().is_some();
        if let Err(e) = state.signal_used_queue() {
            log::debug!("cannot signal used queue: {e}");
        }
        let queue = state.get_queue();
        let avail = queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire);
        log::info!(
            "volume {}: vring {index} started at avail index {} (guest's: {}){}",
            self.engine.volume().name(),
            queue.next_avail(),
            avail.map_or_else(|e| format!("unreadable: {e}"), |a| a.0.to_string()),
            if signalled {
                ""
            } else {
                "; no call descriptor yet"
            }
        );
    }

    /// Takes at most `batch` chains from one ring, while the engine has room and the volume
    /// is not paused.
    fn take_chains(
        &mut self,
        index: u16,
        state: &mut VringStateOf,
        mem: &Arc<GuestMemory>,
    ) -> Pass {
        let mut pass = Pass {
            popped_any: false,
            starved: false,
        };
        let mut taken = 0;
        while self.engine.has_room() && !self.free_tags.is_empty() {
            if taken == self.settings.batch {
                // More may be waiting: the run loop comes back at once (`popped_any`),
                // after submitting these and completing what is done.
                pass.starved = true;
                return pass;
            }
            taken += 1;
            if self.engine.volume().is_paused() {
                pass.starved = true;
                return pass;
            }
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.as_ref()) else {
                break;
            };
            pass.popped_any = true;
            let parsed = request::parse(chain, mem.as_ref(), &mut self.request);
            if !self.dispatch(parsed, index, mem, state) {
                state.get_queue_mut().go_to_previous_position();
                pass.starved = true;
                return pass;
            }
        }
        if !self.engine.has_room() || self.free_tags.is_empty() {
            pass.starved = true;
        }
        pass
    }

    /// Answers or submits one parsed chain. Returns false if the engine refused it for now
    /// (the chain must be offered again later).
    fn dispatch(
        &mut self,
        parsed: Parsed,
        vring: u16,
        mem: &Arc<GuestMemory>,
        state: &mut VringStateOf,
    ) -> bool {
        let head = self.request.head_index;
        match parsed {
            Parsed::Ok => self.act(vring, mem, state),
            Parsed::Failed { error, status_addr } => {
                self.guest_warnings.warn(
                    self.engine.volume().name(),
                    format_args!("bad request: {error}"),
                );
                self.answer_now(state, vring, head, status_addr, Status::IoErr, 1, mem);
                true
            }
            Parsed::Dropped(error) => {
                self.guest_warnings.warn(
                    self.engine.volume().name(),
                    format_args!("dropped request: {error}"),
                );
                self.publish_answered(vring, head, 0, state);
                true
            }
        }
    }

    /// Carries out the action of the request just parsed: answers it, or hands its
    /// operation to the engine with a free tag. Returns false if the engine refused it for
    /// now.
    fn act(&mut self, vring: u16, mem: &Arc<GuestMemory>, state: &mut VringStateOf) -> bool {
        let head = self.request.head_index;
        let status_addr = self.request.status_addr;
        let device = Device {
            serial: &self.settings.serial,
            logical_block_bytes: self.settings.logical_block_bytes,
            volume: self.engine.volume().as_ref(),
        };
        let (op, used_len_ok) = match self.request.action(mem.as_ref(), &device) {
            RequestAction::Submit { op, used_len_ok } => (op, used_len_ok),
            RequestAction::Answer { status, used_len } => {
                self.answer_now(state, vring, head, status_addr, status, used_len, mem);
                return true;
            }
        };
        let Some(tag) = self.free_tags.pop() else {
            return false;
        };
        let slot = &mut self.inflight[tag as usize];
        slot.vring = vring;
        slot.head_index = head;
        slot.status_addr = status_addr;
        slot.used_len_ok = used_len_ok;
        slot.mem = Some(mem.clone());
        slot.written.clear();
        if let BlockOp::Read { .. } = op {
            slot.written.extend_from_slice(&self.request.data_segments);
        }
        // SAFETY: the iovecs point into guest memory mapped by `mem`, which the in-flight
        // slot keeps alive until the engine returns the completion for `tag`; the guest
        // gave these buffers to the device until it sees the used entry.
        match unsafe { self.engine.submit(op, u64::from(tag)) } {
            Ok(()) => {
                let position = self.order[usize::from(vring)].push(head, None);
                self.inflight[tag as usize].position = Some(position);
                true
            }
            Err(Rejected::Full | Rejected::Paused) => {
                self.inflight[tag as usize].mem = None;
                self.free_tags.push(tag);
                false
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn answer_now(
        &mut self,
        state: &mut VringStateOf,
        vring: u16,
        head: u16,
        status_addr: GuestAddress,
        status: Status,
        used_len: u32,
        mem: &GuestMemory,
    ) {
        if status != Status::Ok {
            // A request the device refused (malformed, not in whole blocks, unsupported)
            // counts among the volume's errors like one that failed in the engine.
            self.engine.volume().stats.count_refused();
        }
        if mem.write_obj(status as u8, status_addr).is_err() {
            self.guest_warnings.warn(
                self.engine.volume().name(),
                format_args!("status byte outside guest memory"),
            );
        }
        self.publish_answered(vring, head, used_len, state);
    }

    /// Queues a chain answered without the engine for its turn on `vring`'s used ring.
    fn publish_answered(&mut self, vring: u16, head: u16, used_len: u32, state: &mut VringStateOf) {
        self.order[usize::from(vring)].push(head, Some(used_len));
        self.publish(vring, state);
    }

    /// Puts the finished chains at the front of `vring`'s publication order on its used ring.
    fn publish(&mut self, vring: u16, state: &mut VringStateOf) {
        let Some(order) = self.order.get_mut(usize::from(vring)) else {
            return;
        };
        while let Some((head, used_len)) = order.pop_finished() {
            if let Err(e) = state.add_used(head, used_len) {
                log::error!(
                    "volume {}: cannot add used entry: {e}",
                    self.engine.volume().name()
                );
            }
            self.to_signal |= 1 << vring;
        }
    }

    /// Moves engine completions onto the used rings. Returns true if there were any.
    fn complete(&mut self, mem: &GuestMemory, vrings: &[Vring]) -> bool {
        self.engine.reap(&mut self.completions);
        if self.completions.is_empty() {
            return false;
        }
        let completions = std::mem::take(&mut self.completions);
        self.complete_all(&completions, mem, vrings);
        self.completions = completions;
        self.completions.clear();
        true
    }

    /// Answers finished requests: status bytes, then one vring lock per ring for all of its
    /// used entries.
    fn complete_all(&mut self, completions: &[Completion], mem: &GuestMemory, vrings: &[Vring]) {
        for (index, vring) in vrings.iter().enumerate() {
            let mut finished_any = false;
            for completion in completions {
                let ours = self
                    .inflight
                    .get(completion.tag as usize)
                    .is_some_and(|slot| slot.vring as usize == index && slot.mem.is_some());
                if !ours {
                    continue;
                }
                let Some((used_len, position)) = self.answer(*completion, mem) else {
                    continue;
                };
                if let Some(order) = self.order.get_mut(index) {
                    order.finish(position, used_len);
                    finished_any = true;
                }
            }
            if finished_any {
                self.publish(index as u16, &mut vring.get_mut());
            }
        }
    }

    /// Writes a finished request's status byte and frees its tag; returns its used length
    /// and its place in the publication order (None: an orphan of a timed-out drain, freed
    /// without a word to the guest).
    fn answer(&mut self, completion: Completion, mem: &GuestMemory) -> Option<(u32, u64)> {
        let tag = completion.tag as usize;
        let slot = &mut self.inflight[tag];
        let Some(position) = slot.position.take() else {
            slot.mem = None;
            self.free_tags.push(tag as u32);
            log::warn!(
                "volume {}: a request finished after its ring was handed back; not answered",
                self.engine.volume().name()
            );
            return None;
        };
        let (status, used_len) = match completion.result {
            Ok(_) => (Status::Ok, slot.used_len_ok),
            Err(failure) => {
                log_failure(self.engine.volume().name(), failure);
                (Status::IoErr, 1)
            }
        };
        // Write the status through the memory the request was parsed against.
        let request_mem = slot.mem.take();
        let target_mem: &GuestMemory = request_mem.as_deref().unwrap_or(mem);
        // The read data is in guest memory now (whatever the outcome, the kernel may have
        // written some): log it before the guest (and the frontend) can see the used entry.
        if self.settings.log.is_active() {
            dirty_log::mark_written(target_mem, &slot.written);
        }
        if target_mem
            .write_obj(status as u8, slot.status_addr)
            .is_err()
        {
            self.guest_warnings.warn(
                self.engine.volume().name(),
                format_args!("status byte outside guest memory"),
            );
        }
        self.free_tags.push(tag as u32);
        Some((used_len, position))
    }

    /// Notifies the guest on every vring that got used entries, if it wants to be notified.
    fn signal(&mut self, vrings: &[Vring]) {
        if self.to_signal == 0 {
            return;
        }
        for (index, vring) in vrings.iter().enumerate() {
            if self.to_signal & (1 << index) == 0 {
                continue;
            }
            if vring.needs_notification().unwrap_or(true) {
                if let Err(e) = vring.signal_used_queue() {
                    log::debug!("cannot signal used queue: {e}");
                }
            }
        }
        self.to_signal = 0;
    }

    /// Waits for every request in flight and puts its completion on the used ring (a ring
    /// is being stopped, or the connection is going away).
    pub fn drain(&mut self) {
        let Some(mem) = self.guest_memory.as_ref().map(|m| m.memory().into_inner()) else {
            return;
        };
        let mut completions = Vec::new();
        if !self.engine.drain(&mut completions, DRAIN_TIMEOUT) {
            log::error!(
                "volume {}: requests still in flight after {} s",
                self.engine.volume().name(),
                DRAIN_TIMEOUT.as_secs()
            );
        }
        let vrings = std::mem::take(&mut self.vrings);
        self.started = 0;
        self.complete_all(&completions, &mem, &vrings);
        self.abandon_order(&vrings);
        self.signal(&vrings);
        self.vrings = vrings;
    }

    /// After a drain: every ring starts its publication order afresh (the frontend may
    /// restart it at any index). Finished chains still held behind a request that did not
    /// finish in time are published now, out of order; that request becomes an orphan (see
    /// `InFlight::position`): the frontend has the ring state, and a late used entry or
    /// status byte could land in a ring or memory the guest has reused.
    fn abandon_order(&mut self, vrings: &[Vring]) {
        for slot in &mut self.inflight {
            slot.position = None;
        }
        for (index, vring) in vrings.iter().enumerate() {
            let Some(order) = self.order.get_mut(index) else {
                continue;
            };
            if order.finished().next().is_some() {
                let mut state = vring.get_mut();
                for entry in order.finished() {
                    if let Err(e) = state.add_used(entry.head, entry.used_len) {
                        log::error!("cannot add used entry: {e}");
                    }
                }
                self.to_signal |= 1 << index;
            }
            *order = PublicationOrder::default();
        }
    }
}

fn log_failure(volume: &str, failure: IoFailure) {
    match failure {
        IoFailure::OutOfRange | IoFailure::ReadOnly => {
            log::debug!("volume {volume}: request refused: {failure}")
        }
        _ => log::warn!("volume {volume}: request failed: {failure}"),
    }
}

#[cfg(test)]
mod tests {
    /// A worker that finds a ring started signals it once, with nothing to do: a daemon
    /// killed between putting entries on the used ring and signalling them would otherwise
    /// leave the guest waiting for ever (with QEMU: avail, used and the restarted device's
    /// base all equal, and the guest's I/O never completing).
    #[test]
    fn a_started_ring_is_signalled_once_even_with_nothing_to_do(
    ) -> Result<(), Box<dyn std::error::Error>> {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        use vhost_user_backend::{VringRwLock, VringT};
        use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

        let tmp = tempfile::tempdir()?;
        let volume = ferry_engine::Volume::open(ferry_engine::VolumeConfig {
            name: "v".into(),
            path: tmp.path().join("v.img"),
            size_bytes: Some(1 << 20),
            ..Default::default()
        })?;
        let engine = ferry_engine::VolumeQueue::new(volume, 0, 16, 4)?;
        let settings = super::WorkerSettings {
            serial: [0; super::ID_BYTES],
            poll_max: std::time::Duration::ZERO,
            batch: 8,
            log: super::LogState::default(),
            logical_block_bytes: 512,
        };
        let mut worker = super::QueueWorker::new(engine, settings, 16);
        let mem: GuestMemoryMmap<super::LogBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)])?;
        let mem = GuestMemoryAtomic::new(mem);
        worker.set_memory(mem.clone());
        let vring = VringRwLock::new(mem, 16)?;
        vring.set_queue_size(16);
        vring.set_queue_info(0x1000, 0x2000, 0x3000)?;
        let call = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        let call = std::fs::File::from(std::os::fd::OwnedFd::from(call));
        vring.set_call(Some(call.try_clone()?));
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let vrings = [vring];
        let signals = |call: &std::fs::File| {
            let mut count = [0u8; 8];
            std::io::Read::read(&mut &*call, &mut count).map_or(0, |_| u64::from_ne_bytes(count))
        };
        worker.run(&vrings);
        assert_eq!(signals(&call), 1, "the start is signalled");
        worker.run(&vrings);
        assert_eq!(signals(&call), 0, "only once");
        // A ring stopped and started again (a new connection) is signalled again.
        worker.drain();
        worker.run(&vrings);
        assert_eq!(signals(&call), 1, "a restart is signalled");
        Ok(())
    }
}
