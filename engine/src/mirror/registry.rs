//! The daemon's migration jobs by id, and the rule that a volume is in at most one running job.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use super::destination::DestinationSpec;
use super::persist::tracker::InterruptedJob;
use super::{MigrationError, MigrationJob, MigrationOptions, MigrationStatus};
use crate::volume::Volume;

/// The jobs of one daemon (held by the control socket).
#[derive(Default)]
pub struct MigrationRegistry {
    jobs: Mutex<BTreeMap<u64, Arc<MigrationJob>>>,
    /// Volumes of jobs being started (connecting to their target): reserved without holding
    /// `jobs`, so that status and other commands answer while a slow target is reached.
    starting: Mutex<BTreeSet<String>>,
    /// Jobs found at start-up by their job files, waiting for a resume or a discard.
    interrupted: Mutex<Vec<Arc<InterruptedJob>>>,
    /// Job files found at start-up that could not be taken up: the volume that has one,
    /// the file and why. A resume of the volume reports why; a discard removes the file.
    broken: Mutex<Vec<BrokenJobFile>>,
}

/// A job file that could not be taken up at start-up.
#[derive(Debug, Clone)]
pub struct BrokenJobFile {
    pub volume: String,
    pub path: std::path::PathBuf,
    pub reason: String,
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
                let interrupted = self.interrupted_with(name);
                if let Some(job) = interrupted {
                    return Err(MigrationError::InterruptedJobExists {
                        volume: name.clone(),
                        path: job.persist.path().to_path_buf(),
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

    /// Every job's status, the interrupted ones last.
    pub fn statuses(&self) -> Vec<MigrationStatus> {
        let mut statuses: Vec<MigrationStatus> = self.jobs().iter().map(|j| j.status()).collect();
        statuses.extend(self.interrupted().iter().map(|j| j.status()));
        statuses
    }

    /// Lists a job found at start-up.
    pub fn add_interrupted(&self, job: Arc<InterruptedJob>) {
        if let Ok(mut list) = self.interrupted.lock() {
            list.push(job);
        }
    }

    pub fn interrupted(&self) -> Vec<Arc<InterruptedJob>> {
        self.interrupted
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    fn interrupted_with(&self, volume: &str) -> Option<Arc<InterruptedJob>> {
        self.interrupted()
            .into_iter()
            .find(|j| j.volume_names().iter().any(|n| n == volume))
    }

    /// Lists a job file that could not be taken up at start-up.
    pub fn add_broken(&self, broken: BrokenJobFile) {
        if let Ok(mut list) = self.broken.lock() {
            list.push(broken);
        }
    }

    /// The broken job file of `volume` (or any), taken out of the list when `take`.
    fn broken_of(&self, volume: Option<&str>, take: bool) -> Option<BrokenJobFile> {
        let mut list = self.broken.lock().ok()?;
        let index = list
            .iter()
            .position(|b| volume.is_none_or(|name| b.volume == name))?;
        Some(if take {
            list.remove(index)
        } else {
            list[index].clone()
        })
    }

    /// Takes the interrupted job out of the list: the one with `volume`, or the only one.
    /// Where there is none, a broken job file of the volume says why.
    fn take_interrupted(
        &self,
        volume: Option<&str>,
    ) -> Result<Arc<InterruptedJob>, MigrationError> {
        let found = self.take_listed(volume);
        if let Err(MigrationError::NoInterruptedJob(_)) = &found {
            if let Some(broken) = self.broken_of(volume, false) {
                return Err(MigrationError::BrokenJobFile {
                    volume: broken.volume,
                    reason: broken.reason,
                });
            }
        }
        found
    }

    fn take_listed(&self, volume: Option<&str>) -> Result<Arc<InterruptedJob>, MigrationError> {
        let poisoned = || MigrationError::BadOptions("registry lock poisoned".into());
        let mut list = self.interrupted.lock().map_err(|_| poisoned())?;
        let index = match volume {
            Some(name) => list
                .iter()
                .position(|j| j.volume_names().iter().any(|n| n == name))
                .ok_or_else(|| MigrationError::NoInterruptedJob(format!(" of volume {name:?}")))?,
            None if list.len() == 1 => 0,
            None if list.is_empty() => return Err(MigrationError::NoInterruptedJob(String::new())),
            None => {
                return Err(MigrationError::BadOptions(
                    "several interrupted jobs: name a volume".into(),
                ))
            }
        };
        Ok(list.remove(index))
    }

    /// Resumes the interrupted job of `volume` (or the only one); see
    /// [`MigrationJob::resume`]. On failure the job stays interrupted, unless the resume
    /// failed half-way (it is then given up).
    pub fn resume(
        &self,
        volume: Option<&str>,
        options: MigrationOptions,
    ) -> Result<Arc<MigrationJob>, MigrationError> {
        let interrupted = self.take_interrupted(volume)?;
        match MigrationJob::resume(&interrupted, options) {
            Ok(job) => {
                if let Ok(mut jobs) = self.jobs.lock() {
                    jobs.insert(job.id(), job.clone());
                }
                Ok(job)
            }
            Err(e) => {
                if !interrupted.is_discarded() {
                    self.add_interrupted(interrupted);
                }
                Err(e)
            }
        }
    }

    /// Gives up the interrupted job of `volume` (or the only one): its file is removed.
    /// A broken job file of the volume is removed as well. Returns the job's id (none for
    /// a broken file).
    pub fn discard(&self, volume: Option<&str>) -> Result<Option<u64>, MigrationError> {
        if let Some(broken) = self.broken_of(volume, true) {
            return match std::fs::remove_file(&broken.path) {
                Ok(()) => Ok(None),
                Err(e) => {
                    let path = broken.path.display().to_string();
                    self.add_broken(broken);
                    Err(MigrationError::BadOptions(format!(
                        "cannot remove {path}: {e}"
                    )))
                }
            };
        }
        let interrupted = self.take_interrupted(volume)?;
        interrupted.discard()?;
        Ok(Some(interrupted.id))
    }

    /// Clean shutdown, guest I/O held: every running job and every interrupted one writes
    /// its job file for the last time and stops. Returns the jobs left for a resume.
    pub fn suspend_all(&self) -> usize {
        let mut kept = 0;
        for job in self.jobs() {
            kept += usize::from(job.suspend());
        }
        for job in self.interrupted() {
            match job.suspend() {
                Ok(()) => kept += 1,
                Err(e) => log::error!("interrupted migration job {}: {e}", job.id),
            }
        }
        kept
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
