//! At start-up: the migrations a restart interrupted, found by the job files beside the
//! volumes' images (`docs/migration.md`, *Migrations that survive a restart*). Each is
//! listed as `interrupted` (its volumes' writes tracked from the first) until
//! `ferry migrate resume` or `ferry migrate discard`; a file that cannot be taken up is
//! reported in one log line and by a resume of its volume, and never resumed.

use std::sync::Arc;

use ferry_engine::mirror::persist::{self, tracker::InterruptedJob, JobPersist};
use ferry_engine::mirror::registry::BrokenJobFile;
use ferry_engine::Volume;

use crate::daemon::Daemon;

/// Looks for a job file beside each of `volumes`' images (the daemon's volumes, before
/// any serves a guest) and lists what it finds in the daemon's migrations.
pub fn recover(daemon: &Daemon, volumes: &[Arc<Volume>]) {
    for volume in volumes {
        let backing = volume.backing();
        if backing.file().is_none() {
            continue;
        }
        let path = JobPersist::path_for(&backing.path);
        if path.symlink_metadata().is_err() {
            continue;
        }
        let name = volume.name().to_string();
        let lookup = |wanted: &str| volumes.iter().find(|v| v.name() == wanted).cloned();
        let recovered = persist::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|file| {
                match file.record.volumes.first() {
                    Some(first) if first.name == name => {}
                    _ => {
                        return Err(format!(
                            "job file {} does not start with volume {name:?}",
                            path.display()
                        ))
                    }
                }
                InterruptedJob::recover(path.clone(), &file, lookup, persist::INTERVAL_DEFAULT)
                    .map_err(|e| e.to_string())
            });
        match recovered {
            Ok(job) => {
                log::warn!(
                    "volume {name}: migration to {} interrupted by {}; {} bytes left to copy \
                     (ferry migrate resume --volume {name}, or ferry migrate discard)",
                    job.persist.meta().target,
                    if job.crashed { "a crash" } else { "a shutdown" },
                    job.uncopied_bytes
                );
                daemon.migrations.add_interrupted(job);
            }
            Err(reason) => {
                log::error!("volume {name}: interrupted migration cannot be resumed: {reason}");
                daemon.migrations.add_broken(BrokenJobFile {
                    volume: name,
                    path,
                    reason,
                });
            }
        }
    }
}
