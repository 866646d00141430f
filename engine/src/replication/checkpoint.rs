//! The DR site's applied checkpoint: the sequence number the replica images are known to
//! hold on stable storage, in a 32-byte file replaced atomically (written beside, synced,
//! renamed, directory synced), so a restart re-applies the log only past it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::journal::checksum::crc32c;

/// "FRPC" read as a little-endian u32.
pub const CHECKPOINT_MAGIC: u32 = u32::from_le_bytes(*b"FRPC");
pub const CHECKPOINT_VERSION: u16 = 1;
pub const CHECKPOINT_BYTES: usize = 32;

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a replication checkpoint: {reason}")]
    Corrupt { path: PathBuf, reason: &'static str },
}

/// What the checkpoint says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// The replicas hold every record up to here (0: nothing applied yet).
    pub applied_seq: u64,
    /// Set once the group was promoted: the replicas are no longer fed by the stream.
    pub promoted: bool,
}

const FLAG_PROMOTED: u16 = 0x1;

impl Checkpoint {
    pub fn encode(&self) -> [u8; CHECKPOINT_BYTES] {
        let mut b = [0u8; CHECKPOINT_BYTES];
        b[0..4].copy_from_slice(&CHECKPOINT_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
        let flags = if self.promoted { FLAG_PROMOTED } else { 0 };
        b[6..8].copy_from_slice(&flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.applied_seq.to_le_bytes());
        let crc = crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Checkpoint, &'static str> {
        let Some(b) = b.get(..CHECKPOINT_BYTES) else {
            return Err("shorter than 32 bytes");
        };
        if b[0..4] != CHECKPOINT_MAGIC.to_le_bytes() {
            return Err("wrong magic");
        }
        if b[4..6] != CHECKPOINT_VERSION.to_le_bytes() {
            return Err("unsupported version");
        }
        if crc32c(&b[0..28]).to_le_bytes() != b[28..32] {
            return Err("bad checksum");
        }
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags & !FLAG_PROMOTED != 0 || b[16..28].iter().any(|&x| x != 0) {
            return Err("unknown flags or reserved bytes set");
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[8..16]);
        Ok(Checkpoint {
            applied_seq: u64::from_le_bytes(seq),
            promoted: flags & FLAG_PROMOTED != 0,
        })
    }

    /// Reads the checkpoint at `path`; a missing file is the empty checkpoint.
    pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
        match fs::read(path) {
            Ok(bytes) => Checkpoint::decode(&bytes).map_err(|reason| CheckpointError::Corrupt {
                path: path.to_owned(),
                reason,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Checkpoint::default()),
            Err(source) => Err(io("reading", path, source)),
        }
    }

    /// Replaces the checkpoint at `path` so that a crash leaves either the old or the new one.
    pub fn store(&self, path: &Path) -> Result<(), CheckpointError> {
        let tmp = path.with_extension("tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io("creating", &tmp, e))?;
        f.write_all(&self.encode())
            .map_err(|e| io("writing", &tmp, e))?;
        f.sync_data().map_err(|e| io("syncing", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| io("renaming", path, e))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing the directory of", path, e))
    }
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> CheckpointError {
    CheckpointError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}
