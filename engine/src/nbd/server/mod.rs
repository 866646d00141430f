//! ferry's NBD server: exports engine volumes over NBD (fixed newstyle, structured replies,
//! `base:allocation`, TLS with `NBD_OPT_STARTTLS`), several connections per export, each
//! on its own engine queue.
//!
//! - [`listener`]: listen addresses, the accept loop and admission.
//! - `negotiation`: the handshake and option haggling, FORCEDTLS, `--tls-authz`.
//! - `transport`: the byte stream, plain or TLS (rustls over the socket).
//! - `transmission`: a connection's request loop on its own [`crate::VolumeQueue`].
//! - `intake`: requests read from the socket in batches, checked, their payloads gathered.
//! - [`request`]: request validation, a pure function (fuzzed).
//! - `slots`: requests in flight, their buffers and encoded replies, and their bounds.
//! - `allocation`: the `base:allocation` context from the image's holes.
//! - [`exports`]: the exports by name, their connections, fencing.
//!
//! A daemon makes one [`NbdServer`], calls [`NbdServer::listen`] for each address, and
//! adds, removes or fences exports at any time ([`NbdServer::add_export`],
//! [`NbdServer::remove_export`], [`NbdServer::fence_export`]).

pub mod exports;
pub mod listener;
pub mod request;

mod allocation;
mod intake;
mod negotiation;
mod slots;
mod transmission;
mod transport;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::ServerConfig;

use crate::nbd::connection::Socket;
use crate::tls::{TlsAuthz, TlsCredentials, TlsError};
use exports::{Export, ExportTable};
pub use exports::{ExportConfig, ExportStatus, NBD_QUEUE_INDEX_BASE};
pub use listener::ListenAddress;
use listener::Listener;
pub use negotiation::{OPTION_DATA_BYTES_MAX, PAYLOAD_BYTES_MAX};
pub use slots::{INFLIGHT_MAX, PAYLOAD_BYTES_INFLIGHT_MAX};

/// Connections served at once by default (`--nbd-max-connections`).
pub const CONNECTIONS_MAX_DEFAULT: usize = 128;
/// The largest `--nbd-max-connections`.
pub const CONNECTIONS_MAX_LIMIT: usize = exports::EXPORT_CONNECTIONS_MAX;
/// How long a client may take from connecting to the transmission phase (qemu's
/// `handshake-max-seconds` default).
pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// How a server runs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// With credentials: TLS is required of every client (FORCEDTLS).
    pub tls: Option<Arc<TlsCredentials>>,
    /// The client certificates allowed in (`--tls-authz`).
    pub authz: TlsAuthz,
    pub connections_max: usize,
    pub handshake_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            tls: None,
            authz: TlsAuthz::default(),
            connections_max: CONNECTIONS_MAX_DEFAULT,
            handshake_timeout: HANDSHAKE_TIMEOUT_DEFAULT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen for NBD on {address}: {source}")]
    Listen {
        address: ListenAddress,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the NBD listener thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("an NBD export is named {0} already")]
    ExportExists(String),
    #[error("no NBD export {0}")]
    NoExport(String),
    #[error("NBD export {name}: {connections} connections still open after {timeout:?}")]
    StillConnected {
        name: String,
        connections: usize,
        timeout: Duration,
    },
}

/// The state every listener and connection thread shares.
pub(crate) struct Shared {
    options: ServerOptions,
    tls: Option<Arc<ServerConfig>>,
    authz: TlsAuthz,
    exports: ExportTable,
    stopping: AtomicBool,
    /// Admitted connections (handshakes included) and handles to shut them down.
    connections: Mutex<Vec<(u64, Socket)>>,
    next_connection: AtomicU64,
    refused: AtomicU64,
    listeners: Mutex<Vec<(OwnedFd, ListenAddress)>>,
}

impl Shared {
    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn lock_connections(&self) -> MutexGuard<'_, Vec<(u64, Socket)>> {
        self.connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits a new connection, or refuses it when the server is at its limit.
    fn admit(self: &Arc<Self>, socket: &Socket) -> Option<Admission> {
        let mut connections = self.lock_connections();
        if connections.len() >= self.options.connections_max {
            drop(connections);
            listener::log_refused(self);
            return None;
        }
        let handle = socket.try_clone().ok()?;
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        connections.push((id, handle));
        Some(Admission {
            shared: self.clone(),
            id,
        })
    }
}

/// An admitted connection's place in the count; dropping it frees the place.
pub(crate) struct Admission {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared
            .lock_connections()
            .retain(|(id, _)| *id != self.id);
    }
}

/// An NBD server: its listeners, exports and connections.
pub struct NbdServer {
    shared: Arc<Shared>,
}

