//! The control commands, looked up by name. Each takes the JSON arguments and returns a
//! JSON value or a [`ControlError`]. New features add a line to [`COMMANDS`].

use serde_json::{json, Value};

use super::journal_commands as jr;
use super::migrate_commands as mig;
use super::{Caller, ControlError};
use crate::daemon::Daemon;

/// A command's implementation: most build a JSON value; a few whose replies can be large
/// (`journal-retrieve`) write the JSON text of their `return` value directly; those
/// between daemons (`incoming-*`) also need to know who called.
#[derive(Clone, Copy)]
pub enum Handler {
    Value(fn(&Daemon, &Value) -> Result<Value, ControlError>),
    Text(fn(&Daemon, &Value) -> Result<String, ControlError>),
    Caller(fn(&Daemon, &Caller, &Value) -> Result<Value, ControlError>),
}

/// A command's result: a JSON value, or the JSON text of one.
pub enum Reply {
    Value(Value),
    Text(String),
}

/// Every command: name, handler, one-line help.
const COMMANDS: &[(&str, Handler, &str)] = &[
    (
        "query-version",
        Handler::Value(query_version),
        "ferry's version",
    ),
    (
        "query-commands",
        Handler::Value(query_commands),
        "the commands this daemon accepts",
    ),
    (
        "query-volumes",
        Handler::Value(query_volumes),
        "volumes: path, size, socket, connection, NBD export, I/O counters",
    ),
    (
        "journal-init",
        Handler::Value(jr::journal_init),
        "start a new log (label), ending the current one",
    ),
    (
        "journal-status",
        Handler::Value(jr::journal_status),
        "journal state: medium, position, records, lag, gaps",
    ),
    (
        "journal-retrieve",
        Handler::Text(jr::journal_retrieve),
        "the log's entries from since_seq on",
    ),
    (
        "journal-seal",
        Handler::Value(jr::journal_seal),
        "write the log onto the medium, close it, go on with the next",
    ),
    (
        "journal-clear",
        Handler::Value(jr::journal_clear),
        "drop the in-memory log",
    ),
    (
        "journal-mark",
        Handler::Value(jr::journal_mark),
        "a named point in the stream (label)",
    ),
    (
        "migrate-start",
        Handler::Value(mig::migrate_start),
        "start migrating volumes to a target",
    ),
    (
        "query-migrations",
        Handler::Value(mig::query_migrations),
        "migration jobs: state, progress, rate, pause",
    ),
    (
        "migrate-cutover",
        Handler::Value(mig::migrate_cutover),
        "switch a ready job's volumes to the target",
    ),
    (
        "migrate-cancel",
        Handler::Value(mig::migrate_cancel),
        "stop a job before cutover; the guest stays on its source",
    ),
    (
        "migrate-set-speed",
        Handler::Value(mig::migrate_set_speed),
        "change a job's copy speed limit (bytes/s, 0: none)",
    ),
    (
        "migrate-resume",
        Handler::Value(mig::migrate_resume),
        "resume a migration a restart interrupted (volume: which)",
    ),
    (
        "migrate-discard",
        Handler::Value(mig::migrate_discard),
        "give up a migration a restart interrupted, removing its job file",
    ),
    (
        "incoming-prepare",
        Handler::Caller(Daemon::incoming_prepare),
        "prepare a volume moving in from the caller's host: image, socket, NBD export for it",
    ),
    (
        "incoming-status",
        Handler::Caller(Daemon::incoming_status),
        "an incoming volume's state (renews its lease)",
    ),
    (
        "incoming-activate",
        Handler::Caller(Daemon::incoming_activate),
        "fence the source's export and let the volume's device serve",
    ),
    (
        "incoming-abandon",
        Handler::Caller(Daemon::incoming_abandon),
        "remove an incoming volume not activated yet, with its image",
    ),
    (
        "replicate-start",
        Handler::Value(Daemon::replicate_start),
        "replicate volumes to another ferry (to: ferry://HOST:PORT) as a group",
    ),
    (
        "replicate-stop",
        Handler::Value(Daemon::replicate_stop),
        "stop replicating a group from here",
    ),
    (
        "replicate-pause",
        Handler::Value(Daemon::replicate_pause),
        "pause a group replicated from here: changes tracked in its bitmap until resumed",
    ),
    (
        "replicate-resume",
        Handler::Value(Daemon::replicate_resume),
        "resume a paused group: it resyncs from its bitmap and streams again",
    ),
    (
        "replicate-set-speed",
        Handler::Value(Daemon::replicate_set_speed),
        "limit a group's initial copy and resyncs to bytes-per-s (0: no limit)",
    ),
    (
        "replicate-receive",
        Handler::Caller(Daemon::replicate_receive),
        "receive a replication group here: its DR log in dir, replicas served behind closed gates",
    ),
    (
        "replicate-status",
        Handler::Value(Daemon::replicate_status),
        "replication groups received here: sequences applied and durable, lag, last error",
    ),
    (
        "replicate-promote",
        Handler::Value(Daemon::replicate_promote),
        "roll a group's replicas to a point (at: latest, seq:N, mark:LABEL) and serve them",
    ),
    (
        "replicate-stream",
        Handler::Value(replicate_stream_misplaced),
        "turn this connection into the primary's replication stream of a group",
    ),
    (
        "query-incoming",
        Handler::Value(query_incoming),
        "incoming volumes and those abandoned lately",
    ),
];

