//! The primary's side of replication groups in the daemon (`docs/replication.md`):
//! `replicate-start` has the DR daemon receive the group (`replicate-receive` over the peer
//! link), attaches the engine's observer to each volume (with the volume's I/O paused, so no
//! write in flight escapes both the observer and the copy), copies the volumes' data (holes
//! skipped) as records numbered in the same order as the guests' writes, and ships the
//! records over a control connection turned into the replication stream, resuming after the
//! DR site's durable sequence when the connection breaks.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::Duration;

use ferry_engine::peer::control_protocol::TimedRead;
use ferry_engine::peer::link::{LinkOptions, PeerLink};
use ferry_engine::peer::transport::ClientStream;
use ferry_engine::peer::{ControlAddress, FerryUrl};
use ferry_engine::replication::frame::{Frame, HEADER_BYTES};
use ferry_engine::replication::primary::{
    GroupSequencer, LagPolicy, OnLag, PrimaryObserver, PrimaryStatus,
};
use ferry_engine::{Volume, WriteObserver};
use serde_json::{json, Value};

use crate::control::ControlError;
use crate::daemon::Daemon;
use crate::replication_copy::copy_and_resync;

/// Bytes of records held for the DR site (numbered, not acknowledged) before the group
/// degrades to a dirty bitmap.
pub const QUEUE_BYTES_MAX: usize = 256 << 20;
/// Bytes of records written to the DR site between reading its acknowledgments.
const SEND_BATCH_BYTES_MAX: usize = 4 << 20;
/// How long attaching the observers waits for a volume's requests in flight to end.
const ATTACH_PAUSE_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Between two attempts to reach the DR site.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a write of a sync group waits for the DR site, unless `replicate-start` says.
pub const SYNC_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// The longest sync timeout `replicate-start` accepts.
const SYNC_TIMEOUT_MAX: Duration = Duration::from_secs(3600);
/// How long the shipper waits for an acknowledgment before it drops the connection and
/// connects again (a batch is at most `SEND_BATCH_BYTES_MAX`; the DR site syncs it twice).
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// The smallest `--max-lag` in bytes: room for a batch of the initial copy and of guest writes.
const MAX_LAG_BYTES_MIN: u64 = 4 << 20;
/// The longest reply line of `replicate-stream`.
const REPLY_BYTES_MAX: usize = 4096;

/// One group replicated from here.
pub struct PrimaryGroup {
    pub name: String,
    pub to: String,
    sequencer: Arc<GroupSequencer>,
    observers: Vec<(Arc<Volume>, Arc<dyn WriteObserver>)>,
}

impl PrimaryGroup {
    /// The group's status as the sequencer reports it.
    pub fn status(&self) -> PrimaryStatus {
        self.sequencer.status()
    }

    pub fn describe(&self) -> Value {
        let status = self.sequencer.status();
        let mut v = serde_json::to_value(&status).unwrap_or_else(|_| json!({}));
        v["group"] = json!(self.name);
        v["role"] = json!("primary");
        v["to"] = json!(self.to);
        v["volumes"] = json!(self
            .observers
            .iter()
            .map(|(volume, _)| volume.name())
            .collect::<Vec<_>>());
        v
    }

    /// Detaches the observers and stops shipping.
    pub fn stop(&self) {
        self.sequencer.stop();
        for (volume, observer) in &self.observers {
            volume.remove_observer(observer);
        }
    }
}

fn text<'a>(args: &'a Value, key: &str) -> Result<&'a str, ControlError> {
    args.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ControlError::bad_argument(format!("{key} is missing")))
}

fn error(desc: impl Into<String>) -> ControlError {
    ControlError::new("ReplicationError", desc)
}

