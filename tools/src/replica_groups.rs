//! The DR side of replication groups in the daemon (`docs/replication.md`): a group's replica
//! volumes served on their vhost-user sockets behind closed gates, the engine's receiver that
//! logs and applies the primary's records to them, the primary's stream taken over from a
//! control connection (`replicate-stream`), status, and promotion, which rolls the replicas
//! to a point and opens their gates so VMs start on them.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_engine::peer::control_protocol::TimedRead;
use ferry_engine::replication::{PromotePoint, Receiver, ReplicaSpec};
use ferry_vhost::DeviceGate;
use serde_json::{json, Value};

use crate::control::{Caller, ControlError};
use crate::daemon::{Admission, Daemon};
use crate::served_volume::ServedVolume;
use crate::volume_spec;

/// The longest group or volume name.
const NAME_BYTES_MAX: usize = 64;
/// Volumes in one group at most.
const GROUP_VOLUMES_MAX: usize = 64;
/// Groups one daemon receives at most.
const GROUPS_MAX: usize = 64;
/// A primary's stream that sends nothing for this long is closed (it reconnects and
/// resumes after the acknowledged sequence).
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// One group received here.
pub struct ReplicaGroup {
    pub name: String,
    receiver: Mutex<Receiver>,
    volumes: Vec<Arc<ServedVolume>>,
}

/// The groups this daemon receives.
#[derive(Default)]
pub struct ReplicaGroups {
    groups: Vec<Arc<ReplicaGroup>>,
}

/// One replica as `replicate-receive` names it.
struct VolumeRequest {
    name: String,
    size_bytes: u64,
    logical_block_bytes: u32,
    path: PathBuf,
    socket: PathBuf,
}

fn plain_name(what: &str, name: &str) -> Result<(), ControlError> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > NAME_BYTES_MAX || !name.chars().all(plain) {
        return Err(ControlError::bad_argument(format!(
            "{what} {name:?}: 1 to {NAME_BYTES_MAX} letters, digits, '.', '_' or '-'"
        )));
    }
    Ok(())
}

fn absolute(key: &str, text: &str) -> Result<PathBuf, ControlError> {
    let path = PathBuf::from(text);
    if !path.is_absolute() || text.contains(',') {
        return Err(ControlError::bad_argument(format!(
            "{key} {text}: an absolute path without commas"
        )));
    }
    Ok(path)
}

fn text<'a>(args: &'a Value, key: &str) -> Result<&'a str, ControlError> {
    args.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ControlError::bad_argument(format!("{key} is missing")))
}

fn volume_request(v: &Value) -> Result<VolumeRequest, ControlError> {
    let name = text(v, "name")?.to_string();
    plain_name("volume", &name)?;
    let size_bytes = v
        .get("size")
        .and_then(Value::as_u64)
        .filter(|&s| s > 0)
        .ok_or_else(|| ControlError::bad_argument("size must be a positive number of bytes"))?;
    let logical_block_bytes = match v.get("logical-block-size") {
        None => 512,
        Some(b) => b
            .as_u64()
            .and_then(|b| u32::try_from(b).ok())
            .ok_or_else(|| ControlError::bad_argument("logical-block-size must be bytes"))?,
    };
    Ok(VolumeRequest {
        name,
        size_bytes,
        logical_block_bytes,
        path: absolute("path", text(v, "path")?)?,
        socket: absolute("socket", text(v, "socket")?)?,
    })
}

