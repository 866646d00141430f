//! The catalog of a journal directory: which media exist and in which state. A small
//! checksummed file, replaced atomically (write a temporary file, fsync, rename, fsync the
//! directory). It is a convenience: tools and recovery can always rebuild it by scanning.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::checksum;
use super::error::JournalError;

/// "FJCT" as a little-endian u32.
pub const CATALOG_MAGIC: u32 = u32::from_le_bytes(*b"FJCT");
/// The catalog version written (version 2 has the run record: how the last run of the
/// journal ended; version 1 has none).
pub const CATALOG_VERSION: u16 = 2;
pub const CATALOG_FILE: &str = "catalog.fjc";
const HEADER_BYTES: usize = 24;
const RUN_BYTES: usize = 24;
const ENTRY_BYTES: usize = 24;

/// How the journal's current (or last) run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Taking writes (or the process died while it was).
    #[default]
    Running,
    /// Closed cleanly; `unjournaled_count` writes were not journaled before the close.
    Closed,
    /// Stopped on a write error or a full medium; the guest went on unjournaled.
    Stopped,
}

/// The run record of the catalog (version 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct RunRecord {
    pub state: RunState,
    /// The journal ran in async mode (a crash may lose acknowledged writes).
    pub async_mode: bool,
    /// The first sequence number not journaled (when stopped or closed).
    pub first_unjournaled_seq: u64,
    /// How many numbers were assigned to unjournaled writes; [`COUNT_UNKNOWN`] while a
    /// stopped journal is still counting.
    pub unjournaled_count: u64,
}

/// `unjournaled_count` of a run that stopped and has not been closed yet.
pub const COUNT_UNKNOWN: u64 = u64::MAX;

/// The state of one medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MediumState {
    /// Being written.
    Open,
    /// Closed with a trailer.
    Sealed,
    /// Left unsealed by a crash or a write error; valid data ends at `valid_end_bytes`.
    Cut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CatalogEntry {
    pub medium_index: u32,
    pub state: MediumState,
    pub valid_end_bytes: u64,
    pub records: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Catalog {
    pub journal_id: u64,
    /// `None` when read from a version 1 catalog.
    pub run: Option<RunRecord>,
    pub media: Vec<CatalogEntry>,
}

pub fn catalog_path(dir: &Path) -> PathBuf {
    dir.join(CATALOG_FILE)
}

impl Catalog {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(RUN_BYTES + self.media.len() * ENTRY_BYTES);
        let run = self.run.unwrap_or_default();
        body.push(match run.state {
            RunState::Running => 0,
            RunState::Closed => 1,
            RunState::Stopped => 2,
        });
        body.push(u8::from(run.async_mode));
        body.extend_from_slice(&[0u8; 6]);
        body.extend_from_slice(&run.first_unjournaled_seq.to_le_bytes());
        body.extend_from_slice(&run.unjournaled_count.to_le_bytes());
        for e in &self.media {
            body.extend_from_slice(&e.medium_index.to_le_bytes());
            body.push(match e.state {
                MediumState::Open => 0,
                MediumState::Sealed => 1,
                MediumState::Cut => 2,
            });
            body.extend_from_slice(&[0u8; 3]);
            body.extend_from_slice(&e.valid_end_bytes.to_le_bytes());
            body.extend_from_slice(&e.records.to_le_bytes());
        }
        let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
        out.extend_from_slice(&CATALOG_MAGIC.to_le_bytes());
        out.extend_from_slice(&CATALOG_VERSION.to_le_bytes());
        out.extend_from_slice(&[0u8; 2]);
        out.extend_from_slice(&self.journal_id.to_le_bytes());
        out.extend_from_slice(&(self.media.len() as u32).to_le_bytes());
        out.extend_from_slice(&checksum::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < HEADER_BYTES {
            return Err(format!(
                "{} bytes, shorter than the {HEADER_BYTES}-byte header",
                b.len()
            ));
        }
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        if u32_at(0) != CATALOG_MAGIC {
            return Err("bad magic at offset 0".into());
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        let run_bytes = match version {
            1 => 0,
            2 => RUN_BYTES,
            v => return Err(format!("unsupported catalog version {v}")),
        };
        let count = u32_at(16) as usize;
        let body = &b[HEADER_BYTES..];
        if body.len() != count.saturating_mul(ENTRY_BYTES).saturating_add(run_bytes) {
            return Err(format!(
                "{count} entries announced, {} body bytes present",
                body.len()
            ));
        }
        if checksum::crc32c(body) != u32_at(20) {
            return Err("checksum mismatch".into());
        }
        let run = (run_bytes > 0)
            .then(|| decode_run(&b[HEADER_BYTES..], u64_at))
            .transpose()?;
        let mut media = Vec::with_capacity(count);
        for i in 0..count {
            let at = HEADER_BYTES + run_bytes + i * ENTRY_BYTES;
            let state = match b[at + 4] {
                0 => MediumState::Open,
                1 => MediumState::Sealed,
                2 => MediumState::Cut,
                s => return Err(format!("unknown medium state {s} at offset {}", at + 4)),
            };
            media.push(CatalogEntry {
                medium_index: u32_at(at),
                state,
                valid_end_bytes: u64_at(at + 8),
                records: u64_at(at + 16),
            });
        }
        Ok(Self {
            journal_id: u64_at(8),
            run,
            media,
        })
    }

    pub fn load(dir: &Path) -> Result<Option<Self>, JournalError> {
        let path = catalog_path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => Self::decode(&bytes)
                .map(Some)
                .map_err(|reason| JournalError::Catalog { path, reason }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(JournalError::Catalog {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// Replaces the catalog atomically.
    pub fn store(&self, dir: &Path) -> Result<(), JournalError> {
        let path = catalog_path(dir);
        let tmp = dir.join(format!("{CATALOG_FILE}.tmp"));
        let err = |e: std::io::Error| JournalError::Catalog {
            path: path.clone(),
            reason: e.to_string(),
        };
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&self.encode()).map_err(err)?;
        f.sync_data().map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        sync_dir(dir).map_err(err)
    }

    pub fn upsert(&mut self, entry: CatalogEntry) {
        match self
            .media
            .iter_mut()
            .find(|e| e.medium_index == entry.medium_index)
        {
            Some(e) => *e = entry,
            None => self.media.push(entry),
        }
    }
}

/// Decodes the run record at the start of `body`; `u64_at` reads the whole file.
fn decode_run(body: &[u8], u64_at: impl Fn(usize) -> u64) -> Result<RunRecord, String> {
    let state = match body[0] {
        0 => RunState::Running,
        1 => RunState::Closed,
        2 => RunState::Stopped,
        s => return Err(format!("unknown run state {s} at offset {HEADER_BYTES}")),
    };
    Ok(RunRecord {
        state,
        async_mode: body[1] != 0,
        first_unjournaled_seq: u64_at(HEADER_BYTES + 8),
        unjournaled_count: u64_at(HEADER_BYTES + 16),
    })
}

/// Makes a directory's entries (new or renamed files) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
