//! Stops are recorded: a clean close leaves a stop record and a closed run in the catalog;
//! a journal that stops on a full medium and is closed without `journal-init` leaves a
//! stop record that `verify` reports and `restore` refuses to reach past without
//! `--allow-gaps`; the next start after an unclean end records the gap first.

use std::path::Path;

use super::super::catalog::{Catalog, RunRecord, RunState, COUNT_UNKNOWN};
use super::super::format::{
    GapInfo, Op, StopCause, StopInfo, FLAG_GAP_ESTIMATED, STOP_PAYLOAD_FIXED_BYTES,
};
use super::super::media::MediaSet;
use super::super::recovery::resume_gap;
use super::super::restore::{restore, RestoreOptions, RestoreReport, Until};
use super::super::verify::verify;
use super::super::{Journal, JournalMode, JournalOptions, JournalState, OnFull};
use super::support::{open_volume, pattern, write, TestResult};
use crate::VolumeQueue;

fn restore_end(
    dir: &Path,
    inputs: &[std::path::PathBuf],
    until: Until,
    allow_gaps: bool,
) -> Result<RestoreReport, Box<dyn std::error::Error>> {
    let set = MediaSet::open(inputs)?;
    let opts = RestoreOptions {
        volume: "vs".into(),
        base: dir.join("vs.base"),
        out: dir.join("vs.out"),
        until,
        allow_gaps,
    };
    Ok(restore(&set, &opts, &mut |_| {})?)
}

fn stops_on(dir: &Path) -> Result<Vec<(u64, StopInfo)>, Box<dyn std::error::Error>> {
    let set = MediaSet::open(&[dir.to_path_buf()])?;
    let mut out = Vec::new();
    for m in &set.media {
        for r in m.live_records() {
            let r = r?;
            if r.header.op == Op::Stop {
                out.push((r.header.seq, StopInfo::decode(&m.payload(&r)?)?));
            }
        }
    }
    Ok(out)
}

#[test]
fn stop_payload_and_catalog_run_bytes_are_as_documented() -> TestResult {
    let stop = StopInfo {
        cause: StopCause::Full,
        first_unjournaled_seq: 0x0102,
        unjournaled_count: 3,
        reason: "x".into(),
    };
    let mut expected = vec![3, 0, 0, 0, 0, 0, 0, 0];
    expected.extend_from_slice(&[2, 1, 0, 0, 0, 0, 0, 0]);
    expected.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]);
    expected.push(b'x');
    assert_eq!(stop.encode(), expected);
    assert_eq!(STOP_PAYLOAD_FIXED_BYTES, 24);
    assert_eq!(StopInfo::decode(&expected)?, stop);
    assert!(StopInfo::decode(&[9; 24]).is_err(), "unknown cause");

    let catalog = Catalog {
        journal_id: 5,
        run: Some(RunRecord {
            state: RunState::Stopped,
            async_mode: true,
            first_unjournaled_seq: 7,
            unjournaled_count: COUNT_UNKNOWN,
        }),
        media: Vec::new(),
    };
    let bytes = catalog.encode();
    assert_eq!(&bytes[4..6], &[2, 0], "catalog version 2");
    assert_eq!(bytes.len(), 48);
    assert_eq!(&bytes[24..32], &[2, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&bytes[32..40], &7u64.to_le_bytes());
    assert_eq!(&bytes[40..48], &[0xff; 8]);
    assert_eq!(Catalog::decode(&bytes)?, catalog);
    Ok(())
}

#[test]
fn resume_gap_follows_how_the_last_run_ended() {
    let run = |state, async_mode, first, count| {
        Some(RunRecord {
            state,
            async_mode,
            first_unjournaled_seq: first,
            unjournaled_count: count,
        })
    };
    let gap = |first, count, est| {
        Some((
            GapInfo {
                first_missing_seq: first,
                missing_count: count,
            },
            est,
        ))
    };
    assert_eq!(
        resume_gap(run(RunState::Closed, false, 11, 0), None, 10),
        None
    );
    assert_eq!(
        resume_gap(run(RunState::Stopped, false, 8, 5), None, 7),
        gap(8, 5, false)
    );
    assert_eq!(
        resume_gap(run(RunState::Stopped, false, 8, COUNT_UNKNOWN), None, 7),
        gap(8, 1, true)
    );
    // Died while running: nothing lost in sync mode, maybe something in async mode.
    assert_eq!(
        resume_gap(run(RunState::Running, false, 0, 0), None, 7),
        None
    );
    assert_eq!(
        resume_gap(run(RunState::Running, true, 0, 0), None, 7),
        gap(8, 1, true)
    );
    // No catalog: the stop record of the last medium tells.
    let full = StopInfo {
        cause: StopCause::Full,
        first_unjournaled_seq: 8,
        unjournaled_count: 3,
        reason: String::new(),
    };
    assert_eq!(resume_gap(None, Some(&full), 7), gap(8, 3, true));
    let closed = StopInfo {
        cause: StopCause::Closed,
        unjournaled_count: 0,
        ..full
    };
    assert_eq!(resume_gap(None, Some(&closed), 7), None);
    assert_eq!(resume_gap(None, None, 7), None);
}

