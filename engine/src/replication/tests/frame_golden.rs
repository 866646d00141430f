//! Every frame kind against bytes written by hand from `docs/replication.md`, and the
//! decoder's refusals of truncated, corrupted and oversized frames.

use crate::replication::frame::*;

/// A header written field by field as the document draws it, with the CRC32C filled in by an
/// independent implementation (the `crc32c` crate). The arguments are the header's fields in
/// the document's order, so each call reads like a row of its table.
#[allow(clippy::too_many_arguments)]
fn golden(
    kind: u8,
    flags: u8,
    seq: u64,
    volume: u32,
    ts: u64,
    off: u64,
    len: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"FRPL"); // 0..4 magic
    b.extend_from_slice(&[1, 0]); // 4..6 version 1
    b.push(kind); // 6 kind
    b.push(flags); // 7 flags
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes()); // 8..12 payload length
    b.extend_from_slice(&[0; 4]); // 12..16 CRC32C, filled below
    b.extend_from_slice(&seq.to_le_bytes()); // 16..24 sequence
    b.extend_from_slice(&volume.to_le_bytes()); // 24..28 volume index
    b.extend_from_slice(&[0; 4]); // 28..32 reserved
    b.extend_from_slice(&ts.to_le_bytes()); // 32..40 timestamp
    b.extend_from_slice(&off.to_le_bytes()); // 40..48 offset (applied sequence in an ack)
    b.extend_from_slice(&len.to_le_bytes()); // 48..56 length
    b.extend_from_slice(payload);
    let crc = crc32c::crc32c(&b);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    b
}

fn roundtrip(frame: Frame, expected: Vec<u8>) {
    assert_eq!(frame.encode(), expected, "encoding of {frame:?}");
    assert_eq!(Frame::decode(&expected), Ok((frame, expected.len())));
}

#[test]
fn write_record() {
    let data = vec![0xab; 4096];
    let f = Frame::Record(Record {
        seq: 7,
        volume_index: 1,
        timestamp_ns: 1_700_000_000_123_456_789,
        op: RecordOp::Write {
            offset_bytes: 8192,
            data: data.clone(),
        },
    });
    roundtrip(
        f,
        golden(1, 0, 7, 1, 1_700_000_000_123_456_789, 8192, 4096, &data),
    );
}

#[test]
fn write_record_exact_bytes() {
    let f = Frame::Record(Record {
        seq: 1,
        volume_index: 0,
        timestamp_ns: 2,
        op: RecordOp::Write {
            offset_bytes: 512,
            data: vec![0x5a; 4],
        },
    });
    #[rustfmt::skip]
    let expected: Vec<u8> = vec![
        0x46, 0x52, 0x50, 0x4c, 0x01, 0x00, 0x01, 0x00, // "FRPL", version 1, write, no flags
        0x04, 0x00, 0x00, 0x00, 0xd3, 0xbd, 0xa6, 0xdc, // payload 4 bytes, CRC32C (docs/replication.md)
        0x01, 0, 0, 0, 0, 0, 0, 0,                      // sequence 1
        0, 0, 0, 0, 0, 0, 0, 0,                         // volume 0, reserved
        0x02, 0, 0, 0, 0, 0, 0, 0,                      // timestamp 2 ns
        0x00, 0x02, 0, 0, 0, 0, 0, 0,                   // offset 512
        0x04, 0, 0, 0, 0, 0, 0, 0,                      // length 4
        0x5a, 0x5a, 0x5a, 0x5a,                         // data
    ];
    roundtrip(f, expected);
}

