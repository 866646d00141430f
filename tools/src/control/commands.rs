//! The control commands, looked up by name. Each takes the JSON arguments and returns a
//! JSON value or a [`ControlError`]. New features add a line to [`COMMANDS`].

use serde_json::{json, Value};

use super::journal_commands as jr;
use super::migrate_commands as mig;
use super::ControlError;
use crate::daemon::Daemon;

type Handler = fn(&Daemon, &Value) -> Result<Value, ControlError>;

/// Every command: name, handler, one-line help.
const COMMANDS: &[(&str, Handler, &str)] = &[
    ("query-version", query_version, "ferry's version"),
    (
        "query-commands",
        query_commands,
        "the commands this daemon accepts",
    ),
    (
        "query-volumes",
        query_volumes,
        "volumes: path, size, socket, connection, I/O counters",
    ),
    (
        "journal-init",
        jr::journal_init,
        "start a new log (label), ending the current one",
    ),
    (
        "journal-status",
        jr::journal_status,
        "journal state: medium, position, records, lag, gaps",
    ),
    (
        "journal-retrieve",
        jr::journal_retrieve,
        "the log's entries from since_seq on",
    ),
    (
        "journal-seal",
        jr::journal_seal,
        "write the log onto the medium, close it, go on with the next",
    ),
    ("journal-clear", jr::journal_clear, "drop the in-memory log"),
    (
        "journal-mark",
        jr::journal_mark,
        "a named point in the stream (label)",
    ),
    (
        "migrate-start",
        mig::migrate_start,
        "start migrating volumes to a target",
    ),
    (
        "query-migrations",
        mig::query_migrations,
        "migration jobs: state, progress, rate, pause",
    ),
    (
        "migrate-cutover",
        mig::migrate_cutover,
        "switch a ready job's volumes to the target",
    ),
    (
        "migrate-cancel",
        mig::migrate_cancel,
        "stop a job before cutover; the guest stays on its source",
    ),
    (
        "migrate-set-speed",
        mig::migrate_set_speed,
        "change a job's copy speed limit (bytes/s, 0: none)",
    ),
];

pub fn dispatch(daemon: &Daemon, command: &str, arguments: &Value) -> Result<Value, ControlError> {
    match COMMANDS.iter().find(|(name, _, _)| *name == command) {
        Some((_, handler, _)) => handler(daemon, arguments),
        None => Err(ControlError::new(
            "CommandNotFound",
            format!("unknown command {command:?} (see query-commands)"),
        )),
    }
}

fn query_version(_: &Daemon, _: &Value) -> Result<Value, ControlError> {
    Ok(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

fn query_commands(_: &Daemon, _: &Value) -> Result<Value, ControlError> {
    Ok(COMMANDS
        .iter()
        .map(|(name, _, help)| json!({ "name": name, "help": help }))
        .collect())
}

fn query_volumes(daemon: &Daemon, _: &Value) -> Result<Value, ControlError> {
    use std::sync::atomic::Ordering::SeqCst;
    Ok(daemon
        .volumes
        .iter()
        .map(|v| {
            let backing = v.volume.backing();
            json!({
                "name": v.volume.name(),
                "path": backing.path,
                "backing": if backing.nbd().is_some() { "nbd" } else { "file" },
                "offset": backing.base_offset_bytes,
                "size": backing.len_bytes,
                "socket": v.socket,
                "read-only": v.volume.read_only(),
                "cache": v.volume.config().cache,
                "queues": v.queues,
                "connected": v.connection.connected.load(SeqCst),
                "connections": v.connection.connections.load(SeqCst),
                "write-cache": v.volume.write_cache_enabled(),
                "stats": v.volume.stats.snapshot(),
            })
        })
        .collect())
}
