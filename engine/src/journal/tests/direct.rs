//! Media written with `O_DIRECT` (`cache=none`, and `auto` off tmpfs): rotation, spares,
//! seal and a crash give media that verify and restore exactly as buffered ones do.

use std::path::{Path, PathBuf};

use super::super::media::MediaSet;
use super::super::options::MediumCache;
use super::super::spares::format_spares;
use super::super::verify::verify;
use super::super::{Journal, JournalOptions};
use super::support::{journaled_v, pattern, verify_and_restore_v, write, Rng, TestResult};
use ferry_test_support::require_ok;

const CAPACITY_BYTES: u64 = 256 * 1024;
const VOLUME_BYTES: u64 = 1 << 20;

/// A scratch directory on a filesystem that takes `O_DIRECT` (in the build's target
/// directory: the default temporary directory may be tmpfs); `None` where it takes none: the
/// test then skips, or fails under `FERRY_REQUIRE_ALL`.
fn direct_capable_dir() -> Option<tempfile::TempDir> {
    let base = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target"));
    let what = format!("O_DIRECT on the filesystem of {}", base.display());
    require_ok(&what, direct_dir_in(&base))
}

/// A scratch directory in `base`, whose filesystem must take `O_DIRECT` and not be in memory.
fn direct_dir_in(base: &Path) -> Result<tempfile::TempDir, String> {
    let dir = tempfile::tempdir_in(base).map_err(|e| e.to_string())?;
    let probe = std::fs::File::create(dir.path().join("probe")).map_err(|e| e.to_string())?;
    super::super::direct::apply_cache_mode(&probe, MediumCache::None).map_err(|e| e.to_string())?;
    if crate::volume::open::is_memory_backed(&probe) {
        return Err("the filesystem is memory-backed".into());
    }
    Ok(dir)
}

fn options(dir: &Path, spares: u32) -> JournalOptions {
    let mut o = JournalOptions::new(dir.join("j"));
    o.capacity_bytes = CAPACITY_BYTES;
    o.cache = MediumCache::None;
    o.spares = spares;
    o
}

/// Writes `count` blocks of assorted sizes at random offsets; returns the final image.
fn run_writes(dir: &Path, journal: &std::sync::Arc<Journal>, count: u64) -> TestResult<Vec<u8>> {
    let (_v, mut q, mut image) = journaled_v(dir, journal, VOLUME_BYTES, 3)?;
    let mut rng = Rng::new(5);
    for i in 0..count {
        let len = 512 * (1 + rng.below(24) as usize);
        let at = rng.below((VOLUME_BYTES as usize - len) as u64 / 512) as usize * 512;
        let data = pattern(100 + i, len);
        write(&mut q, at as u64, &data).map_err(|e| format!("{e:?}"))?;
        image[at..at + len].copy_from_slice(&data);
    }
    Ok(image)
}

#[test]
fn direct_media_rotate_seal_and_restore() -> TestResult {
    let Some(tmp) = direct_capable_dir() else {
        return Ok(());
    };
    let dir = tmp.path();
    let journal = Journal::open(options(dir, 0))?;
    let expected = run_writes(dir, &journal, 300)?;
    assert_eq!(journal.status().medium_direct, Some(true));
    assert_eq!(journal.status().appends_io_uring, Some(true));
    journal.close();
    let media = super::super::media::list_media(&dir.join("j"))?;
    assert!(media.len() > 2, "rotation expected, got {}", media.len());
    assert_eq!(verify_and_restore_v(dir)?, expected);
    Ok(())
}

#[test]
fn direct_media_over_spares_survive_a_crash() -> TestResult {
    let Some(tmp) = direct_capable_dir() else {
        return Ok(());
    };
    let dir = tmp.path();
    format_spares(&dir.join("j"), 2, CAPACITY_BYTES, &mut |_, _| {})?;
    let journal = Journal::open(options(dir, 2))?;
    let expected = run_writes(dir, &journal, 150)?;
    assert_eq!(journal.status().medium_direct, Some(true));
    journal.crash_for_test();
    drop(journal);
    assert_eq!(verify_and_restore_v(dir)?, expected);
    let journal = Journal::open(options(dir, 2))?;
    let more = journal.mark("after-crash")?;
    journal.close();
    let set = MediaSet::open(&[dir.join("j")])?;
    let report = verify(&set);
    assert!(report.ok(), "{report:#?}");
    assert_eq!(report.last_seq, Some(more.seq));
    assert_eq!(verify_and_restore_v(dir)?, expected);
    Ok(())
}
