//! Golden-byte tests of the record format: the exact bytes of a header and of a record.

use super::super::error::FormatError;
use super::super::format::*;

fn sample() -> RecordHeader {
    RecordHeader {
        op: Op::Write,
        flags: 0,
        seq: 0x0102_0304_0506_0708,
        stream_id: 3,
        log_id: 2,
        timestamp_ns: 1_700_000_000_000_000_000,
        offset_bytes: 4096,
        len_bytes: 8,
        payload_len_bytes: 0,
        payload_crc: 0,
    }
}

#[test]
fn header_bytes_are_exactly_as_documented() {
    let mut out = Vec::new();
    encode_record(&mut out, sample(), b"ABCDEFGH");
    let payload_crc = crc32c::crc32c(b"ABCDEFGH");
    let mut expected = Vec::new();
    expected.extend_from_slice(b"FJRN"); // magic
    expected.extend_from_slice(&[2, 0]); // version
    expected.push(1); // op = write
    expected.push(0); // flags
    expected.extend_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]); // seq
    expected.extend_from_slice(&[3, 0, 0, 0]); // stream id
    expected.extend_from_slice(&[2, 0, 0, 0]); // log id
    expected.extend_from_slice(&1_700_000_000_000_000_000u64.to_le_bytes());
    expected.extend_from_slice(&[0, 0x10, 0, 0, 0, 0, 0, 0]); // offset 4096
    expected.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]); // len
    expected.extend_from_slice(&[8, 0, 0, 0]); // payload len
    expected.extend_from_slice(&payload_crc.to_le_bytes());
    expected.extend_from_slice(&[0, 0, 0, 0]); // reserved
    let header_crc = crc32c::crc32c(&expected[0..60]);
    expected.extend_from_slice(&header_crc.to_le_bytes());
    expected.extend_from_slice(b"ABCDEFGH");
    assert_eq!(out, expected);
    assert_eq!(out.len(), 72);
}

#[test]
fn pinned_header_checksum() {
    let bytes = sample().encode();
    let crc = u32::from_le_bytes([bytes[60], bytes[61], bytes[62], bytes[63]]);
    assert_eq!(crc, crc32c::crc32c(&bytes[..60]));
    assert_eq!(format!("{crc:08x}"), PINNED_HEADER_CRC);
}

const PINNED_HEADER_CRC: &str = "f0d44db1";

#[test]
fn records_round_trip_and_align() -> Result<(), FormatError> {
    let mut out = Vec::new();
    encode_record(&mut out, sample(), b"abc");
    assert_eq!(out.len(), 72, "3 payload bytes pad to 8");
    let h = RecordHeader::decode(&out)?;
    assert_eq!(h.payload_len_bytes, 3);
    h.check_payload(&out[64..67])?;
    assert_eq!(h.seq, sample().seq);
    Ok(())
}

#[test]
fn padding_reaches_the_next_block() {
    for len in [0usize, 8, 64, 4032, 4040, 4088, 4096, 5000] {
        let pad = padding_needed(len);
        assert_eq!((len + pad) % BLOCK_BYTES, 0, "len {len}");
        assert!(pad == 0 || pad >= HEADER_BYTES);
        if pad > 0 {
            assert_eq!(padding_record(pad, 1, 0).len(), pad);
        }
    }
}

#[test]
fn payload_codecs_round_trip() -> Result<(), FormatError> {
    let m = MediumHeader {
        journal_id: 9,
        medium_index: 4,
        flags: 1,
        capacity_bytes: 1 << 20,
        prev_valid_end_bytes: 12288,
    };
    assert_eq!(MediumHeader::decode(&m.encode())?, m);
    let s = StreamDef {
        volume: "vda".into(),
        queue_index: 1,
    };
    assert_eq!(s.encode(), vec![1, 0, 3, 0, b'v', b'd', b'a']);
    assert_eq!(StreamDef::decode(&s.encode())?, s);
    let g = GapInfo {
        first_missing_seq: 5,
        missing_count: 2,
    };
    assert_eq!(GapInfo::decode(&g.encode())?, g);
    Ok(())
}

#[test]
fn trailer_room_counts_every_trailer_record() {
    use crate::journal::format::{
        record_bytes, trailer_records_bytes, TRAILER_ENTRIES_PER_RECORD, TRAILER_ENTRY_BYTES,
    };
    let full = record_bytes(TRAILER_ENTRIES_PER_RECORD * TRAILER_ENTRY_BYTES);
    assert_eq!(trailer_records_bytes(0), record_bytes(0));
    assert_eq!(
        trailer_records_bytes(3),
        record_bytes(3 * TRAILER_ENTRY_BYTES)
    );
    assert_eq!(trailer_records_bytes(TRAILER_ENTRIES_PER_RECORD), full);
    assert_eq!(
        trailer_records_bytes(2 * TRAILER_ENTRIES_PER_RECORD + 1),
        2 * full + record_bytes(TRAILER_ENTRY_BYTES)
    );
}

/// A trailer record that another follows: op 10, flags UNSEQUENCED | CONTINUES (0x84), then
/// 56-byte entries exactly as `docs/journal.md` lays them out.
#[test]
fn continued_trailer_bytes_are_exactly_as_documented() -> Result<(), FormatError> {
    use crate::journal::entry::LogEntry;
    let entry = LogEntry {
        seq: 9,
        stream_id: 1,
        log_id: 2,
        timestamp_ns: 3,
        op: Op::Write,
        offset_bytes: 4096,
        len_bytes: 512,
        medium: 4,
        position_bytes: 8192,
    };
    let mut payload = Vec::new();
    encode_trailer_entry(&mut payload, &entry);
    let mut expected_entry = Vec::new();
    expected_entry.extend_from_slice(&9u64.to_le_bytes()); // seq
    expected_entry.extend_from_slice(&1u32.to_le_bytes()); // stream
    expected_entry.extend_from_slice(&2u32.to_le_bytes()); // log id
    expected_entry.extend_from_slice(&3u64.to_le_bytes()); // timestamp
    expected_entry.extend_from_slice(&[1, 0, 0, 0]); // op write, 3 zero bytes
    expected_entry.extend_from_slice(&4u32.to_le_bytes()); // medium
    expected_entry.extend_from_slice(&4096u64.to_le_bytes()); // offset
    expected_entry.extend_from_slice(&512u64.to_le_bytes()); // length
    expected_entry.extend_from_slice(&8192u64.to_le_bytes()); // position
    assert_eq!(payload, expected_entry);
    assert_eq!(decode_trailer(&payload)?, vec![entry]);

    let header = RecordHeader {
        op: Op::Trailer,
        flags: FLAG_UNSEQUENCED | FLAG_TRAILER_CONTINUES,
        seq: 9,
        stream_id: 0,
        log_id: 0,
        timestamp_ns: 0,
        offset_bytes: 0,
        len_bytes: 0,
        payload_len_bytes: 0,
        payload_crc: 0,
    };
    let mut out = Vec::new();
    encode_record(&mut out, header, &payload);
    assert_eq!(&out[6..8], &[10, 0x84]); // op trailer, flags
    assert_eq!(out.len(), record_bytes(TRAILER_ENTRY_BYTES));
    assert_eq!(RecordHeader::decode(&out[..HEADER_BYTES])?.flags, 0x84);
    Ok(())
}