#[test]
fn discard_write_zeroes_flush_mark() {
    let rec = |seq, op| {
        Frame::Record(Record {
            seq,
            volume_index: 3,
            timestamp_ns: 99,
            op,
        })
    };
    roundtrip(
        rec(
            2,
            RecordOp::Discard {
                offset_bytes: 4096,
                len_bytes: 1 << 20,
            },
        ),
        golden(2, 0, 2, 3, 99, 4096, 1 << 20, &[]),
    );
    roundtrip(
        rec(
            3,
            RecordOp::WriteZeroes {
                offset_bytes: 0,
                len_bytes: 65536,
                unmap: true,
            },
        ),
        golden(3, 1, 3, 3, 99, 0, 65536, &[]),
    );
    roundtrip(
        rec(
            4,
            RecordOp::WriteZeroes {
                offset_bytes: 0,
                len_bytes: 512,
                unmap: false,
            },
        ),
        golden(3, 0, 4, 3, 99, 0, 512, &[]),
    );
    roundtrip(rec(5, RecordOp::Flush), golden(4, 0, 5, 3, 99, 0, 0, &[]));
    roundtrip(
        rec(
            6,
            RecordOp::Mark {
                label: "before-upgrade".into(),
            },
        ),
        golden(5, 0, 6, 3, 99, 0, 0, b"before-upgrade"),
    );
}

#[test]
fn resync_boundaries() {
    let rec = |seq, op| {
        Frame::Record(Record {
            seq,
            volume_index: 0,
            timestamp_ns: 2,
            op,
        })
    };
    roundtrip(
        rec(8, RecordOp::ResyncBegin),
        golden(6, 0, 8, 0, 2, 0, 0, &[]),
    );
    roundtrip(
        rec(9, RecordOp::ResyncEnd),
        golden(7, 0, 9, 0, 2, 0, 0, &[]),
    );
    // The begin record of docs/replication.md, byte by byte.
    let doc: Vec<u8> = [
        "46 52 50 4c 01 00 06 00 00 00 00 00 88 4b 9c aa",
        "08 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00",
        "02 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00",
        "00 00 00 00 00 00 00 00",
    ]
    .iter()
    .flat_map(|row| row.split(' '))
    .map(|b| u8::from_str_radix(b, 16).unwrap_or(0))
    .collect();
    assert_eq!(doc, golden(6, 0, 8, 0, 2, 0, 0, &[]));
    assert_eq!(rec(8, RecordOp::ResyncBegin).encode(), doc);
}

#[test]
fn ack() {
    let f = Frame::Ack(Ack {
        durable_seq: 1000,
        applied_seq: 990,
        timestamp_ns: 5,
    });
    roundtrip(f, golden(16, 0, 1000, 0, 5, 990, 0, &[]));
}

