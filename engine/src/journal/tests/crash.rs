//! Crash recovery: a child process journals writes in sync mode and is killed mid-stream;
//! a torn record is appended to its last medium. Reopening must detect and cut the torn
//! tail, continue the sequence, and every write the child saw completed must be there.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use super::super::media::list_media;
use super::super::options::Committer;
use super::super::{Journal, JournalOptions};
use super::support::{open_volume, pattern, verify_and_restore, write, TestResult};
use crate::VolumeQueue;

const CHILD_ENV: &str = "FERRY_JOURNAL_CRASH_CHILD_DIR";
/// Set (to N) when the child journals with `spares=N` on pre-formatted spares.
const SPARES_ENV: &str = "FERRY_JOURNAL_CRASH_CHILD_SPARES";
/// Set to `queue` when the child's queue thread makes the group commits (`committer=queue`).
const COMMITTER_ENV: &str = "FERRY_JOURNAL_CRASH_CHILD_COMMITTER";
const WRITE_BYTES: usize = 4096;
const SLOTS: u64 = 64;
/// How many writes the child may complete beyond those the parent has read of: the child
/// takes one byte from its stdin per write past this lead, and the parent sends one per
/// `DONE` line it reads. However slow the parent, the child is killed mid-stream within
/// this many writes of the ones the parent saw, so it stays on the media formatted for it.
const CHILD_LEAD_WRITES: u64 = 8;

/// The child: journals writes forever, printing `DONE <i>` after each completes.
#[test]
#[ignore = "run as a child process by crash_mid_stream_is_recovered"]
fn crash_child() -> TestResult {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return Ok(());
    };
    let dir = std::path::PathBuf::from(dir);
    let mut o = JournalOptions::new(dir.join("j"));
    o.capacity_bytes = 256 * 1024;
    o.spares = std::env::var(SPARES_ENV).map_or(Ok(0), |s| s.parse())?;
    if std::env::var(COMMITTER_ENV).is_ok_and(|c| c == "queue") {
        o.committer = Committer::Queue;
    }
    let journal = Journal::open(o)?;
    let v = open_volume(&dir, "vc", SLOTS * WRITE_BYTES as u64)?;
    v.add_observer(journal.observer());
    let mut q = VolumeQueue::new(v, 0, 4, 4)?;
    let mut go_on = std::io::stdin().lock();
    for i in 0.. {
        if i >= CHILD_LEAD_WRITES {
            let mut byte = [0u8; 1];
            std::io::Read::read_exact(&mut go_on, &mut byte)?;
        }
        write(
            &mut q,
            (i % SLOTS) * WRITE_BYTES as u64,
            &pattern(i, WRITE_BYTES),
        )?;
        println!("DONE {i}");
    }
    Ok(())
}

#[test]
fn crash_mid_stream_is_recovered() -> TestResult {
    crash_case(0, Committer::Writer)
}

/// The same on formatted media: the killed child's last medium is a spare with a zero tail.
#[test]
fn crash_mid_stream_on_formatted_media_is_recovered() -> TestResult {
    crash_case(2, Committer::Writer)
}

/// The same with the child's queue thread making the group commits.
#[test]
fn crash_mid_stream_with_queue_commits_is_recovered() -> TestResult {
    crash_case(0, Committer::Queue)
}

fn crash_case(spares: u32, committer: Committer) -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    if spares > 0 {
        // Enough formatted media for the whole run (150 writes and the child's lead fill
        // three media), so the last medium is a spare whether or not the idle-priority
        // formatter got CPU to refill.
        let j = dir.join("j");
        super::super::spares::format_spares(&j, spares + 4, 256 * 1024, &mut |_, _| {})?;
    }
    std::fs::write(dir.join("vc.base"), vec![0u8; SLOTS as usize * WRITE_BYTES])?;
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "journal::tests::crash::crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .env(SPARES_ENV, spares.to_string())
        .env(
            COMMITTER_ENV,
            if committer == Committer::Queue {
                "queue"
            } else {
                "writer"
            },
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    let mut go_on = child.stdin.take().ok_or("no child stdin")?;
    let mut last_done = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(n) = line.strip_prefix("DONE ") {
            last_done = Some(n.parse::<u64>()?);
            std::io::Write::write_all(&mut go_on, b"+")?;
            if last_done >= Some(150) {
                break;
            }
        }
    }
    child.kill()?;
    child.wait()?;
    let last_done = last_done.ok_or("the child completed no write")?;

    // A torn append: half a record after the last valid one.
    let media = list_media(&dir.join("j"))?;
    let (_, last_path) = media.last().ok_or("no media")?;
    let mut bytes = std::fs::read(last_path)?;
    let scan = super::super::scan::scan_medium(bytes.as_slice())?;
    assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    let good_len = scan.valid_end_bytes;
    if spares > 0 {
        assert!(
            scan.zero_tail_bytes > 0,
            "the last medium was not a formatted spare"
        );
        assert_eq!(bytes.len() as u64, good_len + scan.zero_tail_bytes);
    }
    bytes.truncate(good_len as usize);
    let mut torn = Vec::new();
    let h = super::super::format::RecordHeader {
        op: super::super::format::Op::Write,
        flags: 0,
        seq: 1 << 40,
        stream_id: 1,
        log_id: 1,
        timestamp_ns: 0,
        offset_bytes: 0,
        len_bytes: 4096,
        payload_len_bytes: 0,
        payload_crc: 0,
    };
    super::super::format::encode_record(&mut torn, h, &[0xAB; 4096]);
    bytes.extend_from_slice(&torn[..1000]);
    // On a formatted medium the torn record is followed by the rest of the zeros.
    let len_bytes = (good_len + scan.zero_tail_bytes).max(bytes.len() as u64);
    bytes.resize(len_bytes as usize, 0);
    std::fs::write(last_path, &bytes)?;

    let journal = Journal::open(JournalOptions::new(dir.join("j")))?;
    let status = journal.status();
    let tail = status.recovered_torn_tail.ok_or("torn tail not detected")?;
    assert_eq!(tail.valid_end_bytes, good_len);
    assert_eq!(tail.torn_bytes, len_bytes - good_len);
    let mark = journal.mark("after-crash")?;
    journal.close();

    // Every completed write is in the journal: replaying gives each slot's last completed pattern.
    let (report, image) = verify_and_restore(dir, "vc")?;
    assert_eq!(report.last_seq, Some(mark.seq));
    for slot in 0..SLOTS {
        let at = (slot as usize) * WRITE_BYTES;
        let got = &image[at..at + WRITE_BYTES];
        // The newest completed write to this slot, or one in flight after it (also fine).
        let newest_done = (0..=last_done).rev().find(|i| i % SLOTS == slot);
        if let Some(i) = newest_done {
            let ok = got == pattern(i, WRITE_BYTES).as_slice()
                || got == pattern(i + SLOTS, WRITE_BYTES).as_slice();
            assert!(
                ok,
                "slot {slot}: completed write {i} missing from the journal"
            );
        }
    }
    Ok(())
}

