//! Taking an interrupted job up again ([`MigrationJob::resume`]) and leaving a running one
//! for a later resume at a clean shutdown ([`MigrationJob::suspend`]).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::tracker::InterruptedJob;
use crate::mirror::job::{JobShared, MigrationJob, VolumeMirror};
use crate::mirror::layout::Layout;
use crate::mirror::opening::open_target;
use crate::mirror::{DestinationSpec, MigrationError, MigrationOptions};

impl MigrationJob {
    /// Resumes `interrupted` to the target its file names, with its mode, granularity and
    /// speed limit (over those of `options`, whose other settings apply: TLS credentials,
    /// timeouts, threads). Only the chunks the file and the tracking since start-up call
    /// uncopied are copied. The interrupted job's file becomes this job's.
    pub fn resume(
        interrupted: &Arc<InterruptedJob>,
        mut options: MigrationOptions,
    ) -> Result<Arc<Self>, MigrationError> {
        let meta = interrupted.persist.meta().clone();
        options.mode = meta.mode;
        options.granularity_bytes = meta.granularity_bytes;
        options.copy_chunk_bytes = options.copy_chunk_bytes.max(meta.granularity_bytes);
        options.copy_chunk_bytes -= options.copy_chunk_bytes % meta.granularity_bytes;
        options.speed_bytes_per_s = interrupted.speed_bytes_per_s;
        options.validate().map_err(MigrationError::BadOptions)?;
        let target = DestinationSpec::parse(&meta.target)
            .map_err(|e| MigrationError::BadOptions(format!("target {}: {e}", meta.target)))?;
        let sizes: Vec<(String, u64)> = meta
            .volumes
            .iter()
            .map(|(name, _, length)| (name.clone(), *length))
            .collect();
        let layout = Layout::place(&sizes);
        let recorded = meta.volumes.iter().map(|(_, offset, _)| *offset);
        if !layout.volumes.iter().map(|p| p.offset_bytes).eq(recorded) {
            return Err(MigrationError::BadOptions(
                "the job file's placements are not those this ferry computes".into(),
            ));
        }
        // A file target must still be there: a new one would lack what was copied.
        if let DestinationSpec::File(path) = &target {
            if path.symlink_metadata().is_err() {
                return Err(MigrationError::BadOptions(format!(
                    "the target {} of the interrupted job is gone: discard the job and start over",
                    path.display()
                )));
            }
        }
        let (target_obj, target_path) =
            open_target(&target, &layout, &interrupted.volumes, &options)?;
        // From here a failure cannot leave the job as it was (some volumes may have changed
        // observers): it is given up, and the migration must start over.
        interrupted.stop_flusher();
        let mirrors: Vec<VolumeMirror> = interrupted
            .volumes
            .iter()
            .zip(&layout.volumes)
            .zip(&interrupted.tables)
            .map(|((volume, placement), table)| {
                VolumeMirror::new(
                    volume.clone(),
                    placement.clone(),
                    meta.granularity_bytes,
                    Some(table.clone()),
                )
            })
            .collect();
        let target_path = target_path.unwrap_or_else(|| PathBuf::from(target.to_string()));
        let shared = Arc::new(JobShared::new(
            options,
            target_obj,
            target_path,
            layout,
            mirrors,
            Some(interrupted.persist.clone()),
        ));
        let job = Arc::new(Self {
            shared,
            threads: Mutex::new(Vec::new()),
        });
        if let Err(e) = job.launch(Some(interrupted)) {
            if let Err(discard) = interrupted.discard() {
                log::error!("{discard}");
            }
            return Err(e);
        }
        log::info!(
            "migration job {} resumed the interrupted job {} ({}): {} bytes to copy",
            job.id(),
            interrupted.id,
            interrupted.persist.path().display(),
            job.shared.counters.total_bytes.load(Ordering::Relaxed)
        );
        Ok(job)
    }

    /// Clean shutdown, guest I/O held: writes the job file for the last time and ends the
    /// job, leaving the file for a resume after the restart. False when the job has no
    /// file, or it could not be written (the job then ends as if cancelled).
    pub fn suspend(&self) -> bool {
        if self.state().is_terminal() {
            return false;
        }
        super::job_file::suspend(&self.shared)
    }
}
