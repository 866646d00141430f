//! The `migrate-*` control commands: start, query, cut over, cancel and throttle live
//! volume migrations (see `docs/migration.md`).

use std::sync::Arc;

use ferry_engine::mirror::{
    DestinationSpec, MigrationError, MigrationJob, MigrationOptions, MirrorMode,
};
use ferry_engine::tls::TlsCredentials;
use serde_json::{json, Value};

use super::ControlError;
use crate::daemon::Daemon;
use crate::handoff::{HandOff, MoveRequest};
use ferry_engine::peer::FerryUrl;

fn error(e: MigrationError) -> ControlError {
    let class = match e {
        MigrationError::UnknownVolume(_)
        | MigrationError::UnknownJob(_)
        | MigrationError::NoInterruptedJob(_) => "NotFound",
        MigrationError::InterruptedJobExists { .. } => "InterruptedJobExists",
        MigrationError::AlreadyMigrating { .. } => "AlreadyMigrating",
        MigrationError::NotReady { .. } => "NotReady",
        MigrationError::NoVolumes
        | MigrationError::DuplicateVolume(_)
        | MigrationError::BadOptions(_)
        | MigrationError::DestinationTooSmall { .. }
        | MigrationError::DestinationIsSource { .. } => "InvalidParameter",
        _ => "MigrationError",
    };
    ControlError::new(class, e.to_string())
}

/// The job named by `job`, or the only job when there is just one.
fn job(daemon: &Daemon, args: &Value) -> Result<Arc<MigrationJob>, ControlError> {
    if let Some(id) = args.get("job") {
        let id = id
            .as_u64()
            .ok_or_else(|| ControlError::bad_argument("job must be a number"))?;
        return daemon.migrations.get(id).map_err(error);
    }
    let mut live: Vec<_> = daemon
        .migrations
        .jobs()
        .into_iter()
        .filter(|j| !j.state().is_terminal())
        .collect();
    match live.len() {
        1 => Ok(live.remove(0)),
        0 => Err(ControlError::new("NotFound", "no migration job is running")),
        _ => Err(ControlError::bad_argument(
            "several jobs are running: give job",
        )),
    }
}

fn options(args: &Value) -> Result<MigrationOptions, ControlError> {
    let mut options = MigrationOptions::default();
    if let Some(mode) = args.get("mode").and_then(Value::as_str) {
        options.mode = match mode {
            "active" => MirrorMode::Active,
            "background" => MirrorMode::Background,
            other => {
                return Err(ControlError::bad_argument(format!(
                    "mode {other:?}: expected active or background"
                )))
            }
        };
    }
    if let Some(speed) = args.get("max-speed") {
        options.speed_bytes_per_s = speed
            .as_u64()
            .ok_or_else(|| ControlError::bad_argument("max-speed must be bytes per second"))?;
    }
    options.auto_cutover = args
        .get("auto-cutover")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Some(hold) = copy_hold(args)? {
        options.copy_hold = hold;
    }
    persist_interval(args, &mut options)?;
    Ok(options)
}

/// `persist-interval-ms`: how often the job file is rewritten.
fn persist_interval(args: &Value, options: &mut MigrationOptions) -> Result<(), ControlError> {
    if let Some(ms) = args.get("persist-interval-ms") {
        let ms = ms.as_u64().filter(|&ms| ms > 0).ok_or_else(|| {
            ControlError::bad_argument("persist-interval-ms must be milliseconds, at least 1")
        })?;
        options.persist_interval = std::time::Duration::from_millis(ms);
    }
    Ok(())
}

/// `copy-hold-ms`: hold each copy between its read and its write (to test races).
fn copy_hold(args: &Value) -> Result<Option<std::time::Duration>, ControlError> {
    match args.get("copy-hold-ms") {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|ms| Some(std::time::Duration::from_millis(ms)))
            .ok_or_else(|| ControlError::bad_argument("copy-hold-ms must be milliseconds")),
    }
}

