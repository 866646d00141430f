//! The running daemon's shared state: the served volumes, added and removed while it runs
//! (the incoming volumes of a move from another host) behind one lock that keeps their
//! names, sockets and images distinct, each exported over NBD when its spec says so; the
//! migration jobs; the journal; the NBD server; the replication groups received here.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ferry_engine::journal::Journal;
use ferry_engine::mirror::MigrationRegistry;
use ferry_engine::nbd::{ExportConfig, NbdServer};
use ferry_engine::tls::{TlsAuthz, TlsCredentials};
use ferry_vhost::DeviceGate;

use crate::handoff::HandOff;
use crate::incoming::{IncomingOptions, IncomingTable};
use crate::replica_groups::ReplicaGroups;
use crate::replication_primary::PrimaryGroup;

use crate::served_volume::{precheck_socket, OpenedVolume, ServedVolume};
use crate::volume_claims::Claims;
use crate::volume_spec::{NbdExportMode, VolumeSpec};

/// Why a volume could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeTableError {
    /// The volume would share its name, socket or image with another (or its socket with
    /// the control socket).
    #[error("{0}")]
    Conflict(String),
    #[error("no volume named {0}")]
    NotFound(String),
    #[error("volume {volume} is in migration job {job}: cancel the job first")]
    Migrating { volume: String, job: u64 },
    /// Opening, binding or starting it failed; nothing of it is left behind.
    #[error("volume {volume}: {reason}")]
    Start { volume: String, reason: String },
    /// It is out of the table and its serving has stopped, but its final flush failed.
    #[error("volume {volume}: {reason}")]
    Stop { volume: String, reason: String },
}

/// The volume table: volumes served, and volumes being started (their claims reserved so
/// that the table's lock is not held while an image is opened or an NBD server reached).
#[derive(Default)]
struct Table {
    served: Vec<Arc<ServedVolume>>,
    starting: Vec<Claims>,
}

/// Everything the control socket's commands act on.
pub struct Daemon {
    table: Mutex<Table>,
    /// The unix control socket, which no volume may use as its socket.
    control_socket: Option<PathBuf>,
    pub migrations: MigrationRegistry,
    /// The write journal, when `--journal` was given.
    pub journal: Option<Arc<Journal>>,
    /// `--tls-creds`: the server pair for the listeners, the client pair for links to
    /// other daemons and the default for connecting to TLS exports (`nbds://` volumes and
    /// migration targets without credentials of their own).
    pub tls: Option<Arc<TlsCredentials>>,
    /// The NBD server, when `--nbd-listen` was given: volumes with `nbd=` are exported on it
    /// while they are served.
    pub nbd: Option<Arc<NbdServer>>,
    /// Volumes moving in from other hosts (`incoming-*`), and their bounds.
    pub(crate) incoming: Mutex<IncomingTable>,
    pub incoming_options: IncomingOptions,
    /// Moves of volumes to other hosts started here (each with its migration jobs).
    pub handoffs: Mutex<Vec<Arc<HandOff>>>,
    /// Replication groups received here from their primaries (`replicate-*`).
    pub(crate) replica_groups: Mutex<ReplicaGroups>,
    /// Replication groups whose volumes are served here (`replicate-start`).
    pub(crate) primary_groups: Mutex<Vec<Arc<PrimaryGroup>>>,
}

/// How an added volume's device and NBD export admit their clients.
pub struct Admission {
    /// The volume's gate (open for an ordinary volume).
    pub gate: Arc<DeviceGate>,
    /// Only these clients may use its NBD export (`None`: whoever the server admits).
    pub nbd_clients: Option<TlsAuthz>,
}

