//! Incoming volumes: the destination's half of moving a running VM's disk from another
//! host (`docs/migration.md`, "Across hosts"). The source daemon prepares one
//! (`incoming-prepare`): a sparse image, a volume served on its vhost-user socket behind a
//! closed gate, exported read-write over NBD with TLS to the source's certificate alone. The
//! source mirrors into the export, then activates it (`incoming-activate`): the export is
//! fenced, so no write of the source lands any more, and the gate opens for the destination
//! VM. Until then the source keeps it alive with any `incoming-*` call within the lease;
//! an incoming volume whose lease runs out, or that the source abandons, is removed with the
//! image it created, so a source that dies or a link that breaks leaves nothing behind.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ferry_engine::tls::TlsAuthz;
use ferry_vhost::DeviceGate;
use serde_json::{json, Value};

use crate::control::{Caller, ControlError};
use crate::daemon::{Admission, Daemon};
use crate::served_volume::ServedVolume;
use crate::volume_spec::{self, VolumeSpec};

/// The bounds of incoming volumes (`ferry serve --incoming-lease`, `--incoming-start-wait`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncomingOptions {
    /// An incoming volume not refreshed by its source for this long is abandoned.
    pub lease: Duration,
    /// How long a device started before activation waits for it before it is refused;
    /// also how long a source's device restarted after its hand-off waits.
    pub start_wait: Duration,
}

impl Default for IncomingOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            start_wait: Duration::from_secs(10),
        }
    }
}

/// How often the daemon looks for expired leases.
pub const LEASE_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Ended incoming volumes remembered for `incoming-status` (their names and why).
const ENDED_REMEMBERED_MAX: usize = 64;
/// How long a fence waits for an export's NBD connections to end (the source's export on
/// the destination at activation, the volume's own on the source at its hand-off).
pub(crate) const FENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest volume name an incoming volume may have.
const NAME_BYTES_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Incoming,
    Active,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            Self::Incoming => "incoming",
            Self::Active => "active",
        }
    }
}

/// One incoming volume.
struct Incoming {
    name: String,
    /// The source's certificate name: the only client of the export, and the only caller
    /// (besides the local control socket) that may activate or abandon it.
    source: String,
    served: Arc<ServedVolume>,
    /// The image was an empty file before: on abandon it is emptied, not deleted.
    image_was_empty: bool,
    uri: Option<String>,
    state: State,
    refreshed: Instant,
}

/// The daemon's incoming volumes, and those that ended lately with the reason.
#[derive(Default)]
pub struct IncomingTable {
    live: Vec<Incoming>,
    ended: VecDeque<(String, String)>,
}

impl IncomingTable {
    fn ended(&mut self, name: &str, reason: String) {
        if self.ended.len() == ENDED_REMEMBERED_MAX {
            self.ended.pop_front();
        }
        self.ended.retain(|(n, _)| n != name);
        self.ended.push_back((name.to_string(), reason));
    }
}

/// What `incoming-prepare` is asked for.
struct Request {
    name: String,
    size_bytes: u64,
    logical_block_bytes: u32,
    path: PathBuf,
    socket: PathBuf,
}

fn request(args: &Value) -> Result<Request, ControlError> {
    let text = |key: &str| {
        args.get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ControlError::bad_argument(format!("{key} is missing")))
    };
    let name = text("name")?;
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > NAME_BYTES_MAX || !name.chars().all(plain) {
        return Err(ControlError::bad_argument(format!(
            "name {name:?}: 1 to {NAME_BYTES_MAX} letters, digits, '.', '_' or '-'"
        )));
    }
    let size_bytes = args
        .get("size")
        .and_then(Value::as_u64)
        .filter(|&s| s > 0)
        .ok_or_else(|| ControlError::bad_argument("size must be a positive number of bytes"))?;
    let logical_block_bytes = match args.get("logical-block-size") {
        None => 512,
        Some(v) => v
            .as_u64()
            .and_then(|b| u32::try_from(b).ok())
            .ok_or_else(|| ControlError::bad_argument("logical-block-size must be bytes"))?,
    };
    let path = PathBuf::from(text("path")?);
    let socket = PathBuf::from(text("socket")?);
    for (key, p) in [("path", &path), ("socket", &socket)] {
        let ok = p.is_absolute() && p.to_str().is_some_and(|t| !t.contains(','));
        if !ok {
            return Err(ControlError::bad_argument(format!(
                "{key} {}: an absolute path without commas",
                p.display()
            )));
        }
    }
    Ok(Request {
        name,
        size_bytes,
        logical_block_bytes,
        path,
        socket,
    })
}