impl Daemon {
    pub(crate) fn primary_groups(&self) -> MutexGuard<'_, Vec<Arc<PrimaryGroup>>> {
        self.primary_groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `replicate-start` `{"group", "volumes", "to", "path-prefix", "socket-prefix",
    /// "mode", "sync-timeout-ms"}`.
    pub fn replicate_start(&self, args: &Value) -> Result<Value, ControlError> {
        let group = text(args, "group")?.to_string();
        let sync = match args.get("mode").and_then(Value::as_str).unwrap_or("async") {
            "async" => false,
            "sync" => true,
            other => {
                return Err(ControlError::bad_argument(format!(
                    "mode: async or sync, not {other}"
                )))
            }
        };
        let sync_timeout = match args.get("sync-timeout-ms") {
            None | Some(Value::Null) => SYNC_TIMEOUT_DEFAULT,
            Some(v) => v
                .as_u64()
                .map(Duration::from_millis)
                .filter(|t| !t.is_zero() && *t <= SYNC_TIMEOUT_MAX)
                .ok_or_else(|| {
                    ControlError::bad_argument(format!(
                        "sync-timeout-ms: milliseconds from 1 to {}",
                        SYNC_TIMEOUT_MAX.as_millis()
                    ))
                })?,
        };
        let policy = lag_policy(args)?;
        let to = text(args, "to")?.to_string();
        let url = FerryUrl::parse(&to).map_err(ControlError::bad_argument)?;
        let prefix = PathBuf::from(
            args.get("path-prefix")
                .and_then(Value::as_str)
                .unwrap_or("/var/lib/ferry"),
        );
        let sockets = PathBuf::from(
            args.get("socket-prefix")
                .and_then(Value::as_str)
                .unwrap_or("/run/ferry"),
        );
        let names: Vec<String> = args
            .get("volumes")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if names.is_empty() {
            return Err(ControlError::bad_argument(
                "volumes: at least one volume name",
            ));
        }
        if self.primary_groups().iter().any(|g| g.name == group) {
            return Err(ControlError::new(
                "Conflict",
                format!("group {group} is replicated already"),
            ));
        }
        let mut volumes = Vec::new();
        for name in &names {
            let served = self
                .volume(name)
                .ok_or_else(|| ControlError::new("NotFound", format!("no volume named {name}")))?;
            let in_group = self
                .primary_groups()
                .iter()
                .any(|g| g.observers.iter().any(|(v, _)| v.name() == name));
            if in_group {
                return Err(ControlError::new(
                    "Conflict",
                    format!("{name} is in a replication group already"),
                ));
            }
            let backing = served.volume.backing();
            if !backing.path.is_file() {
                return Err(error(format!(
                    "{name}: only volumes on files are replicated"
                )));
            }
            volumes.push(served.volume.clone());
        }
        let link = PeerLink::new(
            &format!("peer {}", url.address),
            url.address.clone(),
            self.tls.as_deref(),
            LinkOptions::default(),
        )
        .map_err(|e| error(e.to_string()))?;
        let receive = json!({
            "group": group,
            "dir": prefix.join(format!("{group}.dr")),
            "volumes": volumes.iter().map(|v| json!({
                "name": v.name(),
                "size": v.size_bytes(),
                "path": prefix.join(format!("{}.img", v.name())),
                "socket": sockets.join(format!("{}.sock", v.name())),
            })).collect::<Vec<_>>(),
        });
        let received = link
            .call("replicate-receive", &receive)
            .map_err(|e| error(e.to_string()))?;
        let durable = received["durable-seq"].as_u64().unwrap_or(0);
        if durable != 0 || received["state"] != "replicating" {
            return Err(error(format!(
                "the DR site holds group {group} already (state {}, record {durable}): a primary resumes no earlier group yet",
                received["state"]
            )));
        }
        let sizes: Vec<u64> = volumes.iter().map(|v| v.size_bytes()).collect();
        let sequencer = GroupSequencer::new(&sizes, 1, QUEUE_BYTES_MAX);
        if sync {
            sequencer.set_sync();
        }
        sequencer.set_lag_policy(policy);
        let mut observers: Vec<(Arc<Volume>, Arc<dyn WriteObserver>)> = Vec::new();
        for (index, volume) in volumes.iter().enumerate() {
            let observer: Arc<dyn WriteObserver> =
                PrimaryObserver::new(sequencer.clone(), index as u32);
            let Some(pause) = volume.pause(ATTACH_PAUSE_TIMEOUT) else {
                for (v, o) in &observers {
                    v.remove_observer(o);
                }
                return Err(error(format!(
                    "{}: requests in flight did not end",
                    volume.name()
                )));
            };
            volume.add_observer(observer.clone());
            drop(pause);
            observers.push((volume.clone(), observer));
        }
        let entry = Arc::new(PrimaryGroup {
            name: group.clone(),
            to,
            sequencer: sequencer.clone(),
            observers,
        });
        self.primary_groups().push(entry.clone());
        let tls = self.tls.clone();
        let address = url.address;
        let copy_sequencer = sequencer.clone();
        let copy_volumes = volumes.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("repl-copy-{group}"))
            .spawn(move || copy_and_resync(&copy_sequencer, &copy_volumes))
            .and_then(|_| {
                let watched = sequencer.clone();
                std::thread::Builder::new()
                    .name(format!("repl-lag-{group}"))
                    .spawn(move || watched.watch_lag())
            })
            .and_then(|_| {
                let watched = sequencer.clone();
                if !sync {
                    return Ok(());
                }
                std::thread::Builder::new()
                    .name(format!("repl-sync-{group}"))
                    .spawn(move || watch_sync(&watched, sync_timeout))
                    .map(drop)
            })
            .and_then(|_| {
                let group = group.clone();
                std::thread::Builder::new()
                    .name(format!("repl-ship-{group}"))
                    .spawn(move || ship(&sequencer, &address, tls.as_deref(), &group, &receive))
            });
        if let Err(e) = spawned {
            entry.stop();
            return Err(error(format!("cannot start the replication threads: {e}")));
        }
        Ok(entry.describe())
    }

    fn primary_group(&self, args: &Value) -> Result<Arc<PrimaryGroup>, ControlError> {
        let name = text(args, "group")?;
        self.primary_groups()
            .iter()
            .find(|g| g.name == name)
            .cloned()
            .ok_or_else(|| ControlError::new("NotFound", format!("no replication group {name}")))
    }

    /// `replicate-pause` `{"group"}`: the group degrades to its bitmap and does not resync
    /// until resumed.
    pub fn replicate_pause(&self, args: &Value) -> Result<Value, ControlError> {
        let group = self.primary_group(args)?;
        group.sequencer.pause();
        Ok(group.describe())
    }

    /// `replicate-resume` `{"group"}`: a paused group resyncs and streams again.
    pub fn replicate_resume(&self, args: &Value) -> Result<Value, ControlError> {
        let group = self.primary_group(args)?;
        group.sequencer.resume();
        Ok(group.describe())
    }

    /// `replicate-set-speed` `{"group", "bytes-per-s"}`: the speed limit of the initial copy
    /// and the resyncs (0: none).
    pub fn replicate_set_speed(&self, args: &Value) -> Result<Value, ControlError> {
        let group = self.primary_group(args)?;
        let speed = args
            .get("bytes-per-s")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                ControlError::bad_argument("bytes-per-s: bytes per second, 0 for no limit")
            })?;
        group.sequencer.set_copy_speed(Some(speed));
        Ok(group.describe())
    }

    /// `replicate-stop` `{"group"}`: detaches the observers and stops shipping.
    pub fn replicate_stop(&self, args: &Value) -> Result<Value, ControlError> {
        let name = text(args, "group")?;
        let mut groups = self.primary_groups();
        let index = groups
            .iter()
            .position(|g| g.name == name)
            .ok_or_else(|| ControlError::new("NotFound", format!("no replication group {name}")))?;
        let group = groups.remove(index);
        drop(groups);
        group.stop();
        Ok(group.describe())
    }
}

