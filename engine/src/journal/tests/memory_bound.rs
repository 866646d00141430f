//! The in-memory log's bound (`log-memory=`): past it the oldest entries leave memory, the
//! status and a retrieve say so, and the media still hold every record.

use super::super::memory_log::CHUNK_ENTRIES;
use super::super::{Journal, JournalMode, JournalOptions};
use super::support::{journaled_v, pattern, verify_and_restore, write, Rng, TestResult};

const VOLUME_BYTES: u64 = 1 << 20;
const WRITE_BYTES: usize = 512;

#[test]
fn a_full_in_memory_log_drops_its_oldest_entries_and_the_media_keep_them() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut options = JournalOptions::new(dir.join("j"));
    options.mode = JournalMode::Async;
    options.capacity_bytes = 8 << 20;
    // The smallest bound: two chunks.
    options.log_memory_bytes = 0;
    let journal = Journal::open(options)?;

    let (_v, mut q, mut image) = journaled_v(dir, &journal, VOLUME_BYTES, 3)?;
    let mut rng = Rng::new(5);
    let writes = 4 * CHUNK_ENTRIES as u64 + 100;
    for i in 0..writes {
        let at = rng.below(VOLUME_BYTES / WRITE_BYTES as u64) as usize * WRITE_BYTES;
        let data = pattern(i, WRITE_BYTES);
        write(&mut q, at as u64, &data).map_err(|e| format!("{e:?}"))?;
        image[at..at + WRITE_BYTES].copy_from_slice(&data);
    }
    let mark = journal.mark("end")?;

    let status = journal.status();
    assert_eq!(status.log_max_entries, 2 * CHUNK_ENTRIES);
    assert!(status.log_dropped > 0, "{status:#?}");
    assert!(status.log_entries <= 3 * CHUNK_ENTRIES, "{status:#?}");
    // Every record made durable is either still in memory or counted as dropped.
    assert_eq!(
        status.log_entries as u64 + status.log_dropped,
        status.durable_seq,
        "{status:#?}"
    );
    let first = status.log_first_seq.ok_or("no entry held")?;
    assert_eq!(first, status.log_dropped + 1, "sequence numbers start at 1");

    let all = journal.retrieve(0, usize::MAX);
    assert_eq!(all.dropped_from(), Some(0));
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (first..=mark.seq).collect::<Vec<_>>());
    let recent = journal.retrieve(mark.seq - 10, usize::MAX);
    assert_eq!(recent.dropped_from(), None);
    assert_eq!(recent.to_vec().len(), 11);

    journal.close();
    let (report, restored) = verify_and_restore(dir, "v")?;
    let on_media: u64 = report.media.iter().map(|m| m.records).sum();
    assert!(on_media >= writes, "{on_media} records on the media");
    assert!(restored == image, "restore from the media differs");
    let held = journal.status().log_entries;
    assert_eq!(journal.clear(), held);
    let cleared = journal.status();
    assert_eq!((cleared.log_entries, cleared.log_dropped), (0, 0));
    Ok(())
}