/// The volume spec of an incoming volume: its image created at its size, exported
/// read-write over NBD.
fn spec_of(request: &Request, create: bool) -> Result<VolumeSpec, ControlError> {
    let size = if create {
        format!(",size={}", request.size_bytes)
    } else {
        String::new()
    };
    let text = format!(
        "name={},path={},socket={},logical-block-size={},nbd=rw{size}",
        request.name,
        request.path.display(),
        request.socket.display(),
        request.logical_block_bytes
    );
    volume_spec::parse_volume(&text).map_err(ControlError::bad_argument)
}

/// Refuses an image path that holds data; true when it is an empty file (used as it is).
fn check_image_path(path: &Path, size_bytes: u64) -> Result<bool, ControlError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(false);
    };
    if !meta.is_file() || meta.len() > 0 {
        return Err(ControlError::new(
            "Conflict",
            format!(
                "{} exists and is not an empty file: an incoming volume gets a new image",
                path.display()
            ),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(size_bytes));
    file.map_err(|e| ControlError::new("Conflict", format!("{}: {e}", path.display())))?;
    Ok(true)
}

/// The caller's name as the export's allow-list and the table know it.
fn source_name(caller: &Caller, args: &Value) -> Result<String, ControlError> {
    match caller {
        Caller::Remote { identity, .. } => Ok(identity.display_name().to_string()),
        // The local control socket names the client the export is for.
        Caller::Local => args
            .get("client")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                ControlError::bad_argument(
                    "client (a certificate name) is needed on the local control socket",
                )
            }),
    }
}

impl Daemon {
    fn incoming_table(&self) -> MutexGuard<'_, IncomingTable> {
        self.incoming.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `incoming-prepare`: see the module's comment. On any failure nothing is left.
    pub fn incoming_prepare(&self, caller: &Caller, args: &Value) -> Result<Value, ControlError> {
        let source = source_name(caller, args)?;
        let request = request(args)?;
        let Some(server) = self.nbd.clone().filter(|s| s.requires_tls()) else {
            return Err(ControlError::new(
                "NotSupported",
                "incoming volumes need an NBD server with TLS (--nbd-listen with --tls-creds)",
            ));
        };
        let clients = TlsAuthz::parse(&source).map_err(ControlError::bad_argument)?;
        let image_was_empty = check_image_path(&request.path, request.size_bytes)?;
        let spec = spec_of(&request, !image_was_empty)?;
        let gate = Arc::new(DeviceGate::new_closed(
            "an incoming volume, not activated yet",
            self.incoming_options.start_wait,
        ));
        let admission = Admission {
            gate,
            nbd_clients: Some(clients),
        };
        let served = self.add_volume(&spec, admission).map_err(|e| {
            if image_was_empty {
                let _ = std::fs::File::create(&request.path);
            }
            ControlError::new("Conflict", e.to_string())
        })?;
        let uri = crate::nbd_serve::export_uris(&server, &request.name)
            .into_iter()
            .find(|u| u.starts_with("nbds://"));
        let port = server.addresses().iter().find_map(|a| match a {
            ferry_engine::nbd::server::ListenAddress::Tcp { port, .. } => Some(*port),
            ferry_engine::nbd::server::ListenAddress::Unix { .. } => None,
        });
        self.incoming_table().live.push(Incoming {
            name: request.name.clone(),
            source: source.clone(),
            served,
            image_was_empty,
            uri: uri.clone(),
            state: State::Incoming,
            refreshed: Instant::now(),
        });
        log::info!(
            "incoming volume {} prepared for {source} ({} bytes at {})",
            request.name,
            request.size_bytes,
            request.path.display()
        );
        Ok(json!({
            "name": request.name,
            "uri": uri,
            "nbd-port": port,
            "lease-ms": self.incoming_options.lease.as_millis() as u64,
            "start-wait-ms": self.incoming_options.start_wait.as_millis() as u64,
        }))
    }

