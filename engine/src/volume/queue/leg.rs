//! A request's *leg*: its write made a second time, to a local file an observer named (an
//! `active` mirror's target), by this queue beside the volume's own I/O.
//!
//! The leg writes the guest's buffers themselves, through its own copy of the request's
//! iovec array (the volume's own transfer advances the slot's), so a mirrored write costs
//! one more `pwritev2` or ring operation on the queue's thread: no copy of the data and no
//! hand-over to another thread and back. It is one more part the request waits for (so the
//! guest's buffers stay valid until it ends) and it never fails the request: its outcome
//! goes to the observer that asked for it ([`WriteObserver::leg_done`]), which decides what
//! a failed leg means (a mirror fails its job; the guest keeps its source). A slot holds at
//! most one leg: a second observer asking for one is told at once that its leg failed.
//!
//! A leg to a memory-backed file is written inline (tmpfs never waits for a device, and a
//! buffered ring write there would wait for a kernel worker thread); any other goes through
//! the ring, tagged [`LEG_USER_DATA`]. A short write is continued where it stopped.

use std::sync::Arc;

use io_uring::{opcode, types};

use super::VolumeQueue;
use crate::iovec::IovecArray;
use crate::observer::{LegTarget, WriteEvent, WriteKind, WriteObserver};
use crate::IoFailure;

/// Marks the ring's `user_data` of a leg's operation; the slot index is in the low 32 bits.
/// (The NBD path's operations carry bit 63.)
pub(super) const LEG_USER_DATA: u64 = 1 << 62;

/// The leg of one request slot; armed while a request's leg is under way, its iovec array
/// allocated once and reused.
pub(super) struct Leg {
    /// The observer that asked for the leg; `None` while no leg is armed. Holding it keeps
    /// the leg's descriptor open ([`LegTarget::fd`]'s contract).
    observer: Option<Arc<dyn WriteObserver>>,
    target: LegTarget,
    /// The request's volume range, reported to the observer when the leg ends.
    volume_offset_bytes: u64,
    volume_len_bytes: u64,
    /// Where the next byte goes in the leg's file, and how many are left.
    file_offset: u64,
    remaining_bytes: u64,
    iovecs: IovecArray,
    iov_start: usize,
    /// The leg's ring operation is in the kernel.
    ring_busy: bool,
}

/// What a leg's write result means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LegStep {
    Again,
    Done(Option<IoFailure>),
}

impl Leg {
    pub(super) fn new(segments_max: usize) -> Self {
        Self {
            observer: None,
            target: LegTarget {
                fd: -1,
                offset_bytes: 0,
                memory_backed: false,
            },
            volume_offset_bytes: 0,
            volume_len_bytes: 0,
            file_offset: 0,
            remaining_bytes: 0,
            iovecs: IovecArray::with_capacity(segments_max),
            iov_start: 0,
            ring_busy: false,
        }
    }

    /// True while a leg is under way.
    #[inline]
    pub(super) fn is_armed(&self) -> bool {
        self.observer.is_some()
    }

    /// Arms the leg of the write `event` to `target`; false (nothing armed) when a leg is
    /// already armed or the event is not a write: the caller tells the observer its leg
    /// failed.
    pub(super) fn arm(
        &mut self,
        observer: &Arc<dyn WriteObserver>,
        target: LegTarget,
        event: &WriteEvent<'_>,
    ) -> bool {
        if self.is_armed() || event.kind != WriteKind::Write {
            return false;
        }
        self.observer = Some(observer.clone());
        self.target = target;
        self.volume_offset_bytes = event.offset_bytes;
        self.volume_len_bytes = event.len_bytes;
        self.file_offset = target.offset_bytes;
        self.remaining_bytes = event.len_bytes;
        self.iovecs.clear();
        self.iovecs.extend_from_slice(event.data);
        self.iov_start = 0;
        self.ring_busy = false;
        true
    }

    /// Moves the leg on after a result (bytes written, or a negated errno).
    fn step(&mut self, result: i32) -> LegStep {
        if result < 0 {
            return match -result {
                libc::EINTR | libc::EAGAIN => LegStep::Again,
                errno => LegStep::Done(Some(IoFailure::Os(errno))),
            };
        }
        let done = (result as u64).min(self.remaining_bytes);
        if done == 0 && self.remaining_bytes > 0 {
            return LegStep::Done(Some(IoFailure::NoProgress));
        }
        self.remaining_bytes -= done;
        self.file_offset += done;
        self.iovecs.advance(&mut self.iov_start, done as usize);
        if self.remaining_bytes > 0 {
            LegStep::Again
        } else {
            LegStep::Done(None)
        }
    }
}