pub fn migrate_start(daemon: &Daemon, args: &Value) -> Result<Value, ControlError> {
    let names: Vec<String> = match args.get("volumes") {
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => {
            return Err(ControlError::bad_argument(
                "volumes must be a list of volume names",
            ))
        }
    };
    let target = args
        .get("target")
        .and_then(Value::as_str)
        .ok_or_else(|| ControlError::bad_argument("target is missing"))?;
    if target.starts_with(ferry_engine::peer::address::SCHEME) {
        return move_to_host(daemon, names, target, args);
    }
    let target =
        DestinationSpec::parse(target).map_err(|e| ControlError::bad_argument(e.to_string()))?;
    let mut options = options(args)?;
    options.nbd_tls = target_tls(daemon, args, &target)?;
    let lookup = |name: &str| daemon.volume(name).map(|v| v.volume.clone());
    let job = daemon
        .migrations
        .start_named(&names, lookup, target, options)
        .map_err(error)?;
    Ok(json!({ "job": job.id() }))
}

/// The credentials for an NBD target: `tls-creds` (a directory the daemon reads), or the
/// daemon's own `--tls-creds` for an `nbds://` target. Credentials make an `nbd://`
/// connection use TLS too, so the daemon's are not given to those.
fn target_tls(
    daemon: &Daemon,
    args: &Value,
    target: &DestinationSpec,
) -> Result<Option<Arc<TlsCredentials>>, ControlError> {
    let wants_tls = matches!(target, DestinationSpec::Nbd(uri) if uri.tls);
    if args.get("tls-creds").is_some() && matches!(target, DestinationSpec::File(_)) {
        return Err(ControlError::bad_argument(
            "tls-creds is for an NBD target (nbds://… or nbd://…)",
        ));
    }
    match args.get("tls-creds") {
        Some(Value::String(dir)) => TlsCredentials::load(std::path::Path::new(dir))
            .map(|c| Some(Arc::new(c)))
            .map_err(|e| ControlError::bad_argument(e.to_string())),
        Some(_) => Err(ControlError::bad_argument(
            "tls-creds must be a directory path",
        )),
        None if wants_tls => Ok(daemon.tls.clone()),
        None => Ok(None),
    }
}

/// `migrate-start` to `ferry://HOST:PORT[/NAME]`: the volumes move to the daemon there
/// (see `crate::handoff`).
fn move_to_host(
    daemon: &Daemon,
    volumes: Vec<String>,
    target: &str,
    args: &Value,
) -> Result<Value, ControlError> {
    let url = FerryUrl::parse(target).map_err(ControlError::bad_argument)?;
    if args.get("tls-creds").is_some() {
        return Err(ControlError::bad_argument(
            "a ferry:// target is reached with the daemon's own --tls-creds",
        ));
    }
    let text = |key: &str| match args.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ControlError::bad_argument(format!("{key} must be a path"))),
    };
    let request = MoveRequest {
        volumes,
        target: url,
        path: text("path")?,
        socket: text("socket")?,
        options: options(args)?,
    };
    if request.options.auto_cutover {
        return Err(ControlError::bad_argument(
            "a move to another host ends by its hand-off, not a cutover (no auto-cutover)",
        ));
    }
    let handoff = HandOff::start(daemon, request)?;
    let jobs = handoff.job_ids();
    daemon
        .handoffs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(handoff);
    Ok(json!({ "job": jobs.first(), "jobs": jobs }))
}

pub fn query_migrations(daemon: &Daemon, _: &Value) -> Result<Value, ControlError> {
    let statuses = daemon.migrations.statuses();
    let mut list = Vec::with_capacity(statuses.len());
    for status in statuses {
        let id = status.id;
        let mut value = serde_json::to_value(status)
            .map_err(|e| ControlError::new("GenericError", e.to_string()))?;
        if let Some(cross) = daemon.handoff_of(id).and_then(|h| h.describe(id)) {
            reconcile(&mut value, &cross);
            value["cross-host"] = cross;
        }
        list.push(value);
    }
    Ok(Value::Array(list))
}