/// A new group gets new images: an existing file with data at a replica's path (another
/// volume's image, say) is refused, as `incoming-prepare` does. A group whose log exists is
/// reopened on its own images.
fn refuse_images_with_data(volumes: &[VolumeRequest]) -> Result<(), ControlError> {
    for v in volumes {
        if let Ok(meta) = std::fs::symlink_metadata(&v.path) {
            if !meta.is_file() || meta.len() > 0 {
                return Err(ControlError::new(
                    "Conflict",
                    format!(
                        "{} exists and is not an empty file: a new replication group gets new images",
                        v.path.display()
                    ),
                ));
            }
            std::fs::OpenOptions::new()
                .write(true)
                .open(&v.path)
                .and_then(|f| f.set_len(v.size_bytes))
                .map_err(|e| ControlError::new("Conflict", format!("{}: {e}", v.path.display())))?;
        }
    }
    Ok(())
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn lock(receiver: &Mutex<Receiver>) -> MutexGuard<'_, Receiver> {
    receiver.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ReplicaGroup {
    fn describe(&self) -> Value {
        let status = lock(&self.receiver).status();
        let lag_s = if status.last_record_timestamp_ns == 0 {
            0.0
        } else {
            now_ns().saturating_sub(status.last_record_timestamp_ns) as f64 / 1e9
        };
        json!({
            "group": self.name,
            "role": "dr",
            "state": if status.promoted {
                "promoted"
            } else if status.resync_since.is_some() {
                "resyncing"
            } else {
                "replicating"
            },
            "resync-since-seq": status.resync_since,
            "durable-seq": status.durable_seq,
            "applied-seq": status.applied_seq,
            "lag-records": status.durable_seq - status.applied_seq,
            "seconds-since-last-record": lag_s,
            "records-received": status.records_received,
            "bytes-received": status.bytes_received,
            "last-error": status.last_error,
            "volumes": self.volumes.iter().map(|v| json!({
                "name": v.volume.name(),
                "socket": v.socket,
            })).collect::<Vec<_>>(),
        })
    }
}

impl Daemon {
    fn replica_groups(&self) -> MutexGuard<'_, ReplicaGroups> {
        self.replica_groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn replica_group(&self, name: &str) -> Result<Arc<ReplicaGroup>, ControlError> {
        self.replica_groups()
            .groups
            .iter()
            .find(|g| g.name == name)
            .cloned()
            .ok_or_else(|| ControlError::new("NotFound", format!("no replication group {name}")))
    }

    /// `replicate-receive`: opens group `group` in `dir` (its DR log and checkpoint; the log
    /// re-applied past the checkpoint), its replica images (created sparse at their size; for
    /// a group without a log yet, a file with data at a replica's path is refused),
    /// and serves each replica on its socket behind a closed gate (open once promoted). A
    /// group already received here answers its status.
    pub fn replicate_receive(&self, _: &Caller, args: &Value) -> Result<Value, ControlError> {
        let group = text(args, "group")?.to_string();
        plain_name("group", &group)?;
        if let Ok(existing) = self.replica_group(&group) {
            return Ok(existing.describe());
        }
        let dir = absolute("dir", text(args, "dir")?)?;
        let volumes = args
            .get("volumes")
            .and_then(Value::as_array)
            .filter(|v| !v.is_empty() && v.len() <= GROUP_VOLUMES_MAX)
            .ok_or_else(|| {
                ControlError::bad_argument(format!(
                    "volumes: 1 to {GROUP_VOLUMES_MAX} objects (name, size, path, socket)"
                ))
            })?
            .iter()
            .map(volume_request)
            .collect::<Result<Vec<_>, _>>()?;
        if self.replica_groups().groups.len() >= GROUPS_MAX {
            return Err(ControlError::new(
                "Conflict",
                format!("this daemon receives {GROUPS_MAX} groups already"),
            ));
        }
        let specs: Vec<ReplicaSpec> = volumes
            .iter()
            .map(|v| ReplicaSpec {
                path: v.path.clone(),
                size_bytes: v.size_bytes,
            })
            .collect();
        let resumed = dir
            .join(ferry_engine::replication::receiver::LOG_FILE)
            .exists();
        if !resumed {
            refuse_images_with_data(&volumes)?;
        }
        let receiver = Receiver::open(&dir, &specs)
            .map_err(|e| ControlError::new("ReplicationError", format!("group {group}: {e}")))?;
        let promoted = receiver.status().promoted;
        let served = self.serve_replicas(&group, &volumes, promoted)?;
        let entry = Arc::new(ReplicaGroup {
            name: group.clone(),
            receiver: Mutex::new(receiver),
            volumes: served,
        });
        self.replica_groups().groups.push(entry.clone());
        log::info!(
            "replication group {group}: receiving {} volumes in {}",
            volumes.len(),
            dir.display()
        );
        Ok(entry.describe())
    }

    /// Serves the replicas behind closed gates (open when `promoted`); on a failure, removes
    /// the ones already added.
    fn serve_replicas(
        &self,
        group: &str,
        volumes: &[VolumeRequest],
        promoted: bool,
    ) -> Result<Vec<Arc<ServedVolume>>, ControlError> {
        let mut served = Vec::new();
        for v in volumes {
            let spec = volume_spec::parse_volume(&format!(
                "name={},path={},socket={},logical-block-size={}",
                v.name,
                v.path.display(),
                v.socket.display(),
                v.logical_block_bytes
            ))
            .map_err(ControlError::bad_argument);
            let gate = Arc::new(DeviceGate::new_closed(
                &format!("a replica of group {group}, not promoted"),
                self.incoming_options.start_wait,
            ));
            if promoted {
                gate.open();
            }
            let admission = Admission {
                gate,
                nbd_clients: None,
            };
            let added = spec.and_then(|spec| {
                self.add_volume(&spec, admission)
                    .map_err(|e| ControlError::new("Conflict", e.to_string()))
            });
            match added {
                Ok(volume) => served.push(volume),
                Err(e) => {
                    for volume in &served {
                        let _ = self.remove_volume(volume.volume.name());
                    }
                    return Err(e);
                }
            }
        }
        Ok(served)
    }

    /// `replicate-status`: every group replicated from here or received here, or the one
    /// named `group`.
    pub fn replicate_status(&self, args: &Value) -> Result<Value, ControlError> {
        if let Some(name) = args.get("group").and_then(Value::as_str) {
            if let Some(group) = self.primary_groups().iter().find(|g| g.name == name) {
                return Ok(group.describe());
            }
            return Ok(self.replica_group(name)?.describe());
        }
        let primaries: Vec<Value> = self.primary_groups().iter().map(|g| g.describe()).collect();
        let groups = self.replica_groups().groups.clone();
        Ok(Value::Array(
            primaries
                .into_iter()
                .chain(groups.iter().map(|g| g.describe()))
                .collect(),
        ))
    }

    /// `replicate-promote`: stops applying, rolls the replicas to `at` (`latest`, `seq:N`,
    /// `mark:LABEL`), syncs them, and opens their gates. A point inside a resync is refused
    /// unless `force`.
    pub fn replicate_promote(&self, args: &Value) -> Result<Value, ControlError> {
        let group = self.replica_group(text(args, "group")?)?;
        let point: PromotePoint = args
            .get("at")
            .and_then(Value::as_str)
            .unwrap_or("latest")
            .parse()
            .map_err(ControlError::bad_argument)?;
        let force = args.get("force").and_then(Value::as_bool).unwrap_or(false);
        let seq = lock(&group.receiver)
            .promote_at(&point, force)
            .map_err(|e| {
                ControlError::new("ReplicationError", format!("group {}: {e}", group.name))
            })?;
        for served in &group.volumes {
            served.gate.open();
        }
        log::info!(
            "replication group {} promoted at record {seq}: its volumes serve from now on",
            group.name
        );
        Ok(json!({ "group": group.name, "seq": seq, "state": "promoted" }))
    }

    /// `replicate-stream`: the control connection becomes the primary's replication stream
    /// for `group` until it ends. The reply line is sent first; frames follow.
    pub fn replicate_stream<S: TimedRead + Write>(
        &self,
        caller: &Caller,
        args: &Value,
        stream: &mut S,
    ) -> Result<(), ControlError> {
        let group = self.replica_group(text(args, "group")?)?;
        stream
            .set_read_timeout(Some(STREAM_IDLE_TIMEOUT))
            .map_err(|e| ControlError::new("ReplicationError", e.to_string()))?;
        let reply = json!({ "return": { "group": group.name } }).to_string();
        crate::control::connection::reply(stream, &reply)
            .map_err(|e| ControlError::new("ReplicationError", e.to_string()))?;
        log::info!("replication group {}: stream from {caller}", group.name);
        match Receiver::serve(&group.receiver, stream) {
            Ok(()) => log::info!(
                "replication group {}: stream from {caller} ended",
                group.name
            ),
            Err(e) => log::warn!("replication group {}: {caller}: {e}", group.name),
        }
        Ok(())
    }
}