#[test]
fn refuses_truncated_frames() {
    let bytes = golden(1, 0, 1, 0, 0, 0, 8, &[1; 8]);
    for cut in [0, 1, 55, 56, 63] {
        match Frame::decode(&bytes[..cut]) {
            Err(FrameError::Truncated { available, .. }) => assert_eq!(available, cut),
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

#[test]
fn refuses_bad_checksum_on_any_byte() {
    let bytes = golden(1, 0, 9, 0, 0, 0, 8, &[1; 8]);
    for i in (12..16).chain(16..bytes.len()) {
        let mut bad = bytes.clone();
        bad[i] ^= 0x10;
        let err = Frame::decode(&bad).expect_err("a flipped bit is caught");
        assert!(
            matches!(err, FrameError::BadChecksum { .. }),
            "byte {i}: {err}"
        );
    }
    let mut bad = bytes;
    bad[20] ^= 1;
    let message = Frame::decode(&bad).expect_err("flip").to_string();
    assert!(message.starts_with("bad frame checksum"), "{message}");
}

#[test]
fn refuses_oversized_before_reading_the_payload() {
    let mut bytes = golden(1, 0, 1, 0, 0, 0, 8, &[1; 8]);
    bytes[8..12].copy_from_slice(&(PAYLOAD_MAX_BYTES + 1).to_le_bytes());
    assert_eq!(
        Header::decode(&bytes).map(|_| ()),
        Err(FrameError::Oversized {
            len_bytes: PAYLOAD_MAX_BYTES + 1,
            max_bytes: PAYLOAD_MAX_BYTES
        })
    );
}

#[test]
fn refuses_wrong_magic_version_kind() {
    let good = golden(4, 0, 1, 0, 0, 0, 0, &[]);
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(
        Frame::decode(&b),
        Err(FrameError::BadMagic { .. })
    ));
    let mut b = good.clone();
    b[4] = 2;
    assert_eq!(
        Frame::decode(&b),
        Err(FrameError::UnsupportedVersion { found: 2 })
    );
    let mut b = good;
    b[6] = 9;
    assert_eq!(Frame::decode(&b), Err(FrameError::UnknownKind { code: 9 }));
}

#[test]
fn refuses_inconsistent_fields_with_a_good_checksum() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            golden(1, 0, 1, 0, 0, 0, 9, &[1; 8]),
            "a write's length must equal its payload (> 0)",
        ),
        (
            golden(1, 0, 1, 0, 0, 0, 0, &[]),
            "a write's length must equal its payload (> 0)",
        ),
        (
            golden(2, 0, 1, 0, 0, 0, 8, &[1; 8]),
            "payload on a kind that carries none",
        ),
        (
            golden(2, 0, 1, 0, 0, u64::MAX, 8, &[]),
            "offset + length overflows",
        ),
        (
            golden(2, 1, 1, 0, 0, 0, 8, &[]),
            "flags not defined for this kind",
        ),
        (
            golden(4, 0, 1, 0, 0, 5, 0, &[]),
            "offset and length must be zero for this kind",
        ),
        (
            golden(4, 0, 0, 0, 0, 0, 0, &[]),
            "records are numbered from 1",
        ),
        (
            golden(5, 0, 1, 0, 0, 0, 0, &[0xff, 0xfe]),
            "mark label is not UTF-8",
        ),
        (
            golden(5, 0, 1, 0, 0, 0, 0, &[b'a'; 257]),
            "mark label longer than 256 bytes",
        ),
        (
            golden(6, 0, 1, 2, 0, 0, 0, &[]),
            "a resync boundary belongs to no volume",
        ),
        (
            golden(7, 0, 1, 0, 0, 0, 0, &[1]),
            "payload on a kind that carries none",
        ),
        (
            golden(6, 0, 1, 0, 0, 4096, 0, &[]),
            "offset and length must be zero for this kind",
        ),
        (
            golden(16, 0, 5, 0, 0, 6, 0, &[]),
            "applied sequence beyond the durable one",
        ),
        (
            golden(16, 0, 5, 1, 0, 0, 0, &[]),
            "an acknowledgment has no volume or length",
        ),
    ];
    for (bytes, reason) in cases {
        match Frame::decode(&bytes) {
            Err(FrameError::Inconsistent { reason: r, .. }) => assert_eq!(r, reason),
            other => panic!("expected {reason:?}, got {other:?}"),
        }
    }
}

#[test]
fn reads_frames_from_a_stream_and_refuses_a_torn_one() {
    use crate::replication::stream::{read_frame, ReadFrameError};
    let a = golden(4, 0, 1, 0, 0, 0, 0, &[]);
    let b = golden(1, 0, 2, 0, 0, 0, 3, &[7; 3]);
    let mut all = a.clone();
    all.extend_from_slice(&b);
    let mut reader = &all[..];
    let mut buf = Vec::new();
    assert_eq!(
        read_frame(&mut reader, &mut buf).ok().flatten(),
        Frame::decode(&a).ok().map(|f| f.0)
    );
    assert_eq!(
        read_frame(&mut reader, &mut buf).ok().flatten(),
        Frame::decode(&b).ok().map(|f| f.0)
    );
    assert!(matches!(read_frame(&mut reader, &mut buf), Ok(None)));
    let mut torn = &all[..all.len() - 1];
    let _ = read_frame(&mut torn, &mut buf);
    assert!(matches!(
        read_frame(&mut torn, &mut buf),
        Err(ReadFrameError::TruncatedStream {
            needed: 59,
            available: 58
        })
    ));
}
