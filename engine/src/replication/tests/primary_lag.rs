//! The primary's bound on the lag and its bitmap resync: past `--max-lag` a degrading group
//! marks changes instead of numbering them and a throttling one spaces the guest's
//! completions; a resync numbers the marked runs with the data read at that moment, clears
//! their bits, and ends with the group streaming (a sync group in sync again once the DR site
//! has the resync); a degradation during a resync keeps the unsent bits.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use crate::observer::ObserverTicket;
use crate::replication::frame::{Ack, RecordOp};
use crate::replication::primary::{
    GroupSequencer, LagPolicy, OnLag, ResyncStep, DIRTY_CHUNK_BYTES,
};
use crate::volume::completion_sink::CompletionSink;

fn write(offset_bytes: u64, len: usize) -> RecordOp {
    RecordOp::Write {
        offset_bytes,
        data: vec![7; len],
    }
}

fn ack(durable_seq: u64) -> Ack {
    Ack {
        durable_seq,
        applied_seq: durable_seq,
        timestamp_ns: 0,
    }
}

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

/// A streaming async group (its empty initial copy done) with `policy`.
fn streaming(policy: LagPolicy) -> Arc<GroupSequencer> {
    let seq = GroupSequencer::new(&[1 << 30, 1 << 30], 1, 256 << 20);
    seq.set_lag_policy(policy);
    seq.set_copy_progress(false, 0);
    seq
}

/// Ships and acknowledges everything numbered.
fn drain(seq: &GroupSequencer) -> Vec<crate::replication::Record> {
    let records = seq.take_unshipped(usize::MAX, Duration::ZERO);
    if let Some(last) = records.last() {
        seq.acknowledged(&ack(last.seq));
    }
    records
}

#[test]
fn past_max_lag_bytes_a_degrading_group_marks_changes_instead() {
    let seq = streaming(LagPolicy {
        bytes_max: Some(64 << 10),
        ..LagPolicy::default()
    });
    seq.push(0, write(0, 16 << 10));
    assert_eq!(seq.status().state, "replicating");
    seq.push(0, write(0, 20 << 10));
    assert_eq!(seq.status().state, "lagging", "past half the bound");
    seq.push(1, write(1 << 20, 40 << 10));
    let status = seq.status();
    assert_eq!(status.state, "degraded");
    assert!(
        status
            .degraded_reason
            .as_deref()
            .is_some_and(|r| r.contains("--max-lag")),
        "{status:?}"
    );
    assert_eq!(status.numbered_seq, 2, "the write past the bound is marked");
    assert_eq!(
        status.dirty_bytes,
        (40u64 << 10).div_ceil(DIRTY_CHUNK_BYTES) * DIRTY_CHUNK_BYTES
    );
}

