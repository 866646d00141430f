//! Pre-formatted spare media: a journal with `spares=N` takes every medium from a spare and
//! restores the same image as one without; sealed media are cut to their end; a crash on a
//! formatted medium recovers cleanly; the scanner tells a zero tail from a torn one.

use std::path::Path;

use super::super::format::{encode_record, MediumHeader, Op, RecordHeader};
use super::super::media::{list_media, MediaSet};
use super::super::prologue::{encode_prologue, Prologue};
use super::super::scan::scan_medium;
use super::super::spares::{format_spares, list_spares};
use super::super::verify::verify;
use super::super::{Journal, JournalOptions};
use super::support::{journaled_v, pattern, verify_and_restore_v, write, Rng, TestResult};

const CAPACITY_BYTES: u64 = 256 * 1024;
const VOLUME_BYTES: u64 = 1 << 20;
const WRITE_BYTES: usize = 4096;

fn options(dir: &Path, spares: u32) -> JournalOptions {
    let mut o = JournalOptions::new(dir.join("j"));
    o.capacity_bytes = CAPACITY_BYTES;
    o.spares = spares;
    o
}

/// Writes `count` deterministic 4 KiB blocks to volume `v` of `dir`; returns the image.
fn run_writes(
    dir: &Path,
    journal: &std::sync::Arc<Journal>,
    count: u64,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let (_v, mut q, mut image) = journaled_v(dir, journal, VOLUME_BYTES, 7)?;
    let mut rng = Rng::new(99);
    let slots = VOLUME_BYTES / WRITE_BYTES as u64;
    for i in 0..count {
        let at = rng.below(slots) as usize * WRITE_BYTES;
        let data = pattern(1000 + i, WRITE_BYTES);
        write(&mut q, at as u64, &data).map_err(|e| format!("{e:?}"))?;
        image[at..at + WRITE_BYTES].copy_from_slice(&data);
    }
    Ok(image)
}

#[test]
fn every_medium_comes_from_a_spare_and_restores_the_same() -> TestResult {
    let plain = tempfile::tempdir()?;
    let journal = Journal::open(options(plain.path(), 0))?;
    let expected = run_writes(plain.path(), &journal, 200)?;
    journal.close();
    assert_eq!(journal.status().spares_taken, 0);
    assert!(list_spares(&plain.path().join("j"), CAPACITY_BYTES)?.is_empty());
    assert_eq!(verify_and_restore_v(plain.path())?, expected);

    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    // Enough spares up front for every medium of the run (the formatter also refills).
    let report = format_spares(&dir.join("j"), 8, CAPACITY_BYTES, &mut |_, _| {})?;
    assert_eq!(report.created, 8);
    let journal = Journal::open(options(dir, 2))?;
    let image = run_writes(dir, &journal, 200)?;
    journal.close();
    assert_eq!(image, expected);
    let media = list_media(&dir.join("j"))?;
    assert!(media.len() > 2, "rotation expected, got {}", media.len());
    assert_eq!(journal.status().spares_taken, media.len() as u64);
    for (_, path) in &media {
        let len = std::fs::metadata(path)?.len();
        assert!(
            len < CAPACITY_BYTES,
            "{} not cut to its end",
            path.display()
        );
        let scan = scan_medium(&super::super::scan::FileSource::open(path)?)?;
        assert!(scan.sealed && scan.problems.is_empty() && scan.zero_tail_bytes == 0);
    }
    assert_eq!(verify_and_restore_v(dir)?, expected);
    Ok(())
}

#[test]
fn crash_on_a_formatted_medium_recovers_cleanly() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    format_spares(&dir.join("j"), 2, CAPACITY_BYTES, &mut |_, _| {})?;
    let journal = Journal::open(options(dir, 2))?;
    let expected = run_writes(dir, &journal, 20)?;
    journal.crash_for_test();
    drop(journal);
    let media = list_media(&dir.join("j"))?;
    let (_, last) = media.last().ok_or("no media")?;
    assert_eq!(std::fs::metadata(last)?.len(), CAPACITY_BYTES);
    let scan = scan_medium(&super::super::scan::FileSource::open(last)?)?;
    assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    assert!(!scan.sealed);
    assert_eq!(scan.zero_tail_bytes, CAPACITY_BYTES - scan.valid_end_bytes);

    // Unsealed, formatted: verify and restore read it as is.
    assert_eq!(verify_and_restore_v(dir)?, expected);
    let journal = Journal::open(options(dir, 2))?;
    assert!(journal.status().recovered_torn_tail.is_none());
    let mark = journal.mark("after-crash")?;
    journal.close();
    let set = MediaSet::open(&[dir.join("j")])?;
    let report = verify(&set);
    assert!(report.ok(), "{report:#?}");
    assert_eq!(report.last_seq, Some(mark.seq));
    assert_eq!(verify_and_restore_v(dir)?, expected);
    Ok(())
}

