//! A migration job that survives a daemon restart: its job file (`IMAGE.ferry-migration`,
//! beside the first volume's image), rewritten at a bounded interval and on a clean
//! shutdown, and removed when the job completes, fails or is cancelled. `docs/migration.md`
//! (*Migrations that survive a restart*) draws the bytes and argues why a crash can never
//! lose a written chunk; in short:
//!
//! - every rewrite records the chunks not yet on the target (dirty or being copied) and
//!   the chunks with a guest write in flight (*armed*), after flushing the target, so that
//!   every chunk the file calls copied is on the target for good;
//! - between rewrites, a guest write to a chunk that is not armed appends an arm record
//!   to the file *before* its source I/O starts ([`JobPersist::arm`]): so a write the
//!   source may hold is always named by the file, whenever the process dies;
//! - after a crash the resume copies the pending chunks, the armed ones and every chunk
//!   an arm record names; after a clean shutdown (guest I/O held, nothing armed) only
//!   the pending ones.
//!
//! Rewrites are atomic: a new file is written beside the old one, synced, and renamed over
//! it (and the directory synced), so the file on disk is always one complete version.

pub mod format;
pub(crate) mod job_file;
mod resume;
pub mod tracker;

use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::dirty_bitmap::ChunkTable;
use super::options::MirrorMode;
use format::{ArmRecord, JobRecord, VolumeRecord};

/// The suffix of a job file, after its first volume's image path.
pub const SUFFIX: &str = ".ferry-migration";
/// The default interval between rewrites of a running job's file.
pub const INTERVAL_DEFAULT: Duration = Duration::from_secs(1);

/// Why the job file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("job file {path}: {step}: {source}")]
    Io {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("job file {path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: format::FormatError,
    },
    #[error("job file {path}: flushing the target first: {reason}")]
    Target { path: PathBuf, reason: String },
}

/// What a job file says about the job besides its bitmaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobMeta {
    pub mode: MirrorMode,
    pub granularity_bytes: u64,
    pub target: String,
    /// Each volume's name, placement in the target and length.
    pub volumes: Vec<(String, u64, u64)>,
}

/// The job file of one job.
pub struct JobPersist {
    path: PathBuf,
    meta: JobMeta,
    /// Serializes rewrites and arm records (taken before any chunk table's lock).
    state: Mutex<FileState>,
}

struct FileState {
    /// The installed file, arm records appended at `end_bytes`; none before the first
    /// rewrite and after removal.
    file: Option<File>,
    end_bytes: u64,
    sequence: u64,
    /// Removed, or written for the last time (clean shutdown): nothing more is written.
    closed: bool,
}

impl JobPersist {
    /// The job file of a job whose first volume's image is `image`.
    pub fn path_for(image: &Path) -> PathBuf {
        let mut name = image.as_os_str().to_os_string();
        name.push(SUFFIX);
        PathBuf::from(name)
    }