impl VolumeQueue {
    /// Starts (or continues) the slot's armed leg: inline to a memory-backed file, else
    /// through the ring.
    pub(super) fn start_leg(&mut self, slot_index: u32) {
        loop {
            let leg = self.slots[slot_index as usize].leg_mut();
            if !leg.target.memory_backed {
                return self.start_leg_ring_op(slot_index);
            }
            let pending = &leg.iovecs[leg.iov_start..];
            // SAFETY: the iovecs point to the guest's buffers of this write, readable until the
            // request completes (`submit`'s contract), and the request waits for this leg; the
            // descriptor stays open while the armed leg holds its observer (`LegTarget::fd`);
            // the call is synchronous.
            let written = unsafe {
                libc::pwritev2(
                    leg.target.fd,
                    pending.as_ptr(),
                    pending.len() as libc::c_int,
                    leg.file_offset as libc::off_t,
                    0,
                )
            };
            let result = if written >= 0 {
                written.min(i32::MAX as isize) as i32
            } else {
                -std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            };
            match leg.step(result) {
                LegStep::Again => continue,
                LegStep::Done(failure) => return self.end_leg(slot_index, failure),
            }
        }
    }

    fn start_leg_ring_op(&mut self, slot_index: u32) {
        let leg = self.slots[slot_index as usize].leg_mut();
        let pending = &leg.iovecs[leg.iov_start..];
        let entry = opcode::Writev::new(
            types::Fd(leg.target.fd),
            pending.as_ptr(),
            pending.len() as u32,
        )
        .offset(leg.file_offset)
        .build()
        .user_data(LEG_USER_DATA | u64::from(slot_index));
        // SAFETY: the leg's iovec array lives in the slot, which stays in flight until this
        // operation's completion is reaped (the leg is a part of the request); the guest's
        // buffers it points to are valid until then (`submit`'s contract); the descriptor stays
        // open while the armed leg holds its observer, and the queue's drop waits for the
        // ring's operations.
        match unsafe { self.ring.push(&entry) } {
            Ok(()) => {
                self.slots[slot_index as usize].leg_mut().ring_busy = true;
                self.ring_ops_inflight += 1;
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                self.end_leg(slot_index, Some(IoFailure::Os(errno)));
            }
        }
    }

    /// Handles the completion of a leg's ring operation.
    pub(super) fn on_leg_completion(&mut self, user_data: u64, result: i32) {
        let slot_index = (user_data & u64::from(u32::MAX)) as u32;
        let Some(slot) = self.slots.get_mut(slot_index as usize) else {
            log::error!("io_uring returned unknown leg user_data {user_data:#x}");
            return;
        };
        let leg = slot.leg_mut();
        if !std::mem::replace(&mut leg.ring_busy, false) {
            log::error!("io_uring completed the leg of slot {slot_index} twice");
            return;
        }
        self.ring_ops_inflight -= 1;
        match leg.step(result) {
            LegStep::Again => self.start_leg(slot_index),
            LegStep::Done(failure) => self.end_leg(slot_index, failure),
        }
    }

