//! The journal's group commit through io_uring: one append (a vectored write of whole blocks)
//! linked to one `fdatasync`, handed to the kernel with a single `io_uring_enter` and waited
//! for together. Short writes go on from where they stopped, with the flush linked again.
//!
//! The entries point at the caller's iovecs and bytes, so no entry may outlive the call that
//! queued it: the entries of one append are queued all or none, and the call returns only
//! when none of them is left queued or in flight (see `CommitRing::settle`).
//!
//! Where the kernel refuses the ring, appends are made with `pwritev` + `fdatasync` instead
//! ([`CommitRingState`]); [`write_all_vectored_at`] is also how spares and devices are filled.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types, EnterFlags, IoUring};
use nix::errno::Errno;
use nix::sys::uio::pwritev;

const WRITE_TAG: u64 = 1;
const SYNC_TAG: u64 = 2;
/// Submission entries of the ring: an append needs two (the write and its flush).
const RING_ENTRIES: u32 = 8;
/// The most entries one append queues.
const APPEND_ENTRIES_MAX: usize = 2;
const _: () = assert!(RING_ENTRIES as usize >= APPEND_ENTRIES_MAX);

/// A small ring owned by the journal's committing thread, used for nothing but appends.
/// Between two calls nothing is queued on it and nothing is in flight.
pub struct CommitRing {
    /// `None` after a submission the kernel refused: the ring was dropped with the entries it
    /// still held, and the next append makes a fresh one.
    ring: Option<IoUring>,
    entries: u32,
    completions: Vec<(u64, i32)>,
    /// Test hook: the next submission fails as if the kernel refused it.
    #[cfg(test)]
    refuse_next_submit: bool,
}

/// The entries of one append: the write, its flush, or both.
struct AppendEntries {
    entries: [squeue::Entry; APPEND_ENTRIES_MAX],
    len: usize,
}

impl AppendEntries {
    fn new() -> Self {
        Self {
            entries: [opcode::Nop::new().build(), opcode::Nop::new().build()],
            len: 0,
        }
    }