#[test]
fn past_max_lag_time_the_watcher_degrades_a_group_whose_records_age() {
    let seq = streaming(LagPolicy {
        time_max: Some(Duration::from_millis(30)),
        ..LagPolicy::default()
    });
    seq.push(0, write(0, 4096));
    let watcher = {
        let seq = seq.clone();
        std::thread::spawn(move || seq.watch_lag())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seq.status().state != "degraded" {
        assert!(std::time::Instant::now() < deadline, "{:?}", seq.status());
        std::thread::sleep(Duration::from_millis(5));
    }
    seq.stop();
    assert!(watcher.join().is_ok());
}

#[test]
fn a_throttling_group_spaces_guest_completions_and_never_degrades_on_lag() {
    let seq = streaming(LagPolicy {
        bytes_max: Some(64 << 10),
        on_lag: OnLag::Throttle,
        ..LagPolicy::default()
    });
    let sink = sink();
    seq.push(0, write(0, 60 << 10));
    // Past the bound by half: completions are spaced, not failed; nothing degrades.
    seq.push(0, write(0, 36 << 10));
    assert!(
        seq.may_hold(),
        "the next guest write's completion is throttled"
    );
    seq.push_held(
        0,
        write(0, 4096),
        Some(ObserverTicket::new(sink.clone(), 1)),
    );
    seq.push_held(
        0,
        write(0, 4096),
        Some(ObserverTicket::new(sink.clone(), 2)),
    );
    let status = seq.status();
    assert_eq!(status.state, "lagging");
    assert!(status.throttle_delay_ms > 0.0, "{status:?}");
    assert_eq!(status.throttled_writes, 2);
    assert!(released(&sink).is_empty(), "completions wait");
    let watcher = {
        let seq = seq.clone();
        std::thread::spawn(move || seq.watch_lag())
    };
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while done.len() < 2 {
        assert!(std::time::Instant::now() < deadline);
        done.extend(released(&sink));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(done, vec![(1, true), (2, true)], "in order, successful");
    drain(&seq);
    assert_eq!(seq.status().state, "replicating");
    assert!(!seq.may_hold());
    seq.stop();
    assert!(watcher.join().is_ok());
}

#[test]
fn a_resync_sends_marked_runs_with_current_data_and_streams_again() {
    let seq = streaming(LagPolicy::default());
    seq.push(0, write(0, 4096));
    seq.degrade("the link is gone".into());
    // Marked while degraded: two adjacent chunks of volume 0, one of volume 1.
    seq.push(0, write(DIRTY_CHUNK_BYTES - 512, 1024));
    seq.push(1, write(10 * DIRTY_CHUNK_BYTES, 4096));
    assert_eq!(seq.status().dirty_bytes, 3 * DIRTY_CHUNK_BYTES);
    // The record numbered before the degradation is acknowledged; the resync may begin.
    assert_eq!(drain(&seq).len(), 1);
    assert!(seq.wait_resync());
    assert_eq!(seq.status().state, "resyncing");
    let mut reads = Vec::new();
    loop {
        let step = seq
            .resync_step(1 << 20, |volume, offset, len| {
                reads.push((volume, offset, len));
                Ok(vec![volume as u8 + 1; len])
            })
            .unwrap_or(ResyncStep::Interrupted);
        if step == ResyncStep::Done {
            break;
        }
        assert!(matches!(step, ResyncStep::Sent { .. }), "{step:?}");
    }
    assert_eq!(
        reads,
        vec![
            (0, 0, 2 * DIRTY_CHUNK_BYTES as usize),
            (1, 10 * DIRTY_CHUNK_BYTES, DIRTY_CHUNK_BYTES as usize)
        ]
    );
    let status = seq.status();
    assert_eq!(status.state, "replicating");
    assert_eq!(status.dirty_bytes, 0);
    assert_eq!(status.resyncs, 1);
    assert_eq!(status.resync_bytes, 3 * DIRTY_CHUNK_BYTES);
    assert_eq!(status.resync_changed_bytes, 3 * DIRTY_CHUNK_BYTES);
    // The resync's records between its boundaries, which tell the DR site.
    let records = drain(&seq);
    let ops: Vec<_> = records.iter().map(|r| (r.seq, r.op.clone())).collect();
    assert_eq!(ops.len(), 4, "{ops:?}");
    assert!(matches!(ops[0], (2, RecordOp::ResyncBegin)), "{ops:?}");
    assert!(matches!(
        ops[1],
        (
            3,
            RecordOp::Write {
                offset_bytes: 0,
                ..
            }
        )
    ));
    assert!(matches!(ops[2], (4, RecordOp::Write { .. })));
    assert!(matches!(ops[3], (5, RecordOp::ResyncEnd)), "{ops:?}");
    // Streaming again: a guest write is a record.
    seq.push(0, write(0, 4096));
    assert_eq!(seq.status().numbered_seq, 6);
}

#[test]
fn a_degradation_during_a_resync_keeps_the_unsent_bits() {
    let seq = streaming(LagPolicy::default());
    seq.degrade("the link is gone".into());
    seq.push(0, write(0, 4096));
    seq.push(0, write(5 * DIRTY_CHUNK_BYTES, 4096));
    assert!(seq.wait_resync());
    let first = seq.resync_step(DIRTY_CHUNK_BYTES, |_, _, len| Ok(vec![1; len]));
    assert!(matches!(first, Ok(ResyncStep::Sent { .. })));
    seq.degrade("the link is gone again".into());
    let next = seq.resync_step(DIRTY_CHUNK_BYTES, |_, _, len| Ok(vec![1; len]));
    assert!(matches!(next, Ok(ResyncStep::Interrupted)));
    assert_eq!(seq.status().dirty_bytes, DIRTY_CHUNK_BYTES);
}

#[test]
fn a_sync_group_is_in_sync_again_once_its_resync_is_acknowledged() {
    let seq = GroupSequencer::new(&[1 << 30], 1, 64 << 20);
    seq.set_sync();
    seq.set_copy_progress(false, 0);
    seq.degrade_sync("the DR site did not answer".into());
    seq.degrade("the DR site did not answer".into());
    seq.push(0, write(0, 4096));
    assert!(seq.wait_resync());
    // Still degraded as a sync group while the resync runs (status says `resyncing`).
    assert_eq!(seq.status().sync_state, Some("degraded"));
    assert_eq!(seq.status().state, "resyncing");
    assert!(
        !seq.may_hold() || {
            // A write observed now completes at once: it does not wait behind the resync.
            let sink = sink();
            seq.push_held(
                0,
                write(0, 4096),
                Some(ObserverTicket::new(sink.clone(), 9)),
            );
            released(&sink) == vec![(9, true)]
        }
    );
    while let Ok(ResyncStep::Sent { .. }) = seq.resync_step(1 << 20, |_, _, len| Ok(vec![1; len])) {
    }
    assert_eq!(seq.status().sync_state, Some("catching-up"));
    drain(&seq);
    assert_eq!(seq.status().sync_state, Some("in-sync"));
    assert!(seq.may_hold());
}

#[test]
fn a_paused_group_marks_changes_and_resyncs_only_once_resumed() {
    let seq = streaming(LagPolicy::default());
    seq.pause();
    seq.push(0, write(0, 4096));
    let status = seq.status();
    assert_eq!(status.state, "paused");
    assert_eq!(status.numbered_seq, 0);
    assert_eq!(status.dirty_bytes, DIRTY_CHUNK_BYTES);
    let waiter = {
        let seq = seq.clone();
        std::thread::spawn(move || seq.wait_resync())
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "no resync while paused");
    seq.resume();
    assert!(waiter.join().unwrap_or(false));
    assert_eq!(seq.status().state, "resyncing");
}

#[test]
fn a_group_whose_link_is_lost_says_so_until_it_degrades() {
    let seq = streaming(LagPolicy::default());
    seq.link_down("connection refused".into());
    seq.push(0, write(0, 4096));
    let status = seq.status();
    assert_eq!(status.state, "disconnected");
    assert_eq!(status.last_error.as_deref(), Some("connection refused"));
    assert_eq!(status.numbered_seq, 1, "records still queue");
    seq.link_up();
    assert_eq!(seq.status().state, "replicating");
}

#[test]
fn marks_ranges_across_words_and_whole_volumes() {
    let seq = streaming(LagPolicy::default());
    seq.degrade("test".into());
    // Chunks 60..70 straddle the first two words of the bitmap.
    seq.mark_changed(0, 60 * DIRTY_CHUNK_BYTES, 10 * DIRTY_CHUNK_BYTES);
    assert_eq!(seq.status().dirty_bytes, 10 * DIRTY_CHUNK_BYTES);
    seq.mark_changed(1, 0, 1 << 30);
    assert_eq!(seq.status().dirty_bytes, (1 << 30) + 10 * DIRTY_CHUNK_BYTES);
    // Past the end: nothing beyond the volume.
    seq.mark_changed(0, (1 << 30) - DIRTY_CHUNK_BYTES, 1 << 40);
    assert_eq!(seq.status().dirty_bytes, (1 << 30) + 11 * DIRTY_CHUNK_BYTES);
}
