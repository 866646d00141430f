//! The journal's error types: format violations found while decoding, and failed steps of
//! opening, writing and reading journals.

use std::io;
use std::path::PathBuf;

/// Why bytes are not a valid record (the offset is added by the caller that knows it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated: {needed_bytes} bytes needed, {available_bytes} available")]
    Truncated {
        needed_bytes: u64,
        available_bytes: u64,
    },
    #[error("bad magic {found:#010x} (not a ferry journal record)")]
    BadMagic { found: u32 },
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("unsupported format version {version}")]
    UnsupportedVersion { version: u16 },
    #[error("unknown operation code {code}")]
    UnknownOp { code: u8 },
    #[error("payload of {len_bytes} bytes exceeds the format's limit")]
    PayloadTooLarge { len_bytes: u32 },
    #[error("payload checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    PayloadCrc { stored: u32, computed: u32 },
    #[error("{what} payload too short: {needed_bytes} bytes needed, {available_bytes} available")]
    ShortPayload {
        what: &'static str,
        needed_bytes: u64,
        available_bytes: u64,
    },
    #[error("{what}")]
    BadPayload { what: &'static str },
}

/// Errors of the journal: operator-facing, each naming the step and the file.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal option {option:?}: {reason}")]
    BadOption { option: String, reason: String },
    #[error("journal directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "journal directory {path} is in use by another process ({}); stop it or give \
         another dir=", holder.map_or("pid unknown".to_string(), |pid| format!("pid {pid}"))
    )]
    InUse { path: PathBuf, holder: Option<u32> },
    #[error("journal medium {path}: {step}: {source}")]
    Medium {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("journal catalog {path}: {reason}")]
    Catalog { path: PathBuf, reason: String },
    #[error("{path} at offset {offset_bytes}: {source}")]
    Record {
        path: PathBuf,
        offset_bytes: u64,
        #[source]
        source: FormatError,
    },
    #[error("{path}: not a ferry journal medium ({reason})")]
    Foreign { path: PathBuf, reason: String },
    #[error("no journal media found in {0}")]
    NoMedia(PathBuf),
    #[error("the journal writer thread could not be started: {0}")]
    Thread(#[source] io::Error),
    #[error("the journal is stopped: {0}")]
    Stopped(String),
    #[error("{0}")]
    Invalid(String),
}
