//! Async mode under a burst bigger than `lag-max`: writes are held at the bound and released
//! as the trail is written oldest first in bounded appends; whatever the interleaving, the
//! media verify, restore to exactly what was written, and the trail ends at zero.

use super::super::{Journal, JournalMode, JournalOptions};
use super::support::{open_volume, pattern, verify_and_restore_v, TestResult};
use crate::VolumeQueue;

const VOLUME_BYTES: u64 = 8 << 20;
const WRITE_BYTES: usize = 64 * 1024;
const QUEUE_DEPTH: u32 = 64;

#[test]
fn bursts_over_lag_max_are_held_released_and_journaled_in_order() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut o = JournalOptions::new(dir.join("j"));
    o.mode = JournalMode::Async;
    o.lag_max_bytes = 256 * 1024;
    o.capacity_bytes = 3 << 20;
    let journal = Journal::open(o)?;
    let base = vec![0u8; VOLUME_BYTES as usize];
    std::fs::write(dir.join("v.img"), &base)?;
    std::fs::write(dir.join("v.base"), &base)?;
    let v = open_volume(dir, "v", VOLUME_BYTES)?;
    v.add_observer(journal.observer());
    let mut q = VolumeQueue::new(v.clone(), 0, QUEUE_DEPTH, 4)?;
    let mut image = base;
    let slots = VOLUME_BYTES as usize / WRITE_BYTES;
    // Rounds of a full queue of 64 KiB writes (4 MiB, 16x lag-max) submitted at once, each
    // round overwriting half of the previous one's blocks so that order matters.
    for round in 0..6u64 {
        let buffers: Vec<(usize, Vec<u8>)> = (0..QUEUE_DEPTH as usize)
            .map(|i| {
                let slot = (i + round as usize * QUEUE_DEPTH as usize / 2) % slots;
                (
                    slot * WRITE_BYTES,
                    pattern(round * 1000 + i as u64, WRITE_BYTES),
                )
            })
            .collect();
        let iovecs: Vec<[libc::iovec; 1]> = buffers
            .iter()
            .map(|(_, data)| {
                [libc::iovec {
                    iov_base: data.as_ptr() as *mut libc::c_void,
                    iov_len: data.len(),
                }]
            })
            .collect();
        for (tag, ((at, _), iov)) in buffers.iter().zip(&iovecs).enumerate() {
            let op = crate::BlockOp::Write {
                offset_bytes: *at as u64,
                iovecs: iov,
            };
            // SAFETY: `buffers` and `iovecs` outlive the completions, all reaped below.
            unsafe { q.submit(op, tag as u64) }.map_err(|e| format!("submit: {e:?}"))?;
        }
        q.commit()?;
        let mut done = Vec::new();
        if !q.drain(&mut done, std::time::Duration::from_secs(30)) {
            return Err("writes not completed within 30 s".into());
        }
        for c in &done {
            c.result.map_err(|e| format!("write {}: {e:?}", c.tag))?;
        }
        for (at, data) in &buffers {
            image[*at..*at + WRITE_BYTES].copy_from_slice(data);
        }
    }
    let status = journal.status();
    assert!(
        status.group_commits >= 6,
        "a trail of 24 MiB in appends of at most 1 MiB: {status:?}"
    );
    v.backing().sync()?;
    journal.close();
    assert_eq!(journal.status().lag_bytes, 0);
    assert_eq!(verify_and_restore_v(dir)?, image);
    assert_eq!(std::fs::read(dir.join("v.img"))?, image);
    Ok(())
}
