//! The primary's sequencer: records numbered in the order they are pushed across volumes,
//! large writes split, a full queue degrading to a dirty bitmap without waiting, records
//! held until acknowledged and sent again after a reconnection.

use std::time::Duration;

use crate::replication::frame::{Ack, RecordOp, PAYLOAD_MAX_BYTES};
use crate::replication::primary::{GroupSequencer, DIRTY_CHUNK_BYTES};

fn write(offset_bytes: u64, len: usize) -> RecordOp {
    RecordOp::Write {
        offset_bytes,
        data: vec![7; len],
    }
}

fn ack(durable_seq: u64, applied_seq: u64) -> Ack {
    Ack {
        durable_seq,
        applied_seq,
        timestamp_ns: 0,
    }
}

#[test]
fn numbers_records_across_volumes_in_push_order() {
    let seq = GroupSequencer::new(&[1 << 30, 1 << 30], 1, 64 << 20);
    seq.push(1, write(0, 4096));
    seq.push(0, RecordOp::Flush);
    seq.push(
        0,
        write(PAYLOAD_MAX_BYTES as u64, PAYLOAD_MAX_BYTES as usize + 512),
    );
    let records = seq.take_unshipped(usize::MAX, Duration::ZERO);
    let got: Vec<(u64, u32)> = records.iter().map(|r| (r.seq, r.volume_index)).collect();
    assert_eq!(got, vec![(1, 1), (2, 0), (3, 0), (4, 0)]);
    assert!(
        matches!(&records[3].op, RecordOp::Write { offset_bytes, data }
        if *offset_bytes == 2 * PAYLOAD_MAX_BYTES as u64 && data.len() == 512)
    );
    assert_eq!(seq.status().numbered_seq, 4);
    assert_eq!(seq.status().state, "replicating");
}

#[test]
fn a_full_queue_degrades_to_a_bitmap_without_waiting() {
    let seq = GroupSequencer::new(&[1 << 30], 1, 3 * 4096 + 1000);
    for i in 0..5u64 {
        seq.push(0, write(i * 4096, 4096));
    }
    let status = seq.status();
    assert_eq!(status.state, "degraded");
    assert_eq!(
        status.numbered_seq, 3,
        "records past the bound are not numbered"
    );
    assert!(status.degraded_reason.is_some_and(|r| r.contains("queue")));
    assert_eq!(
        status.dirty_bytes, DIRTY_CHUNK_BYTES,
        "writes 4 and 5 share one chunk"
    );
}

#[test]
fn holds_records_until_acknowledged_and_resends_after_a_reconnection() {
    let seq = GroupSequencer::new(&[1 << 30], 1, 64 << 20);
    for i in 0..6u64 {
        seq.push(0, write(i * 4096, 4096));
    }
    assert_eq!(seq.take_unshipped(2 * (4096 + 56), Duration::ZERO).len(), 2);
    assert_eq!(seq.take_unshipped(usize::MAX, Duration::ZERO).len(), 4);
    seq.acknowledged(&ack(3, 2));
    let status = seq.status();
    assert_eq!(
        (
            status.acknowledged_seq,
            status.applied_seq,
            status.lag_records
        ),
        (3, 2, 3)
    );
    // Reconnected: the DR site says it holds 4; 5 and 6 go again.
    assert!(seq.resume_after(4));
    let again: Vec<u64> = seq
        .take_unshipped(usize::MAX, Duration::ZERO)
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(again, vec![5, 6]);
    // A DR site behind what is still held cannot be resumed record by record.
    assert!(!seq.resume_after(1));
    assert!(seq
        .take_unshipped(usize::MAX, Duration::from_millis(1))
        .is_empty());
}
