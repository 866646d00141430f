//! Direct (`O_DIRECT`) appends to a medium: deciding whether a medium file is written around
//! the host page cache, and the reusable block-aligned staging buffer such appends are
//! copied into (the kernel refuses unaligned buffers and lengths for direct I/O).

use std::fs::File;
use std::os::fd::AsRawFd;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use super::format::BLOCK_BYTES;
use super::options::MediumCache;
use crate::volume::open::is_memory_backed;

/// One block of the staging buffer, aligned as direct I/O needs (4 KiB covers 512-byte and
/// 4 KiB logical blocks).
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct AlignedBlock([u8; BLOCK_BYTES]);

const _: () = assert!(std::mem::size_of::<AlignedBlock>() == BLOCK_BYTES);

/// A growable byte buffer whose start is 4 KiB aligned, reused from append to append so
/// its pages stay warm.
#[derive(Default)]
pub struct StagingBuffer {
    blocks: Vec<AlignedBlock>,
}

impl StagingBuffer {
    /// Copies `parts` one after the other into the buffer and returns them as one aligned
    /// slice. The total must be a whole number of blocks (media are appended in blocks).
    pub fn fill(&mut self, parts: &[&[u8]]) -> &[u8] {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let blocks = total.div_ceil(BLOCK_BYTES);
        if self.blocks.len() < blocks {
            self.blocks.resize(blocks, AlignedBlock([0; BLOCK_BYTES]));
        }
        let bytes = self.bytes_mut();
        let mut at = 0;
        for p in parts {
            bytes[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        &bytes[..total]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.blocks.len() * BLOCK_BYTES;
        // SAFETY: `AlignedBlock` is a `repr(C)` wrapper of a byte array whose size equals
        // its alignment (asserted above), so the Vec's blocks are `len` contiguous,
        // initialised bytes with no padding, borrowed mutably for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), len) }
    }
}

/// Switches `file` to direct I/O as `cache` asks. Returns whether it is direct then, or
/// the error when `cache=none` was asked for and the filesystem refuses.
/// `auto` keeps media on tmpfs buffered: there the page cache is the medium, and a staging
/// copy would only add a copy. (A device node lives on devtmpfs: block devices go direct.)
pub fn apply_cache_mode(file: &File, cache: MediumCache) -> std::io::Result<bool> {
    match cache {
        MediumCache::Writeback => Ok(false),
        MediumCache::Auto if !is_block_device(file) && is_memory_backed(file) => Ok(false),
        MediumCache::Auto => Ok(set_direct(file).is_ok()),
        MediumCache::None => set_direct(file).map(|()| true),
    }
}

fn is_block_device(file: &File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    file.metadata()
        .is_ok_and(|m| m.file_type().is_block_device())
}

fn set_direct(file: &File) -> std::io::Result<()> {
    update_status_flags(file, |flags| flags | OFlag::O_DIRECT)
}

/// Turns `O_DIRECT` off again (appends go through the page cache from then on).
pub fn clear_direct(file: &File) -> std::io::Result<()> {
    update_status_flags(file, |flags| flags - OFlag::O_DIRECT)
}

/// The file status flags of `file` (`F_GETFL`).
fn status_flags(file: &File) -> std::io::Result<OFlag> {
    let flags = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL)?;
    Ok(OFlag::from_bits_retain(flags))
}

fn update_status_flags(file: &File, change: impl FnOnce(OFlag) -> OFlag) -> std::io::Result<()> {
    let flags = change(status_flags(file)?);
    fcntl(file.as_raw_fd(), FcntlArg::F_SETFL(flags))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_is_aligned_and_holds_the_parts_in_order() {
        let mut staging = StagingBuffer::default();
        let a = vec![1u8; 100];
        let b = vec![2u8; BLOCK_BYTES * 2 - 100];
        let out = staging.fill(&[&a, &b, &[]]);
        assert_eq!(out.as_ptr() as usize % BLOCK_BYTES, 0);
        assert_eq!(out.len(), BLOCK_BYTES * 2);
        assert!(out[..100].iter().all(|&x| x == 1));
        assert!(out[100..].iter().all(|&x| x == 2));
        let small = staging.fill(&[&[3u8; BLOCK_BYTES]]);
        assert_eq!(small.len(), BLOCK_BYTES);
        assert!(small.iter().all(|&x| x == 3));
    }

    #[test]
    fn direct_can_be_turned_off_again() -> std::io::Result<()> {
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target"))?;
        let file = File::create(dir.path().join("medium"))?;
        if apply_cache_mode(&file, MediumCache::None).is_err() {
            return Ok(()); // this filesystem takes no O_DIRECT: nothing to turn off
        }
        assert!(status_flags(&file)?.contains(OFlag::O_DIRECT));
        clear_direct(&file)?;
        assert!(!status_flags(&file)?.contains(OFlag::O_DIRECT));
        Ok(())
    }

    #[test]
    fn writeback_never_goes_direct_and_auto_stays_buffered_on_tmpfs() -> std::io::Result<()> {
        let dir = std::path::Path::new("/dev/shm");
        if !dir.is_dir() {
            return Ok(());
        }
        let path = dir.join(format!("ferry-direct-test.{}", std::process::id()));
        let file = File::create(&path)?;
        let result = (
            apply_cache_mode(&file, MediumCache::Writeback),
            apply_cache_mode(&file, MediumCache::Auto),
        );
        std::fs::remove_file(&path)?;
        assert!(!result.0?);
        assert!(!result.1?);
        Ok(())
    }
}
