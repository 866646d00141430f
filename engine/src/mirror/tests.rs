//! Tests of the mirror that look inside a running job (its chunk tables, its job file): the
//! overlap rule between an `active` mirror's legs and the bulk copier, and the arm records
//! a guest write appends to the job file.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use ferry_test_support::wait::{wait_until, HANG_TIMEOUT};

use super::{DestinationSpec, MigrationJob, MigrationOptions, MigrationState, MirrorMode};
use crate::volume::queue::{BlockOp, VolumeQueue};
use crate::{Volume, VolumeConfig};

type TestResult = anyhow::Result<()>;

const MIB: usize = 1 << 20;
const GRANULARITY: u64 = 64 << 10;

/// Writes `data` at `offset_bytes` of `volume` through a queue of its own and waits for it.
fn guest_write(volume: &Arc<Volume>, offset_bytes: u64, data: &[u8]) -> TestResult {
    let mut queue = VolumeQueue::new(volume.clone(), 0, 4, 1)?;
    let iovecs = [libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    }];
    let op = BlockOp::Write {
        offset_bytes,
        iovecs: &iovecs,
    };
    // SAFETY: `data` outlives the queue, which is drained below before it drops.
    unsafe { queue.submit(op, 1) }.map_err(|e| anyhow::anyhow!("submit: {e:?}"))?;
    queue.commit()?;
    let mut out = Vec::new();
    anyhow::ensure!(
        queue.drain(&mut out, HANG_TIMEOUT),
        "the write never completed"
    );
    anyhow::ensure!(out.len() == 1 && out[0].result.is_ok(), "{out:?}");
    Ok(())
}

/// A guest write into the chunk the copier holds (read from the source, not yet written to
/// the target) is on the target as soon as the guest sees it complete (its leg), marks the
/// chunk dirty again, and stays on the target after the copier has written the older data
/// it read: the chunk is copied again once the copy ends.
#[test]
fn an_active_write_racing_the_copy_of_its_chunk_reaches_the_target() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    std::fs::write(&src, vec![0xaa; MIB])?;
    let volume = Volume::open(VolumeConfig {
        name: "vda".into(),
        path: src,
        ..Default::default()
    })?;
    let options = MigrationOptions {
        mode: MirrorMode::Active,
        granularity_bytes: GRANULARITY,
        copy_chunk_bytes: GRANULARITY,
        copy_threads: 1,
        // Held until the test lets go (below).
        copy_hold: Duration::from_secs(3600),
        ready_pending_bytes_max: Some(0),
        ..Default::default()
    };
    let job = MigrationJob::start(
        vec![volume.clone()],
        DestinationSpec::File(dst.clone()),
        options,
    )?;
    let planned = job.status().total_bytes;
    let table = |f: &dyn Fn(&super::dirty_bitmap::ChunkTable) -> bool| {
        job.shared().volumes[0]
            .table
            .lock()
            .map(|t| f(&t))
            .unwrap_or(false)
    };
    // The copier walks up from chunk 0.
    wait_until("the copier holds chunk 0", HANG_TIMEOUT, || {
        Ok(table(&|t| t.is_copying(0)))
    })?;

    let data = vec![0x55; 4096];
    guest_write(&volume, 4096, &data)?;
    let target = std::fs::File::open(&dst)?;
    let mut on_target = vec![0u8; 4096];
    target.read_exact_at(&mut on_target, 4096)?;
    assert_eq!(
        on_target, data,
        "the leg wrote the target before the write completed"
    );
    assert!(table(&|t| t.is_copying(0)), "the copy is still held");
    assert_eq!(
        job.status().total_bytes,
        planned + GRANULARITY,
        "the write re-dirtied the chunk being copied"
    );

    job.set_copy_hold(Duration::ZERO);
    let state = job.wait_for(
        |s| s == MigrationState::Ready || s.is_terminal(),
        HANG_TIMEOUT,
    );
    assert_eq!(state, MigrationState::Ready);
    let mut expected = vec![0xaa; MIB];
    expected[4096..8192].copy_from_slice(&data);
    assert_eq!(std::fs::read(&dst)?, expected);
    job.cancel()?;
    Ok(())
}

/// The job file of a running job: a guest write to a chunk the file does not name appends
/// an arm record before it completes (a second write to the chunk appends nothing), and
/// the file goes when the job is cancelled.
#[test]
fn a_guest_write_is_armed_in_the_job_file_before_it_completes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    std::fs::File::create(&src)?.set_len(MIB as u64)?; // all holes: nothing to copy
    let volume = Volume::open(VolumeConfig {
        name: "vda".into(),
        path: src.clone(),
        ..Default::default()
    })?;
    let options = MigrationOptions {
        mode: MirrorMode::Background,
        granularity_bytes: GRANULARITY,
        // No rewrite during the test: what the file gains is arm records.
        persist_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let job = MigrationJob::start(vec![volume.clone()], DestinationSpec::File(dst), options)?;
    let path = super::persist::JobPersist::path_for(&src);
    let file = super::persist::read(&path)?;
    assert!(file.record.in_use && file.arms.is_empty());
    assert_eq!(
        file.uncopied(0),
        vec![0],
        "a sparse source has nothing to copy"
    );
    guest_write(&volume, 3 * GRANULARITY + 512, &[7u8; 8192])?;
    let file = super::persist::read(&path)?;
    assert_eq!(file.arms.len(), 1);
    assert_eq!(file.uncopied(0), vec![1 << 3]);
    guest_write(&volume, 3 * GRANULARITY, &[8u8; 4096])?;
    assert_eq!(
        super::persist::read(&path)?.arms.len(),
        1,
        "chunk 3 is armed already"
    );
    job.cancel()?;
    assert!(!path.exists(), "the job file outlived the cancelled job");
    Ok(())
}
