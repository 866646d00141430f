//! Records appended through the mapped tail of a memory-backed medium (`mapped=on`): many
//! queue threads at once with marks and seals taking the tail back between them, media
//! filling up and rotating, a crash with the tail lent, and a filesystem that runs out of
//! room (the journal must stop, never the process with a SIGBUS).

use std::sync::Arc;

use super::super::format::{Op, BLOCK_BYTES};
use super::super::media::list_media;
use super::super::writer::AppendPath;
use super::super::{Journal, JournalMode, JournalOptions, JournalState, MappedAppends};
use super::support::{
    open_volume, pattern, spawn_slot_writers, verify_and_restore, write, TestResult,
};
use crate::VolumeQueue;
use ferry_test_support::{images, require_ok};

const WRITE_BYTES: usize = 4096;

/// A directory on tmpfs (`/dev/shm`), where media are mapped; `None` where there is none:
/// the test then skips, or fails under `FERRY_REQUIRE_ALL`.
fn memory_dir() -> TestResult<Option<tempfile::TempDir>> {
    Ok(require_ok("a tmpfs at /dev/shm", images::memory_dir()))
}

#[test]
fn concurrent_queues_append_through_the_tail_across_marks_seals_and_full_media() -> TestResult {
    const THREADS: u64 = 4;
    const WRITES_PER_THREAD: u64 = 400;
    let Some(tmp) = memory_dir()? else {
        return Ok(());
    };
    let dir = tmp.path();
    for mode in [JournalMode::Sync, JournalMode::Async] {
        let volume = format!("v{mode:?}");
        let volume_bytes = THREADS * WRITES_PER_THREAD * WRITE_BYTES as u64;
        std::fs::write(
            dir.join(format!("{volume}.base")),
            vec![0u8; volume_bytes as usize],
        )?;
        let mut options = JournalOptions::new(dir.join("j"));
        // ~250 writes per medium: the tail gives up at the end of each and the writer rotates.
        options.capacity_bytes = 1 << 20;
        options.mode = mode;
        // `auto` maps sync journals only.
        options.mapped = MappedAppends::On;
        let journal = Journal::open(options)?;
        let v = open_volume(dir, &volume, volume_bytes)?;
        v.add_observer(journal.observer());
        let workers = spawn_slot_writers(&v, THREADS, WRITES_PER_THREAD, WRITE_BYTES);
        let mut marks = 0;
        while !workers.iter().all(|w| w.is_finished()) {
            let mark = journal.mark(&format!("m{marks}"))?;
            assert!(journal.status().durable_seq >= mark.seq);
            if marks % 3 == 2 {
                journal.seal()?;
            }
            marks += 1;
            std::thread::sleep(std::time::Duration::from_millis(3));
        }
        for w in workers {
            w.join().map_err(|_| "a writer thread panicked")??;
        }
        // An async journal makes the last writes durable in its own time: a mark waits for
        // everything before it.
        let last = journal.mark("end")?;
        let status = journal.status();
        assert!(status.durable_seq >= last.seq, "{status:#?}");
        assert_eq!(status.appends, Some(AppendPath::Mapped), "{status:#?}");
        // How many depends on timing: after every seal and rotation records go to the
        // writer until it has opened the next medium and lends its tail again.
        assert!(status.mapped_records > 0, "{status:#?}");
        assert_eq!(status.lag_bytes, 0, "{status:#?}");
        assert_eq!(status.durable_seq + 1, status.next_seq, "{status:#?}");
        v.backing().sync()?;
        journal.close();
        let (report, image) = verify_and_restore(dir, &volume)?;
        assert!(report.media.len() > 5, "media rotated: {report:#?}");
        assert!(image == std::fs::read(dir.join(format!("{volume}.img")))?);
        // Sealed media are cut at their last record, as growing ones are.
        for (_, path) in list_media(&dir.join("j"))? {
            assert!(std::fs::metadata(&path)?.len() < 1 << 20, "{path:?}");
        }
        std::fs::remove_dir_all(dir.join("j"))?;
    }
    Ok(())
}

/// A crash while the tail is lent leaves the medium as long as its capacity, zeros after
/// the last record: the restart reads that as the end of data, not as a torn tail, and every
/// write that completed is in the journal.
#[test]
fn a_crash_with_the_tail_lent_loses_no_completed_write() -> TestResult {
    crash_with_the_tail_lent(false)
}

/// The same with a record cut short by the crash: its payload partly copied, its header
/// (written last) not yet there. The restart cuts it off as a torn tail.
#[test]
fn a_record_cut_short_in_the_mapping_is_a_torn_tail() -> TestResult {
    crash_with_the_tail_lent(true)
}

