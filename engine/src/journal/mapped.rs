//! The mapped tail: the end of an open memory-backed medium, lent by the writer to the
//! threads that observe guest writes (`mapped=on`, or `auto` for a sync journal), which
//! encode each record straight into the medium's pages under the journal's lock.
//!
//! On tmpfs or ramfs the page cache *is* the medium: a record copied into a shared mapping of
//! the file is as durable as one written with `pwritev` and `fdatasync` (a no-op there), and
//! a daemon killed afterwards leaves it in the file. So a record appended here is durable when
//! `observe` returns, and the guest's write needs no group commit, no writer thread and no
//! wake-up: the cost of a journaled write is the copy of its data and its CRC. The writer
//! lends the tail only while it has nothing to write itself, and takes it back (ending the
//! lent stretch with a padding record at the next block boundary) before it appends, seals
//! or closes, so the medium is still written strictly in order by one party at a time.
//!
//! Pages are faulted in ahead of the append point with `MADV_POPULATE_WRITE`, which reports a
//! full filesystem as an error instead of the `SIGBUS` a store into an unbacked page of the
//! mapping would raise: a record goes into the mapping only where the pages are already
//! there, and one that does not fit hands the tail back to the writer, whose `pwritev` then
//! meets the full medium the ordinary way (the journal stops or pauses, the guest goes on).
//! Faulting in fresh tmpfs pages (allocating and zeroing them) is most of what a journaled
//! write costs, so a [`Prefaulter`] thread does it ahead of the append point; the observing
//! thread does it itself only when it catches up with the prefaulter.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::entry::{now_ns, LogEntry};
use super::format::{
    encode_record_in, padding_needed, padding_record, record_bytes, trailer_records_bytes,
    RecordHeader, BLOCK_BYTES, HEADER_BYTES,
};
use crate::confine::{self, Allowlist};

/// The prefaulter only touches mappings it is handed (`madvise`) and waits for work.
const PREFAULT_SYSCALLS: Allowlist = Allowlist {
    kind: "journal-prefault",
    groups: &[confine::RUNTIME],
    extra: &[],
};

/// Bytes an observing thread faults in at a time when it catches up with the prefaulter (64
/// pages of 4 KiB).
const POPULATE_STEP_BYTES: u64 = 256 << 10;
/// How far ahead of the append point the prefaulter keeps pages faulted in, and how close
/// the append point may come to its goal before the goal moves on (`benches/journal-notes.md`,
/// *The prefault thread*).
const PREFAULT_AHEAD_BYTES: u64 = 16 << 20;
const PREFAULT_LOW_WATER_BYTES: u64 = 8 << 20;
/// The prefaulter's step: it looks for a new goal (or a new medium) between steps.
const PREFAULT_STEP_BYTES: u64 = 1 << 20;
/// The most a padding record ending the lent stretch can take (see [`padding_needed`]).
const END_PADDING_MAX_BYTES: u64 = (BLOCK_BYTES + HEADER_BYTES) as u64;
/// Room kept free at the end of the medium besides the trailer: what the writer's own
/// fitting keeps (a stop record and the padding of the trailer's append) plus the padding
/// that ends the lent stretch.
const RESERVE_BYTES: u64 = 3 * END_PADDING_MAX_BYTES;

/// A shared, writable mapping of a whole medium file, and how far its pages are faulted in.
/// Shared by the tail (the only one that writes into it) and the prefaulter (which only asks
/// the kernel to fault pages in).
pub struct MediumMapping {
    base: MappingBase,
    len: usize,
    /// Every page below this is faulted in (it only grows).
    populated_to: AtomicU64,
}

/// The start address of a [`MediumMapping`]: the one part of it that is not `Send` and `Sync`
/// by itself.
struct MappingBase(NonNull<u8>);

// SAFETY: the address is only dereferenced through `MediumMapping::bytes_mut`, whose caller
// (the lent tail, one at a time, whichever thread holds it) is the only one using that range;
// otherwise it is passed to madvise(2) and munmap(2), which take an address from any thread.
// The mapping stays until the `MediumMapping` holding this address is dropped.
unsafe impl Send for MappingBase {}
// SAFETY: as above: a shared `MappingBase` only hands out the address, which makes no
// reference into the mapping.
unsafe impl Sync for MappingBase {}

