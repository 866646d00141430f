//! An NBD export's size constraints (NBD protocol, "Size constraints" and `NBD_INFO_BLOCK_SIZE`):
//! checking what a server advertises, and the request sizes ferry derives from it.
//!
//! ferry asks for `NBD_INFO_BLOCK_SIZE` in every `NBD_OPT_GO`, which commits it to the
//! constraints the server sends: every request's offset and length a multiple of the minimum
//! block size, and no READ or WRITE payload above the maximum. ferry's requests are whole
//! 512-byte sectors (volume offsets, lengths and merge offsets are sector multiples), or whole
//! logical blocks of a volume that sets a larger one (virtio-blk `blk_size`,
//! `logical-block-size=`), so an export whose minimum block size is larger than that is
//! refused at connect rather than sent requests it may not take.

use super::protocol::InfoBlockSize;

/// The largest minimum block size the protocol allows (2^16).
const BLOCK_BYTES_MIN_LIMIT: u32 = 1 << 16;
/// A maximum payload of this value means the server has no fixed limit.
const PAYLOAD_UNLIMITED: u32 = u32::MAX;
/// The granularity of every request ferry sends: a sector (see the module comment).
pub(crate) const REQUEST_ALIGN_BYTES: u64 = crate::SECTOR_SIZE;
/// ferry's own bound on one request: the payload of a READ or WRITE, and the effect length of
/// a WRITE_ZEROES or TRIM. 32 MiB is the protocol's default maximum payload, what servers
/// must not treat as a denial of service, and qemu's limit.
pub(crate) const REQUEST_BYTES_MAX: u64 = 32 << 20;
const _: () = assert!(REQUEST_BYTES_MAX.is_multiple_of(BLOCK_BYTES_MIN_LIMIT as u64));
const _: () = assert!(REQUEST_BYTES_MAX.is_multiple_of(REQUEST_ALIGN_BYTES));

/// An export's size constraints: what the server sent in `NBD_INFO_BLOCK_SIZE`, or the
/// protocol's defaults when it sent none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BlockSizes {
    /// Requests' offsets and lengths are multiples of this (a power of 2, at most 64 KiB).
    pub block_bytes_min: u32,
    /// Requests aligned to this avoid read-modify-write on the server (a power of 2).
    pub block_bytes_preferred: u32,
    /// The largest READ or WRITE payload the server takes (4294967295: no fixed limit).
    pub payload_bytes_max: u32,
    /// False when the server sent no `NBD_INFO_BLOCK_SIZE` and these are the defaults.
    pub advertised: bool,
}

impl BlockSizes {
    /// What a server that advertises nothing supports (NBD protocol, "Size constraints"):
    /// a minimum block size of 1, a preferred one of 4 KiB, payloads of at least 32 MiB.
    pub const DEFAULT: Self = Self {
        block_bytes_min: 1,
        block_bytes_preferred: 4096,
        payload_bytes_max: REQUEST_BYTES_MAX as u32,
        advertised: false,
    };

    /// The constraints of an `NBD_INFO_BLOCK_SIZE` information reply, checked against the
    /// protocol: the minimum a power of 2 no larger than 64 KiB, the preferred size a power
    /// of 2 no smaller than the minimum, the maximum payload a multiple of the minimum (or
    /// 0xffffffff, no limit).
    ///
    /// Not checked: that the maximum payload is at least the preferred size (the protocol
    /// text asks for it). qemu's client does not check it either, and qemu's server
    /// advertises a preferred size of at least 4 KiB next to a maximum payload that follows
    /// its block layer's `max-transfer`, which may be smaller; ferry uses the preferred size
    /// for nothing but reports.
    pub(crate) fn from_info(info: InfoBlockSize) -> Result<Self, String> {
        let sizes = Self {
            block_bytes_min: info.block_bytes_min,
            block_bytes_preferred: info.block_bytes_preferred,
            payload_bytes_max: info.payload_bytes_max,
            advertised: true,
        };
        sizes.validate()?;
        Ok(sizes)
    }

