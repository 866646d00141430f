//! A full journal: on-full=stop keeps the guest running and records the gap; journal-init
//! restarts on a new medium; verify and restore see the gap. on-full=pause holds the guest
//! until room appears.

use super::super::media::MediaSet;
use super::super::restore::{restore, RestoreOptions, Until};
use super::super::verify::verify;
use super::super::{Committer, Journal, JournalOptions, JournalState, OnFull};
use super::support::{open_volume, pattern, write, TestResult};
use crate::VolumeQueue;

fn small(dir: &std::path::Path, on_full: OnFull, committer: Committer) -> JournalOptions {
    let mut o = JournalOptions::new(dir.join("j"));
    o.committer = committer;
    o.capacity_bytes = 256 * 1024;
    o.media_max = 1;
    o.on_full = on_full;
    o
}

#[test]
fn full_journal_stops_records_the_gap_and_restarts_on_init() -> TestResult {
    full_case(Committer::Writer)
}

/// The same with the queue thread making the group commits (it meets the full medium).
#[test]
fn full_journal_committed_by_the_queue_stops_records_the_gap_and_restarts() -> TestResult {
    full_case(Committer::Queue)
}

fn full_case(committer: Committer) -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let journal = Journal::open(small(dir, OnFull::Stop, committer))?;
    let v = open_volume(dir, "vf", 1 << 20)?;
    std::fs::copy(dir.join("vf.img"), dir.join("vf.base"))?;
    v.add_observer(journal.observer());
    let mut q = VolumeQueue::new(v, 0, 4, 4)?;
    for i in 0..100u64 {
        // The guest never sees a failure, even once the journal is full.
        write(&mut q, (i % 16) * 16384, &pattern(i, 16384))?;
    }
    let status = journal.status();
    assert_eq!(status.state, JournalState::Stopped, "{status:?}");
    assert!(status.reason.as_deref().unwrap_or("").contains("full"));
    let gap = status.open_gap.ok_or("no open gap")?;
    assert!(gap.missing_count > 0);
    assert!(journal.mark("while-stopped").is_err());
    // Archive the full medium; init restarts on a new one and records the gap.
    let archive = dir.join("archive");
    std::fs::create_dir(&archive)?;
    std::fs::rename(
        dir.join("j/medium-000000.fj"),
        archive.join("medium-000000.fj"),
    )?;
    journal.init("after-gap")?;
    let status = journal.status();
    assert_eq!(status.state, JournalState::Running);
    assert_eq!(status.gaps.len(), 1);
    write(&mut q, 0, &pattern(1000, 4096))?;
    journal.close();

    let set = MediaSet::open(&[archive.clone(), dir.join("j")])?;
    let report = verify(&set);
    assert!(!report.ok());
    assert!(
        report.sequence_breaks.iter().all(|b| b.recorded_gap),
        "{report:#?}"
    );
    let mut opts = RestoreOptions {
        volume: "vf".into(),
        base: dir.join("vf.base"),
        out: dir.join("vf.out"),
        until: Until::End,
        allow_gaps: false,
    };
    assert!(
        restore(&set, &opts, &mut |_| {}).is_err(),
        "a broken range must be refused"
    );
    opts.allow_gaps = true;
    restore(&set, &opts, &mut |_| {})?;
    Ok(())
}

#[test]
fn pause_holds_the_guest_until_room_appears() -> TestResult {
    pause_case(Committer::Writer)
}

/// The same with the queue thread making the group commits: it meets the full media and
/// hands the held batch to the writer thread, which retries.
#[test]
fn pause_with_queue_commits_holds_the_guest_until_room_appears() -> TestResult {
    pause_case(Committer::Queue)
}

fn pause_case(committer: Committer) -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    let journal = Journal::open(small(&dir, OnFull::Pause, committer))?;
    let v = open_volume(&dir, "vp", 1 << 20)?;
    v.add_observer(journal.observer());
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || -> Result<(), String> {
        let mut q = VolumeQueue::new(v, 0, 4, 4).map_err(|e| e.to_string())?;
        for i in 0..20u64 {
            write(&mut q, (i % 16) * 16384, &pattern(i, 16384)).map_err(|e| e.to_string())?;
            let _ = tx.send(i);
        }
        Ok(())
    });
    // Wait until the journal is full: from then on it holds the guest's writes.
    let paused = || Ok(journal.status().state == JournalState::Paused);
    ferry_test_support::wait_until(
        "the journal paused",
        ferry_test_support::HANG_TIMEOUT,
        paused,
    )?;
    let last = rx.try_iter().last();
    assert!(
        last < Some(19) && !writer.is_finished(),
        "the guest should be held by a full journal"
    );
    std::fs::create_dir(dir.join("archive"))?;
    std::fs::rename(
        dir.join("j/medium-000000.fj"),
        dir.join("archive/medium-000000.fj"),
    )?;
    writer.join().map_err(|_| "writer panicked")??;
    assert_eq!(journal.status().state, JournalState::Running);
    journal.close();
    let set = MediaSet::open(&[dir.join("archive"), dir.join("j")])?;
    let report = verify(&set);
    assert!(report.ok(), "no gap with on-full=pause: {report:#?}");
    Ok(())
}