pub fn dispatch(
    daemon: &Daemon,
    caller: &Caller,
    command: &str,
    arguments: &Value,
) -> Result<Reply, ControlError> {
    match COMMANDS.iter().find(|(name, _, _)| *name == command) {
        Some((_, Handler::Value(handler), _)) => handler(daemon, arguments).map(Reply::Value),
        Some((_, Handler::Text(handler), _)) => handler(daemon, arguments).map(Reply::Text),
        Some((_, Handler::Caller(handler), _)) => {
            handler(daemon, caller, arguments).map(Reply::Value)
        }
        None => Err(ControlError::new(
            "CommandNotFound",
            format!("unknown command {command:?} (see query-commands)"),
        )),
    }
}

/// `replicate-stream` changes the connection's protocol, so the connection handles it
/// (`connection.rs`); reaching the table means it came some other way.
fn replicate_stream_misplaced(_: &Daemon, _: &Value) -> Result<Value, ControlError> {
    Err(ControlError::new(
        "NotSupported",
        "replicate-stream must be the last request of a connection",
    ))
}

fn query_version(_: &Daemon, _: &Value) -> Result<Value, ControlError> {
    Ok(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

fn query_incoming(daemon: &Daemon, _: &Value) -> Result<Value, ControlError> {
    Ok(daemon.incoming_list())
}

fn query_commands(_: &Daemon, _: &Value) -> Result<Value, ControlError> {
    Ok(COMMANDS
        .iter()
        .map(|(name, _, help)| json!({ "name": name, "help": help }))
        .collect())
}

/// How a volume is exported over NBD (`null`: it is not).
fn nbd_export(daemon: &Daemon, name: &str) -> Value {
    let Some(server) = &daemon.nbd else {
        return Value::Null;
    };
    let Some(status) = server.export_status(name) else {
        return Value::Null;
    };
    json!({
        "export": status.name,
        "read-only": status.read_only,
        "tls": server.requires_tls(),
        "uris": crate::nbd_serve::export_uris(server, name),
        "fenced": status.fenced,
        "connections": status.connections,
        "connections-total": status.connections_total,
        "clients": status.clients,
    })
}

fn query_volumes(daemon: &Daemon, _: &Value) -> Result<Value, ControlError> {
    use std::sync::atomic::Ordering::SeqCst;
    Ok(daemon
        .volumes()
        .iter()
        .map(|v| {
            let backing = v.volume.backing();
            json!({
                "name": v.volume.name(),
                "path": backing.path,
                "backing": if backing.nbd().is_some() { "nbd" } else { "file" },
                "nbd-block-sizes": backing.nbd().map(|e| e.block_sizes()),
                "backing-tls": backing.nbd().map(|e| e.uses_tls()),
                "offset": backing.base_offset_bytes,
                "size": backing.len_bytes,
                "socket": v.socket,
                "read-only": v.volume.read_only(),
                "cache": v.volume.config().cache,
                "queues": v.queues,
                "logical-block-size": v.volume.config().request_block_bytes(),
                "connected": v.connection.connected.load(SeqCst),
                "connections": v.connection.connections.load(SeqCst),
                "write-cache": v.volume.write_cache_enabled(),
                "stats": v.volume.stats.snapshot(),
                "nbd": nbd_export(daemon, v.volume.name()),
                "gate-open": v.gate.is_open(),
            })
        })
        .collect())
}
