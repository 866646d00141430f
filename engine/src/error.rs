//! The engine's error types: one variant per failed step, with the cause as the source.

use std::io;
use std::path::PathBuf;

/// Errors of setting up and managing volumes (operator-facing, never on the per-request path).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("volume {volume}: image {path} does not exist (give size= to create it)")]
    ImageMissing { volume: String, path: PathBuf },
    #[error("volume {volume}: cannot open {path}: {source}")]
    Open {
        volume: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("volume {volume}: cannot create {path}: {source}")]
    Create {
        volume: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "volume {volume}: {path} is {actual_bytes} bytes, but size={requested_bytes} was given"
    )]
    SizeMismatch {
        volume: String,
        path: PathBuf,
        actual_bytes: u64,
        requested_bytes: u64,
    },
    #[error("volume {volume}: {reason}")]
    BadGeometry { volume: String, reason: String },
    #[error("volume {volume}: {path} is not a regular file or a block device")]
    NotAnImage { volume: String, path: PathBuf },
    #[error("volume {volume}: {reason}")]
    Nbd { volume: String, reason: String },
    #[error("cannot set up io_uring: {0}")]
    Ring(#[source] io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Why one block operation failed. Small and `Copy` so it travels in completions
/// without allocation; the front end maps every variant to an I/O error status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoFailure {
    #[error("request reaches past the end of the volume")]
    OutOfRange,
    #[error("volume is read-only")]
    ReadOnly,
    #[error("operating system error {0}")]
    Os(i32),
    #[error("the device returned no progress (zero-length transfer)")]
    NoProgress,
    #[error("a mirror or journal could not take the write")]
    Observer,
    #[error("too many requests in flight")]
    Busy,
}
