//! The tape-style write journal: every guest write of the observed volumes, appended in
//! order to a numbered set of append-only media, plus the offline tools that read media back
//! (list, verify, restore, demux, export). The byte layout is in `docs/journal.md`.

pub mod catalog;
pub mod checksum;
pub mod commit_ring;
pub mod demux;
pub mod device;
pub mod dir_lock;
pub mod direct;
pub mod entry;
pub mod error;
pub mod export;
pub mod format;
pub mod mapped;
pub mod media;
pub mod memory_log;
pub mod merge;
pub mod options;
pub mod prologue;
pub mod recovery;
pub mod restore;
pub mod running;
pub mod scan;
pub mod spares;
pub mod verify;
pub mod writer;

#[cfg(test)]
mod tests;

pub use dir_lock::DirLock;
pub use entry::{render_csv, render_jsonl, LogEntry};
pub use error::{FormatError, JournalError};
pub use options::{Committer, JournalMode, JournalOptions, MappedAppends, MediumCache, OnFull};
pub use running::{Journal, JournalState, JournalStatus, MarkResult, SealResult};
