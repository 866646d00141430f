//! The `journal-*` control commands: start, mark, seal and clear the running journal's
//! log, and read its status and entries (see `docs/journal.md`).

use std::sync::Arc;

use ferry_engine::journal::memory_log::LogSnapshot;
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

/// Entries per `journal-retrieve` reply unless `limit` says otherwise, and the most allowed:
/// a reply is one JSON line built in memory, so a log of millions of entries is read in pages
/// (`next_seq`) instead of one reply the size of the log.
pub const RETRIEVE_PAGE_DEFAULT: usize = 16384;
pub const RETRIEVE_PAGE_MAX: usize = 65536;

pub fn journal_retrieve(daemon: &Daemon, args: &Value) -> Result<String, ControlError> {
    let since = args.get("since_seq").and_then(Value::as_u64).unwrap_or(0);
    let limit = match args.get("limit") {
        None => RETRIEVE_PAGE_DEFAULT,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=RETRIEVE_PAGE_MAX as u64).contains(n))
            .ok_or_else(|| {
                ControlError::bad_argument(format!(
                    "limit must be a number from 1 to {RETRIEVE_PAGE_MAX}"
                ))
            })? as usize,
    };
    let page = journal(daemon)?.retrieve(since, limit);
    let reply = RetrievePage {
        entries: PageEntries(&page),
        next_seq: page.next_seq(),
        log_first_seq: page.first_held_seq,
        log_last_seq: page.last_held_seq,
        log_dropped: page.dropped,
        dropped_from_seq: page.dropped_from(),
    };
    serde_json::to_string(&reply).map_err(|e| ControlError::new("GenericError", e.to_string()))
}

/// `journal-retrieve`'s reply, serialized straight from the log's chunks (a JSON value per
/// entry would cost several allocations each).
#[derive(serde::Serialize)]
struct RetrievePage<'a> {
    entries: PageEntries<'a>,
    next_seq: Option<u64>,
    log_first_seq: Option<u64>,
    log_last_seq: Option<u64>,
    log_dropped: u64,
    dropped_from_seq: Option<u64>,
}

struct PageEntries<'a>(&'a LogSnapshot);

impl serde::Serialize for PageEntries<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter())
    }
}

pub fn journal_seal(daemon: &Daemon, _: &Value) -> Result<Value, ControlError> {
    to_json(journal(daemon)?.seal().map_err(journal_error)?)
}

pub fn journal_clear(daemon: &Daemon, _: &Value) -> Result<Value, ControlError> {
    Ok(json!({ "dropped": journal(daemon)?.clear() }))
}
