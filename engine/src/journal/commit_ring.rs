//! The journal's group commit through io_uring: one append (a vectored write of whole blocks)
//! linked to one `fdatasync`, handed to the kernel with a single `io_uring_enter` and waited
//! for together. Short writes go on from where they stopped, with the flush linked again.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types};

use crate::reactor::Ring;

const WRITE_TAG: u64 = 1;
const SYNC_TAG: u64 = 2;

/// A small ring owned by the journal's writer thread, used for nothing but appends.
pub struct CommitRing {
    ring: Ring,
    completions: Vec<(u64, i32)>,
}

impl CommitRing {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            ring: Ring::new(8)?,
            completions: Vec::with_capacity(4),
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
            let with_sync = sync && !iovecs.is_empty();
            let mut entries = Vec::with_capacity(2);
            if !iovecs.is_empty() {
                let count = u32::try_from(iovecs.len())
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                let write = opcode::Writev::new(fd, iovecs.as_ptr(), count)
                    .offset(offset + done as u64)
                    .build()
                    .user_data(WRITE_TAG);
                entries.push(if with_sync {
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
            if entries.is_empty() {
                return Ok(());
            }
            for entry in &entries {
                // SAFETY: the iovecs and the slices of `parts` they point to outlive the
                // completions, which are all taken below before this function returns or
                // `iovecs` is touched again.
                unsafe { self.ring.push(entry)? };
            }
            let (written, synced) = self.wait_for(entries.len())?;
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

    /// Waits for `count` completions; returns the bytes the write took (if one was
    /// submitted) and whether the flush completed. A failed write or flush is the error.
    fn wait_for(&mut self, count: usize) -> io::Result<(Option<usize>, bool)> {
        self.completions.clear();
        while self.completions.len() < count {
            self.ring.submit_and_wait(count - self.completions.len())?;
            self.ring.reap(&mut self.completions);
        }
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
}

/// Sets `out` to the iovecs of what is left of `parts` after the first `done` bytes.
pub fn iovecs_after(parts: &[&[u8]], done: usize, out: &mut Vec<libc::iovec>) {
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
}