/// How long removing a volume waits for its NBD clients to end (their requests drain).
const NBD_EXPORT_REMOVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Daemon {
    pub fn new(
        journal: Option<Arc<Journal>>,
        control_socket: Option<PathBuf>,
        tls: Option<Arc<TlsCredentials>>,
    ) -> Self {
        Self {
            table: Mutex::default(),
            control_socket,
            migrations: MigrationRegistry::new(),
            journal,
            tls,
            nbd: None,
            incoming: Mutex::default(),
            handoffs: Mutex::default(),
            replica_groups: Mutex::default(),
            primary_groups: Mutex::default(),
            incoming_options: IncomingOptions::default(),
        }
    }

    /// The daemon with these bounds on incoming volumes.
    pub fn with_incoming_options(mut self, options: IncomingOptions) -> Self {
        self.incoming_options = options;
        self
    }

    /// A gate for an ordinary volume: open, and bounded like an incoming volume's.
    pub fn open_gate(&self) -> Arc<DeviceGate> {
        Arc::new(DeviceGate::new_open(self.incoming_options.start_wait))
    }

    /// The daemon with an NBD server that exports the volumes whose spec says `nbd=`.
    pub fn with_nbd(mut self, server: Option<Arc<NbdServer>>) -> Self {
        self.nbd = server;
        self
    }

    /// The move to another host that job `id` belongs to, if any.
    pub fn handoff_of(&self, id: u64) -> Option<Arc<HandOff>> {
        self.handoffs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|h| h.job_ids().contains(&id))
            .cloned()
    }

    /// The table stays consistent through a panic (every change is one push or remove).
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn volume(&self, name: &str) -> Option<Arc<ServedVolume>> {
        self.table()
            .served
            .iter()
            .find(|v| v.volume.name() == name)
            .cloned()
    }

    /// The volumes served now, in the order they were added.
    pub fn volumes(&self) -> Vec<Arc<ServedVolume>> {
        self.table().served.clone()
    }

    /// Opens and serves a volume while the daemon runs, exactly as a volume of the command
    /// line is served. Refused when it would share a name, socket or image with another
    /// volume; on any failure nothing of it is left (no socket, no table entry, and no image
    /// when the attempt created it).
    pub fn add_volume(
        &self,
        spec: &VolumeSpec,
        admission: Admission,
    ) -> Result<Arc<ServedVolume>, VolumeTableError> {
        let claims = self.reserve(Claims::of_spec(spec))?;
        let image = &spec.engine.path;
        let image_existed = std::fs::symlink_metadata(image).is_ok();
        let opened = precheck_socket(&spec.socket)
            .and_then(|()| OpenedVolume::open(spec, self.tls.as_ref()));
        let served = opened
            .and_then(|opened| ServedVolume::start(opened, self.journal.as_ref(), admission.gate))
            .map_err(|e| {
                if !image_existed && image.is_file() {
                    let _ = std::fs::remove_file(image);
                }
                VolumeTableError::Start {
                    volume: claims.name.clone(),
                    reason: format!("{e:#}"),
                }
            });
        let mut table = self.table();
        table.starting.retain(|c| c != &claims);
        let served = Arc::new(served?);
        table.served.push(served.clone());
        drop(table);
        self.export_over_nbd(&served, admission.nbd_clients)?;
        Ok(served)
    }

    /// Serves a volume opened beforehand (the command line's, opened before the journal).
    pub fn add_opened(&self, opened: OpenedVolume) -> Result<Arc<ServedVolume>, VolumeTableError> {
        let claims = self.reserve(Claims::of_spec(opened.spec()))?;
        let gate = self.open_gate();
        let served = ServedVolume::start(opened, self.journal.as_ref(), gate).map_err(|e| {
            VolumeTableError::Start {
                volume: claims.name.clone(),
                reason: format!("{e:#}"),
            }
        });
        let mut table = self.table();
        table.starting.retain(|c| c != &claims);
        let served = Arc::new(served?);
        table.served.push(served.clone());
        drop(table);
        self.export_over_nbd(&served, None)?;
        Ok(served)
    }

    /// Checks `claims` against every volume served or being started and reserves them.
    fn reserve(&self, claims: Claims) -> Result<Claims, VolumeTableError> {
        let mut table = self.table();
        if let Some(conflict) = self
            .control_socket
            .as_deref()
            .and_then(|control| claims.conflict_with_control(control))
        {
            return Err(VolumeTableError::Conflict(conflict));
        }
        let others = table
            .served
            .iter()
            .map(|v| v.claims())
            .chain(table.starting.iter().cloned());
        for other in others {
            if let Some(conflict) = claims.conflict(&other) {
                return Err(VolumeTableError::Conflict(conflict));
            }
        }
        table.starting.push(claims.clone());
        Ok(claims)
    }

    /// Stops serving a volume and takes it out of the table: its frontend, if one is
    /// attached, is disconnected after its requests in flight drain, and its socket file is
    /// removed. The image stays (deleting it is the caller's choice). Refused while the
    /// volume is in a migration job that has not ended.
    pub fn remove_volume(&self, name: &str) -> Result<Arc<ServedVolume>, VolumeTableError> {
        let served = {
            let mut table = self.table();
            let index = table
                .served
                .iter()
                .position(|v| v.volume.name() == name)
                .ok_or_else(|| VolumeTableError::NotFound(name.to_string()))?;
            let running = self.migrations.jobs().into_iter().find(|job| {
                !job.state().is_terminal() && job.volume_names().iter().any(|n| n == name)
            });
            if let Some(job) = running {
                return Err(VolumeTableError::Migrating {
                    volume: name.to_string(),
                    job: job.id(),
                });
            }
            table.served.remove(index)
        };
        // Outside the lock: the drains of NBD clients and of an attached frontend take up
        // to their bounds.
        self.withdraw_nbd_export(&served);
        served.stop_serving().map_err(|e| VolumeTableError::Stop {
            volume: name.to_string(),
            reason: format!("{e:#}"),
        })?;
        Ok(served)
    }
}

impl Daemon {
    /// Exports a served volume over NBD when its spec says so (and the daemon has an NBD
    /// server); a volume whose export fails is taken out again.
    fn export_over_nbd(
        &self,
        served: &Arc<ServedVolume>,
        clients: Option<TlsAuthz>,
    ) -> Result<(), VolumeTableError> {
        let (Some(server), Some(mode)) = (&self.nbd, served.nbd) else {
            return Ok(());
        };
        let name = served.volume.name().to_string();
        let exported = server.add_export(ExportConfig {
            name: name.clone(),
            volume: served.volume.clone(),
            read_only: mode == NbdExportMode::ReadOnly,
            description: format!("ferry volume {name}"),
            clients,
        });
        if let Err(e) = exported {
            self.table().served.retain(|v| !Arc::ptr_eq(v, served));
            let _ = served.stop_serving();
            return Err(VolumeTableError::Start {
                volume: name,
                reason: e.to_string(),
            });
        }
        Ok(())
    }

    /// Withdraws a volume's NBD export, if it has one: its clients are disconnected once
    /// their requests in flight have drained.
    fn withdraw_nbd_export(&self, served: &ServedVolume) {
        let Some(server) = &self.nbd else { return };
        if served.nbd.is_none() {
            return;
        }
        if let Err(e) = server.remove_export(served.volume.name(), NBD_EXPORT_REMOVE_TIMEOUT) {
            log::error!("volume {}: {e}", served.volume.name());
        }
    }
}

#[cfg(test)]
mod tests;