fn write_record(out: &mut Vec<u8>, seq: u64, fill: u8) {
    let h = RecordHeader {
        op: Op::Write,
        flags: 0,
        seq,
        stream_id: 1,
        log_id: 1,
        timestamp_ns: 0,
        offset_bytes: 0,
        len_bytes: 4096,
        payload_len_bytes: 0,
        payload_crc: 0,
    };
    encode_record(out, h, &[fill; 4096]);
}

#[test]
fn scan_tells_a_zero_tail_from_a_torn_one() -> TestResult {
    let medium_bytes = 64 * 1024;
    let header = MediumHeader {
        journal_id: 1,
        medium_index: 0,
        flags: 0,
        capacity_bytes: medium_bytes as u64,
        prev_valid_end_bytes: u64::MAX,
    };
    let mut good = encode_prologue(&header, &Prologue::default());
    write_record(&mut good, 1, 0xA1);
    write_record(&mut good, 2, 0xA2);
    let good_len = good.len();

    // Records, then zeros: a clean end.
    let mut formatted = good.clone();
    formatted.resize(medium_bytes, 0);
    let scan = scan_medium(formatted.as_slice())?;
    assert_eq!(scan.records.len(), 3);
    assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    assert_eq!(scan.valid_end_bytes, good_len as u64);
    assert_eq!(scan.zero_tail_bytes, (medium_bytes - good_len) as u64);

    // Records, a torn record, then zeros: torn.
    let mut torn = Vec::new();
    write_record(&mut torn, 3, 0xA3);
    let mut bytes = good.clone();
    bytes.extend_from_slice(&torn[..1000]);
    bytes.resize(medium_bytes, 0);
    let scan = scan_medium(bytes.as_slice())?;
    assert_eq!(scan.records.len(), 3);
    let tail = scan.torn_tail().ok_or("torn tail not reported")?;
    assert_eq!(tail.offset_bytes, good_len as u64);
    assert_eq!(scan.zero_tail_bytes, 0);

    // A torn append whose header block is zero but a later block landed: not clean.
    let mut bytes = good.clone();
    bytes.resize(good_len + 8192, 0);
    bytes.extend_from_slice(&torn[4096..]);
    bytes.resize(medium_bytes, 0);
    let scan = scan_medium(bytes.as_slice())?;
    assert!(scan.torn_tail().is_some(), "{:?}", scan.problems);

    // Zeros, then a valid record: damage, not the end.
    let mut bytes = good;
    bytes.resize(good_len + 4096, 0);
    write_record(&mut bytes, 3, 0xA3);
    bytes.resize(medium_bytes, 0);
    let scan = scan_medium(bytes.as_slice())?;
    assert_eq!(scan.records.len(), 4);
    assert_eq!(scan.problems.len(), 1);
    assert!(!scan.problems[0].torn_tail);

    // Zeros after the records of a medium shorter than its capacity (a growing medium
    // extended by a crash before its data landed): a torn tail, as without spares.
    let mut bytes = formatted;
    bytes.truncate(good_len + 4096);
    let scan = scan_medium(bytes.as_slice())?;
    assert!(scan.torn_tail().is_some(), "{:?}", scan.problems);
    assert_eq!(scan.zero_tail_bytes, 0);
    Ok(())
}

/// The scheduling policy (`SCHED_*`) of this process's thread named `name` (as the kernel
/// keeps it: at most 15 bytes), if any.
fn thread_policy(name: &str) -> Option<u32> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        // Fields after the parenthesised command; `policy` is field 41 of stat(5).
        let rest = &stat[stat.rfind(')')? + 2..];
        return rest.split(' ').nth(41 - 3)?.parse().ok();
    }
    None
}

#[test]
fn the_formatter_runs_at_idle_priority_and_refills() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("j");
    std::fs::create_dir_all(&dir)?;
    let formatter = super::super::spares::SpareFormatter::start(dir.clone(), CAPACITY_BYTES, 2)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while list_spares(&dir, CAPACITY_BYTES)?.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "spares not formatted");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        thread_policy("ferry-journal-f"),
        Some(libc::SCHED_IDLE as u32)
    );
    drop(formatter);
    for spare in list_spares(&dir, CAPACITY_BYTES)? {
        assert!(std::fs::read(&spare)?.iter().all(|&b| b == 0));
    }
    Ok(())
}
