//! The virtio-blk configuration space and feature bits ferry offers (virtio 1.2, 5.2.3-5.2.4).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use ferry_engine::SECTOR_SIZE;

use crate::request::{SEG_MAX, SIZE_MAX};

/// The unit of virtio-blk sector numbers and lengths, whatever the logical block size, as
/// the `u32` the configuration space counts in.
const SECTOR_BYTES: u32 = SECTOR_SIZE as u32;
/// The logical block size reported to the guest unless a volume sets `logical-block-size=`:
/// one sector.
pub const LOGICAL_BLOCK_BYTES_DEFAULT: u32 = SECTOR_BYTES;
/// The largest logical block size accepted (the NBD protocol's largest minimum block size;
/// Linux guests take at most their page size).
pub const LOGICAL_BLOCK_BYTES_MAX: u32 = 64 << 10;
/// The physical block size reported (as a multiple of the logical one): 4 KiB, or the
/// logical block if that is larger.
const PHYSICAL_BLOCK_BYTES: u32 = 4096;
/// The largest discard / write-zeroes the guest may send, in sectors (1 GiB).
pub const DISCARD_SECTORS_MAX: u32 = 1 << 21;

/// Checks a `logical-block-size=` value: a power of two from one sector to 64 KiB.
pub fn check_logical_block_bytes(bytes: u32) -> Result<(), String> {
    if bytes.is_power_of_two() && (SECTOR_BYTES..=LOGICAL_BLOCK_BYTES_MAX).contains(&bytes) {
        Ok(())
    } else {
        Err(format!(
            "logical-block-size={bytes}: expected a power of two from {SECTOR_BYTES} to {LOGICAL_BLOCK_BYTES_MAX}"
        ))
    }
}

/// Whether a request's byte range is whole logical blocks (the guest must send them so).
pub fn is_block_aligned(offset_bytes: u64, len_bytes: u64, logical_block_bytes: u32) -> bool {
    let block = u64::from(logical_block_bytes);
    offset_bytes.is_multiple_of(block) && len_bytes.is_multiple_of(block)
}

/// Offsets into `struct virtio_blk_config`.
pub mod offset {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    pub const MIN_IO_SIZE: usize = 26;
    pub const WRITEBACK: usize = 32;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    /// Bytes up to and including `unused1`.
    pub const END: usize = 60;
}

/// The virtio feature bits offered for a volume.
pub fn device_features(read_only: bool) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | 1 << bit);
    if read_only {
        bits |= 1 << VIRTIO_BLK_F_RO;
    } else {
        bits |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    bits
}

/// Encodes the configuration space of a volume of `capacity_sectors` (512-byte units, as
/// virtio-blk counts) with `logical_block_bytes` blocks (checked by
/// [`check_logical_block_bytes`]).
pub fn config_space(
    capacity_sectors: u64,
    num_queues: u16,
    writeback: bool,
    logical_block_bytes: u32,
) -> [u8; offset::END] {
    let physical_blocks = (PHYSICAL_BLOCK_BYTES / logical_block_bytes).max(1);
    let physical_block_exp = physical_blocks.trailing_zeros() as u8;
    // Discards are best aligned to the physical block, in sectors.
    let discard_alignment_sectors = (logical_block_bytes * physical_blocks) / SECTOR_BYTES;
    let mut c = [0u8; offset::END];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(offset::CAPACITY, &capacity_sectors.to_le_bytes());
    put(offset::SIZE_MAX, &SIZE_MAX.to_le_bytes());
    put(offset::SEG_MAX, &SEG_MAX.to_le_bytes());
    put(offset::BLK_SIZE, &logical_block_bytes.to_le_bytes());
    put(offset::PHYSICAL_BLOCK_EXP, &[physical_block_exp]);
    // In logical blocks.
    put(offset::MIN_IO_SIZE, &(physical_blocks as u16).to_le_bytes());
    put(offset::WRITEBACK, &[u8::from(writeback)]);
    put(offset::NUM_QUEUES, &num_queues.to_le_bytes());
    put(
        offset::MAX_DISCARD_SECTORS,
        &DISCARD_SECTORS_MAX.to_le_bytes(),
    );
    put(offset::MAX_DISCARD_SEG, &1u32.to_le_bytes());
    put(
        offset::DISCARD_SECTOR_ALIGNMENT,
        &discard_alignment_sectors.to_le_bytes(),
    );
    put(
        offset::MAX_WRITE_ZEROES_SECTORS,
        &DISCARD_SECTORS_MAX.to_le_bytes(),
    );
    put(offset::MAX_WRITE_ZEROES_SEG, &1u32.to_le_bytes());
    put(offset::WRITE_ZEROES_MAY_UNMAP, &[1]);
    c
}