/// A writer killed after sealing a full medium, before appending the rest of its batch,
/// leaves a trailer whose number (the last one *assigned*) was never journaled. The restart
/// must continue after the last journaled record, or verify sees numbers missing.
#[test]
fn restart_numbers_after_the_last_journaled_record() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let (journal, q) = journal_eight_writes(dir)?;
    let status = journal.status();
    let journaled = status.durable_seq;
    journal.crash_for_test();
    drop(q);
    // The bookkeeping record of an append whose batch held numbers up to `journaled + 3`,
    // at the append point (the end of a growing medium; inside a mapped one, which is as
    // long as its capacity).
    let media = list_media(&dir.join("j"))?;
    let (_, last_path) = media.last().ok_or("no media")?;
    let medium = std::fs::OpenOptions::new().write(true).open(last_path)?;
    let record = super::super::format::padding_record(4096, journaled + 3, 1);
    std::os::unix::fs::FileExt::write_all_at(&medium, &record, status.position_bytes)?;

    let journal = Journal::open(JournalOptions::new(dir.join("j")))?;
    let mark = journal.mark("after-restart")?;
    assert_eq!(mark.seq, journaled + 1);
    journal.close();
    let (report, image) = verify_and_restore(dir, "vc")?;
    assert_eq!(report.last_seq, Some(mark.seq));
    assert_eight_writes(&image);
    Ok(())
}

/// A daemon killed after sealing a medium and before opening the next one (media are opened
/// by the first append after a seal) leaves a sealed newest medium. If bytes that are not
/// records follow its trailer, the restart must tell readers where it ends, as for a cut one.
#[test]
fn bytes_after_a_sealed_newest_medium_are_cut_on_restart() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let (journal, q) = journal_eight_writes(dir)?;
    journal.seal()?;
    journal.crash_for_test();
    drop(q);
    let media = list_media(&dir.join("j"))?;
    assert_eq!(media.len(), 1, "the seal opened a medium before any append");
    let (_, sealed_path) = &media[0];
    let mut bytes = std::fs::read(sealed_path)?;
    let sealed_len = bytes.len() as u64;
    bytes.extend_from_slice(&[0xAB; 1000]);
    std::fs::write(sealed_path, &bytes)?;

    let journal = Journal::open(JournalOptions::new(dir.join("j")))?;
    let tail = journal
        .status()
        .recovered_torn_tail
        .ok_or("bytes after the trailer not detected")?;
    assert_eq!((tail.valid_end_bytes, tail.torn_bytes), (sealed_len, 1000));
    let mark = journal.mark("after-restart")?;
    journal.close();
    let (report, image) = verify_and_restore(dir, "vc")?;
    assert_eq!(report.last_seq, Some(mark.seq));
    assert_eq!(report.media[0].recovered_end_bytes, Some(sealed_len));
    assert_eight_writes(&image);
    Ok(())
}

/// A sync journal in `dir/j` over volume `vc` (base `dir/vc.base`, zeros) holding eight
/// 4 KiB writes, pattern i at block i; returns the journal and the queue that wrote them.
fn journal_eight_writes(
    dir: &std::path::Path,
) -> TestResult<(std::sync::Arc<Journal>, VolumeQueue)> {
    std::fs::write(dir.join("vc.base"), vec![0u8; 8 * WRITE_BYTES])?;
    let journal = Journal::open(JournalOptions::new(dir.join("j")))?;
    let v = open_volume(dir, "vc", 8 * WRITE_BYTES as u64)?;
    v.add_observer(journal.observer());
    let mut q = VolumeQueue::new(v, 0, 4, 4)?;
    for i in 0..8u64 {
        write(&mut q, i * WRITE_BYTES as u64, &pattern(i, WRITE_BYTES))?;
    }
    Ok((journal, q))
}

/// Checks a restored image of [`journal_eight_writes`]'s volume.
fn assert_eight_writes(image: &[u8]) {
    for i in 0..8usize {
        assert!(image[i * WRITE_BYTES..(i + 1) * WRITE_BYTES] == pattern(i as u64, WRITE_BYTES));
    }
}