impl MediumMapping {
    /// Maps `len` bytes of `file` (opened read-write) shared; nothing is faulted in yet.
    pub fn new(file: &File, len: u64) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        if len == 0 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: a fresh shared mapping of an open descriptor chosen by the kernel; no
        // existing memory is affected. The result is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<u8>()).ok_or(io::ErrorKind::InvalidData)?;
        Ok(Self {
            base: MappingBase(base),
            len,
            populated_to: AtomicU64::new(0),
        })
    }

    fn populated_to(&self) -> u64 {
        self.populated_to.load(Ordering::Acquire)
    }

    /// Faults in (allocating where needed) every page from where the faulted-in part ends up
    /// to `to` (clamped to the mapping), in steps of at most `step` bytes.
    fn populate_to(&self, to: u64, step: u64) -> io::Result<()> {
        const PAGE: u64 = 4096;
        let to = to.min(self.len as u64);
        loop {
            let done = self.populated_to();
            if done >= to {
                return Ok(());
            }
            let from = done - done % PAGE;
            let until = to.min(from + step);
            // SAFETY: `from..until` lies inside the mapping; MADV_POPULATE_WRITE only faults
            // the pages in (as a write would) and fails instead of raising SIGBUS where it
            // cannot. No reference into the range is made.
            let rc = unsafe {
                libc::madvise(
                    self.base.0.as_ptr().add(from as usize).cast(),
                    (until - from) as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            // Contiguous: every page below `done` was faulted in before it was published.
            self.populated_to.fetch_max(until, Ordering::AcqRel);
        }
    }

    /// Starts the faulted-in part at `at` (the append point of a tail being lent: the pages
    /// before it were written already and are not touched through the mapping).
    fn start_populated_at(&self, at: u64) {
        self.populated_to.fetch_max(at, Ordering::AcqRel);
    }

    /// The bytes `at..at + len` of the mapping, or `None` when they do not lie inside it.
    ///
    /// # Safety
    /// The caller is the only one writing to or reading from this range in this process for
    /// as long as the slice lives (the lent tail: records go only where its append point is).
    #[allow(clippy::mut_from_ref)] // the mapping is shared memory; the contract above holds
    unsafe fn bytes_mut(&self, at: u64, len: usize) -> Option<&mut [u8]> {
        let end = at.checked_add(u64::try_from(len).ok()?)?;
        if end > self.len as u64 {
            return None;
        }
        // SAFETY: `at..end` lies inside the mapping (checked above), which lives as long as
        // `self`; the caller guarantees no other reference into it.
        Some(unsafe { std::slice::from_raw_parts_mut(self.base.0.as_ptr().add(at as usize), len) })
    }
}

impl Drop for MediumMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which no reference outlives.
        unsafe {
            libc::munmap(self.base.0.as_ptr().cast(), self.len);
        }
    }
}