#[test]
fn clean_close_records_a_stop_and_a_restart_is_warned_about() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let v = open_volume(dir, "vs", 1 << 20)?;
    std::fs::copy(dir.join("vs.img"), dir.join("vs.base"))?;
    for run in 0..2u64 {
        let journal = Journal::open(JournalOptions::new(dir.join("j")))?;
        v.add_observer(journal.observer());
        let mut q = VolumeQueue::new(v.clone(), 0, 4, 4)?;
        write(&mut q, run * 4096, &pattern(run, 4096))?;
        journal.close();
        v.remove_observer(&journal.observer());
        let catalog = Catalog::load(&dir.join("j"))?.ok_or("no catalog")?;
        let run_record = catalog.run.ok_or("no run record")?;
        assert_eq!(run_record.state, RunState::Closed);
        assert_eq!(run_record.unjournaled_count, 0);
    }
    let stops = stops_on(&dir.join("j"))?;
    assert_eq!(stops.len(), 2, "{stops:?}");
    assert!(stops.iter().all(|(_, s)| s.cause == StopCause::Closed));
    let set = MediaSet::open(&[dir.join("j")])?;
    let report = verify(&set);
    assert!(report.ok(), "{report:#?}");
    // Restoring across the restart works but says what it cannot know.
    let report = restore_end(dir, &[dir.join("j")], Until::End, false)?;
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].contains("started again"));
    // Restoring up to the first stop needs no warning.
    let first_stop = stops[0].0;
    let report = restore_end(dir, &[dir.join("j")], Until::Seq(first_stop), false)?;
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    Ok(())
}

fn fill_until_stopped(dir: &Path) -> Result<u64, Box<dyn std::error::Error>> {
    let mut o = JournalOptions::new(dir.join("j"));
    o.capacity_bytes = 256 * 1024;
    o.media_max = 1;
    o.on_full = OnFull::Stop;
    let journal = Journal::open(o)?;
    let v = open_volume(dir, "vs", 1 << 20)?;
    std::fs::copy(dir.join("vs.img"), dir.join("vs.base"))?;
    v.add_observer(journal.observer());
    let mut q = VolumeQueue::new(v.clone(), 0, 4, 4)?;
    for i in 0..40u64 {
        write(&mut q, (i % 16) * 16384, &pattern(i, 16384))?;
    }
    let status = journal.status();
    assert_eq!(status.state, JournalState::Stopped, "{status:?}");
    let gap = status.open_gap.ok_or("no open gap")?;
    journal.close();
    v.remove_observer(&journal.observer());
    Ok(gap.first_missing_seq)
}

#[test]
fn stop_without_init_is_seen_by_verify_and_restore() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let first_missing = fill_until_stopped(dir)?;
    let stops = stops_on(&dir.join("j"))?;
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert_eq!(stops[0].1.cause, StopCause::Full);
    assert_eq!(stops[0].1.first_unjournaled_seq, first_missing);
    assert_eq!(stops[0].0, first_missing - 1);
    let run = Catalog::load(&dir.join("j"))?
        .and_then(|c| c.run)
        .ok_or("no run")?;
    assert_eq!(run.state, RunState::Stopped);
    assert_eq!(run.first_unjournaled_seq, first_missing);
    assert!(run.unjournaled_count > 0 && run.unjournaled_count != COUNT_UNKNOWN);

    let set = MediaSet::open(&[dir.join("j")])?;
    let report = verify(&set);
    assert!(!report.ok(), "an unresolved stop is a problem");
    assert!(report.stops.iter().any(|s| !s.resolved));
    let inputs = [dir.join("j")];
    let refused = restore_end(dir, &inputs, Until::End, false);
    let err = refused.err().ok_or("restore to the end must be refused")?;
    assert!(err.to_string().contains("journaling stopped"), "{err}");
    let report = restore_end(dir, &inputs, Until::End, true)?;
    assert!(!report.warnings.is_empty());
    // Up to the last journaled write, nothing is missing.
    let report = restore_end(dir, &inputs, Until::Seq(first_missing - 1), false)?;
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    Ok(())
}