    fn push(&mut self, entry: squeue::Entry) {
        if let Some(slot) = self.entries.get_mut(self.len) {
            *slot = entry;
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[squeue::Entry] {
        &self.entries[..self.len]
    }
}

impl CommitRing {
    pub fn new() -> io::Result<Self> {
        Self::with_entries(RING_ENTRIES)
    }

    fn with_entries(entries: u32) -> io::Result<Self> {
        Ok(Self {
            ring: Some(IoUring::new(entries)?),
            entries,
            completions: Vec::with_capacity(APPEND_ENTRIES_MAX),
            #[cfg(test)]
            refuse_next_submit: false,
        })
    }

    /// Writes all of `parts` at `offset` of `file` and, with `sync`, makes them durable
    /// (`fdatasync`), linked so that the flush starts only after the write is whole.
    pub fn write_all_at(
        &mut self,
        file: &impl AsRawFd,
        parts: &[&[u8]],
        offset: u64,
        sync: bool,
    ) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut done = 0usize;
        let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(parts.len());
        loop {
            iovecs_after(parts, done, &mut iovecs);
            let fd = types::Fd(file.as_raw_fd());
            let entries = append_entries(fd, &iovecs, offset + done as u64, sync)?;
            if entries.len == 0 {
                return Ok(());
            }
            // SAFETY: the entries point at `iovecs` and at the slices of `parts` those point
            // to, which live until this function returns; `run` returns only when none of
            // the entries is left queued or in flight.
            let (written, synced) = unsafe { self.run(entries.as_slice()) }?;
            let written = written.unwrap_or(0);
            if written == 0 && done < total && !iovecs.is_empty() {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += written;
            if done >= total && (!sync || synced) {
                return Ok(());
            }
            // A short write: its linked flush was cancelled; go on with the rest.
        }
    }

    /// Queues `entries` (all or none), hands them to the kernel and takes their completions;
    /// returns the bytes the write took (if one was queued) and whether the flush completed.
    /// A failed write or flush is the error.
    ///
    /// # Safety
    /// Every buffer and iovec array the entries point to must stay valid until this returns.
    unsafe fn run(&mut self, entries: &[squeue::Entry]) -> io::Result<(Option<usize>, bool)> {
        let ring = match &mut self.ring {
            Some(ring) => ring,
            None => self.ring.insert(IoUring::new(self.entries)?),
        };
        // SAFETY: the caller keeps the memory the entries point to valid until this returns,
        // and `settle` below returns only when no entry is left queued or in flight. A failed
        // push queues none of them.
        let pushed = unsafe { ring.submission().push_multiple(entries) };
        if pushed.is_err() {
            return Err(io::Error::other(
                "the journal's commit ring has no room for an append",
            ));
        }
        self.settle(entries.len())?;
        self.outcome()
    }

    /// Hands the `count` entries just queued to the kernel and takes their completions.
    /// Returns only when none of them is left queued or in flight: if the kernel takes none
    /// of them, the ring is dropped with them (the kernel never reads the entries of a ring
    /// closed before they were submitted) and its error returned.
    fn settle(&mut self, count: usize) -> io::Result<()> {
        self.completions.clear();
        loop {
            let Some(ring) = self.ring.as_mut() else {
                return Ok(());
            };
            let queued = ring.submission().len();
            let in_flight = count.saturating_sub(queued + self.completions.len());
            if queued == 0 && in_flight == 0 {
                return Ok(());
            }
            if in_flight > 0 {
                // The kernel took only some of the entries: the rest waits until these are
                // done, so that a flush never starts before the write it follows has ended.
                if let Err(e) = wait_for_completions(ring, in_flight) {
                    if e.kind() != io::ErrorKind::Interrupted {
                        abandon_in_flight(&e);
                    }
                }
            } else if let Err(e) = self.submit_and_wait(queued) {
                // io_uring_enter(2) fails only when it took no entry: all are still queued,
                // none is in flight, and none will be once the ring is gone.
                self.ring = None;
                return Err(e);
            }
            if let Some(ring) = self.ring.as_mut() {
                let taken = ring.completion().map(|cqe| (cqe.user_data(), cqe.result()));
                self.completions.extend(taken);
            }
        }
    }

    /// Hands the `queued` entries to the kernel and waits for as many completions, with one
    /// `io_uring_enter`.
    fn submit_and_wait(&mut self, queued: usize) -> io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.refuse_next_submit) {
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        let Some(ring) = self.ring.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        loop {
            match ring.submit_and_wait(queued) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The bytes the write took (if one was submitted) and whether the flush completed, from
    /// the completions taken; a failed write or flush is the error.
    fn outcome(&self) -> io::Result<(Option<usize>, bool)> {
        let mut written = None;
        let mut synced = false;
        let mut error = None;
        for &(tag, result) in &self.completions {
            match (tag, result) {
                (WRITE_TAG, n) if n >= 0 => written = Some(n as usize),
                (SYNC_TAG, 0) => synced = true,
                // The flush linked to a short write is cancelled; not an error.
                (SYNC_TAG, n) if n == -libc::ECANCELED => {}
                (_, n) => error = error.or(Some(io::Error::from_raw_os_error(-n))),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok((written, synced)),
        }
    }

    /// Entries queued on the ring and not yet handed to the kernel.
    #[cfg(test)]
    fn queued(&mut self) -> usize {
        self.ring.as_mut().map_or(0, |r| r.submission().len())
    }
}

/// The write of `iovecs` at `offset` (if any) and, with `sync`, the flush linked after it.
fn append_entries(
    fd: types::Fd,
    iovecs: &[libc::iovec],
    offset: u64,
    sync: bool,
) -> io::Result<AppendEntries> {
    let mut entries = AppendEntries::new();
    if !iovecs.is_empty() {
        let count = u32::try_from(iovecs.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let write = opcode::Writev::new(fd, iovecs.as_ptr(), count)
            .offset(offset)
            .build()
            .user_data(WRITE_TAG);
        entries.push(if sync {
            write.flags(squeue::Flags::IO_LINK)
        } else {
            write
        });
    }
    if sync {
        entries.push(
            opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(SYNC_TAG),
        );
    }
    Ok(entries)
}

/// Sleeps until `want` completions are ready, handing the kernel nothing new.
fn wait_for_completions(ring: &IoUring, want: usize) -> io::Result<usize> {
    let want = u32::try_from(want).unwrap_or(u32::MAX);
    // SAFETY: io_uring_enter(2) with nothing to submit and no argument pointer: it only waits
    // for completions of entries the kernel already took.
    unsafe {
        ring.submitter()
            .enter::<libc::sigset_t>(0, want, EnterFlags::GETEVENTS.bits(), None)
    }
}

/// The kernel refused to wait for entries it is still working on, which point at memory the
/// caller is about to free: returning would let the kernel use that memory, so the process
/// ends here, as a crash would (the journal recovers from one; the media keep every record
/// made durable before).
fn abandon_in_flight(e: &io::Error) -> ! {
    log::error!("journal: io_uring refused to wait for an append in flight ({e}); aborting");
    std::process::abort()
}

/// How the medium writer makes its appends durable: the commit ring, made on the first
/// append by the thread that makes it, or `pwritev` + `fdatasync` if the kernel refuses one.
pub enum CommitRingState {
    NotYet,
    Ready(Box<CommitRing>),
    Unavailable,
}

impl CommitRingState {
    /// Writes `parts` at `at` and makes them durable: through io_uring when the kernel
    /// gives this thread a ring, else with `pwritev` + `fdatasync`.
    pub fn write_durably(&mut self, file: &File, parts: &[&[u8]], at: u64) -> io::Result<()> {
        if let CommitRingState::NotYet = self {
            *self = match CommitRing::new() {
                Ok(ring) => CommitRingState::Ready(Box::new(ring)),
                Err(e) => {
                    log::warn!("journal: no io_uring for appends ({e}); using pwritev + fdatasync");
                    CommitRingState::Unavailable
                }
            };
        }
        match self {
            CommitRingState::Ready(ring) => ring.write_all_at(file, parts, at, true),
            CommitRingState::NotYet | CommitRingState::Unavailable => {
                write_all_vectored_at(file, parts, at).and_then(|()| file.sync_data())
            }
        }
    }
}

/// Writes all of `parts` at `offset` with `pwritev`, continuing after short writes.
pub fn write_all_vectored_at(file: &File, parts: &[&[u8]], offset: u64) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let mut rest = slices.as_mut_slice();
    // Drops the empty parts in front, so that an empty `rest` means all is written.
    IoSlice::advance_slices(&mut rest, 0);
    let mut at = offset;
    while !rest.is_empty() {
        let at_offset = i64::try_from(at).map_err(|_| io::ErrorKind::InvalidInput)?;
        let written = match pwritev(file, rest, at_offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        at += written as u64;
        IoSlice::advance_slices(&mut rest, written);
    }
    Ok(())
}

/// Sets `out` to the iovecs of what is left of `parts` after the first `done` bytes.
fn iovecs_after(parts: &[&[u8]], done: usize, out: &mut Vec<libc::iovec>) {
    out.clear();
    let mut skip = done;
    for part in parts {
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        let rest = &part[skip..];
        skip = 0;
        out.push(libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn writes_every_part_in_order_and_syncs() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(&path)?;
        let mut ring = CommitRing::new()?;
        let a = vec![1u8; 3000];
        let b = vec![2u8; 5000];
        ring.write_all_at(&file, &[&a, &b], 4096, true)?;
        ring.write_all_at(&file, &[&[3u8; 10]], 0, false)?;
        let mut back = Vec::new();
        std::fs::File::open(&path)?.read_to_end(&mut back)?;
        assert_eq!(back.len(), 4096 + 8000);
        assert_eq!(&back[..10], &[3u8; 10]);
        assert!(back[10..4096].iter().all(|&x| x == 0));
        assert_eq!(&back[4096..7096], &a[..]);
        assert_eq!(&back[7096..], &b[..]);
        Ok(())
    }

    /// What a short write leaves: the rest of the part it stopped in, then the others.
    #[test]
    fn iovecs_after_a_short_write_start_where_it_stopped() {
        let (a, b, c) = ([1u8; 10], [2u8; 20], [3u8; 30]);
        let parts: [&[u8]; 3] = [&a, &b, &c];
        let mut out = Vec::new();
        iovecs_after(&parts, 15, &mut out);
        let lens: Vec<usize> = out.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [15, 30]);
        assert_eq!(out[0].iov_base as *const u8, b[5..].as_ptr());
        iovecs_after(&parts, 30, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].iov_base as *const u8, c.as_ptr());
        iovecs_after(&parts, 60, &mut out);
        assert!(out.is_empty());
    }

    fn empty_file(dir: &tempfile::TempDir) -> io::Result<(std::fs::File, std::path::PathBuf)> {
        let path = dir.path().join("m");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(&path)?;
        Ok((file, path))
    }

    /// A ring with room for one entry cannot take a write and its flush: the append fails
    /// with nothing queued, and the next append hands the kernel only its own entry.
    #[test]
    fn an_append_without_room_queues_nothing() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (file, path) = empty_file(&dir)?;
        let mut ring = CommitRing::with_entries(1)?;
        {
            let first = vec![1u8; 4096];
            assert!(ring.write_all_at(&file, &[&first], 0, true).is_err());
        }
        assert_eq!(ring.queued(), 0);
        ring.write_all_at(&file, &[&[2u8; 512]], 4096, false)?;
        let back = std::fs::read(&path)?;
        assert_eq!(back.len(), 4096 + 512);
        assert!(
            back[..4096].iter().all(|&x| x == 0),
            "the refused write ran"
        );
        assert!(back[4096..].iter().all(|&x| x == 2));
        Ok(())
    }

    /// A submission the kernel refuses leaves its entries queued; they go with the ring, so
    /// the next append does not hand the kernel a write from memory freed since.
    #[test]
    fn a_refused_submission_leaves_nothing_for_the_next() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (file, path) = empty_file(&dir)?;
        let mut ring = CommitRing::new()?;
        ring.refuse_next_submit = true;
        {
            let first = vec![1u8; 4096];
            let err = ring.write_all_at(&file, &[&first], 0, true).err();
            assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::EAGAIN));
        }
        assert_eq!(ring.queued(), 0);
        ring.write_all_at(&file, &[&[2u8; 512]], 8192, true)?;
        let back = std::fs::read(&path)?;
        assert_eq!(back.len(), 8192 + 512);
        assert!(
            back[..8192].iter().all(|&x| x == 0),
            "the refused write ran"
        );
        assert!(back[8192..].iter().all(|&x| x == 2));
        Ok(())
    }

