//! The primary's sequencer: records numbered in the order they are pushed across volumes,
//! large writes split, a full queue degrading to a dirty bitmap without waiting, records
//! held until acknowledged and sent again after a reconnection; in sync mode, guest
//! completions released by the durable acknowledgment, a degradation, the watchdog or a stop.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use crate::observer::ObserverTicket;
use crate::replication::frame::{Ack, RecordOp, PAYLOAD_MAX_BYTES};
use crate::replication::primary::{GroupSequencer, DIRTY_CHUNK_BYTES};
use crate::volume::completion_sink::CompletionSink;

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
    // Writes 4 and 5 (12 KiB..20 KiB), in whole chunks.
    let chunks = (20u64 << 10).div_ceil(DIRTY_CHUNK_BYTES) - (12u64 << 10) / DIRTY_CHUNK_BYTES;
    assert_eq!(status.dirty_bytes, chunks * DIRTY_CHUNK_BYTES);
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

/// Guest completions released to a sink whose wake-ups go nowhere.
fn sink() -> Arc<CompletionSink> {
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from);
    Arc::new(CompletionSink::new(
        null.expect("/dev/null opens for writing"),
    ))
}

fn released(sink: &CompletionSink) -> Vec<(u32, bool)> {
    let mut out = Vec::new();
    sink.drain_into(&mut out);
    out
}

/// A sync group with its (empty) initial copy acknowledged: in sync.
fn in_sync() -> Arc<GroupSequencer> {
    let seq = GroupSequencer::new(&[1 << 30], 1, 64 << 20);
    seq.set_sync();
    seq.set_copy_progress(false, 0);
    assert_eq!(seq.status().sync_state, Some("in-sync"));
    seq
}

#[test]
fn a_sync_write_completes_once_its_last_record_is_durable_at_the_dr_site() {
    let seq = in_sync();
    let sink = sink();
    assert!(seq.may_hold());
    let big = PAYLOAD_MAX_BYTES as usize + 4096;
    seq.push_held(0, write(0, big), Some(ObserverTicket::new(sink.clone(), 1)));
    seq.push_held(
        0,
        write(0, 4096),
        Some(ObserverTicket::new(sink.clone(), 2)),
    );
    assert_eq!(seq.status().sync_held_writes, 2);
    assert_eq!(seq.take_unshipped(64 << 20, Duration::ZERO).len(), 3);
    // Applied is no durability: nothing completes until the durable sequence covers a write.
    seq.acknowledged(&ack(1, 0));
    assert!(
        released(&sink).is_empty(),
        "the first record of two completed the write"
    );
    seq.acknowledged(&ack(2, 1));
    assert_eq!(released(&sink), vec![(1, true)]);
    seq.acknowledged(&ack(3, 3));
    assert_eq!(released(&sink), vec![(2, true)]);
    assert_eq!(seq.status().sync_held_writes, 0);
}

#[test]
fn a_sync_group_degraded_to_async_completes_held_writes_and_holds_no_more() {
    let seq = in_sync();
    let sink = sink();
    seq.push_held(
        0,
        write(0, 4096),
        Some(ObserverTicket::new(sink.clone(), 1)),
    );
    seq.degrade_sync("the DR site is gone".into());
    assert_eq!(released(&sink), vec![(1, true)]);
    assert!(!seq.may_hold());
    seq.push_held(
        0,
        write(4096, 4096),
        Some(ObserverTicket::new(sink.clone(), 2)),
    );
    assert_eq!(released(&sink), vec![(2, true)]);
    let status = seq.status();
    assert_eq!(status.state, "replicating", "records are still queued");
    assert_eq!(status.numbered_seq, 2);
    assert_eq!(status.sync_state, Some("degraded"));
    assert_eq!(
        status.sync_degraded_reason.as_deref(),
        Some("the DR site is gone")
    );
}

#[test]
fn the_watchdog_degrades_a_sync_group_the_dr_site_does_not_answer() {
    let seq = in_sync();
    let sink = sink();
    seq.set_error(Some("connection refused".into()));
    seq.push_held(
        0,
        write(0, 4096),
        Some(ObserverTicket::new(sink.clone(), 7)),
    );
    // Returns once it degraded the group (nothing acknowledges the write).
    seq.watch_sync(Duration::from_millis(20));
    assert_eq!(released(&sink), vec![(7, true)]);
    let reason = seq.status().sync_degraded_reason.unwrap_or_default();
    assert!(
        reason.contains("record 1") && reason.contains("connection refused"),
        "{reason}"
    );
}

#[test]
fn a_sync_group_holds_nothing_while_its_initial_copy_is_not_acknowledged() {
    let seq = GroupSequencer::new(&[1 << 30], 1, 64 << 20);
    seq.set_sync();
    seq.set_copy_progress(true, 4096);
    assert!(seq.push_copy(0, 0, || Ok(vec![1; 4096])).unwrap_or(false));
    seq.set_copy_progress(false, 4096);
    assert_eq!(seq.status().sync_state, Some("catching-up"));
    let sink = sink();
    seq.push_held(
        0,
        write(0, 4096),
        Some(ObserverTicket::new(sink.clone(), 3)),
    );
    assert_eq!(released(&sink), vec![(3, true)]);
    seq.take_unshipped(64 << 20, Duration::ZERO);
    seq.acknowledged(&ack(1, 1));
    assert_eq!(seq.status().sync_state, Some("in-sync"));
}

#[test]
fn stopping_a_sync_group_completes_its_held_writes() {
    let seq = in_sync();
    let sink = sink();
    seq.push_held(
        0,
        write(0, 4096),
        Some(ObserverTicket::new(sink.clone(), 4)),
    );
    seq.stop();
    assert_eq!(released(&sink), vec![(4, true)]);
}
