//! A local file or block device as a migration destination (buffered `pwrite`, `fdatasync`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{Destination, DestinationError, LocalFile};

/// The largest single write of zeros when `fallocate` cannot zero a range.
const ZERO_WRITE_BYTES_MAX: usize = 1 << 20;

/// An open file or block device that a mirror writes to.
#[derive(Debug)]
pub struct FileDestination {
    path: PathBuf,
    file: File,
    size_bytes: u64,
    is_block_device: bool,
    /// Created by this open, so every byte not written reads as zero.
    created: bool,
    /// The file lives on tmpfs or ramfs.
    memory_backed: bool,
    dev: u64,
    ino: u64,
    rdev: u64,
}

impl FileDestination {
    /// Opens `path`, creating a sparse file of `create_size_bytes` when it does not exist.
    /// An existing file keeps its size (the caller refuses one that is too small).
    pub fn open(path: &Path, create_size_bytes: u64) -> Result<Self, DestinationError> {
        let target = path.display().to_string();
        let open_err = |source| DestinationError::Open {
            target: target.clone(),
            source,
        };
        let created = path.symlink_metadata().is_err();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(created)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        if created {
            if let Err(e) = file.set_len(create_size_bytes) {
                let _ = std::fs::remove_file(path);
                return Err(open_err(e));
            }
        }
        let meta = file.metadata().map_err(open_err)?;
        let is_block_device = std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type());
        if !is_block_device && !meta.is_file() {
            return Err(DestinationError::Unusable {
                target,
                reason: "not a regular file or a block device".into(),
            });
        }
        let size_bytes = crate::volume::open::image_len(&file).map_err(open_err)?;
        let memory_backed = !is_block_device && crate::volume::open::is_memory_backed(&file);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size_bytes,
            is_block_device,
            created,
            memory_backed,
            dev: meta.dev(),
            ino: meta.ino(),
            rdev: meta.rdev(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// True when this process created the file (so a cancelled job may remove it).
    pub fn created(&self) -> bool {
        self.created
    }

    /// (device, inode, device number of a block device), to refuse a destination that is a
    /// source.
    pub fn identity(&self) -> (u64, u64, u64) {
        (self.dev, self.ino, self.rdev)
    }

    fn io_err(
        &self,
        op: &'static str,
        offset_bytes: u64,
        len_bytes: u64,
        source: std::io::Error,
    ) -> DestinationError {
        DestinationError::Io {
            target: self.describe(),
            op,
            offset_bytes,
            len_bytes,
            source,
        }
    }

    fn fallocate(&self, mode: i32, offset_bytes: u64, len_bytes: u64) -> std::io::Result<()> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        let mode = nix::fcntl::FallocateFlags::from_bits_retain(mode);
        nix::fcntl::fallocate(fd, mode, offset_bytes as _, len_bytes as _).map_err(Into::into)
    }

    fn write_zero_bytes(&self, offset_bytes: u64, len_bytes: u64) -> std::io::Result<()> {
        let zeros = vec![0u8; ZERO_WRITE_BYTES_MAX.min(len_bytes as usize)];
        let mut done = 0u64;
        while done < len_bytes {
            let n = (len_bytes - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset_bytes + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl Destination for FileDestination {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn write_at(&self, offset_bytes: u64, data: &[u8]) -> Result<(), DestinationError> {
        self.file
            .write_all_at(data, offset_bytes)
            .map_err(|e| self.io_err("write", offset_bytes, data.len() as u64, e))
    }

    fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
    ) -> Result<(), DestinationError> {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let modes = if unmap {
            [
                libc::FALLOC_FL_PUNCH_HOLE | keep,
                libc::FALLOC_FL_ZERO_RANGE | keep,
            ]
        } else {
            [
                libc::FALLOC_FL_ZERO_RANGE | keep,
                libc::FALLOC_FL_PUNCH_HOLE | keep,
            ]
        };
        for mode in modes {
            if self.fallocate(mode, offset_bytes, len_bytes).is_ok() {
                return Ok(());
            }
        }
        self.write_zero_bytes(offset_bytes, len_bytes)
            .map_err(|e| self.io_err("write-zeroes", offset_bytes, len_bytes, e))
    }

    fn read_at(&self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), DestinationError> {
        self.file
            .read_exact_at(buf, offset_bytes)
            .map_err(|e| self.io_err("read", offset_bytes, buf.len() as u64, e))
    }

    fn flush(&self) -> Result<(), DestinationError> {
        self.file
            .sync_data()
            .map_err(|e| self.io_err("flush", 0, 0, e))
    }

    fn known_zero(&self) -> bool {
        self.created && !self.is_block_device
    }

    fn local_file(&self) -> Option<LocalFile> {
        Some(LocalFile {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.file),
            memory_backed: self.memory_backed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_sparse_and_writes() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("t.img");
        let t = FileDestination::open(&path, 1 << 20)?;
        assert!(t.known_zero());
        assert_eq!(t.size_bytes(), 1 << 20);
        t.write_at(4096, b"hello")?;
        t.write_zeroes(4096, 2, true)?;
        t.flush()?;
        let mut buf = [0u8; 5];
        t.read_at(4096, &mut buf)?;
        assert_eq!(&buf, b"\0\0llo");
        let again = FileDestination::open(&path, 1 << 30)?;
        assert!(!again.known_zero());
        assert_eq!(
            again.size_bytes(),
            1 << 20,
            "an existing target is never resized"
        );
        Ok(())
    }
}
