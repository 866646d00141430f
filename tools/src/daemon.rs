//! The running daemon's shared state: the served volumes and what the control socket
//! reaches through them.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_engine::journal::Journal;
use ferry_engine::mirror::MigrationRegistry;
use ferry_engine::tls::TlsCredentials;
use ferry_engine::Volume;
use ferry_vhost::ConnectionState;

/// One volume being served.
pub struct ServedVolume {
    pub volume: Arc<Volume>,
    pub socket: PathBuf,
    pub connection: Arc<ConnectionState>,
    pub queues: u16,
}

/// Everything the control socket's commands act on.
pub struct Daemon {
    pub volumes: Vec<ServedVolume>,
    pub migrations: MigrationRegistry,
    /// The write journal, when `--journal` was given.
    pub journal: Option<Arc<Journal>>,
    /// The daemon's own credentials (`--tls-creds`): for listening, and the default for
    /// connecting to TLS exports (`nbds://` migration targets) not given their own.
    pub tls: Option<Arc<TlsCredentials>>,
}

impl Daemon {
    pub fn volume(&self, name: &str) -> Option<&ServedVolume> {
        self.volumes.iter().find(|v| v.volume.name() == name)
    }
}
