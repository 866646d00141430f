//! The job file: golden bytes of the format (`docs/migration.md`), damaged and torn input,
//! and the file as a job writes, arms and removes it.

use std::sync::Mutex;

use super::format::*;
use super::{JobMeta, JobPersist};
use crate::mirror::dirty_bitmap::ChunkTable;
use crate::mirror::MirrorMode;

const G: u64 = 64 * 1024;

/// One volume of 130 chunks (three bitmap words) at offset 1 MiB in the target.
fn sample() -> JobRecord {
    JobRecord {
        in_use: true,
        sequence: 7,
        mode: MirrorMode::Background,
        granularity_bytes: G,
        speed_bytes_per_s: 1 << 20,
        target: "/t.img".into(),
        volumes: vec![VolumeRecord {
            name: "vda".into(),
            placement_offset_bytes: 1 << 20,
            length_bytes: 130 * G - 512,
            pending: vec![0b1011, 0, 1 << 1],
            armed: vec![1 << 63, 0, 0],
        }],
    }
}

#[test]
fn bytes_are_exactly_as_documented() {
    let out = encode(&sample());
    let mut body = Vec::new();
    body.extend_from_slice(&[6, 0]); // target length
    body.extend_from_slice(b"/t.img");
    body.extend_from_slice(&[3, 0]); // name length
    body.extend_from_slice(b"vda");
    body.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]); // placement 1 MiB
    body.extend_from_slice(&(130 * G - 512).to_le_bytes()); // length
    body.extend_from_slice(&[130, 0, 0, 0, 0, 0, 0, 0]); // chunks
    for word in [0b1011u64, 0, 2, 1 << 63, 0, 0] {
        body.extend_from_slice(&word.to_le_bytes()); // pending, then armed
    }
    let mut expected = Vec::new();
    expected.extend_from_slice(b"FERRYMIG");
    expected.extend_from_slice(&[1, 0, 0, 0]); // version
    expected.extend_from_slice(&[1, 0, 0, 0]); // flags: in use
    expected.extend_from_slice(&[7, 0, 0, 0, 0, 0, 0, 0]); // sequence
    expected.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 0]); // granularity 64 KiB
    expected.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]); // speed 1 MiB/s
    expected.extend_from_slice(&[1, 0, 0, 0]); // mode background, 3 reserved
    expected.extend_from_slice(&[1, 0, 0, 0]); // volume count
    expected.extend_from_slice(&(body.len() as u32).to_le_bytes());
    expected.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    expected.extend_from_slice(&[0, 0, 0, 0]); // reserved
    let header_crc = crc32c::crc32c(&expected[..60]);
    expected.extend_from_slice(&header_crc.to_le_bytes());
    expected.extend_from_slice(&body);
    assert_eq!(out, expected);
    assert_eq!(out.len(), 64 + 2 + 6 + 2 + 3 + 24 + 48);
    assert_eq!(format!("{header_crc:08x}"), PINNED_HEADER_CRC);
}

const PINNED_HEADER_CRC: &str = "19c9587a";

#[test]
fn arm_bytes_are_exactly_as_documented() {
    let out = encode_arm(&ArmRecord {
        volume_index: 2,
        sequence: 7,
        first_chunk: 0x0102,
        chunk_count: 3,
    });
    let mut expected = Vec::new();
    expected.extend_from_slice(b"ARM1");
    expected.extend_from_slice(&[2, 0, 0, 0]);
    expected.extend_from_slice(&[7, 0, 0, 0, 0, 0, 0, 0]);
    expected.extend_from_slice(&[2, 1, 0, 0, 0, 0, 0, 0]);
    expected.extend_from_slice(&[3, 0, 0, 0]);
    let crc = crc32c::crc32c(&expected);
    expected.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(out.as_slice(), expected.as_slice());
}

#[test]
fn round_trips_with_arms_and_unions_them() -> Result<(), FormatError> {
    let mut bytes = encode(&sample());
    let arm = ArmRecord {
        volume_index: 0,
        sequence: 7,
        first_chunk: 64,
        chunk_count: 2,
    };
    bytes.extend_from_slice(&encode_arm(&arm));
    let file = decode(&bytes)?;
    assert_eq!(file.record, sample());
    assert_eq!(file.arms, vec![arm]);
    assert_eq!(file.torn_tail_bytes, 0);
    assert_eq!(file.uncopied(0), vec![0b1011 | 1 << 63, 0b11, 2]);
    Ok(())
}

#[test]
fn every_truncation_and_every_flipped_bit_of_the_body_is_refused() {
    let bytes = encode(&sample());
    for len in 0..bytes.len() {
        assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
    }
    for at in 0..bytes.len() {
        for bit in 0..8 {
            let mut damaged = bytes.clone();
            damaged[at] ^= 1 << bit;
            assert!(decode(&damaged).is_err(), "byte {at} bit {bit}");
        }
    }
}

