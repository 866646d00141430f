//! What the running journal answers its control operations: its status, and the results of
//! a mark (or a new log) and of a seal. The control socket sends these as JSON, and
//! `ferry journal status` reads the status back into [`JournalStatus`].

use crate::journal::format::GapInfo;
use crate::journal::options::{Committer, JournalMode};
use crate::journal::recovery::RecoveredTail;
use crate::journal::writer::AppendPath;

/// Whether the journal is taking writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalState {
    Running,
    /// Journaling stopped (write error or last medium full); guest writes go on unjournaled.
    Stopped,
    /// on-full=pause: the media are full; guest writes are held until room appears.
    Paused,
}

/// The answer of `status()`. Its `Option` fields are required when it is read back as well
/// (`null` when unknown): a reply that lacks one is an error, not a silent `None`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JournalStatus {
    pub state: JournalState,
    /// Why the journal is stopped or paused, loudly.
    #[serde(deserialize_with = "serde::Deserialize::deserialize")]
    pub reason: Option<String>,
    pub mode: JournalMode,
    pub dir: String,
    /// The medium being written and the append position on it.
    #[serde(deserialize_with = "serde::Deserialize::deserialize")]
    pub medium: Option<u32>,
    pub position_bytes: u64,
    /// Records made durable since the journal was opened.
    pub records: u64,
    /// Group commits (appends + flushes) that made those records durable.
    pub group_commits: u64,
    pub next_seq: u64,
    pub durable_seq: u64,
    /// Bytes observed but not yet durable.
    pub lag_bytes: u64,
    /// Gaps recorded in the journal, and the one still open while stopped.
    pub gaps: Vec<GapInfo>,
    #[serde(deserialize_with = "serde::Deserialize::deserialize")]
    pub open_gap: Option<GapInfo>,
    pub log_id: u32,
    pub label: String,
    /// Entries in the in-memory log, the oldest sequence number it holds, entries dropped
    /// from it to its bound (`log-memory=`) since the start or the last clear, and the bound.
    pub log_entries: usize,
    #[serde(deserialize_with = "serde::Deserialize::deserialize")]
    pub log_first_seq: Option<u64>,
    pub log_dropped: u64,
    pub log_max_entries: usize,
    #[serde(deserialize_with = "serde::Deserialize::deserialize")]
    pub recovered_torn_tail: Option<RecoveredTail>,
    /// Media opened by taking a formatted spare (`spares=N`).
    pub spares_taken: u64,
    /// Whether media are appended with `O_DIRECT` (`cache=`); unknown before the first
    /// medium is opened.
    #[serde(deserialize_with = "serde::Deserialize::deserialize")]
    pub medium_direct: Option<bool>,
    /// Whether group commits go through io_uring (`false`: the kernel refused a ring, the
    /// writer uses `pwritev` + `fdatasync`); unknown before the first append, and before
    /// any append to a medium that is not memory-backed.
    #[serde(deserialize_with = "serde::Deserialize::deserialize")]
    pub appends_io_uring: Option<bool>,
    /// How group commits are written: `io_uring`, `pwritev` (no ring) or `memory`
    /// (memory-backed media, `pwritev` on the committing thread); unknown before the first.
    #[serde(deserialize_with = "serde::Deserialize::deserialize")]
    pub appends: Option<AppendPath>,
    /// Who makes group commits: `writer` or `queue` (`committer=`, resolved).
    pub committer: Committer,
    /// Group commits made by queue threads (the rest were made by the writer thread).
    pub queue_commits: u64,
    /// Records the observing threads appended straight onto a mapped medium (`mapped=`:
    /// durable at once, in no group commit).
    pub mapped_records: u64,
}

/// The answer of `mark()` and `init()`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MarkResult {
    pub seq: u64,
    pub log_id: u32,
    pub label: String,
    pub timestamp_ns: u64,
}

/// The answer of `seal()`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SealResult {
    /// The medium that was sealed (none if no medium was open).
    pub sealed_medium: Option<u32>,
}
