//! One volume being served: opened and checked from its spec, then its vhost-user socket
//! bound and its serving thread started (the same steps for a volume of the command line
//! and for one added while the daemon runs), and, when it is removed, its thread stopped
//! and its socket unbound.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use anyhow::{bail, Context};
use ferry_engine::journal::Journal;
use ferry_engine::tls::TlsCredentials;
use ferry_engine::Volume;
use ferry_vhost::{ConnectionState, DeviceGate, ServeStop, Serving};

use crate::volume_claims::{Claims, FileIdentity, ImageRange};
use crate::volume_spec::{NbdExportMode, VolumeSpec};

/// A volume opened and checked against its device settings, not served yet.
pub struct OpenedVolume {
    spec: VolumeSpec,
    volume: Arc<Volume>,
}

impl OpenedVolume {
    /// Opens the image (creating it when the spec gives a size) and checks the device
    /// settings against it. `daemon_tls` (`--tls-creds`) serves an `nbds://` volume without
    /// credentials of its own (see [`VolumeSpec::engine_config`]).
    pub fn open(
        spec: &VolumeSpec,
        daemon_tls: Option<&Arc<TlsCredentials>>,
    ) -> anyhow::Result<Self> {
        let volume = Volume::open(spec.engine_config(daemon_tls)?)?;
        ferry_vhost::check_settings(&volume, &spec.device_settings())?;
        Ok(Self {
            spec: spec.clone(),
            volume,
        })
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }
}

/// One volume being served.
pub struct ServedVolume {
    pub volume: Arc<Volume>,
    pub socket: PathBuf,
    pub connection: Arc<ConnectionState>,
    pub queues: u16,
    /// How the volume is exported over NBD (`nbd=`), if it is.
    pub nbd: Option<NbdExportMode>,
    /// The volume runs to its image's end (no `length=`): it claims bytes the image may
    /// grow.
    to_image_end: bool,
    /// Whether its device may take requests (closed for an incoming volume until it is
    /// handed over, and on the source of a move once it has been).
    pub gate: Arc<DeviceGate>,
    stop: Arc<ServeStop>,
    /// The serving thread, until [`ServedVolume::stop_serving`] joins it.
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ServedVolume {
    /// Serves an opened volume: adds the journal's observer (every guest write of every
    /// volume is journaled), binds the socket and starts the thread accepting frontends,
    /// whose requests `gate` admits.
    pub fn start(
        opened: OpenedVolume,
        journal: Option<&Arc<Journal>>,
        gate: Arc<DeviceGate>,
    ) -> anyhow::Result<Self> {
        let OpenedVolume { spec, volume } = opened;
        if let Some(journal) = journal {
            volume.add_observer(journal.observer_for(volume.name()));
        }
        let listener = ferry_vhost::bind_socket(&spec.socket)?;
        crate::identity::apply_socket_access(&spec.socket)?;
        let stop = ServeStop::new(&listener).context("cannot start a volume thread")?;
        let connection = Arc::new(ConnectionState::default());
        let thread = {
            let serving = Serving {
                listener,
                state: connection.clone(),
                stop: stop.clone(),
                gate: gate.clone(),
            };
            let volume = volume.clone();
            let settings = spec.device_settings();
            std::thread::Builder::new()
                .name(format!("ferry-{}", volume.name()))
                .spawn(move || ferry_vhost::serve_volume(volume, settings, serving))
        };
        let thread = match thread {
            Ok(thread) => thread,
            Err(e) => {
                let _ = std::fs::remove_file(&spec.socket);
                return Err(e).context("cannot start a volume thread");
            }
        };
        Ok(Self {
            volume,
            socket: spec.socket.clone(),
            connection,
            queues: spec.queues,
            nbd: spec.nbd,
            gate,
            to_image_end: spec.engine.length_bytes.is_none(),
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// What the volume holds for itself alone; its image is the one it is served from now
    /// (a migration's cutover changes it).
    pub fn claims(&self) -> Claims {
        let backing = self.volume.backing();
        let identity = match backing.file() {
            Some(image) => image.file.metadata().ok().map(|m| FileIdentity::of(&m)),
            None => None,
        };
        let start_bytes = backing.base_offset_bytes;
        Claims {
            name: self.volume.name().to_string(),
            socket: self.socket.clone(),
            image: ImageRange {
                path: backing.path.clone(),
                identity,
                start_bytes,
                end_bytes: if self.to_image_end {
                    u64::MAX
                } else {
                    start_bytes.saturating_add(backing.len_bytes)
                },
                read_only: self.volume.read_only(),
            },
        }
    }

    /// Stops serving: no frontend is accepted any more, the attached one is disconnected
    /// once its requests in flight have drained, the thread is joined, the image flushed and
    /// the socket file removed. The volume itself stays open while others hold it.
    pub fn stop_serving(&self) -> anyhow::Result<()> {
        self.gate.shut();
        self.stop.stop();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                log::error!("volume {}: its serving thread panicked", self.volume.name());
            }
        }
        let flushed = self.volume.backing().sync();
        let _ = std::fs::remove_file(&self.socket);
        flushed.with_context(|| format!("volume {}: final flush failed", self.volume.name()))
    }
}

/// Refuses a socket path that another process serves, a file that is not a socket, or a
/// directory that does not exist, before anything is created for the volume.
pub fn precheck_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("socket {} is in use by another process", path.display());
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("socket directory {} does not exist", dir.display());
        }
    }
    Ok(())
}