#[test]
fn a_torn_last_arm_is_ignored_and_a_damaged_middle_one_refused() -> Result<(), FormatError> {
    let mut bytes = encode(&sample());
    let arm = |first_chunk| {
        encode_arm(&ArmRecord {
            volume_index: 0,
            sequence: 7,
            first_chunk,
            chunk_count: 1,
        })
    };
    bytes.extend_from_slice(&arm(5));
    bytes.extend_from_slice(&arm(6)[..20]);
    let file = decode(&bytes)?;
    assert_eq!((file.arms.len(), file.torn_tail_bytes), (1, 20));
    let mut bytes = encode(&sample());
    let mut damaged = arm(5);
    damaged[17] ^= 1;
    bytes.extend_from_slice(&damaged);
    assert_eq!(decode(&bytes)?.torn_tail_bytes, ARM_BYTES);
    let mut with_partial = bytes.clone();
    with_partial.extend_from_slice(&arm(6)[..5]);
    assert_eq!(decode(&with_partial), Err(FormatError::Arm { index: 0 }));
    bytes.extend_from_slice(&arm(6));
    assert_eq!(decode(&bytes), Err(FormatError::Arm { index: 0 }));
    // An arm of another version of the file, or past the volume, is damage too.
    let mut bytes = encode(&sample());
    for bad in [
        ArmRecord {
            volume_index: 0,
            sequence: 6,
            first_chunk: 1,
            chunk_count: 1,
        },
        ArmRecord {
            volume_index: 1,
            sequence: 7,
            first_chunk: 1,
            chunk_count: 1,
        },
        ArmRecord {
            volume_index: 0,
            sequence: 7,
            first_chunk: 129,
            chunk_count: 2,
        },
    ] {
        bytes.extend_from_slice(&encode_arm(&bad));
    }
    assert_eq!(decode(&bytes), Err(FormatError::Arm { index: 0 }));
    Ok(())
}

#[test]
fn header_fields_are_checked() {
    let reseal = |mut bytes: Vec<u8>| {
        let crc = crc32c::crc32c(&bytes[..60]);
        bytes[60..64].copy_from_slice(&crc.to_le_bytes());
        bytes
    };
    let good = encode(&sample());
    let mut v = good.clone();
    v[8] = 2;
    assert_eq!(decode(&reseal(v)), Err(FormatError::Version(2)));
    let mut v = good.clone();
    v[40] = 9;
    assert_eq!(decode(&reseal(v)), Err(FormatError::Field("mode")));
    let mut v = good.clone();
    v[24..32].copy_from_slice(&3000u64.to_le_bytes());
    assert_eq!(decode(&reseal(v)), Err(FormatError::Field("granularity")));
    let mut v = good.clone();
    v[0] = b'X';
    assert_eq!(decode(&v), Err(FormatError::BadMagic));
    let mut v = good;
    v[48..52].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&reseal(v)),
        Err(FormatError::Truncated { .. })
    ));
}

fn meta() -> JobMeta {
    JobMeta {
        mode: MirrorMode::Active,
        granularity_bytes: G,
        target: "/t.img".into(),
        volumes: vec![("v".into(), 0, 8 * G)],
    }
}

/// The file as a job drives it: a rewrite records pending and in-flight chunks; an arm
/// between rewrites is appended and read back; a second arm of the same chunk costs
/// nothing; the next rewrite starts a new interval; the last one clears `in_use`.
#[test]
fn rewrites_and_arms_record_a_superset_of_what_was_written(
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = JobPersist::path_for(&dir.path().join("v.img"));
    let persist = JobPersist::new(path.clone(), meta(), 0);
    let table = Mutex::new(ChunkTable::new(8 * G, G));
    if let Ok(mut t) = table.lock() {
        t.mark_dirty(0, 2 * G);
        t.begin_write(5 * G, 1, false); // in flight and armed: stays armed
        t.set_armed(&(5..6));
        t.begin_write(7 * G, 1, false); // in flight, its arm not appended yet
    }
    persist.write(&[&table], 0, false, || Ok(()))?;
    let file = super::read(&path)?;
    assert!(file.record.in_use);
    assert_eq!(file.record.sequence, 1);
    assert_eq!(file.uncopied(0), vec![0b10_0011]);
    assert!(table.lock().is_ok_and(|t| !t.is_armed(&(7..8))));
    persist.arm(0, 7..8, &table)?;
    assert_eq!(super::read(&path)?.uncopied(0), vec![0b1010_0011]);
    if let Ok(mut t) = table.lock() {
        t.end_write(7 * G, 1);
    }
    persist.arm(0, 3..5, &table)?;
    let before = std::fs::metadata(&path)?.len();
    persist.arm(0, 3..5, &table)?;
    assert_eq!(
        std::fs::metadata(&path)?.len(),
        before,
        "armed chunks are not armed again"
    );
    assert_eq!(super::read(&path)?.uncopied(0), vec![0b1011_1011]);
    if let Ok(mut t) = table.lock() {
        t.end_write(5 * G, 1);
    }
    persist.write(&[&table], 0, true, || Ok(()))?;
    let file = super::read(&path)?;
    assert!(!file.record.in_use);
    assert_eq!((file.record.sequence, file.arms.len()), (2, 0));
    assert_eq!(file.uncopied(0), vec![0b11]);
    persist.arm(0, 6..7, &table)?; // after the last version: nothing more is written
    assert_eq!(super::read(&path)?.arms.len(), 0);
    persist.remove()?;
    assert!(!path.exists());
    Ok(())
}

/// A failed target flush installs nothing: the previous version and its arms stay.
#[test]
fn a_failed_target_flush_keeps_the_previous_version() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = JobPersist::path_for(&dir.path().join("v.img"));
    let persist = JobPersist::new(path.clone(), meta(), 0);
    let table = Mutex::new(ChunkTable::new(8 * G, G));
    persist.write(&[&table], 0, false, || Ok(()))?;
    persist.arm(0, 1..2, &table)?;
    assert!(persist
        .write(&[&table], 0, false, || Err("EIO".into()))
        .is_err());
    persist.arm(0, 2..3, &table)?;
    let file = super::read(&path)?;
    assert_eq!(file.record.sequence, 1);
    assert_eq!(file.uncopied(0), vec![0b110]);
    Ok(())
}