/// A thread that keeps the pages of the lent medium faulted in ahead of its append point, so
/// that the observing threads find them ready (the first touch of fresh memory, not the
/// copy, is most of a mapped append's cost).
pub struct Prefaulter {
    shared: Arc<PrefaultShared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct PrefaultShared {
    job: Mutex<PrefaultJob>,
    wake: Condvar,
}

#[derive(Default)]
struct PrefaultJob {
    mapping: Option<Arc<MediumMapping>>,
    goal: u64,
    stop: bool,
}

impl PrefaultShared {
    fn job(&self) -> std::sync::MutexGuard<'_, PrefaultJob> {
        self.job.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Prefaulter {
    pub fn start() -> io::Result<Self> {
        let shared = Arc::new(PrefaultShared::default());
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-jprefault".into())
            .spawn(move || {
                confine::enter(&PREFAULT_SYSCALLS);
                prefault_main(&thread_shared)
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Works on `mapping` (or on nothing) instead of the mapping it had, up to `goal`.
    fn set(&self, mapping: Option<Arc<MediumMapping>>, goal: u64) {
        let mut job = self.shared.job();
        job.mapping = mapping;
        job.goal = goal;
        drop(job);
        self.shared.wake.notify_one();
    }

    /// Moves the goal of the current mapping on to `goal`.
    fn want(&self, goal: u64) {
        let mut job = self.shared.job();
        if goal > job.goal {
            job.goal = goal;
            drop(job);
            self.shared.wake.notify_one();
        }
    }

    /// Lets go of the current mapping.
    pub fn release(&self) {
        self.set(None, 0);
    }
}

impl Drop for Prefaulter {
    fn drop(&mut self) {
        self.shared.job().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn prefault_main(shared: &PrefaultShared) {
    let mut job = shared.job();
    loop {
        if job.stop {
            return;
        }
        let work = job
            .mapping
            .as_ref()
            .filter(|m| m.populated_to() < job.goal.min(m.len as u64))
            .cloned();
        let Some(mapping) = work else {
            job = shared.wake.wait(job).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        let goal = job.goal;
        drop(job);
        let step_end = mapping.populated_to().saturating_add(PREFAULT_STEP_BYTES);
        let result = mapping.populate_to(goal.min(step_end), PREFAULT_STEP_BYTES);
        job = shared.job();
        if let Err(e) = result {
            // The medium's filesystem is full (or the kernel will not): the observing thread
            // meets it too and hands the tail back; nothing more to do on this mapping.
            log::debug!("journal: prefaulting stopped: {e}");
            if job
                .mapping
                .as_ref()
                .is_some_and(|m| Arc::ptr_eq(m, &mapping))
            {
                job.mapping = None;
            }
        }
    }
}

/// The end of the open medium while it is lent to the observing threads.
pub struct MappedTail {
    mapping: Arc<MediumMapping>,
    prefaulter: Option<Arc<Prefaulter>>,
    pub medium: u32,
    /// Where the next record goes.
    pub position_bytes: u64,
    capacity_bytes: u64,
    /// The prefaulter's goal: moved on when the append point comes within
    /// `PREFAULT_LOW_WATER_BYTES` of it.
    prefault_goal: u64,
    /// Records on the medium before it was lent (their trailer entries take room too).
    entries_before: usize,
    /// The records appended through the tail, for the medium's trailer.
    pub entries: Vec<LogEntry>,
    /// The last sequence number appended (or assigned before the tail was lent).
    last_seq: u64,
}

/// What a tail is made of, and given back as.
pub struct TailParts {
    pub mapping: Arc<MediumMapping>,
    pub medium: u32,
    /// Where the next record goes (block-aligned when lent and when given back).
    pub position_bytes: u64,
    pub capacity_bytes: u64,
    pub entries_before: usize,
    pub entries: Vec<LogEntry>,
}

impl MappedTail {
    /// Lends `parts` (`last_seq`: the last sequence number assigned), faulting in its first
    /// pages and setting the prefaulter (if any) to work ahead of it; gives the parts back
    /// with the error if the kernel will not fault pages in.
    pub fn lend(
        parts: TailParts,
        prefaulter: Option<Arc<Prefaulter>>,
        last_seq: u64,
    ) -> Result<Self, (TailParts, io::Error)> {
        let at = parts.position_bytes;
        parts.mapping.start_populated_at(at);
        if let Err(e) = parts
            .mapping
            .populate_to(at + POPULATE_STEP_BYTES, POPULATE_STEP_BYTES)
        {
            return Err((parts, e));
        }
        let prefault_goal = at + PREFAULT_AHEAD_BYTES;
        if let Some(p) = &prefaulter {
            p.set(Some(parts.mapping.clone()), prefault_goal);
        }
        Ok(Self {
            mapping: parts.mapping,
            prefaulter,
            medium: parts.medium,
            position_bytes: at,
            capacity_bytes: parts.capacity_bytes,
            prefault_goal,
            entries_before: parts.entries_before,
            entries: parts.entries,
            last_seq,
        })
    }

    /// Encodes the sequenced record `header` (its payload `header.payload_len_bytes` long,
    /// written by `fill`) at the append point and returns its log entry; or hands `fill`
    /// back when the record does not fit before the medium's reserved end or its pages
    /// cannot be had (the record then goes to the writer, and so must every later one).
    pub fn append<F: FnOnce(&mut [u8])>(
        &mut self,
        header: RecordHeader,
        fill: F,
    ) -> Result<LogEntry, F> {
        let len = record_bytes(header.payload_len_bytes as usize);
        let at = self.position_bytes;
        let end = at + len as u64;
        let trailer = trailer_records_bytes(self.entries_before + self.entries.len() + 1) as u64;
        if end + trailer + RESERVE_BYTES > self.capacity_bytes {
            return Err(fill);
        }
        // The pages of this record and of the padding that may end the stretch after it.
        let needed = end + END_PADDING_MAX_BYTES;
        if needed > self.mapping.populated_to() {
            if let Err(e) = self
                .mapping
                .populate_to(needed, POPULATE_STEP_BYTES.max(len as u64))
            {
                log::warn!("journal: cannot fault in medium pages ({e}); the writer appends");
                return Err(fill);
            }
        }
        if end + PREFAULT_LOW_WATER_BYTES > self.prefault_goal {
            self.prefault_goal = end + PREFAULT_AHEAD_BYTES;
            if let Some(p) = &self.prefaulter {
                p.want(self.prefault_goal);
            }
        }
        // SAFETY: the tail is the only writer of the medium while it is lent, and nothing
        // reads `at..end` through the mapping (the prefaulter makes no references).
        let Some(dst) = (unsafe { self.mapping.bytes_mut(at, len) }) else {
            log::error!(
                "journal: a record at {at} of medium {} would end past its mapping; the writer appends",
                self.medium
            );
            return Err(fill);
        };
        encode_record_in(dst, header, fill);
        self.position_bytes = end;
        self.last_seq = header.seq;
        let entry = LogEntry::of(&header, self.medium, at);
        self.entries.push(entry);
        Ok(entry)
    }

    /// Ends the lent stretch at the next block boundary with a padding record and gives the
    /// parts back (the append point block-aligned, the entries appended).
    pub fn finish(self) -> TailParts {
        let at = self.position_bytes;
        let mut pad = padding_needed((at % BLOCK_BYTES as u64) as usize);
        if pad > 0 {
            // Inside the faulted-in pages and the reserve (checked by every `append`).
            let padding = padding_record(pad, self.last_seq, now_ns());
            // SAFETY: as in `append`: the tail is the medium's only writer.
            match unsafe { self.mapping.bytes_mut(at, pad) } {
                Some(dst) => dst.copy_from_slice(&padding),
                None => {
                    log::error!(
                        "journal: the padding at {at} of medium {} would end past its mapping",
                        self.medium
                    );
                    pad = 0;
                }
            }
        }
        TailParts {
            mapping: self.mapping,
            medium: self.medium,
            position_bytes: at + pad as u64,
            capacity_bytes: self.capacity_bytes,
            entries_before: self.entries_before,
            entries: self.entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::format::Op;

    const MAPPED_BYTES: u64 = 64 << 10;

    fn mapped_file(dir: &tempfile::TempDir) -> io::Result<(File, Arc<MediumMapping>)> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(dir.path().join("m"))?;
        file.set_len(MAPPED_BYTES)?;
        let mapping = Arc::new(MediumMapping::new(&file, MAPPED_BYTES)?);
        Ok((file, mapping))
    }

    fn header(seq: u64, payload_len: usize) -> RecordHeader {
        RecordHeader {
            op: Op::Write,
            flags: 0,
            seq,
            stream_id: 1,
            log_id: 1,
            timestamp_ns: 0,
            offset_bytes: 0,
            len_bytes: payload_len as u64,
            payload_len_bytes: payload_len as u32,
            payload_crc: 0,
        }
    }

    #[test]
    fn bytes_outside_the_mapping_are_refused() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (_file, mapping) = mapped_file(&dir)?;
        // SAFETY: this test is the only user of the mapping.
        unsafe {
            assert!(mapping.bytes_mut(0, MAPPED_BYTES as usize).is_some());
            assert!(mapping.bytes_mut(MAPPED_BYTES - 10, 10).is_some());
            assert!(mapping.bytes_mut(MAPPED_BYTES - 10, 11).is_none());
            assert!(mapping.bytes_mut(MAPPED_BYTES, 1).is_none());
            assert!(mapping.bytes_mut(u64::MAX, 2).is_none());
        }
        Ok(())
    }

    /// A tail that believes its medium bigger than the mapping (a capacity that does not
    /// match) refuses the record that would end past the mapping instead of writing there.
    #[test]
    fn a_tail_refuses_records_past_its_mapping() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (_file, mapping) = mapped_file(&dir)?;
        let parts = TailParts {
            mapping,
            medium: 1,
            position_bytes: 0,
            capacity_bytes: 16 * MAPPED_BYTES,
            entries_before: 0,
            entries: Vec::new(),
        };
        let mut tail = MappedTail::lend(parts, None, 0).map_err(|(_, e)| e)?;
        let payload_len = 4000;
        let mut seq = 1;
        while let Ok(entry) = tail.append(header(seq, payload_len), |out| out.fill(7)) {
            assert!(entry.position_bytes + record_bytes(payload_len) as u64 <= MAPPED_BYTES);
            seq += 1;
        }
        let refused_at = tail.position_bytes;
        assert!(seq > 1, "no record fitted");
        assert!(refused_at + record_bytes(payload_len) as u64 > MAPPED_BYTES);
        let back = tail.finish();
        assert!(back.position_bytes <= MAPPED_BYTES);
        assert_eq!(back.entries.len() as u64, seq - 1);
        Ok(())
    }
}