    /// `incoming-status`: the volume's state (refreshing its lease), or why it ended.
    pub fn incoming_status(&self, caller: &Caller, args: &Value) -> Result<Value, ControlError> {
        let name = name_arg(args)?;
        let mut table = self.incoming_table();
        if let Some(incoming) = table.live.iter_mut().find(|i| i.name == name) {
            check_owner(caller, incoming)?;
            incoming.refreshed = Instant::now();
            return Ok(self.describe(incoming));
        }
        match table.ended.iter().find(|(n, _)| n == name) {
            Some((_, reason)) => {
                Ok(json!({ "name": name, "state": "abandoned", "reason": reason }))
            }
            None => Err(ControlError::new(
                "NotFound",
                format!("no incoming volume {name}"),
            )),
        }
    }

    fn describe(&self, incoming: &Incoming) -> Value {
        use std::sync::atomic::Ordering::SeqCst;
        let lease_left = self
            .incoming_options
            .lease
            .saturating_sub(incoming.refreshed.elapsed());
        json!({
            "name": incoming.name,
            "state": incoming.state.as_str(),
            "source": incoming.source,
            "uri": incoming.uri,
            "path": incoming.served.volume.backing().path,
            "socket": incoming.served.socket,
            "size": incoming.served.volume.size_bytes(),
            "connected": incoming.served.connection.connected.load(SeqCst),
            "lease-left-ms": match incoming.state {
                State::Incoming => Some(lease_left.as_millis() as u64),
                State::Active => None,
            },
        })
    }

    /// Every incoming volume's status (`query-incoming`).
    pub fn incoming_list(&self) -> Value {
        let table = self.incoming_table();
        let live = table.live.iter().map(|i| self.describe(i));
        let ended = table
            .ended
            .iter()
            .map(|(name, reason)| json!({ "name": name, "state": "abandoned", "reason": reason }));
        Value::Array(live.chain(ended).collect())
    }

    /// `incoming-activate`: fences the source's export (no write of the source lands after
    /// this returns) and opens the gate.
    pub fn incoming_activate(&self, caller: &Caller, args: &Value) -> Result<Value, ControlError> {
        let name = name_arg(args)?;
        let served = {
            let mut table = self.incoming_table();
            let incoming = find(&mut table, name)?;
            check_owner(caller, incoming)?;
            incoming.refreshed = Instant::now();
            if incoming.state == State::Active {
                return Ok(json!({ "name": name, "state": "active" }));
            }
            incoming.served.clone()
        };
        if let Some(server) = &self.nbd {
            server
                .fence_export(name, FENCE_TIMEOUT)
                .map_err(|e| ControlError::new("MigrationError", format!("fencing {name}: {e}")))?;
        }
        served.volume.backing().sync().map_err(|e| {
            ControlError::new("MigrationError", format!("{name}: flushing the image: {e}"))
        })?;
        let mut table = self.incoming_table();
        let incoming = find(&mut table, name)?;
        incoming.state = State::Active;
        served.gate.open();
        log::info!("incoming volume {name} activated: its device serves from now on");
        Ok(json!({ "name": name, "state": "active" }))
    }

    /// `incoming-abandon`: removes a volume not activated yet, with its export and the
    /// image it created. Abandoning one that already ended answers how it ended.
    pub fn incoming_abandon(&self, caller: &Caller, args: &Value) -> Result<Value, ControlError> {
        let name = name_arg(args)?;
        {
            let table = self.incoming_table();
            if let Some(incoming) = table.live.iter().find(|i| i.name == name) {
                check_owner(caller, incoming)?;
                if incoming.state == State::Active {
                    return Err(ControlError::new(
                        "MigrationError",
                        format!("{name} is active: it serves the VM now and is not abandoned"),
                    ));
                }
            } else if let Some((_, reason)) = table.ended.iter().find(|(n, _)| n == name) {
                return Ok(json!({ "name": name, "state": "abandoned", "reason": reason }));
            }
        }
        let reason = format!("abandoned by {caller}");
        self.abandon(name, &reason)?;
        Ok(json!({ "name": name, "state": "abandoned", "reason": reason }))
    }