fn crash_with_the_tail_lent(cut_short: bool) -> TestResult {
    let Some(tmp) = memory_dir()? else {
        return Ok(());
    };
    let dir = tmp.path();
    std::fs::write(dir.join("v.base"), vec![0u8; 64 * WRITE_BYTES])?;
    let mut options = JournalOptions::new(dir.join("j"));
    options.capacity_bytes = 4 << 20;
    let journal = Journal::open(options.clone())?;
    let v = open_volume(dir, "v", 64 * WRITE_BYTES as u64)?;
    v.add_observer(journal.observer());
    let mut q = VolumeQueue::new(v.clone(), 0, 4, 4)?;
    for i in 0..64u64 {
        write(&mut q, i * WRITE_BYTES as u64, &pattern(i, WRITE_BYTES))?;
    }
    let status = journal.status();
    assert_eq!(status.appends, Some(AppendPath::Mapped), "{status:#?}");
    // Not at a block boundary: the tail was lent and not taken back.
    assert_ne!(status.position_bytes % BLOCK_BYTES as u64, 0, "{status:#?}");
    journal.crash_for_test();
    drop(q);
    let media = list_media(&dir.join("j"))?;
    assert_eq!(media.len(), 1);
    assert_eq!(std::fs::metadata(&media[0].1)?.len(), 4 << 20);
    if cut_short {
        let medium = std::fs::OpenOptions::new().write(true).open(&media[0].1)?;
        let payload = pattern(99, 1000);
        std::os::unix::fs::FileExt::write_all_at(&medium, &payload, status.position_bytes + 64)?;
    }

    let journal = Journal::open(options)?;
    let recovered = journal.status().recovered_torn_tail;
    if cut_short {
        let tail = recovered.ok_or("the record cut short was not found")?;
        assert_eq!(tail.valid_end_bytes, status.position_bytes, "{tail:?}");
    } else {
        assert!(recovered.is_none_or(|t| t.torn_bytes == 0), "{recovered:?}");
    }
    let mark = journal.mark("after-restart")?;
    journal.close();
    v.backing().sync()?;
    let (report, image) = verify_and_restore(dir, "v")?;
    assert_eq!(report.last_seq, Some(mark.seq));
    assert!(image == std::fs::read(dir.join("v.img"))?);
    Ok(())
}

/// Records that fit only in part of a medium: the last one before the reserve goes to the
/// writer, which rotates; every log entry names the medium and position it was read from.
#[test]
fn log_entries_of_mapped_records_point_at_their_records() -> TestResult {
    let Some(tmp) = memory_dir()? else {
        return Ok(());
    };
    let dir = tmp.path();
    let mut options = JournalOptions::new(dir.join("j"));
    options.capacity_bytes = 256 << 10;
    let journal = Journal::open(options)?;
    let v = open_volume(dir, "v", 1 << 20)?;
    v.add_observer(journal.observer());
    let mut q = VolumeQueue::new(v, 0, 4, 4)?;
    for i in 0..200u64 {
        let len = WRITE_BYTES * (1 + i as usize % 3) - 512 * (i as usize % 2);
        write(&mut q, (i % 64) * 8192, &pattern(i, len))?;
    }
    journal.close();
    let entries = journal.retrieve(0, usize::MAX).to_vec();
    let media = list_media(&dir.join("j"))?;
    assert!(media.len() > 3);
    let writes = entries.iter().filter(|e| e.op == Op::Write).count();
    assert_eq!(writes, 200);
    for e in entries.iter().filter(|e| e.op == Op::Write) {
        let (_, path) = media
            .iter()
            .find(|(index, _)| *index == e.medium)
            .ok_or("medium missing")?;
        let bytes = std::fs::read(path)?;
        let at = e.position_bytes as usize;
        let header = super::super::format::RecordHeader::decode(&bytes[at..at + 64])?;
        assert_eq!((header.seq, header.op), (e.seq, Op::Write));
        assert_eq!(header.offset_bytes, e.offset_bytes);
    }
    Ok(())
}

/// The mount point of a small tmpfs, unmounted on drop; `None` without the right to mount
/// (the test then skips, or fails under `FERRY_REQUIRE_ALL`).
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn mount(bytes: u64) -> TestResult<Option<Self>> {
        let dir = tempfile::tempdir()?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "ferry-test"])
            .arg(dir.path())
            .output();
        let mounted = match out {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            Err(e) => Err(e.to_string()),
        };
        Ok(require_ok("mounting a tmpfs (root)", mounted).map(|()| Self { dir }))
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// A medium on a filesystem smaller than the medium's capacity: faulting pages in fails
/// before the filesystem is full, the writer meets ENOSPC, the journal stops with a gap and
/// the guest's writes go on (a store into an unbacked page would have killed the daemon).
#[test]
fn a_full_filesystem_stops_the_journal_not_the_daemon() -> TestResult {
    let Some(fs) = SmallTmpfs::mount(2 << 20)? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let mut options = JournalOptions::new(fs.dir.path().join("j"));
    options.capacity_bytes = 64 << 20;
    let journal: Arc<Journal> = Journal::open(options)?;
    let v = open_volume(tmp.path(), "v", 1 << 20)?;
    v.add_observer(journal.observer());
    let mut q = VolumeQueue::new(v, 0, 4, 4)?;
    for i in 0..1024u64 {
        write(&mut q, (i % 256) * 4096, &pattern(i, WRITE_BYTES))?;
    }
    let status = journal.status();
    assert_eq!(status.state, JournalState::Stopped, "{status:#?}");
    assert!(status.mapped_records > 0, "{status:#?}");
    assert!(
        status.open_gap.is_some_and(|g| g.missing_count > 0),
        "{status:#?}"
    );
    journal.close();
    Ok(())
}
