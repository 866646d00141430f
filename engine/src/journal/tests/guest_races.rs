//! A hostile guest changing a write's buffer while the write is in flight: whatever bytes the
//! journal keeps, its record must be whole (its CRC32C covers exactly the bytes on the
//! medium), or `verify` would report a bad record and `restore` would refuse every volume's
//! range that crosses it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::super::media::MediaSet;
use super::super::verify::verify;
use super::super::{Journal, JournalMode, JournalOptions};
use super::support::{journaled_v, write, TestResult};

const WRITE_BYTES: usize = 4096;

#[test]
fn a_buffer_changed_during_the_write_leaves_a_whole_record() -> TestResult {
    for mode in [JournalMode::Sync, JournalMode::Async] {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        let mut o = JournalOptions::new(dir.join("j"));
        o.mode = mode;
        let journal = Journal::open(o)?;
        let (_v, mut q, _) = journaled_v(dir, &journal, 1 << 20, 3)?;

        // The guest's buffer, flipped between two patterns by another thread all along.
        let buffer: Arc<Vec<AtomicU64>> =
            Arc::new((0..WRITE_BYTES / 8).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (buffer, stop) = (buffer.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    for word in buffer.iter() {
                        word.store(round.wrapping_mul(0x9e37_79b9_7f4a_7c15), Ordering::Relaxed);
                    }
                }
            })
        };
        // SAFETY: the atomics are WRITE_BYTES of plain memory that outlive every write below;
        // the journal only reads them (racing with the flipper, as it races with a guest).
        let data = unsafe { std::slice::from_raw_parts(buffer.as_ptr() as *const u8, WRITE_BYTES) };
        for i in 0..2000u64 {
            write(&mut q, (i % 64) * WRITE_BYTES as u64, data)?;
        }
        stop.store(true, Ordering::Relaxed);
        let _ = flipper.join();
        journal.close();

        let set = MediaSet::open(&[dir.join("j")])?;
        let report = verify(&set);
        assert!(report.ok(), "{mode:?}: {report:#?}");
    }
    Ok(())
}
