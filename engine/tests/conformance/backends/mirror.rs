//! The mirrored backend: a file volume with a migration job to a file target running during
//! the whole case, `active` (guest writes mirrored) or `background` (guest writes only dirty
//! the copy), and the copy still in progress.
//!
//! Mid-copy is made and checked, not hoped for: the copy is throttled to
//! [`CRAWL_BYTES_PER_S`], one chunk a second, so that the whole volume would take minutes whatever the scheduling; the case starts
//! once the first chunks are copied, so that it meets copied chunks (at the volume's start,
//! where the copy begins and the cases write too) and dirty ones; after the case the job must
//! still be copying with chunks dirty. Only then is the copy let go: the job becomes ready,
//! cuts over, and the target, the frozen source and what the volume reads from the target all
//! agree.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, ensure, Context as _, Result};
use ferry_engine::mirror::{
    DestinationSpec, MigrationJob, MigrationOptions, MigrationState, MirrorMode,
};
use ferry_engine::CacheMode;
use ferry_test_support::{wait_until, HANG_TIMEOUT};
use tempfile::TempDir;

use super::file::{filled_image, open_volume, scratch_on, Place};
use crate::fixture::{Access, Beside, Fixture, FixtureIo, VOLUME_BYTES};
use ferry_test_support::compare_bytes;

/// The chunk the job tracks and copies at once.
const CHUNK_BYTES: u64 = 64 << 10;
/// The copy's speed until the case has run: one chunk a second, so that the volume would
/// take minutes, far longer than any case.
const CRAWL_BYTES_PER_S: u64 = CHUNK_BYTES;
const _: () = assert!(VOLUME_BYTES / CRAWL_BYTES_PER_S >= 120);
/// Copier threads: each books one chunk on the throttle, then copies it.
const COPY_THREADS: usize = 2;

/// A file volume in the build directory with a `mode` migration job to a file beside it,
/// mid-copy.
pub fn open(mode: MirrorMode, access: Access) -> Result<Option<Fixture>> {
    let Some(dir) = scratch_on(Place::BuildDir)? else {
        return Ok(None);
    };
    let source = filled_image(dir.path(), "v.img", VOLUME_BYTES)?;
    let target = dir.path().join("target.img");
    let volume = open_volume(&source, CacheMode::Writeback, access)?;
    let io = FixtureIo::new(volume.clone())?;
    let options = MigrationOptions {
        mode,
        speed_bytes_per_s: CRAWL_BYTES_PER_S,
        granularity_bytes: CHUNK_BYTES,
        copy_chunk_bytes: CHUNK_BYTES,
        copy_threads: COPY_THREADS,
        ..Default::default()
    };
    let job = MigrationJob::start(vec![volume], DestinationSpec::File(target.clone()), options)
        .context("start the migration job")?;
    wait_until("the first chunks copied", HANG_TIMEOUT, || {
        Ok(job.status().copied_bytes >= COPY_THREADS as u64 * CHUNK_BYTES)
    })?;
    let migration = Migration {
        job,
        source,
        target,
        _dir: dir,
    };
    Ok(Some(Fixture::new(io, migration)))
}

/// The job and its two ends.
struct Migration {
    job: Arc<MigrationJob>,
    source: PathBuf,
    target: PathBuf,
    _dir: TempDir,
}

impl Migration {
    /// Fails unless the job is still copying with chunks left: the case ran mid-copy.
    fn check_mid_copy(&self) -> Result<()> {
        let status = self.job.status();
        ensure!(
            status.state == MigrationState::Copying && status.dirty_bytes > 0,
            "the copy ended before the case did, so the case did not run mid-copy: {status:?}"
        );
        Ok(())
    }

    /// Lets the copy run at full speed until the job is ready, then cuts over.
    fn finish(&self) -> Result<()> {
        self.job.set_speed(0);
        let state = self
            .job
            .wait_for(|s| s != MigrationState::Copying, HANG_TIMEOUT);
        if state != MigrationState::Ready {
            bail!("the job is {state}, not ready: {:?}", self.job.status());
        }
        let report = self.job.cutover().context("cut over")?;
        ensure!(report.switched, "a file target takes the volume over");
        Ok(())
    }
}

impl Beside for Migration {
    fn check_after(&mut self, io: &mut FixtureIo, content: &[u8]) -> Result<()> {
        self.check_mid_copy()?;
        self.finish()?;
        ensure!(io.volume.backing().path == self.target);
        let source = std::fs::read(&self.source).context("read the source")?;
        compare_bytes("the source after the case", &source, content)?;
        let target = std::fs::read(&self.target).context("read the target")?;
        compare_bytes("the target after cutover", &target, content)?;
        let served = io.flush_and_read_all()?;
        compare_bytes("the volume on its target", &served, content)
    }
}
