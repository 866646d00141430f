//! Group commits made by the queue threads (`committer=queue`): several threads, each with
//! its own queue, write concurrently while marks and seals go through the writer thread;
//! whoever holds the appender commits for the others, and no write is left waiting. Also
//! how `committer=auto` resolves.

use std::sync::Arc;

use super::super::options::Committer;
use super::super::{Journal, JournalMode, JournalOptions};
use super::support::{
    open_volume, pattern, spawn_slot_writers, verify_and_restore, write, TestResult,
};
use crate::VolumeQueue;

const WRITE_BYTES: usize = 4096;
const THREADS: u64 = 4;
const WRITES_PER_THREAD: u64 = 300;

#[test]
fn concurrent_queues_commit_each_others_writes() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let volume_bytes = THREADS * WRITES_PER_THREAD * WRITE_BYTES as u64;
    std::fs::write(dir.join("vq.base"), vec![0u8; volume_bytes as usize])?;
    let mut options = JournalOptions::new(dir.join("j"));
    options.capacity_bytes = 1 << 20;
    options.committer = Committer::Queue;
    let journal = Journal::open(options)?;
    let v = open_volume(dir, "vq", volume_bytes)?;
    v.add_observer(journal.observer());
    let workers = spawn_slot_writers(&v, THREADS, WRITES_PER_THREAD, WRITE_BYTES);
    // Marks and seals from another thread meanwhile: the writer thread takes the appender
    // between the queues' commits.
    let mut marks = 0;
    while !workers.iter().all(|w| w.is_finished()) {
        journal.mark(&format!("m{marks}"))?;
        if marks % 4 == 3 {
            journal.seal()?;
        }
        marks += 1;
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    for w in workers {
        w.join().map_err(|_| "a writer thread panicked")??;
    }
    assert!(marks > 0);
    let status = journal.status();
    assert_eq!(status.committer, Committer::Queue);
    assert_eq!(status.lag_bytes, 0, "{status:#?}");
    assert!(status.queue_commits > 0, "{status:#?}");
    assert!(status.records >= THREADS * WRITES_PER_THREAD, "{status:#?}");
    v.backing().sync()?;
    journal.close();
    let (_, image) = verify_and_restore(dir, "vq")?;
    assert!(image == std::fs::read(dir.join("vq.img"))?);
    Ok(())
}

/// `committer=auto` is the writer thread wherever the medium is (on tmpfs too: with the
/// vhost worker's `batch=` its commits overlap the queue's work; see
/// `benches/journal-notes.md`, *Group commits on the writer thread*).
#[test]
fn auto_committer_is_the_writer_on_memory_and_elsewhere() -> TestResult {
    let shm = std::path::Path::new("/dev/shm");
    let memory = shm
        .is_dir()
        .then(|| tempfile::tempdir_in(shm))
        .transpose()?;
    let disk = tempfile::tempdir()?;
    for dir in [Some(disk.path()), memory.as_ref().map(|m| m.path())]
        .into_iter()
        .flatten()
    {
        for mode in [JournalMode::Sync, JournalMode::Async] {
            let mut options = JournalOptions::new(dir.join(format!("j-{mode:?}")));
            options.mode = mode;
            let journal = Journal::open(options)?;
            assert_eq!(
                journal.status().committer,
                Committer::Writer,
                "{dir:?} {mode:?}"
            );
            journal.close();
        }
    }
    Ok(())
}

/// One write per batch: each completes, committed by the queue's own thread.
#[test]
fn single_writes_complete_with_queue_commits() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut options = JournalOptions::new(dir.join("j"));
    options.committer = Committer::Queue;
    // On tmpfs records would go onto the mapped medium, in no commit at all.
    options.mapped = super::super::MappedAppends::Off;
    let journal: Arc<Journal> = Journal::open(options)?;
    let v = open_volume(dir, "v1", 1 << 20)?;
    v.add_observer(journal.observer());
    let mut q = VolumeQueue::new(v, 0, 4, 4)?;
    for i in 0..10u64 {
        write(&mut q, i * 4096, &pattern(i, 4096))?;
    }
    // The writer thread may take a batch when its timer wakes it: most, not all.
    let status = journal.status();
    assert!(status.queue_commits >= 5, "{status:#?}");
    assert_eq!(status.lag_bytes, 0);
    Ok(())
}
