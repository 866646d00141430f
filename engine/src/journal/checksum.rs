//! CRC32C (Castagnoli), the checksum of journal records and of the catalog, computed in one
//! place. `crc-fast` folds with carry-less multiplication (PCLMULQDQ, VPCLMULQDQ with
//! AVX-512 where the CPU has it), several times faster than the SSE4.2 `crc32` instruction
//! on a 4 KiB payload, and the journal computes one per guest write on the hot path
//! (`benches/journal-notes.md`, *The payload's CRC32C*).

/// The CRC32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc_fast::crc32_iscsi(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same values as an independent implementation (the `crc32c` crate), on lengths
    /// around the folding widths.
    #[test]
    fn agrees_with_an_independent_crc32c() {
        let data: Vec<u8> = (0..9000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in [
            0, 1, 7, 8, 15, 16, 31, 63, 64, 127, 255, 256, 511, 4095, 4096, 4097, 9000,
        ] {
            let bytes = &data[..len];
            assert_eq!(crc32c(bytes), crc32c::crc32c(bytes), "length {len}");
        }
        // The check value of CRC-32/ISCSI.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
