//! The exports a server offers, by name, and each export's live connections: a connection
//! attaches to its export when it enters the transmission phase, and an export that is
//! fenced or removed shuts every attached connection down and refuses new ones.
//!
//! Attaching and fencing take the same lock, so no connection can attach after a fence
//! without being shut down by it: once [`Export::fence`] returns, every connection that
//! could still write is known, and [`Export::wait_detached`] waits for them to end (each
//! drains its requests in flight before it detaches).

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::nbd::connection::Socket;
use crate::tls::{PeerIdentity, TlsAuthz};
use crate::Volume;

/// The queue index the engine sees for NBD connections starts here (plus the connection's
/// slot in its export), apart from the virtqueue indices a vhost-user front end uses: the
/// journal keeps one stream per queue index.
pub const NBD_QUEUE_INDEX_BASE: u16 = 0x8000;
/// The most connections one export serves at once (slots for the queue indices).
pub const EXPORT_CONNECTIONS_MAX: usize = 4096;
const _: () = assert!(NBD_QUEUE_INDEX_BASE as usize + EXPORT_CONNECTIONS_MAX <= u16::MAX as usize);

/// What an export is: a volume under a name, and who may use it how.
#[derive(Clone)]
pub struct ExportConfig {
    /// The name clients ask for (`nbd://HOST:PORT/NAME`).
    pub name: String,
    pub volume: Arc<Volume>,
    /// Served read-only (also when the volume itself is read-only).
    pub read_only: bool,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Only clients whose certificate names are in this list may use the export (on top
    /// of the server's own `--tls-authz`); `None`: every client the server admits.
    pub clients: Option<TlsAuthz>,
}

impl std::fmt::Debug for ExportConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportConfig")
            .field("name", &self.name)
            .field("volume", &self.volume.name())
            .field("read_only", &self.read_only)
            .field("clients", &self.clients)
            .finish()
    }
}

/// What the control socket shows of an export.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExportStatus {
    pub name: String,
    pub read_only: bool,
    /// Fenced: every connection was shut down and none is accepted any more.
    pub fenced: bool,
    /// Connections in the transmission phase now.
    pub connections: usize,
    /// Connections that have entered the transmission phase since the export was added.
    pub connections_total: u64,
    /// The names of the connected clients (their certificate's name over TLS, else their
    /// address).
    pub clients: Vec<String>,
}

struct Attached {
    id: u64,
    slot: u16,
    /// A handle on the connection's socket, to shut it down from another thread.
    socket: Socket,
    client: String,
}

#[derive(Default)]
struct Connections {
    attached: Vec<Attached>,
    fenced: bool,
    removed: bool,
}

/// An export on a server.
pub(crate) struct Export {
    pub config: ExportConfig,
    connections: Mutex<Connections>,
    detached: Condvar,
    fenced: AtomicBool,
    total: AtomicU64,
    next_id: AtomicU64,
}

/// Why a connection cannot attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttachRefused {
    Fenced,
    Removed,
    Full,
}

