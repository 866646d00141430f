//! A running job's file: created at the start, rewritten by the job's `ferry-migrate-file`
//! thread every `MigrationOptions::persist_interval`, armed by the mirror before guest
//! writes, written for the last time by a clean shutdown, removed when the job ends.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::tracker::sleep_unless;
use super::{JobMeta, JobPersist, PersistError};
use crate::mirror::destination::DestinationSpec;
use crate::mirror::dirty_bitmap::ChunkTable;
use crate::mirror::job::JobShared;
use crate::mirror::layout::Layout;
use crate::mirror::{MigrationError, MigrationOptions};
use crate::volume::Volume;

/// The job file of a job about to start, beside its first volume's image; none when that
/// volume has no local image (an NBD backing), `options.persist` is off, or the job hands
/// off. Refuses to
/// start over a job file that is there already: an interrupted job must be resumed or
/// discarded first.
pub(crate) fn create(
    volumes: &[Arc<Volume>],
    layout: &Layout,
    target: &DestinationSpec,
    options: &MigrationOptions,
) -> Result<Option<Arc<JobPersist>>, MigrationError> {
    // A job that hands off belongs to a move between hosts, which a restart ends: its
    // other half is on the destination.
    let Some(first) = volumes
        .first()
        .filter(|_| options.persist && !options.hand_off)
    else {
        return Ok(None);
    };
    let backing = first.backing();
    if backing.file().is_none() {
        log::info!(
            "volume {}: no local image, so its migration will not survive a restart",
            first.name()
        );
        return Ok(None);
    }
    let path = JobPersist::path_for(&backing.path);
    if path.symlink_metadata().is_ok() {
        return Err(MigrationError::InterruptedJobExists {
            volume: first.name().to_string(),
            path,
        });
    }
    let meta = JobMeta {
        mode: options.mode,
        granularity_bytes: options.granularity_bytes,
        target: target.to_string(),
        volumes: layout
            .volumes
            .iter()
            .map(|p| (p.name.clone(), p.offset_bytes, p.length_bytes))
            .collect(),
    };
    Ok(Some(Arc::new(JobPersist::new(path, meta, 0))))
}

/// Rewrites the job's file (see [`JobPersist::write`]); the target is flushed first.
pub(crate) fn write(job: &JobShared, last: bool) -> Result<(), PersistError> {
    let Some(persist) = &job.persist else {
        return Ok(());
    };
    let tables: Vec<&Mutex<ChunkTable>> = job.volumes.iter().map(|vm| vm.table.as_ref()).collect();
    persist.write(&tables, job.throttle.bytes_per_s(), last, || {
        job.target.flush().map_err(|e| e.to_string())
    })
}

/// The job's file thread: a rewrite every interval until the job ends. A failed rewrite
/// is logged (once until one succeeds again); the previous version stays valid.
pub(crate) fn run(job: Arc<JobShared>) {
    let mut failing = false;
    while sleep_unless(&job.stop, job.options.persist_interval) {
        match write(&job, false) {
            Ok(()) if failing => {
                log::info!("migration job {}: job file written again", job.id);
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                log::error!("migration job {}: {e}", job.id);
                failing = true;
            }
            Err(_) => {}
        }
    }
    // The job has ended: a failed job's file is this thread's to remove (see
    // `JobShared::end`); after a completion or cancellation it is already gone, and after
    // a clean shutdown it stays.
    if !job.keep_file.load(Ordering::Acquire) {
        remove(&job);
    }
}

/// Arms `chunks` of volume `index` before a guest write to them starts on the source; a
/// job whose file cannot record them fails (which removes the file).
pub(crate) fn arm(job: &JobShared, index: usize, chunks: Range<u64>) {
    let Some(persist) = &job.persist else {
        return;
    };
    if let Err(e) = persist.arm(index, chunks, &job.volumes[index].table) {
        job.fail(format!("{e}"));
    }
}

/// Removes the job's file (the job ended); a failure is logged, it cannot be undone.
pub(crate) fn remove(job: &JobShared) {
    if let Some(persist) = &job.persist {
        if let Err(e) = persist.remove() {
            log::error!("migration job {}: {e}", job.id);
        }
    }
}

/// Clean shutdown with guest I/O held: the last version of the file (`in_use` clear),
/// then the job ends and leaves its file for a resume. True when the file was written.
pub(crate) fn suspend(job: &JobShared) -> bool {
    let written = match write(job, true) {
        Ok(()) => job.persist.is_some(),
        Err(e) => {
            log::error!("migration job {}: {e}", job.id);
            false
        }
    };
    job.keep_file.store(written, Ordering::Release);
    job.end(
        crate::mirror::MigrationState::Cancelled,
        Some("interrupted by the daemon's shutdown".into()),
        None,
    );
    written
}