/// Returns `size` bytes of `space` from `offset`, zero-padded past its end (frontends may
/// ask for a newer, larger `virtio_blk_config` than ferry fills in).
pub fn read_config(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(space.len());
    let end = (offset as usize)
        .saturating_add(size as usize)
        .min(space.len());
    out[..end - start].copy_from_slice(&space[start..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_golden_bytes() {
        let c = config_space(2048, 2, true, 512);
        assert_eq!(&c[0..8], &2048u64.to_le_bytes());
        assert_eq!(&c[8..12], &(256u32 * 1024).to_le_bytes());
        assert_eq!(&c[12..16], &126u32.to_le_bytes());
        assert_eq!(&c[20..24], &512u32.to_le_bytes());
        // 4 KiB physical blocks: 2^3 logical blocks, the minimum I/O size 8 of them.
        assert_eq!(c[24], 3);
        assert_eq!(&c[26..28], &8u16.to_le_bytes());
        assert_eq!(c[32], 1);
        assert_eq!(&c[34..36], &2u16.to_le_bytes());
        assert_eq!(&c[44..48], &8u32.to_le_bytes());
        assert_eq!(c[56], 1);
    }

    #[test]
    fn config_of_larger_logical_blocks() {
        // 4 KiB logical blocks: capacity still in 512-byte sectors, the physical block is
        // the logical one, discards aligned to it (8 sectors).
        let c = config_space(2048, 1, false, 4096);
        assert_eq!(&c[0..8], &2048u64.to_le_bytes());
        assert_eq!(&c[20..24], &4096u32.to_le_bytes());
        assert_eq!(c[24], 0);
        assert_eq!(&c[26..28], &1u16.to_le_bytes());
        assert_eq!(&c[44..48], &8u32.to_le_bytes());
        let c = config_space(2048, 1, false, 65536);
        assert_eq!(&c[20..24], &65536u32.to_le_bytes());
        assert_eq!(c[24], 0);
        assert_eq!(&c[44..48], &128u32.to_le_bytes());
        let c = config_space(2048, 1, false, 1024);
        assert_eq!(c[24], 2);
        assert_eq!(&c[26..28], &4u16.to_le_bytes());
    }

    #[test]
    fn logical_block_sizes_accepted() {
        for ok in [512, 1024, 4096, 65536] {
            assert!(check_logical_block_bytes(ok).is_ok(), "{ok}");
        }
        for bad in [0, 256, 1000, 3072, 131072] {
            assert!(check_logical_block_bytes(bad).is_err(), "{bad}");
        }
        assert!(is_block_aligned(8192, 4096, 4096));
        assert!(!is_block_aligned(512, 4096, 4096));
        assert!(!is_block_aligned(4096, 512, 4096));
        assert!(is_block_aligned(512, 512, 512));
    }

    #[test]
    fn reads_past_the_end_as_zeros() {
        let c = config_space(8, 1, false, 512);
        assert_eq!(read_config(&c, 56, 8), vec![1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(read_config(&c, 1000, 4), vec![0; 4]);
    }

    #[test]
    fn read_only_offers_no_discard() {
        let f = device_features(true);
        assert_ne!(f & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_DISCARD, 0);
    }
}