impl Export {
    pub fn new(config: ExportConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            connections: Mutex::new(Connections::default()),
            detached: Condvar::new(),
            fenced: AtomicBool::new(false),
            total: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connections> {
        self.connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// True when the export refuses changes: checked before every write is submitted.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Served read-only: asked for, or the volume is.
    pub fn read_only(&self) -> bool {
        self.config.read_only || self.config.volume.read_only()
    }

    /// True when the client with `peer` (its certificate, over TLS) may use the export.
    pub fn admits(&self, peer: Option<&PeerIdentity>) -> bool {
        match (&self.config.clients, peer) {
            (None, _) => true,
            (Some(allowed), Some(peer)) => allowed.check(peer).is_ok(),
            (Some(_), None) => false,
        }
    }

    /// Attaches a connection entering the transmission phase; `socket` is a handle the
    /// export keeps to shut the connection down.
    pub fn attach(
        self: &Arc<Self>,
        socket: Socket,
        client: String,
    ) -> Result<Attachment, AttachRefused> {
        let mut connections = self.lock();
        if connections.removed {
            return Err(AttachRefused::Removed);
        }
        if connections.fenced {
            return Err(AttachRefused::Fenced);
        }
        let slot = (0..EXPORT_CONNECTIONS_MAX as u16)
            .find(|s| connections.attached.iter().all(|a| a.slot != *s))
            .ok_or(AttachRefused::Full)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        connections.attached.push(Attached {
            id,
            slot,
            socket,
            client,
        });
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(Attachment {
            export: self.clone(),
            id,
            queue_index: NBD_QUEUE_INDEX_BASE + slot,
        })
    }

    /// Refuses new connections and shuts every attached one down; with `removed`, the
    /// export is also gone for new lookups of connections that found it already.
    pub fn fence(&self, removed: bool) {
        let mut connections = self.lock();
        connections.fenced = true;
        connections.removed |= removed;
        self.fenced.store(true, Ordering::Release);
        for attached in &connections.attached {
            attached.socket.shutdown();
        }
    }

    /// Lifts a fence: the export takes new connections and writes again (a move between
    /// hosts whose hand-off failed gives the volume back to its source). A removed export
    /// stays removed.
    pub fn unfence(&self) {
        let mut connections = self.lock();
        if connections.removed {
            return;
        }
        connections.fenced = false;
        self.fenced.store(false, Ordering::Release);
    }

    /// Waits until no connection is attached, for at most `timeout`; false on timeout.
    pub fn wait_detached(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut connections = self.lock();
        while !connections.attached.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            connections = match self.detached.wait_timeout(connections, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    /// Shuts every attached connection down (the server is stopping).
    pub fn shut_down_connections(&self) {
        for attached in &self.lock().attached {
            attached.socket.shutdown();
        }
    }

    pub fn status(&self) -> ExportStatus {
        let connections = self.lock();
        ExportStatus {
            name: self.config.name.clone(),
            read_only: self.read_only(),
            fenced: connections.fenced,
            connections: connections.attached.len(),
            connections_total: self.total.load(Ordering::Relaxed),
            clients: connections
                .attached
                .iter()
                .map(|a| a.client.clone())
                .collect(),
        }
    }

    fn detach(&self, id: u64) {
        let mut connections = self.lock();
        connections.attached.retain(|a| a.id != id);
        self.detached.notify_all();
    }
}

/// A connection's place in its export; dropping it detaches the connection.
pub(crate) struct Attachment {
    export: Arc<Export>,
    id: u64,
    /// The queue index the connection's engine queue uses.
    pub queue_index: u16,
}

impl Attachment {
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.export.detach(self.id);
    }
}

/// The exports of a server by name (names are unique).
#[derive(Default)]
pub(crate) struct ExportTable {
    exports: Mutex<BTreeMap<String, Arc<Export>>>,
}

impl ExportTable {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.exports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds an export; false when the name is taken.
    pub fn add(&self, export: Arc<Export>) -> bool {
        let mut exports = self.lock();
        if exports.contains_key(&export.config.name) {
            return false;
        }
        exports.insert(export.config.name.clone(), export);
        true
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.lock().remove(name)
    }

    /// The export a client names; the empty name is the only export when there is
    /// exactly one (as qemu-nbd serves its one export under any name clients default to).
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        let exports = self.lock();
        if name.is_empty() && exports.len() == 1 {
            return exports.values().next().cloned();
        }
        exports.get(name).cloned()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.lock().get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Export>> {
        self.lock().values().cloned().collect()
    }
}

/// A short name for a client in logs and status: its certificate's name, or its address.
pub(crate) fn client_name(socket: &Socket, peer: Option<&PeerIdentity>) -> String {
    if let Some(peer) = peer {
        return peer.display_name().to_string();
    }
    match socket {
        Socket::Tcp(s) => s
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "tcp client".into()),
        Socket::Unix(_) => format!("unix client (fd {})", socket.as_raw_fd()),
    }
}