/// `max-lag-bytes`, `max-lag-ms` and `on-lag` (degrade, throttle) of `replicate-start`.
fn lag_policy(args: &Value) -> Result<LagPolicy, ControlError> {
    let number = |key: &str| match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .map(Some)
            .ok_or_else(|| ControlError::bad_argument(format!("{key}: a positive integer"))),
    };
    let bytes_max = number("max-lag-bytes")?;
    if bytes_max.is_some_and(|b| b < MAX_LAG_BYTES_MIN) {
        return Err(ControlError::bad_argument(format!(
            "max-lag-bytes: at least {MAX_LAG_BYTES_MIN}"
        )));
    }
    let on_lag = match args
        .get("on-lag")
        .and_then(Value::as_str)
        .unwrap_or("degrade")
    {
        "degrade" => OnLag::Degrade,
        "throttle" => OnLag::Throttle,
        other => {
            return Err(ControlError::bad_argument(format!(
                "on-lag: degrade or throttle, not {other}"
            )))
        }
    };
    Ok(LagPolicy {
        bytes_max,
        time_max: number("max-lag-ms")?.map(Duration::from_millis),
        on_lag,
    })
}

/// Watches a sync group's held writes (`GroupSequencer::watch_sync`) again each time a
/// resync has made it sync again, until it stops.
fn watch_sync(sequencer: &GroupSequencer, timeout: Duration) {
    while !sequencer.is_stopped() {
        sequencer.watch_sync(timeout);
        loop {
            let status = sequencer.status();
            let degraded =
                status.sync_degraded_reason.is_some() || status.degraded_reason.is_some();
            if sequencer.is_stopped() || !degraded {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Ships the group's records until it stops, reconnecting after a failure.
fn ship(
    sequencer: &GroupSequencer,
    address: &ControlAddress,
    tls: Option<&ferry_engine::tls::TlsCredentials>,
    group: &str,
    receive: &Value,
) {
    let config = match tls.map(|t| t.client_config()).transpose() {
        Ok(config) => config,
        Err(e) => {
            sequencer.set_error(Some(format!("TLS: {e}")));
            return;
        }
    };
    while !sequencer.is_stopped() {
        match ship_once(sequencer, address, config.as_ref(), group, receive) {
            Ok(()) => return,
            Err(e) => {
                log::warn!("replication group {group}: {e}");
                sequencer.link_down(e);
                std::thread::sleep(RECONNECT_INTERVAL);
            }
        }
    }
}

fn ship_once(
    sequencer: &GroupSequencer,
    address: &ControlAddress,
    config: Option<&Arc<rustls::ClientConfig>>,
    group: &str,
    receive: &Value,
) -> Result<(), String> {
    let mut conn = ClientStream::connect(address, config, CONNECT_TIMEOUT, CONNECT_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let io = |e: std::io::Error| format!("the stream to {address}: {e}");
    conn.set_read_timeout(Some(ACK_TIMEOUT)).map_err(io)?;
    // A DR daemon restarted since learns the group again from this (its log re-applied).
    request_on(&mut conn, "replicate-receive", receive)?;
    request_on(&mut conn, "replicate-stream", &json!({ "group": group }))?;
    let first = read_ack(&mut conn)?;
    if !sequencer.resume_after(first.durable_seq) {
        let reason = format!(
            "the DR site holds record {}, which this primary cannot resume from",
            first.durable_seq
        );
        sequencer.degrade(reason.clone());
        sequencer.stop();
        return Err(reason);
    }
    sequencer.set_error(None);
    sequencer.link_up();
    // A batch waits whole for its acknowledgment: under a bound in bytes it is a quarter of
    // the bound, so a batch on its way is not the lag by itself.
    let batch_bytes_max = sequencer
        .lag_policy()
        .bytes_max
        .map_or(SEND_BATCH_BYTES_MAX, |max| {
            SEND_BATCH_BYTES_MAX.min((max / 4) as usize)
        });
    let mut out = Vec::new();
    while !sequencer.is_stopped() {
        let records = sequencer.take_unshipped(batch_bytes_max, Duration::from_millis(200));
        let Some(last) = records.last().map(|r| r.seq) else {
            continue;
        };
        out.clear();
        for record in &records {
            record.encode_into(&mut out);
        }
        conn.write_all(&out).map_err(io)?;
        conn.flush().map_err(io)?;
        // The DR site acknowledges each batch twice: logged, then applied. The next batch
        // goes once this one is applied (stop and wait: a pipelined sender reading
        // acknowledgments on a thread of its own is still to come).
        loop {
            let ack = read_ack(&mut conn)?;
            sequencer.acknowledged(&ack);
            if ack.applied_seq >= last {
                break;
            }
        }
    }
    Ok(())
}

/// Sends one control request on the stream and reads its reply line.
fn request_on(conn: &mut ClientStream, command: &str, arguments: &Value) -> Result<Value, String> {
    let io = |e: std::io::Error| format!("{command}: {e}");
    let request = json!({ "command": command, "arguments": arguments });
    conn.write_all(format!("{request}\n").as_bytes())
        .map_err(io)?;
    conn.flush().map_err(io)?;
    let reply = read_line(conn).map_err(io)?;
    let reply: Value =
        serde_json::from_slice(&reply).map_err(|e| format!("{command} reply: {e}"))?;
    match reply.get("return") {
        Some(value) => Ok(value.clone()),
        None => Err(format!(
            "the DR site refused {command}: {}",
            reply["error"]["desc"]
        )),
    }
}

fn read_line(conn: &mut ClientStream) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if conn.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return Ok(line);
        }
        if line.len() >= REPLY_BYTES_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "reply line too long",
            ));
        }
        line.push(byte[0]);
    }
}

fn read_ack(conn: &mut ClientStream) -> Result<ferry_engine::replication::Ack, String> {
    let mut buf = [0u8; HEADER_BYTES];
    conn.read_exact(&mut buf)
        .map_err(|e| format!("reading an acknowledgment: {e}"))?;
    match Frame::decode(&buf) {
        Ok((Frame::Ack(ack), _)) => Ok(ack),
        Ok(_) => Err("the DR site sent a record instead of an acknowledgment".into()),
        Err(e) => Err(format!("the DR site's acknowledgment: {e}")),
    }
}
