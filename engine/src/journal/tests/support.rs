//! Test helpers: drive a real `Volume` + `VolumeQueue` and a deterministic PRNG.

use std::sync::Arc;

use crate::volume::queue::wait_readable;
use crate::{BlockOp, IoFailure, Volume, VolumeConfig, VolumeQueue};

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// xorshift64*: deterministic pseudo-random numbers for tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

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

/// Submits one operation and waits for its completion.
pub fn run_op(q: &mut VolumeQueue, op: BlockOp<'_>) -> Result<u64, IoFailure> {
    const TAG: u64 = 7;
    // SAFETY: the buffers behind `op` outlive this call, which waits for the completion.
    if unsafe { q.submit(op, TAG) }.is_err() {
        return Err(IoFailure::Busy);
    }
    if q.commit().is_err() {
        return Err(IoFailure::Os(libc::EIO));
    }
    let mut out = Vec::new();
    loop {
        q.reap(&mut out);
        if let Some(c) = out.iter().find(|c| c.tag == TAG) {
            return c.result;
        }
        wait_readable(q.notify_fd(), 50);
        q.clear_notification();
    }
}

/// Writes `data` at `offset` through `q`.
pub fn write(q: &mut VolumeQueue, offset: u64, data: &[u8]) -> Result<u64, IoFailure> {
    let iov = [libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    }];
    run_op(
        q,
        BlockOp::Write {
            offset_bytes: offset,
            iovecs: &iov,
        },
    )
}

/// A recognisable block pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// Verifies the journal in `dir/j` (it must be clean) and restores volume `v` from
/// `dir/v.base` to the end into `dir/v.restored`; returns the restored image.
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
