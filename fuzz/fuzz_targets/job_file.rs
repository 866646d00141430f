//! Fuzz target: the migration job file's decoder (`docs/migration.md`) on any bytes, and on
//! valid files cut short or with an appended tail: no panic; an accepted file has bitmaps
//! sized for its volumes, arms inside them, and encodes back to the bytes it was read from
//! (up to its arm records).
#![no_main]

use ferry_engine::mirror::persist::format::{decode, encode, encode_arm, ArmRecord, ARM_BYTES};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check(data);
    // The same bytes as the tail of a valid file: its arm log, torn or not.
    if let Some((&cut, rest)) = data.split_first() {
        let valid = sample_file();
        let mut bytes = valid.clone();
        bytes.extend_from_slice(rest);
        check(&bytes);
        let cut = usize::from(cut) % (valid.len() + 1);
        check(&valid[..cut]);
    }
});

fn check(bytes: &[u8]) {
    let Ok(file) = decode(bytes) else {
        return;
    };
    let record = &file.record;
    for (index, volume) in record.volumes.iter().enumerate() {
        let words = volume.chunks(record.granularity_bytes).div_ceil(64) as usize;
        assert_eq!(volume.pending.len(), words);
        assert_eq!(volume.armed.len(), words);
        assert_eq!(file.uncopied(index).len(), words);
    }
    let encoded = encode(record);
    assert_eq!(&bytes[..encoded.len()], encoded.as_slice());
    let tail = bytes.len() - encoded.len();
    assert_eq!(tail, file.arms.len() * ARM_BYTES + file.torn_tail_bytes);
    assert!(file.torn_tail_bytes <= ARM_BYTES);
}

fn sample_file() -> Vec<u8> {
    use ferry_engine::mirror::persist::format::{JobRecord, VolumeRecord};
    use ferry_engine::mirror::MirrorMode;
    let record = JobRecord {
        in_use: true,
        sequence: 3,
        mode: MirrorMode::Active,
        granularity_bytes: 65536,
        speed_bytes_per_s: 0,
        target: "nbd://h/e".into(),
        volumes: vec![VolumeRecord {
            name: "v".into(),
            placement_offset_bytes: 0,
            length_bytes: 100 * 65536,
            pending: vec![0xff, 0],
            armed: vec![0, 1],
        }],
    };
    let mut bytes = encode(&record);
    bytes.extend_from_slice(&encode_arm(&ArmRecord {
        volume_index: 0,
        sequence: 3,
        first_chunk: 10,
        chunk_count: 4,
    }));
    bytes
}
