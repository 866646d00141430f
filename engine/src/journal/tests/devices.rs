//! Block devices as media (loop devices; skipped where `losetup` is not allowed, except
//! under FERRY_REQUIRE_ALL, which CI sets): registered
//! devices are taken first, filled to their size, sealed without truncation, then the journal
//! goes on with files; everything verifies and restores; a crash on a device medium recovers.

use std::path::Path;

use ferry_test_support::loop_device::LoopDevice;
use ferry_test_support::require_ok;

use super::super::device::{device_spares, register_device};
use super::super::media::{list_media, MediaSet};
use super::super::scan::{scan_medium, FileSource};
use super::super::verify::verify;
use super::super::{Journal, JournalOptions};
use super::support::{journaled_v, pattern, verify_and_restore_v, write, Rng, TestResult};

const DEVICE_BYTES: u64 = 1 << 20;
const FILE_CAPACITY_BYTES: u64 = 256 * 1024;
const VOLUME_BYTES: u64 = 1 << 20;

/// A loop device over `backing`, written with `DEVICE_BYTES` bytes of 0xEE; `None` where
/// loop devices cannot be set up (not root, no loop driver): the test then skips, or fails
/// under `FERRY_REQUIRE_ALL`.
fn loop_device(backing: &Path) -> TestResult<Option<LoopDevice>> {
    std::fs::write(backing, vec![0xEEu8; DEVICE_BYTES as usize])?;
    Ok(require_ok("a loop device", LoopDevice::attach(backing)))
}

fn options(dir: &Path) -> JournalOptions {
    let mut o = JournalOptions::new(dir.join("j"));
    o.capacity_bytes = FILE_CAPACITY_BYTES;
    o
}

fn run_writes(dir: &Path, journal: &std::sync::Arc<Journal>, count: u64) -> TestResult<Vec<u8>> {
    let (v, mut q, mut image) = journaled_v(dir, journal, VOLUME_BYTES, 11)?;
    let mut rng = Rng::new(17);
    for i in 0..count {
        let at = rng.below(VOLUME_BYTES / 4096) as usize * 4096;
        let data = pattern(500 + i, 4096);
        write(&mut q, at as u64, &data).map_err(|e| format!("{e:?}"))?;
        image[at..at + 4096].copy_from_slice(&data);
    }
    v.remove_observer(&journal.observer());
    Ok(image)
}

#[test]
fn registered_devices_are_filled_first_then_files() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let Some(first) = loop_device(&dir.join("dev0"))? else {
        return Ok(());
    };
    let Some(second) = loop_device(&dir.join("dev1"))? else {
        return Ok(());
    };
    for d in [&first, &second] {
        let r = register_device(&dir.join("j"), d.path(), &mut |_, _| {})?;
        assert_eq!(r.capacity_bytes, DEVICE_BYTES);
    }
    assert_eq!(device_spares(&dir.join("j"))?.len(), 2);
    // Registering zeroed the devices.
    assert!(std::fs::read(dir.join("dev0"))?.iter().all(|&b| b == 0));
    let again = register_device(&dir.join("j"), first.path(), &mut |_, _| {});
    assert!(again.is_err(), "a device registered twice");

    let journal = Journal::open(options(dir))?;
    let expected = run_writes(dir, &journal, 600)?;
    assert_eq!(journal.status().spares_taken, 2);
    journal.close();

    let media = list_media(&dir.join("j"))?;
    assert!(media.len() >= 3, "{media:?}");
    for (i, (_, path)) in media.iter().enumerate() {
        let is_link = std::fs::symlink_metadata(path)?.file_type().is_symlink();
        assert_eq!(is_link, i < 2, "medium {i} {}", path.display());
        let scan = scan_medium(&FileSource::open(path)?)?;
        assert!(scan.sealed, "medium {i} not sealed");
        assert!(scan.problems.is_empty(), "medium {i}: {:?}", scan.problems);
        if i < 2 {
            let header = scan.medium_header.ok_or("no medium header")?;
            assert_eq!(header.capacity_bytes, DEVICE_BYTES);
            assert!(
                scan.valid_end_bytes > DEVICE_BYTES / 2,
                "device {i} barely used"
            );
        }
    }
    assert_eq!(verify_and_restore_v(dir)?, expected);
    Ok(())
}

#[test]
fn a_crash_on_a_device_medium_recovers() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let Some(device) = loop_device(&dir.join("dev0"))? else {
        return Ok(());
    };
    register_device(&dir.join("j"), device.path(), &mut |_, _| {})?;
    let journal = Journal::open(options(dir))?;
    let expected = run_writes(dir, &journal, 50)?;
    journal.crash_for_test();
    drop(journal);

    let media = list_media(&dir.join("j"))?;
    assert_eq!(media.len(), 1);
    let scan = scan_medium(&FileSource::open(&media[0].1)?)?;
    assert!(
        !scan.sealed && scan.problems.is_empty(),
        "{:?}",
        scan.problems
    );
    assert_eq!(scan.zero_tail_bytes, DEVICE_BYTES - scan.valid_end_bytes);
    assert_eq!(verify_and_restore_v(dir)?, expected);

    let journal = Journal::open(options(dir))?;
    assert!(journal.status().recovered_torn_tail.is_none());
    let more = run_writes(dir, &journal, 20)?;
    let mark = journal.mark("after-crash")?;
    journal.close();
    let report = verify(&MediaSet::open(&[dir.join("j")])?);
    assert!(report.ok(), "{report:#?}");
    assert_eq!(report.last_seq, Some(mark.seq));
    assert_eq!(verify_and_restore_v(dir)?, more);
    Ok(())
}
