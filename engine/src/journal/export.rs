//! `export --format dm-log-writes`: writes one volume's journal as a Linux dm-log-writes log
//! (the format of drivers/md/dm-log-writes.c, replayable with `replay-log`).
//!
//! Layout with sector size 512: sector 0 holds the super block {magic u64 =
//! 0x6a736677736872, version u64 = 1, nr_entries u64, sectorsize u32}; entries follow from
//! sector 1, each a sector holding {sector u64, nr_sectors u64, flags u64, data_len u64}
//! (a mark's label follows the entry inside that sector), then, for a write, its data in
//! `nr_sectors` sectors. Discards carry no data. All little-endian.

use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::error::JournalError;
use super::format::Op;
use super::media::MediaSet;

pub const LOG_WRITES_MAGIC: u64 = 0x006a_7366_7773_6872;
pub const LOG_WRITES_VERSION: u64 = 1;
pub const LOG_FLUSH_FLAG: u64 = 1 << 0;
pub const LOG_FUA_FLAG: u64 = 1 << 1;
pub const LOG_DISCARD_FLAG: u64 = 1 << 2;
pub const LOG_MARK_FLAG: u64 = 1 << 3;
/// The sector size the export uses (virtio-blk's and the guest's logical block size).
pub const EXPORT_SECTOR_BYTES: u64 = 512;
const ENTRY_BYTES: usize = 32;

/// What an export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub volume: String,
    pub out: PathBuf,
    pub entries: u64,
    pub bytes: u64,
}

/// Exports `volume` (all its records and every mark) to `out`.
pub fn export_dm_log_writes(
    set: &MediaSet,
    volume: &str,
    out: &Path,
) -> Result<ExportReport, JournalError> {
    let streams = set.streams_of(volume);
    if streams.is_empty() {
        return Err(JournalError::Invalid(format!(
            "volume {volume:?} is not in the journal"
        )));
    }
    let err = |step: &'static str| {
        let path = out.to_path_buf();
        move |source| JournalError::Medium { path, step, source }
    };
    let file = std::fs::File::create(out).map_err(err("create"))?;
    let mut w = BufWriter::new(file);
    let sector = EXPORT_SECTOR_BYTES as usize;
    w.write_all(&vec![0u8; sector]).map_err(err("write"))?;
    let mut entries = 0u64;
    for r in set.sequenced() {
        let r = r?;
        let h = r.record.header;
        let ours = streams.contains(&h.stream_id);
        let (flags, with_data) = match h.op {
            Op::Write | Op::WriteZeroes if ours => (0, true),
            Op::Discard if ours => (LOG_DISCARD_FLAG, false),
            Op::Flush if ours => (LOG_FLUSH_FLAG, false),
            Op::Mark => (LOG_MARK_FLAG, false),
            _ => continue,
        };
        if h.op != Op::Mark
            && (h.offset_bytes % EXPORT_SECTOR_BYTES != 0 || h.len_bytes % EXPORT_SECTOR_BYTES != 0)
        {
            return Err(JournalError::Invalid(format!(
                "seq {}: offset {} length {} is not sector-aligned; dm-log-writes cannot express it",
                h.seq, h.offset_bytes, h.len_bytes
            )));
        }
        let mut block = vec![0u8; sector];
        let (first, count) = if h.op == Op::Flush || h.op == Op::Mark {
            (0, 0)
        } else {
            (
                h.offset_bytes / EXPORT_SECTOR_BYTES,
                h.len_bytes / EXPORT_SECTOR_BYTES,
            )
        };
        let mut label = Vec::new();
        if h.op == Op::Mark {
            label = set.payload(&r)?;
            label.truncate(sector - ENTRY_BYTES - 1);
        }
        block[0..8].copy_from_slice(&first.to_le_bytes());
        block[8..16].copy_from_slice(&count.to_le_bytes());
        block[16..24].copy_from_slice(&flags.to_le_bytes());
        block[24..32].copy_from_slice(&(label.len() as u64).to_le_bytes());
        block[ENTRY_BYTES..ENTRY_BYTES + label.len()].copy_from_slice(&label);
        w.write_all(&block).map_err(err("write"))?;
        if with_data {
            if h.op == Op::Write {
                w.write_all(&set.payload(&r)?).map_err(err("write"))?;
            } else {
                write_zero_bytes(&mut w, h.len_bytes).map_err(err("write"))?;
            }
        }
        entries += 1;
    }
    let mut file = w.into_inner().map_err(|e| err("flush")(e.into_error()))?;
    let bytes = file.seek(SeekFrom::End(0)).map_err(err("seek"))?;
    let mut superblock = vec![0u8; sector];
    superblock[0..8].copy_from_slice(&LOG_WRITES_MAGIC.to_le_bytes());
    superblock[8..16].copy_from_slice(&LOG_WRITES_VERSION.to_le_bytes());
    superblock[16..24].copy_from_slice(&entries.to_le_bytes());
    superblock[24..28].copy_from_slice(&(EXPORT_SECTOR_BYTES as u32).to_le_bytes());
    file.seek(SeekFrom::Start(0)).map_err(err("seek"))?;
    file.write_all(&superblock).map_err(err("write"))?;
    file.sync_all().map_err(err("sync"))?;
    Ok(ExportReport {
        volume: volume.to_string(),
        out: out.to_path_buf(),
        entries,
        bytes,
    })
}

fn write_zero_bytes(w: &mut impl Write, len: u64) -> std::io::Result<()> {
    let zeros = [0u8; 4096];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        w.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    Ok(())
}