    #[test]
    fn a_failed_write_is_the_error() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ro");
        std::fs::write(&path, b"x")?;
        let read_only = std::fs::File::open(&path)?;
        let mut ring = CommitRing::new()?;
        let err = ring.write_all_at(&read_only, &[&[0u8; 512]], 0, true).err();
        assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::EBADF));
        Ok(())
    }

    fn appended(state: &mut CommitRingState) -> io::Result<Vec<u8>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        state.write_durably(&file, &[b"head", &[7u8; 5000], b"tail"], 10)?;
        std::fs::read(&path)
    }

    #[test]
    fn appends_take_a_ring_on_first_use() -> io::Result<()> {
        let mut state = CommitRingState::NotYet;
        let bytes = appended(&mut state)?;
        assert!(matches!(state, CommitRingState::Ready(_)));
        assert_eq!(bytes.len(), 10 + 4 + 5000 + 4);
        assert_eq!(&bytes[10..14], b"head");
        assert!(bytes[14..5014].iter().all(|&b| b == 7));
        assert_eq!(&bytes[5014..], b"tail");
        Ok(())
    }

    /// Empty parts anywhere are skipped; nothing but empty parts writes nothing.
    #[test]
    fn vectored_writes_skip_empty_parts() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m");
        let file = std::fs::File::create(&path)?;
        write_all_vectored_at(&file, &[b"", b"", b""], 3)?;
        assert_eq!(std::fs::metadata(&path)?.len(), 0);
        write_all_vectored_at(&file, &[b"", b"ab", b"", b"cd", b""], 2)?;
        assert_eq!(std::fs::read(&path)?, b"\0\0abcd");
        Ok(())
    }

    /// Without io_uring the same bytes land through pwritev + fdatasync.
    #[test]
    fn appends_without_io_uring_write_the_same_bytes() -> io::Result<()> {
        let mut with_ring = CommitRingState::NotYet;
        let mut without = CommitRingState::Unavailable;
        assert_eq!(appended(&mut with_ring)?, appended(&mut without)?);
        Ok(())
    }
}