    fn validate(&self) -> Result<(), String> {
        let (min, preferred, max) = (
            self.block_bytes_min,
            self.block_bytes_preferred,
            self.payload_bytes_max,
        );
        if !min.is_power_of_two() || min > BLOCK_BYTES_MIN_LIMIT {
            return Err(format!(
                "the server's minimum block size {min} is not a power of 2 of at most \
                 {BLOCK_BYTES_MIN_LIMIT}"
            ));
        }
        if !preferred.is_power_of_two() || preferred < min {
            return Err(format!(
                "the server's preferred block size {preferred} is not a power of 2 of at \
                 least its minimum block size {min}"
            ));
        }
        if max < min || (!max.is_multiple_of(min) && max != PAYLOAD_UNLIMITED) {
            return Err(format!(
                "the server's maximum payload {max} is not a multiple of its minimum block \
                 size {min}"
            ));
        }
        Ok(())
    }

    /// Refuses constraints that requests in whole multiples of `request_bytes` (a power of
    /// two, at least a sector: the smallest logical block of the volumes the requests come
    /// from) cannot meet: a larger minimum block size, or a maximum payload below one block.
    /// The reason names both sizes.
    pub(crate) fn check_usable(&self, request_bytes: u64) -> Result<(), String> {
        if u64::from(self.block_bytes_min) > request_bytes {
            return Err(format!(
                "the export's minimum block size is {} bytes; ferry's volumes take \
                 {request_bytes}-byte requests",
                self.block_bytes_min
            ));
        }
        if u64::from(self.payload_bytes_max) < request_bytes {
            return Err(format!(
                "the export's maximum payload is {} bytes; ferry's volumes take \
                 {request_bytes}-byte requests",
                self.payload_bytes_max
            ));
        }
        Ok(())
    }

    /// What every request's offset and length are a multiple of: the minimum block size,
    /// and at least a sector.
    fn align_bytes(&self) -> u64 {
        u64::from(self.block_bytes_min).max(REQUEST_ALIGN_BYTES)
    }

    /// The largest READ or WRITE ferry sends: the maximum payload, at most
    /// [`REQUEST_BYTES_MAX`], rounded down to the alignment so that every piece of a split
    /// request stays aligned. Never below the alignment ([`check_usable`](Self::check_usable)
    /// refuses a maximum payload below a sector).
    pub(crate) fn request_bytes_max(&self) -> u64 {
        let align = self.align_bytes();
        let max = u64::from(self.payload_bytes_max).min(REQUEST_BYTES_MAX);
        (max / align * align).max(align)
    }

    /// The largest effect length of a WRITE_ZEROES or TRIM. The protocol lets these exceed
    /// the maximum payload (they carry none), though a server may refuse one that would cost
    /// it more than a request of the maximum payload; ferry keeps them at
    /// [`REQUEST_BYTES_MAX`] (or the maximum payload, if larger), rounded down to the
    /// alignment. qemu's client splits write-zeroes at the maximum payload and trims at 2 GiB.
    pub(crate) fn effect_bytes_max(&self) -> u64 {
        let align = self.align_bytes();
        let max = self.request_bytes_max().max(REQUEST_BYTES_MAX);
        max / align * align
    }

    /// True when `offset_bytes` and `len_bytes` are multiples of the minimum block size.
    pub(crate) fn is_aligned(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        let min = u64::from(self.block_bytes_min);
        offset_bytes.is_multiple_of(min) && len_bytes.is_multiple_of(min)
    }
}