impl NbdServer {
    /// A server with no listener and no export yet; checks the TLS credentials.
    pub fn new(options: ServerOptions) -> Result<Self, ServerError> {
        let tls = match &options.tls {
            Some(credentials) => Some(credentials.server_config()?),
            None => None,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                tls,
                authz: options.authz.clone(),
                options,
                exports: ExportTable::default(),
                stopping: AtomicBool::new(false),
                connections: Mutex::new(Vec::new()),
                next_connection: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                listeners: Mutex::new(Vec::new()),
            }),
        })
    }

    /// True when clients must use TLS.
    pub fn requires_tls(&self) -> bool {
        self.shared.tls.is_some()
    }

    /// Binds `address` and accepts connections on it from a thread of its own; returns the
    /// address bound (a `:0` port resolved).
    pub fn listen(&self, address: &ListenAddress) -> Result<ListenAddress, ServerError> {
        let listen_error = |source| ServerError::Listen {
            address: address.clone(),
            source,
        };
        let (listener, bound) = Listener::bind(address).map_err(listen_error)?;
        let handle = listener.handle().map_err(listen_error)?;
        let shared = self.shared.clone();
        let loop_address = bound.clone();
        std::thread::Builder::new()
            .name("ferry-nbd-accept".into())
            .spawn(move || {
                crate::confine::enter(&listener::ACCEPT_SYSCALLS);
                listener::accept_loop(shared, listener, loop_address)
            })
            .map_err(ServerError::Thread)?;
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((handle, bound.clone()));
        log::info!("nbd: listening on {bound}");
        Ok(bound)
    }

    /// Offers an export; its name must be new.
    pub fn add_export(&self, config: ExportConfig) -> Result<(), ServerError> {
        let name = config.name.clone();
        if !self.shared.exports.add(Export::new(config)) {
            return Err(ServerError::ExportExists(name));
        }
        Ok(())
    }

    /// Withdraws an export: new clients no longer find it, its connections are shut down,
    /// and this waits up to `timeout` for them to end (their requests in flight drained).
    pub fn remove_export(&self, name: &str, timeout: Duration) -> Result<(), ServerError> {
        let export = self
            .shared
            .exports
            .remove(name)
            .ok_or_else(|| ServerError::NoExport(name.into()))?;
        export.fence(true);
        wait_detached(&export, timeout)
    }

    /// Fences an export: from now on it takes no change (writes fail with `EPERM`), its
    /// connections are shut down and new ones refused; waits up to `timeout` for the
    /// connections to end, after which no write through this server can reach the volume.
    pub fn fence_export(&self, name: &str, timeout: Duration) -> Result<(), ServerError> {
        let export = self
            .shared
            .exports
            .get(name)
            .ok_or_else(|| ServerError::NoExport(name.into()))?;
        export.fence(false);
        wait_detached(&export, timeout)
    }

    /// Lifts an export's fence ([`Export::unfence`]).
    pub fn unfence_export(&self, name: &str) -> Result<(), ServerError> {
        let export = self
            .shared
            .exports
            .get(name)
            .ok_or_else(|| ServerError::NoExport(name.into()))?;
        export.unfence();
        Ok(())
    }

    pub fn export_status(&self, name: &str) -> Option<ExportStatus> {
        self.shared.exports.get(name).map(|e| e.status())
    }

    pub fn exports(&self) -> Vec<ExportStatus> {
        self.shared
            .exports
            .all()
            .iter()
            .map(|e| e.status())
            .collect()
    }

    /// The addresses listened on.
    pub fn addresses(&self) -> Vec<ListenAddress> {
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(_, address)| address.clone())
            .collect()
    }

    /// Connections admitted now (handshakes included).
    pub fn connections(&self) -> usize {
        self.shared.lock_connections().len()
    }

    /// Stops accepting, shuts every connection down, removes unix sockets. Connections
    /// end on their own threads after draining their requests.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        let listeners = std::mem::take(
            &mut *self
                .shared
                .listeners
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for (handle, address) in listeners {
            listener::shut_down_listener(&handle);
            if let ListenAddress::Unix { path } = address {
                let _ = std::fs::remove_file(path);
            }
        }
        for (_, connection) in self.shared.lock_connections().iter() {
            connection.shutdown();
        }
        for export in self.shared.exports.all() {
            export.shut_down_connections();
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn wait_detached(export: &Export, timeout: Duration) -> Result<(), ServerError> {
    if export.wait_detached(timeout) {
        return Ok(());
    }
    Err(ServerError::StillConnected {
        name: export.config.name.clone(),
        connections: export.status().connections,
        timeout,
    })
}

#[cfg(test)]
mod tests;
