//! The `journal-*` control commands: start, mark, seal and clear the running journal's
//! log, and read its status and entries (see `docs/journal.md`).

use std::sync::Arc;

use ferry_engine::journal::Journal;
use serde_json::{json, Value};

use super::ControlError;
use crate::daemon::Daemon;

fn journal(daemon: &Daemon) -> Result<&Arc<Journal>, ControlError> {
    daemon.journal.as_ref().ok_or_else(|| {
        ControlError::new(
            "NotFound",
            "this daemon runs no journal (start it with --journal)",
        )
    })
}

fn label(args: &Value) -> Result<&str, ControlError> {
    args.get("label")
        .and_then(Value::as_str)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ControlError::bad_argument("label is missing"))
}

fn to_json<T: serde::Serialize>(value: T) -> Result<Value, ControlError> {
    serde_json::to_value(value).map_err(|e| ControlError::new("GenericError", e.to_string()))
}

fn journal_error(e: impl std::fmt::Display) -> ControlError {
    ControlError::new("JournalError", e.to_string())
}

pub fn journal_init(daemon: &Daemon, args: &Value) -> Result<Value, ControlError> {
    to_json(journal(daemon)?.init(label(args)?).map_err(journal_error)?)
}

pub fn journal_mark(daemon: &Daemon, args: &Value) -> Result<Value, ControlError> {
    to_json(journal(daemon)?.mark(label(args)?).map_err(journal_error)?)
}

pub fn journal_status(daemon: &Daemon, _: &Value) -> Result<Value, ControlError> {
    to_json(journal(daemon)?.status())
}

pub fn journal_retrieve(daemon: &Daemon, args: &Value) -> Result<Value, ControlError> {
    let since = args.get("since_seq").and_then(Value::as_u64).unwrap_or(0);
    let snapshot = journal(daemon)?.retrieve(since);
    Ok(json!({
        "entries": to_json(snapshot.to_vec())?,
        "log_first_seq": snapshot.first_held_seq,
        "log_dropped": snapshot.dropped,
        "dropped_from_seq": snapshot.dropped_from(),
    }))
}

pub fn journal_seal(daemon: &Daemon, _: &Value) -> Result<Value, ControlError> {
    to_json(journal(daemon)?.seal().map_err(journal_error)?)
}

pub fn journal_clear(daemon: &Daemon, _: &Value) -> Result<Value, ControlError> {
    Ok(json!({ "dropped": journal(daemon)?.clear() }))
}