    /// Abandons every incoming volume whose lease ran out.
    pub fn expire_incoming_leases(&self) {
        let lease = self.incoming_options.lease;
        let expired: Vec<String> = self
            .incoming_table()
            .live
            .iter()
            .filter(|i| i.state == State::Incoming && i.refreshed.elapsed() > lease)
            .map(|i| i.name.clone())
            .collect();
        for name in expired {
            let reason = format!("its source did not renew its lease within {lease:?}");
            if let Err(e) = self.abandon(&name, &reason) {
                log::error!("incoming volume {name}: {}", e.desc);
            }
        }
    }

    /// Removes an incoming volume (not active) and its image; it shows as abandoned once
    /// both are gone.
    fn abandon(&self, name: &str, reason: &str) -> Result<(), ControlError> {
        let incoming = {
            let mut table = self.incoming_table();
            let index = table
                .live
                .iter()
                .position(|i| i.name == name && i.state == State::Incoming)
                .ok_or_else(|| {
                    ControlError::new("NotFound", format!("no incoming volume {name}"))
                })?;
            table.live.remove(index)
        };
        let image = incoming.served.volume.backing().path.clone();
        let removed = self.remove_volume(name);
        let cleaned = if incoming.image_was_empty {
            std::fs::File::create(&image).map(drop)
        } else {
            std::fs::remove_file(&image)
        };
        if let Err(e) = cleaned {
            log::error!("incoming volume {name}: {}: {e}", image.display());
        }
        self.incoming_table().ended(name, reason.to_string());
        log::warn!("incoming volume {name} abandoned: {reason}");
        removed
            .map(drop)
            .map_err(|e| ControlError::new("MigrationError", e.to_string()))
    }
}

fn name_arg(args: &Value) -> Result<&str, ControlError> {
    args.get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ControlError::bad_argument("name is missing"))
}

fn find<'a>(table: &'a mut IncomingTable, name: &str) -> Result<&'a mut Incoming, ControlError> {
    if let Some(index) = table.live.iter().position(|i| i.name == name) {
        return Ok(&mut table.live[index]);
    }
    let reason = table
        .ended
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, r)| format!(": abandoned, {r}"))
        .unwrap_or_default();
    Err(ControlError::new(
        "NotFound",
        format!("no incoming volume {name}{reason}"),
    ))
}

/// Only the source that prepared a volume (or the local control socket) may act on it.
fn check_owner(caller: &Caller, incoming: &Incoming) -> Result<(), ControlError> {
    match caller {
        Caller::Local => Ok(()),
        Caller::Remote { identity, .. } if identity.display_name() == incoming.source => Ok(()),
        Caller::Remote { identity, .. } => Err(ControlError::new(
            "PermissionDenied",
            format!(
                "incoming volume {} belongs to {}, not {}",
                incoming.name,
                incoming.source,
                identity.display_name()
            ),
        )),
    }
}

/// Runs [`Daemon::expire_incoming_leases`] every [`LEASE_CHECK_INTERVAL`] for the daemon's
/// life.
pub fn start_lease_keeper(daemon: &Arc<Daemon>) -> std::io::Result<()> {
    let daemon = Arc::downgrade(daemon);
    std::thread::Builder::new()
        .name("ferry-leases".into())
        .spawn(move || {
            ferry_engine::confine::enter(&crate::seccomp::LEASES_SYSCALLS);
            while let Some(daemon) = daemon.upgrade() {
                daemon.expire_incoming_leases();
                drop(daemon);
                std::thread::sleep(LEASE_CHECK_INTERVAL);
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests;
