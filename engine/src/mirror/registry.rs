//! The daemon's migration jobs by id, and the rule that a volume is in at most one running job.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use super::destination::DestinationSpec;
use super::{MigrationError, MigrationJob, MigrationOptions, MigrationStatus};
use crate::volume::Volume;

/// The jobs of one daemon (held by the control socket).
#[derive(Default)]
pub struct MigrationRegistry {
    jobs: Mutex<BTreeMap<u64, Arc<MigrationJob>>>,
    /// Volumes of jobs being started (connecting to their target): reserved without holding
    /// `jobs`, so that status and other commands answer while a slow target is reached.
    starting: Mutex<BTreeSet<String>>,
}

impl MigrationRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a job, refusing volumes that are in a job that has not ended.
    pub fn start(
        &self,
        volumes: Vec<Arc<Volume>>,
        target: DestinationSpec,
        options: MigrationOptions,
    ) -> Result<Arc<MigrationJob>, MigrationError> {
        let poisoned = || MigrationError::BadOptions("registry lock poisoned".into());
        let names: Vec<String> = volumes.iter().map(|v| v.name().to_string()).collect();
        {
            // `starting` is taken before `jobs` (here only), and held across the check and
            // the reservation, so two starts for one volume cannot both pass.
            let mut starting = self.starting.lock().map_err(|_| poisoned())?;
            let jobs = self.jobs.lock().map_err(|_| poisoned())?;
            for name in &names {
                let running = jobs.values().find(|job| {
                    !job.state().is_terminal() && job.volume_names().iter().any(|n| n == name)
                });
                if let Some(job) = running {
                    return Err(MigrationError::AlreadyMigrating {
                        volume: name.clone(),
                        job_id: job.id(),
                    });
                }
                if starting.contains(name) {
                    return Err(MigrationError::BadOptions(format!(
                        "volume {name}: another migration of it is being started"
                    )));
                }
            }
            starting.extend(names.iter().cloned());
        }
        // Connecting to the target may take up to its timeout: no registry lock is held.
        let started = MigrationJob::start(volumes, target, options);
        let mut starting = self.starting.lock().map_err(|_| poisoned())?;
        if let Ok(job) = &started {
            // Listed before the reservation goes, so the volumes are never unguarded.
            let mut jobs = self.jobs.lock().map_err(|_| poisoned())?;
            jobs.insert(job.id(), job.clone());
        }
        for name in &names {
            starting.remove(name);
        }
        started
    }

    /// Like [`start`](Self::start), with volumes named and found through `lookup`.
    pub fn start_named(
        &self,
        names: &[String],
        lookup: impl Fn(&str) -> Option<Arc<Volume>>,
        target: DestinationSpec,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::{ExportUri, NbdAddress};
    use crate::VolumeConfig;
    use std::time::Duration;

    /// A target that takes its time (a server that accepts and never answers the handshake):
    /// the registry answers other commands meanwhile, and a second start of the same volume is
    /// refused at once instead of queueing behind the first. The first start stays blocked
    /// until the test closes the silent connection, so "meanwhile" needs no clock.
    #[test]
    fn a_slow_target_blocks_neither_status_nor_a_second_start(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("silent.sock");
        let silent = std::os::unix::net::UnixListener::bind(&socket)?;
        let volume = Volume::open(VolumeConfig {
            name: "v".into(),
            path: dir.path().join("v.img"),
            size_bytes: Some(1 << 20),
            ..Default::default()
        })?;
        let registry = Arc::new(MigrationRegistry::new());
        let target = DestinationSpec::Nbd(ExportUri {
            address: NbdAddress::Unix { socket },
            export: "e".into(),
            tls: false,
        });
        // Far beyond the test: only the closed connection ends the first start.
        let options = MigrationOptions {
            nbd_request_timeout: Duration::from_secs(600),
            ..MigrationOptions::default()
        };
        let first = {
            let (registry, volume, target, options) = (
                registry.clone(),
                volume.clone(),
                target.clone(),
                options.clone(),
            );
            std::thread::spawn(move || registry.start(vec![volume], target, options).is_err())
        };
        // The first start connects once it has reserved the volume.
        let (connection, _) = silent.accept()?;
        assert!(registry.statuses().is_empty());
        let second = registry.start(vec![volume], target, options);
        assert!(
            !first.is_finished(),
            "the second start returned only after the first"
        );
        let Err(MigrationError::BadOptions(reason)) = second else {
            return Err("a second start of the volume was not refused".into());
        };
        assert!(reason.contains("being started"), "{reason}");
        drop(connection);
        assert!(
            first.join().map_err(|_| "start panicked")?,
            "the silent target was accepted"
        );
        Ok(())
    }
}