    /// A job file at `path`, written by the first [`write`](Self::write) with sequence
    /// `after_sequence + 1`.
    pub fn new(path: PathBuf, meta: JobMeta, after_sequence: u64) -> Self {
        Self {
            path,
            meta,
            state: Mutex::new(FileState {
                file: None,
                end_bytes: 0,
                sequence: after_sequence,
                closed: false,
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self) -> &JobMeta {
        &self.meta
    }

    fn io(&self, step: &'static str) -> impl FnOnce(std::io::Error) -> PersistError + '_ {
        move |source| PersistError::Io {
            path: self.path.clone(),
            step,
            source,
        }
    }

    /// Rewrites the file from `tables` (one per volume, in order): snapshots them (which
    /// starts a new arm interval), runs `flush_target` so that what the snapshot calls
    /// copied is durable, then installs the new version. `last` writes the clean-shutdown
    /// version (`in_use` clear) and closes the file. A failure leaves the previous version
    /// installed, and arms go on being appended to it, so the file stays conservative.
    pub fn write(
        &self,
        tables: &[&Mutex<ChunkTable>],
        speed_bytes_per_s: u64,
        last: bool,
        flush_target: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), PersistError> {
        let Ok(mut state) = self.state.lock() else {
            return Err(self.io("lock")(std::io::Error::other("poisoned")));
        };
        if state.closed {
            return Ok(());
        }
        let sequence = state.sequence + 1;
        let mut volumes = Vec::with_capacity(tables.len());
        for (table, (name, offset, length)) in tables.iter().zip(&self.meta.volumes) {
            let (pending, armed) = match table.lock() {
                Ok(mut t) => t.snapshot_for_file(),
                Err(_) => {
                    return Err(self.io("lock a chunk table")(std::io::Error::other(
                        "poisoned",
                    )))
                }
            };
            volumes.push(VolumeRecord {
                name: name.clone(),
                placement_offset_bytes: *offset,
                length_bytes: *length,
                pending,
                armed,
            });
        }
        flush_target().map_err(|reason| PersistError::Target {
            path: self.path.clone(),
            reason,
        })?;
        let record = JobRecord {
            in_use: !last,
            sequence,
            mode: self.meta.mode,
            granularity_bytes: self.meta.granularity_bytes,
            speed_bytes_per_s,
            target: self.meta.target.clone(),
            volumes,
        };
        let bytes = format::encode(&record);
        let file = self.install(&bytes)?;
        state.file = Some(file);
        state.end_bytes = bytes.len() as u64;
        state.sequence = sequence;
        state.closed = last;
        Ok(())
    }

    /// Writes `bytes` to a new file beside the job file, syncs it and renames it over the
    /// job file; returns the new file (open for the arm records).
    fn install(&self, bytes: &[u8]) -> Result<File, PersistError> {
        let mut temp_name = self.path.as_os_str().to_os_string();
        temp_name.push(".new");
        let temp = PathBuf::from(temp_name);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(self.io("create the new version"))?;
        file.write_all(bytes)
            .map_err(self.io("write the new version"))?;
        file.sync_all().map_err(self.io("sync the new version"))?;
        std::fs::rename(&temp, &self.path).map_err(self.io("rename the new version"))?;
        self.sync_dir()?;
        Ok(file)
    }

    fn sync_dir(&self) -> Result<(), PersistError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io("sync the directory"))
    }

    /// Before a guest write to `chunks` of volume `volume_index` starts on the source:
    /// appends an arm record unless they are all armed already. The record is in the
    /// file (the page cache) when this returns, so a process crash cannot lose it.
    pub fn arm(
        &self,
        volume_index: usize,
        chunks: Range<u64>,
        table: &Mutex<ChunkTable>,
    ) -> Result<(), PersistError> {
        let Ok(mut state) = self.state.lock() else {
            return Err(self.io("lock")(std::io::Error::other("poisoned")));
        };
        if table.lock().map(|t| t.is_armed(&chunks)).unwrap_or(false) {
            return Ok(()); // armed by another write while this one waited
        }
        let sequence = state.sequence;
        let end_bytes = state.end_bytes;
        let Some(file) = state.file.as_ref().filter(|_| !state.closed) else {
            return Ok(()); // removed: the job has ended, nothing is tracked any more
        };
        let record = format::encode_arm(&ArmRecord {
            volume_index: volume_index as u32,
            sequence,
            first_chunk: chunks.start,
            chunk_count: (chunks.end - chunks.start) as u32,
        });
        file.write_all_at(&record, end_bytes)
            .map_err(self.io("append an arm record"))?;
        state.end_bytes += record.len() as u64;
        if let Ok(mut t) = table.lock() {
            t.set_armed(&chunks);
        }
        Ok(())
    }

    /// Removes the file (the job completed, failed or was cancelled).
    pub fn remove(&self) -> Result<(), PersistError> {
        if let Ok(mut state) = self.state.lock() {
            state.file = None;
            state.closed = true;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io("remove")(e)),
        }
    }
}

/// Reads and checks the job file at `path`.
pub fn read(path: &Path) -> Result<format::JobFile, PersistError> {
    let bytes = std::fs::read(path).map_err(|source| PersistError::Io {
        path: path.to_path_buf(),
        step: "read",
        source,
    })?;
    format::decode(&bytes).map_err(|source| PersistError::Format {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests;
