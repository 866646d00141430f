//! The `base:allocation` metadata context: which extents of a volume are allocated in its
//! image, found with `lseek(SEEK_DATA)`/`lseek(SEEK_HOLE)` on the image file, so that a
//! client copies only data (`qemu-img convert`, `qemu-img map`, `nbdcopy`).
//!
//! A hole reads as zeroes (`NBD_STATE_HOLE | NBD_STATE_ZERO`); everything else is reported
//! allocated (state 0), which is always true enough: the protocol lets a server report
//! data where it does not know. So are block devices and NBD backings, whose allocation
//! this server does not look into. Extent boundaries inside a block are rounded so that a
//! hole never covers part of an allocated block.

use std::os::fd::AsRawFd;

use nix::unistd::{lseek, Whence};

use crate::nbd::protocol::{BlockDescriptor, NBD_STATE_HOLE, NBD_STATE_ZERO};
use crate::volume::Backing;

/// The most descriptors one block status reply carries (the client asks again for the
/// rest).
pub const DESCRIPTORS_MAX: usize = 1024;
/// A hole reads as zeroes.
const HOLE: u32 = NBD_STATE_HOLE | NBD_STATE_ZERO;

/// Fills `out` with the extents from `offset_bytes` of the volume (relative to the
/// volume), covering at most `len_bytes` (at least one extent, at most `max` extents);
/// boundaries fall on multiples of `block_bytes`, which divides `offset_bytes` and
/// `len_bytes`.
pub(crate) fn extents(
    backing: &Backing,
    offset_bytes: u64,
    len_bytes: u32,
    block_bytes: u64,
    max: usize,
    out: &mut Vec<BlockDescriptor>,
) {
    out.clear();
    let end = offset_bytes + u64::from(len_bytes);
    let file = match backing.file() {
        Some(image) if !image.is_block_device => &image.file,
        _ => {
            push(out, len_bytes, 0);
            return;
        }
    };
    let base = backing.base_offset_bytes;
    let mut at = offset_bytes;
    while at < end && out.len() < max {
        let Some((next, flags)) = next_extent(file, base + at, base + end) else {
            // lseek failed (a file system without SEEK_DATA answers as if all data).
            push(out, (end - at) as u32, 0);
            break;
        };
        let mut next = next - base;
        if flags == HOLE {
            // A hole ends on a block boundary (the rest of its block is data).
            next = (next / block_bytes * block_bytes).max(at);
        } else {
            next = next.div_ceil(block_bytes) * block_bytes;
        }
        let next = next.min(end);
        if next == at {
            // A hole smaller than a block: report the block as data.
            let data_end = (at + block_bytes).min(end);
            push(out, (data_end - at) as u32, 0);
            at = data_end;
            continue;
        }
        push(out, (next - at) as u32, flags);
        at = next;
    }
}

/// Appends an extent, merged with the last one when their states are equal.
fn push(out: &mut Vec<BlockDescriptor>, len_bytes: u32, flags: u32) {
    if let Some(last) = out.last_mut() {
        if last.flags == flags {
            last.len_bytes += len_bytes;
            return;
        }
    }
    out.push(BlockDescriptor { len_bytes, flags });
}

/// The end of the extent at the absolute offset `at` (bounded by `end`) and its state;
/// `None` when the file system cannot tell.
fn next_extent(file: &impl AsRawFd, at: u64, end: u64) -> Option<(u64, u32)> {
    let fd = file.as_raw_fd();
    let offset = i64::try_from(at).ok()?;
    match lseek(fd, offset, Whence::SeekData) {
        // No data after `at`: a hole up to the end of the file (and so of the range).
        Err(nix::errno::Errno::ENXIO) => Some((end, HOLE)),
        Err(_) => None,
        Ok(data) if data as u64 > at => Some(((data as u64).min(end), HOLE)),
        Ok(_) => match lseek(fd, offset, Whence::SeekHole) {
            Ok(hole) => Some(((hole as u64).clamp(at + 1, end), 0)),
            Err(_) => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{BackingKind, FileImage};
    use std::os::unix::fs::FileExt;

    fn backing(file: std::fs::File, base: u64, len: u64) -> Backing {
        Backing {
            path: "test".into(),
            kind: BackingKind::File(FileImage {
                file,
                buffered: None,
                is_block_device: false,
                memory_backed: false,
            }),
            base_offset_bytes: base,
            len_bytes: len,
        }
    }

    fn sparse_file(len: u64, data_at: &[u64]) -> std::io::Result<std::fs::File> {
        let file = tempfile::tempfile()?;
        file.set_len(len)?;
        for &at in data_at {
            file.write_all_at(&[0xa5; 4096], at)?;
        }
        Ok(file)
    }

    #[test]
    fn reports_holes_and_data() -> std::io::Result<()> {
        const MIB: u64 = 1 << 20;
        let b = backing(sparse_file(4 * MIB, &[MIB])?, 0, 4 * MIB);
        let mut out = Vec::new();
        extents(&b, 0, (4 * MIB) as u32, 512, DESCRIPTORS_MAX, &mut out);
        let total: u64 = out.iter().map(|d| u64::from(d.len_bytes)).sum();
        assert_eq!(total, 4 * MIB, "{out:?}");
        // Whatever the file system's allocation unit, the written block is data and the
        // start and the end are holes.
        assert_eq!(out.first().map(|d| d.flags), Some(HOLE), "{out:?}");
        assert_eq!(out.last().map(|d| d.flags), Some(HOLE), "{out:?}");
        assert!(out.iter().any(|d| d.flags == 0), "{out:?}");
        extents(&b, MIB, 4096, 512, DESCRIPTORS_MAX, &mut out);
        assert_eq!(
            out,
            vec![BlockDescriptor {
                len_bytes: 4096,
                flags: 0
            }]
        );
        extents(&b, 0, (4 * MIB) as u32, 512, 1, &mut out);
        assert_eq!(out.len(), 1);
        Ok(())
    }

    #[test]
    fn follows_the_volume_slice_of_the_image() -> std::io::Result<()> {
        const MIB: u64 = 1 << 20;
        let b = backing(sparse_file(8 * MIB, &[4 * MIB])?, 4 * MIB, 4 * MIB);
        let mut out = Vec::new();
        extents(&b, 0, 4096, 512, DESCRIPTORS_MAX, &mut out);
        assert_eq!(
            out,
            vec![BlockDescriptor {
                len_bytes: 4096,
                flags: 0
            }]
        );
        extents(&b, 2 * MIB, MIB as u32, 512, DESCRIPTORS_MAX, &mut out);
        assert_eq!(
            out,
            vec![BlockDescriptor {
                len_bytes: MIB as u32,
                flags: HOLE
            }]
        );
        Ok(())
    }
}