/// A job of a move to another host is over only when the move is: `completed` (its data
/// all on the destination) reads `cutting-over` until the destination has activated, and
/// `failed` when the activation failed; `handed-off` is the move's.
fn reconcile(status: &mut Value, cross: &Value) {
    let handed_off = cross["handed-off"].as_bool().unwrap_or(false);
    status["handed_off"] = Value::Bool(handed_off);
    if status["error"].is_null() && !cross["error"].is_null() {
        // Cancelled by the move (the VM's migration cancelled, the destination gone).
        status["error"] = cross["error"].clone();
    }
    if status["state"] != "completed" || handed_off {
        return;
    }
    if cross["error"].is_null() {
        status["state"] = json!("cutting-over");
    } else {
        status["state"] = json!("failed");
        status["error"] = cross["error"].clone();
    }
}

pub fn migrate_cutover(daemon: &Daemon, args: &Value) -> Result<Value, ControlError> {
    let job = job(daemon, args)?;
    let report = job.cutover().map_err(error)?;
    serde_json::to_value(report).map_err(|e| ControlError::new("GenericError", e.to_string()))
}

pub fn migrate_cancel(daemon: &Daemon, args: &Value) -> Result<Value, ControlError> {
    let job = job(daemon, args)?;
    job.cancel().map_err(error)?;
    Ok(json!({ "job": job.id() }))
}

pub fn migrate_set_speed(daemon: &Daemon, args: &Value) -> Result<Value, ControlError> {
    let job = job(daemon, args)?;
    let speed = args.get("speed").and_then(Value::as_u64).ok_or_else(|| {
        ControlError::bad_argument("speed must be bytes per second (0: unlimited)")
    })?;
    job.set_speed(speed);
    if let Some(hold) = copy_hold(args)? {
        job.set_copy_hold(hold);
    }
    Ok(json!({ "job": job.id(), "speed": speed }))
}

/// The volume named by `volume`, if any.
fn volume_arg(args: &Value) -> Result<Option<&str>, ControlError> {
    match args.get("volume") {
        None => Ok(None),
        Some(Value::String(name)) => Ok(Some(name)),
        Some(_) => Err(ControlError::bad_argument("volume must be a volume name")),
    }
}

/// `migrate-resume`: takes up a job a restart interrupted (see `crate::migration_recovery`),
/// with its recorded target, mode and speed; `persist-interval-ms` may change how often its
/// file is rewritten. TLS credentials for an `nbds://` target are the daemon's.
pub fn migrate_resume(daemon: &Daemon, args: &Value) -> Result<Value, ControlError> {
    let volume = volume_arg(args)?;
    let mut options = MigrationOptions::default();
    persist_interval(args, &mut options)?;
    options.nbd_tls = daemon.tls.clone();
    let crashed = daemon
        .migrations
        .interrupted()
        .iter()
        .find(|j| volume.is_none_or(|name| j.volume_names().iter().any(|n| n == name)))
        .map(|j| j.crashed);
    let job = daemon.migrations.resume(volume, options).map_err(error)?;
    let status = job.status();
    Ok(json!({
        "job": job.id(),
        "total_bytes": status.total_bytes,
        "crashed": crashed.unwrap_or(false),
        "job_file": status.job_file,
    }))
}

/// `migrate-discard`: gives up a job a restart interrupted (or a job file that could not
/// be taken up): its file is removed, its volumes are no longer tracked.
pub fn migrate_discard(daemon: &Daemon, args: &Value) -> Result<Value, ControlError> {
    let id = daemon
        .migrations
        .discard(volume_arg(args)?)
        .map_err(error)?;
    Ok(json!({ "job": id }))
}
