//! Test helpers of the journal: volumes observed by a journal, restores to compare with, and
//! writer threads. Requests go through `crate::testing`; data and randomness come from
//! `ferry-test-support`.

use std::sync::Arc;

use crate::{Volume, VolumeConfig, VolumeQueue};

pub use crate::testing::{run_op, write_at as write};
pub use ferry_test_support::{pattern, Rng};

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

pub fn open_volume(
    dir: &std::path::Path,
    name: &str,
    size: u64,
) -> Result<Arc<Volume>, Box<dyn std::error::Error>> {
    Ok(Volume::open(VolumeConfig {
        name: name.into(),
        path: dir.join(format!("{name}.img")),
        size_bytes: Some(size),
        ..Default::default()
    })?)
}

/// Volume `v` of `dir`, journaled by `journal`: `v.img` and its copy `v.base` (what a
/// restore starts from) are filled with `pattern(seed)` unless `v.img` exists already.
/// Returns the volume, a queue on it and the image as it is now.
pub fn journaled_v(
    dir: &std::path::Path,
    journal: &Arc<super::super::Journal>,
    size_bytes: u64,
    seed: u64,
) -> TestResult<(Arc<Volume>, VolumeQueue, Vec<u8>)> {
    let image = if dir.join("v.img").exists() {
        std::fs::read(dir.join("v.img"))?
    } else {
        let base = pattern(seed, size_bytes as usize);
        std::fs::write(dir.join("v.img"), &base)?;
        std::fs::write(dir.join("v.base"), &base)?;
        base
    };
    let v = open_volume(dir, "v", size_bytes)?;
    v.add_observer(journal.observer());
    let q = VolumeQueue::new(v.clone(), 0, 4, 4)?;
    Ok((v, q, image))
}

/// Verifies the journal in `dir/j` (it must be clean) and restores volume `v` from
/// `dir/v.base` to the end into `dir/v.restored`; returns the restored image.
pub fn verify_and_restore_v(dir: &std::path::Path) -> TestResult<Vec<u8>> {
    Ok(verify_and_restore(dir, "v")?.1)
}

/// Verifies the journal in `dir/j` (it must be clean) and restores `volume` from
/// `dir/<volume>.base` to the end into `dir/<volume>.restored`; returns the verify report
/// and the restored image.
pub fn verify_and_restore(
    dir: &std::path::Path,
    volume: &str,
) -> TestResult<(super::super::verify::VerifyReport, Vec<u8>)> {
    use super::super::media::MediaSet;
    use super::super::restore::{restore, RestoreOptions, Until};
    let set = MediaSet::open(&[dir.join("j")])?;
    let report = super::super::verify::verify(&set);
    assert!(report.ok(), "{report:#?}");
    let out = dir.join(format!("{volume}.restored"));
    let opts = RestoreOptions {
        volume: volume.into(),
        base: dir.join(format!("{volume}.base")),
        out: out.clone(),
        until: Until::End,
        allow_gaps: false,
    };
    restore(&set, &opts, &mut |_| {})?;
    Ok((report, std::fs::read(out)?))
}

/// `threads` threads, each with its own queue `t` on `v`, each writing `writes_per_thread`
/// blocks of `block_bytes` one at a time: slot `t * writes_per_thread + i` holds
/// `pattern(slot)`.
pub fn spawn_slot_writers(
    v: &Arc<Volume>,
    threads: u64,
    writes_per_thread: u64,
    block_bytes: usize,
) -> Vec<std::thread::JoinHandle<Result<(), String>>> {
    (0..threads)
        .map(|t| {
            let v = v.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let mut q = VolumeQueue::new(v, t as u16, 4, 4).map_err(|e| e.to_string())?;
                for i in 0..writes_per_thread {
                    let slot = t * writes_per_thread + i;
                    let data = pattern(slot, block_bytes);
                    write(&mut q, slot * block_bytes as u64, &data)
                        .map_err(|e| format!("write {slot}: {e:?}"))?;
                }
                Ok(())
            })
        })
        .collect()
}