impl std::fmt::Display for BlockSizes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "minimum block {} bytes, preferred block {} bytes, maximum payload {} bytes ({})",
            self.block_bytes_min,
            self.block_bytes_preferred,
            self.payload_bytes_max,
            if self.advertised {
                "advertised"
            } else {
                "protocol defaults: the server advertised none"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(min: u32, preferred: u32, max: u32) -> Result<BlockSizes, String> {
        BlockSizes::from_info(InfoBlockSize {
            block_bytes_min: min,
            block_bytes_preferred: preferred,
            payload_bytes_max: max,
        })
    }

    #[test]
    fn parses_advertised_sizes() -> Result<(), String> {
        let sizes = parse(512, 4096, 1 << 20)?;
        assert_eq!(
            sizes,
            BlockSizes {
                block_bytes_min: 512,
                block_bytes_preferred: 4096,
                payload_bytes_max: 1 << 20,
                advertised: true,
            }
        );
        assert_eq!(sizes.request_bytes_max(), 1 << 20);
        assert_eq!(sizes.effect_bytes_max(), 32 << 20);
        sizes.check_usable(REQUEST_ALIGN_BYTES)?;
        Ok(())
    }

    #[test]
    fn refuses_sizes_against_the_protocol() {
        for (min, preferred, max, says) in [
            (0, 4096, 1 << 20, "minimum block size 0"),
            (3, 4096, 1 << 20, "minimum block size 3"),
            (1 << 17, 1 << 17, 1 << 20, "minimum block size 131072"),
            (512, 256, 1 << 20, "preferred block size 256"),
            (512, 3000, 1 << 20, "preferred block size 3000"),
            (4096, 4096, 1_000_000, "maximum payload 1000000"),
            (4096, 4096, 0, "maximum payload 0"),
            (4096, 4096, 2048, "maximum payload 2048"),
        ] {
            match parse(min, preferred, max) {
                Err(reason) => assert!(reason.contains(says), "{reason:?} lacks {says:?}"),
                Ok(sizes) => panic!("{sizes:?} was accepted"),
            }
        }
    }

    #[test]
    fn accepts_what_servers_send() -> Result<(), String> {
        // nbdkit without limits; qemu over blkdebug max-transfer=1024 (below its preferred).
        for (min, preferred, max) in [(1, 4096, u32::MAX), (1, 4096, 1024), (512, 512, 512)] {
            let sizes = parse(min, preferred, max)?;
            sizes.check_usable(REQUEST_ALIGN_BYTES)?;
        }
        Ok(())
    }

    #[test]
    fn the_defaults_are_the_protocols() {
        let d = BlockSizes::DEFAULT;
        assert_eq!(
            (
                d.block_bytes_min,
                d.block_bytes_preferred,
                d.payload_bytes_max
            ),
            (1, 4096, 32 << 20)
        );
        assert!(!d.advertised);
        assert_eq!(d.request_bytes_max(), 32 << 20);
        assert_eq!(d.effect_bytes_max(), 32 << 20);
        assert!(d.check_usable(REQUEST_ALIGN_BYTES).is_ok());
        assert!(d.to_string().contains("defaults"));
    }

    #[test]
    fn request_sizes_stay_aligned_and_bounded() -> Result<(), String> {
        // No fixed limit: ferry still sends at most 32 MiB.
        let unlimited = parse(1, 4096, u32::MAX)?;
        assert_eq!(unlimited.request_bytes_max(), 32 << 20);
        assert_eq!(unlimited.effect_bytes_max(), 32 << 20);
        // A maximum that is no multiple of a sector: pieces stay whole sectors.
        let odd = parse(1, 4096, 1_000_000)?;
        assert_eq!(odd.request_bytes_max(), 1_000_000 / 512 * 512);
        assert!(odd.is_aligned(0, 3));
        let sector = parse(512, 4096, 1 << 20)?;
        assert!(sector.is_aligned(4096, 512));
        assert!(!sector.is_aligned(4096, 100));
        assert!(!sector.is_aligned(100, 512));
        Ok(())
    }

    #[test]
    fn refuses_what_ferry_cannot_honour_naming_both_sizes() -> Result<(), String> {
        let big_blocks = parse(4096, 4096, 1 << 20)?;
        let reason = big_blocks
            .check_usable(REQUEST_ALIGN_BYTES)
            .err()
            .unwrap_or_default();
        assert_eq!(
            reason,
            "the export's minimum block size is 4096 bytes; ferry's volumes take 512-byte requests"
        );
        let tiny_payload = parse(1, 4096, 256)?;
        let reason = tiny_payload
            .check_usable(REQUEST_ALIGN_BYTES)
            .err()
            .unwrap_or_default();
        assert!(reason.contains("maximum payload is 256 bytes"), "{reason}");
        Ok(())
    }
}