#[test]
fn next_start_after_a_stop_records_the_gap() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let first_missing = fill_until_stopped(dir)?;
    let count = Catalog::load(&dir.join("j"))?
        .and_then(|c| c.run)
        .ok_or("no run")?
        .unjournaled_count;
    // Archive the full medium and start again (as a restarted daemon would).
    let archive = dir.join("archive");
    std::fs::create_dir(&archive)?;
    std::fs::rename(
        dir.join("j/medium-000000.fj"),
        archive.join("medium-000000.fj"),
    )?;
    let mut o = JournalOptions::new(dir.join("j"));
    o.mode = JournalMode::Async;
    let journal = Journal::open(o)?;
    let status = journal.status();
    assert_eq!(
        status.gaps,
        vec![GapInfo {
            first_missing_seq: first_missing,
            missing_count: count
        }]
    );
    assert!(
        status.next_seq > first_missing + count,
        "the gap takes the number after the missing ones"
    );
    journal.close();
    let inputs = [archive, dir.join("j")];
    let set = MediaSet::open(&inputs)?;
    let gap_flags: Vec<u8> = set
        .sequenced()
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .filter(|r| r.record.header.op == Op::Gap)
        .map(|r| r.record.header.flags)
        .collect();
    assert_eq!(gap_flags, vec![0], "the count was known: not estimated");
    let report = verify(&set);
    assert!(report.sequence_breaks.iter().all(|b| b.recorded_gap));
    assert!(
        report
            .stops
            .iter()
            .all(|s| s.resolved || !s.cause.loses_writes()),
        "{report:#?}"
    );
    assert!(restore_end(dir, &inputs, Until::End, false).is_err());
    restore_end(dir, &inputs, Until::End, true)?;

    // The async run was closed cleanly: no gap on the next start.
    let journal = Journal::open(JournalOptions::new(dir.join("j")))?;
    assert_eq!(journal.status().gaps.len(), 0);
    journal.close();
    Ok(())
}

#[test]
fn async_crash_is_recorded_as_an_estimated_gap() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut o = JournalOptions::new(dir.join("j"));
    o.mode = JournalMode::Async;
    let journal = Journal::open(o.clone())?;
    journal.mark("before")?;
    journal.crash_for_test();
    drop(journal);
    let journal = Journal::open(o)?;
    let gaps = journal.status().gaps;
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    journal.close();
    let set = MediaSet::open(&[dir.join("j")])?;
    let flags: Vec<u8> = set
        .sequenced()
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .filter(|r| r.record.header.op == Op::Gap)
        .map(|r| r.record.header.flags)
        .collect();
    assert_eq!(flags, vec![FLAG_GAP_ESTIMATED]);
    Ok(())
}

#[test]
fn demuxed_streams_carry_the_stop() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let first_missing = fill_until_stopped(dir)?;
    let set = MediaSet::open(&[dir.join("j")])?;
    let outputs = super::super::demux::demux(&set, &dir.join("demuxed"))?;
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    let demuxed = [outputs[0].path.clone()];
    let stops = stops_on(&outputs[0].path)?;
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert_eq!(stops[0].0, first_missing - 1);
    assert_eq!(stops[0].1.cause, StopCause::Full);
    assert_eq!(stops[0].1.first_unjournaled_seq, first_missing);

    let report = verify(&MediaSet::open(&demuxed)?);
    assert!(
        !report.ok(),
        "an unresolved stop is a problem on the demuxed stream too"
    );
    let refused = restore_end(dir, &demuxed, Until::End, false);
    let err = refused.err().ok_or("restore to the end must be refused")?;
    assert!(err.to_string().contains("journaling stopped"), "{err}");
    let from_demuxed = restore_end(dir, &demuxed, Until::End, true)?;
    let from_demuxed_image = std::fs::read(dir.join("vs.out"))?;
    assert!(!from_demuxed.warnings.is_empty());
    restore_end(dir, &[dir.join("j")], Until::End, true)?;
    assert_eq!(std::fs::read(dir.join("vs.out"))?, from_demuxed_image);
    let report = restore_end(dir, &demuxed, Until::Seq(first_missing - 1), false)?;
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    Ok(())
}
