//! Cutover: hold guest I/O, copy what is left, flush the target, switch the volumes over.
//! A hand-off ends the same way without the switch: the volumes stay on their source, and
//! the host the target is on takes over from there.
//!
//! Each volume gets a new [`Backing`] on its slice of the target (a file, a block device or
//! an NBD export, whose slice each queue then reaches over a connection of its own) and the
//! source is released. The new backings are opened before the pause: for NBD that is one
//! probe connection that checks the export is still there.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::job::JobShared;
use super::status::{CutoverReport, MigrationState};
use super::MigrationError;
use crate::volume::{Backing, PauseGuard, VolumeConfig};

/// How often the cutover looks whether the copier has drained the last chunks.
const DRAIN_POLL: Duration = Duration::from_micros(200);

/// How a job ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The volumes switch to the target.
    Switch,
    /// The volumes stay on their source; the target is complete when the job ends.
    HandOff,
}

/// Cuts over (or hands off) a `ready` job. On an error before the switch the guest resumes
/// on its source; the job goes back to `ready` (pause or drain timeout) or to `failed`
/// (target error).
pub(crate) fn run(job: &Arc<JobShared>, ending: Ending) -> Result<CutoverReport, MigrationError> {
    let state = job.state();
    if state.is_terminal() {
        return Err(MigrationError::Ended {
            state: state.to_string(),
        });
    }
    if !job.transition(MigrationState::Ready, MigrationState::CuttingOver) {
        return Err(MigrationError::NotReady {
            state: state.to_string(),
        });
    }
    let result = switch(job, ending);
    job.unthrottled.store(false, Ordering::Release);
    if result.is_err() {
        job.transition(MigrationState::CuttingOver, MigrationState::Ready);
    }
    result
}

fn switch(job: &Arc<JobShared>, ending: Ending) -> Result<CutoverReport, MigrationError> {
    let new_backings = match ending {
        Ending::Switch => open_new_backings(job)?,
        Ending::HandOff => None,
    };
    job.unthrottled.store(true, Ordering::Release);
    // Flush the bulk of the copy while the guest still runs, so that the flush inside the
    // pause only writes back what changed in the last moments (the pause is the cost the
    // guest sees, and an fdatasync of a freshly copied image writes back all of it).
    if let Err(e) = job.target.flush() {
        job.fail(format!("flushing the target before cutover: {e}"));
        return Err(failed(job));
    }
    let held_since = Instant::now();
    let mut guards: Vec<PauseGuard> = Vec::with_capacity(job.volumes.len());
    for vm in &job.volumes {
        match vm.volume.pause(job.options.pause_timeout) {
            Some(guard) => guards.push(guard),
            None => {
                return Err(MigrationError::PauseTimeout {
                    volume: vm.volume.name().to_string(),
                    timeout_ms: job.options.pause_timeout.as_millis() as u64,
                })
            }
        }
    }
    let copied_before = job.counters.copied_bytes.load(Ordering::Relaxed);
    drain(job)?;
    if let Err(e) = job.target.flush() {
        job.fail(format!("flushing the target at cutover: {e}"));
        return Err(failed(job));
    }
    let switched = new_backings.is_some();
    if let Some(backings) = new_backings {
        for (vm, backing) in job.volumes.iter().zip(backings) {
            vm.volume.replace_backing(backing);
        }
    }
    let mut report = CutoverReport {
        pause_us: 0,
        drained_bytes: job.counters.copied_bytes.load(Ordering::Relaxed) - copied_before,
        switched,
        handed_off: ending == Ending::HandOff,
    };
    // Detach while the guest is still held, so no write escapes the mirror before the switch.
    job.end(MigrationState::Completed, None, Some(report.clone()));
    drop(guards);
    report.pause_us = held_since.elapsed().as_micros() as u64;
    if let Ok(mut c) = job.control.lock() {
        c.report = Some(report.clone());
    }
    log::info!(
        "migration job {} completed: guest I/O held {} us, {} bytes copied during the pause",
        job.id,
        report.pause_us,
        report.drained_bytes
    );
    Ok(report)
}

/// Waits (guest held) until the copier has copied every dirty chunk.
fn drain(job: &JobShared) -> Result<(), MigrationError> {
    let deadline = Instant::now() + job.options.drain_timeout;
    loop {
        if job.state() == MigrationState::Failed {
            return Err(failed(job));
        }
        if job.all_clean() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(MigrationError::DrainTimeout {
                timeout_ms: job.options.drain_timeout.as_millis() as u64,
            });
        }
        std::thread::sleep(DRAIN_POLL);
    }
}

fn failed(job: &JobShared) -> MigrationError {
    let reason = job
        .control
        .lock()
        .ok()
        .and_then(|c| c.error.clone())
        .unwrap_or_else(|| "unknown".into());
    MigrationError::Failed { reason }
}

/// Opens each volume's slice of the target as its next backing (before the pause).
fn open_new_backings(job: &JobShared) -> Result<Option<Vec<Backing>>, MigrationError> {
    let Some(path) = &job.target_path else {
        return Ok(None);
    };
    let mut backings = Vec::with_capacity(job.volumes.len());
    for vm in &job.volumes {
        let old = vm.volume.config();
        let config = VolumeConfig {
            name: old.name.clone(),
            path: path.clone(),
            size_bytes: None,
            read_only: old.read_only,
            cache: old.cache,
            offset_bytes: vm.placement.offset_bytes,
            length_bytes: Some(vm.placement.length_bytes),
            request_block_bytes: old.request_block_bytes,
            // The target's credentials: the volume is served from it after the switch.
            nbd_tls: job.options.nbd_tls.clone(),
        };
        let backing = crate::volume::open::open_backing(&config).map_err(|source| {
            MigrationError::OpenNewBacking {
                volume: old.name.clone(),
                source,
            }
        })?;
        backings.push(backing);
    }
    Ok(Some(backings))
}
