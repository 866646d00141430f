//! The decoder and the recovery scan fed thousands of random, truncated and bit-flipped
//! inputs (deterministic PRNG): they must report problems, never panic. The same entry
//! points are the `cargo fuzz` targets in `fuzz/`.

use super::super::format::*;
use super::super::scan::scan_medium;
use super::support::Rng;

fn valid_medium() -> Vec<u8> {
    let mut out = Vec::new();
    let header = MediumHeader {
        journal_id: 1,
        medium_index: 0,
        flags: 0,
        capacity_bytes: 1 << 20,
        prev_valid_end_bytes: u64::MAX,
    };
    let mut h = RecordHeader {
        op: Op::MediumHeader,
        flags: FLAG_UNSEQUENCED,
        seq: 0,
        stream_id: 0,
        log_id: 0,
        timestamp_ns: 1,
        offset_bytes: 0,
        len_bytes: 0,
        payload_len_bytes: 0,
        payload_crc: 0,
    };
    encode_record(&mut out, h, &header.encode());
    for seq in 1..20u64 {
        h.op = Op::Write;
        h.flags = 0;
        h.seq = seq;
        h.offset_bytes = seq * 512;
        h.len_bytes = 512;
        encode_record(&mut out, h, &vec![seq as u8; 512]);
    }
    out
}

#[test]
fn decoder_survives_garbage() {
    let mut rng = Rng::new(0x1234_5678);
    let base = valid_medium();
    for round in 0..3000 {
        let mut input = match round % 3 {
            0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
            1 => base[..rng.below(base.len() as u64) as usize].to_vec(),
            _ => base.clone(),
        };
        for _ in 0..rng.below(8) {
            if !input.is_empty() {
                let i = rng.below(input.len() as u64) as usize;
                input[i] ^= 1 << rng.below(8);
            }
        }
        let _ = RecordHeader::decode(&input);
        let _ = decode_trailer(&input);
        let _ = StreamDef::decode(&input);
        let scan = scan_medium(input.as_slice());
        let scan = match scan {
            Ok(s) => s,
            Err(e) => panic!("scanning an in-memory medium cannot fail with I/O: {e}"),
        };
        assert!(scan.valid_end_bytes <= input.len() as u64);
    }
}

#[test]
fn scan_reports_torn_tail_and_bad_record_offsets() -> Result<(), Box<dyn std::error::Error>> {
    let mut m = valid_medium();
    let clean = scan_medium(m.as_slice())?;
    assert_eq!(clean.records.len(), 20);
    assert!(clean.problems.is_empty());
    // Corrupt the payload of the 5th record (position of record index 5).
    let pos5 = clean.records[5].position_bytes as usize;
    m[pos5 + 100] ^= 0xff;
    // Tear the tail: cut the last record in half.
    let last = clean.records[19].position_bytes as usize;
    m.truncate(last + 200);
    let scan = scan_medium(m.as_slice())?;
    assert_eq!(scan.problems.len(), 2, "{:?}", scan.problems);
    assert_eq!(scan.problems[0].offset_bytes, pos5 as u64);
    assert!(!scan.problems[0].torn_tail);
    assert_eq!(scan.problems[1].offset_bytes, last as u64);
    assert!(scan.problems[1].torn_tail);
    assert_eq!(scan.valid_end_bytes, last as u64);
    assert_eq!(scan.records.len(), 18);
    Ok(())
}