    /// The leg has ended: tells its observer, disarms it, and ends its part of the request
    /// (successfully: a leg never fails the guest's write).
    fn end_leg(&mut self, slot_index: u32, failure: Option<IoFailure>) {
        let leg = self.slots[slot_index as usize].leg_mut();
        let Some(observer) = leg.observer.take() else {
            return;
        };
        let event = WriteEvent {
            volume: self.volume.name(),
            queue_index: self.queue_index,
            kind: WriteKind::Write,
            offset_bytes: leg.volume_offset_bytes,
            len_bytes: leg.volume_len_bytes,
            data: &[],
        };
        observer.leg_done(&event, failure);
        self.end_part(slot_index, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observer::Observed;
    use crate::volume::queue::{BlockOp, Completion};
    use crate::{Volume, VolumeConfig};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use std::sync::Mutex;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Asks for a leg of every write, to `file` at the write's offset plus `shift_bytes`.
    struct LegObserver {
        file: std::fs::File,
        memory_backed: bool,
        shift_bytes: u64,
        done: Mutex<Vec<(u64, u64, Option<IoFailure>)>>,
    }

    impl LegObserver {
        fn new(file: std::fs::File, memory_backed: bool) -> Arc<Self> {
            Arc::new(Self {
                file,
                memory_backed,
                shift_bytes: 1 << 20,
                done: Mutex::new(Vec::new()),
            })
        }

        fn done(&self) -> Vec<(u64, u64, Option<IoFailure>)> {
            self.done.lock().map(|d| d.clone()).unwrap_or_default()
        }
    }

    impl WriteObserver for LegObserver {
        fn observe(&self, event: &WriteEvent<'_>, ticket: crate::ObserverTicket) -> Observed {
            if event.kind != WriteKind::Write {
                return Observed::Done(ticket);
            }
            let target = LegTarget {
                fd: self.file.as_raw_fd(),
                offset_bytes: event.offset_bytes + self.shift_bytes,
                memory_backed: self.memory_backed,
            };
            Observed::Leg(ticket, target)
        }

        fn leg_done(&self, event: &WriteEvent<'_>, failure: Option<IoFailure>) {
            if let Ok(mut done) = self.done.lock() {
                done.push((event.offset_bytes, event.len_bytes, failure));
            }
        }
    }

    fn volume_in(dir: &std::path::Path) -> Result<Arc<Volume>, Box<dyn std::error::Error>> {
        let path = dir.join("source.img");
        std::fs::write(&path, vec![0u8; 1 << 20])?;
        Ok(Volume::open(VolumeConfig {
            name: "v".into(),
            path,
            ..Default::default()
        })?)
    }

    /// Writes `chunks` (each at its offset) through a queue and waits for them.
    fn write_all(volume: &Arc<Volume>, chunks: &[(u64, Vec<u8>)]) -> Vec<Completion> {
        let mut queue = match VolumeQueue::new(volume.clone(), 0, 8, 4) {
            Ok(q) => q,
            Err(e) => panic!("queue: {e}"),
        };
        for (tag, (offset_bytes, data)) in chunks.iter().enumerate() {
            // Two iovecs per write, so that a leg walks an array like the guest's.
            let half = data.len() / 2;
            let iovecs = [
                libc::iovec {
                    iov_base: data.as_ptr() as *mut libc::c_void,
                    iov_len: half,
                },
                libc::iovec {
                    iov_base: data[half..].as_ptr() as *mut libc::c_void,
                    iov_len: data.len() - half,
                },
            ];
            let op = BlockOp::Write {
                offset_bytes: *offset_bytes,
                iovecs: &iovecs,
            };
            // SAFETY: `chunks` outlives the queue, which is drained below before it drops;
            // the iovec array is copied by `submit`.
            let taken = unsafe { queue.submit(op, tag as u64) };
            assert_eq!(taken, Ok(()));
        }
        assert!(queue.commit().is_ok());
        let mut out = Vec::new();
        assert!(queue.drain(&mut out, std::time::Duration::from_secs(10)));
        out
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    /// Every write reaches both the source and the leg's file, inline (memory-backed) and
    /// through the ring, and the observer hears of each leg once.
    #[test]
    fn legs_write_the_guest_data_to_the_observers_file() -> TestResult {
        for memory_backed in [true, false] {
            let dir = tempfile::tempdir()?;
            let volume = volume_in(dir.path())?;
            let target = tempfile::tempfile()?;
            target.set_len(2 << 20)?;
            let observer = LegObserver::new(target.try_clone()?, memory_backed);
            volume.add_observer(observer.clone());
            let chunks: Vec<(u64, Vec<u8>)> = (0..6u8)
                .map(|i| {
                    (
                        u64::from(i) * 8192,
                        pattern(i * 31 + 1, 4096 + 512 * usize::from(i)),
                    )
                })
                .collect();
            let completions = write_all(&volume, &chunks);
            assert_eq!(completions.len(), chunks.len());
            assert!(
                completions.iter().all(|c| c.result.is_ok()),
                "{completions:?}"
            );
            let source = std::fs::File::open(dir.path().join("source.img"))?;
            for (offset, data) in &chunks {
                let mut on_source = vec![0u8; data.len()];
                source.read_exact_at(&mut on_source, *offset)?;
                let mut on_target = vec![0u8; data.len()];
                target.read_exact_at(&mut on_target, offset + (1 << 20))?;
                assert_eq!(&on_source, data);
                assert_eq!(
                    &on_target, data,
                    "leg at {offset}, memory_backed {memory_backed}"
                );
            }
            let mut done = observer.done();
            done.sort_by_key(|d| d.0);
            let expected: Vec<_> = chunks
                .iter()
                .map(|(o, d)| (*o, d.len() as u64, None))
                .collect();
            assert_eq!(done, expected);
        }
        Ok(())
    }

    /// A leg that cannot be written (a read-only descriptor) is reported to its observer;
    /// the guest's write still succeeds on the source.
    #[test]
    fn a_failed_leg_never_fails_the_guest_write() -> TestResult {
        for memory_backed in [true, false] {
            let dir = tempfile::tempdir()?;
            let volume = volume_in(dir.path())?;
            let target_path = dir.path().join("target.img");
            std::fs::write(&target_path, vec![0u8; 2 << 20])?;
            let observer = LegObserver::new(std::fs::File::open(&target_path)?, memory_backed);
            volume.add_observer(observer.clone());
            let completions = write_all(&volume, &[(4096, pattern(9, 4096))]);
            assert_eq!(completions.len(), 1);
            assert_eq!(completions[0].result, Ok(4096));
            assert_eq!(
                observer.done(),
                vec![(4096, 4096, Some(IoFailure::Os(libc::EBADF)))]
            );
        }
        Ok(())
    }

    /// Two observers asking for a leg of the same write: the first gets it, the second is
    /// told at once that its leg failed, and the guest's write succeeds.
    #[test]
    fn a_second_leg_is_refused_to_its_observer() -> TestResult {
        let dir = tempfile::tempdir()?;
        let volume = volume_in(dir.path())?;
        let (first_file, second_file) = (tempfile::tempfile()?, tempfile::tempfile()?);
        first_file.set_len(2 << 20)?;
        second_file.set_len(2 << 20)?;
        let first = LegObserver::new(first_file.try_clone()?, true);
        let second = LegObserver::new(second_file, true);
        volume.add_observer(first.clone());
        volume.add_observer(second.clone());
        let data = pattern(3, 4096);
        let completions = write_all(&volume, &[(0, data.clone())]);
        assert_eq!(completions[0].result, Ok(4096));
        assert_eq!(first.done(), vec![(0, 4096, None)]);
        assert_eq!(second.done(), vec![(0, 4096, Some(IoFailure::Busy))]);
        let mut on_target = vec![0u8; 4096];
        first_file.read_exact_at(&mut on_target, 1 << 20)?;
        assert_eq!(on_target, data);
        Ok(())
    }

    fn armed(buffers: &mut [[u8; 4]]) -> Leg {
        let iovecs: Vec<libc::iovec> = buffers
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut leg = Leg::new(1);
        leg.target.offset_bytes = 4096;
        leg.file_offset = 4096;
        leg.remaining_bytes = 4 * buffers.len() as u64;
        leg.iovecs.extend_from_slice(&iovecs);
        leg
    }

    #[test]
    fn a_short_leg_write_continues_where_it_stopped() {
        let mut buffers = [[0u8; 4]; 2];
        let mut leg = armed(&mut buffers);
        assert_eq!(leg.step(5), LegStep::Again);
        assert_eq!((leg.file_offset, leg.remaining_bytes), (4101, 3));
        assert_eq!(leg.iov_start, 1);
        assert_eq!(leg.iovecs[1].iov_len, 3);
        assert_eq!(leg.step(3), LegStep::Done(None));
    }

    #[test]
    fn a_leg_retries_interruptions_and_reports_failures() {
        let mut buffers = [[0u8; 4]];
        let mut leg = armed(&mut buffers);
        assert_eq!(leg.step(-libc::EINTR), LegStep::Again);
        assert_eq!(leg.step(-libc::EAGAIN), LegStep::Again);
        assert_eq!(
            leg.step(-libc::ENOSPC),
            LegStep::Done(Some(IoFailure::Os(libc::ENOSPC)))
        );
        assert_eq!(leg.step(0), LegStep::Done(Some(IoFailure::NoProgress)));
    }
}
