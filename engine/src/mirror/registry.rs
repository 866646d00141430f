//! The daemon's migration jobs by id, and the rule that a volume is in at most one running job.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{MigrationError, MigrationJob, MigrationOptions, MigrationStatus};
use crate::target::TargetSpec;
use crate::volume::Volume;

/// The jobs of one daemon (held by the control socket).
#[derive(Default)]
pub struct MigrationRegistry {
    jobs: Mutex<BTreeMap<u64, Arc<MigrationJob>>>,
}

impl MigrationRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a job, refusing volumes that are in a job that has not ended.
    pub fn start(
        &self,
        volumes: Vec<Arc<Volume>>,
        target: TargetSpec,
        options: MigrationOptions,
    ) -> Result<Arc<MigrationJob>, MigrationError> {
        // Held across the start, so two starts for one volume cannot both pass the check.
        let mut jobs = self
            .jobs
            .lock()
            .map_err(|_| MigrationError::BadOptions("registry lock poisoned".into()))?;
        for volume in &volumes {
            let running = jobs.values().find(|job| {
                !job.state().is_terminal() && job.volume_names().iter().any(|n| n == volume.name())
            });
            if let Some(job) = running {
                return Err(MigrationError::AlreadyMigrating {
                    volume: volume.name().to_string(),
                    job_id: job.id(),
                });
            }
        }
        let job = MigrationJob::start(volumes, target, options)?;
        jobs.insert(job.id(), job.clone());
        Ok(job)
    }

    /// Like [`start`](Self::start), with volumes named and found through `lookup`.
    pub fn start_named(
        &self,
        names: &[String],
        lookup: impl Fn(&str) -> Option<Arc<Volume>>,
        target: TargetSpec,
        options: MigrationOptions,
    ) -> Result<Arc<MigrationJob>, MigrationError> {
        let volumes = names
            .iter()
            .map(|n| lookup(n).ok_or_else(|| MigrationError::UnknownVolume(n.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        self.start(volumes, target, options)
    }

    pub fn get(&self, id: u64) -> Result<Arc<MigrationJob>, MigrationError> {
        self.jobs
            .lock()
            .ok()
            .and_then(|jobs| jobs.get(&id).cloned())
            .ok_or(MigrationError::UnknownJob(id))
    }

    /// Every job, oldest first.
    pub fn jobs(&self) -> Vec<Arc<MigrationJob>> {
        self.jobs
            .lock()
            .map(|j| j.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn statuses(&self) -> Vec<MigrationStatus> {
        self.jobs().iter().map(|j| j.status()).collect()
    }

    /// Drops ended jobs from the list; returns how many.
    pub fn forget_ended(&self) -> usize {
        let Ok(mut jobs) = self.jobs.lock() else {
            return 0;
        };
        let before = jobs.len();
        jobs.retain(|_, job| !job.state().is_terminal());
        before - jobs.len()
    }
}
