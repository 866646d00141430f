//! `export --format dm-log-writes`: writes one volume's journal as a Linux dm-log-writes log
//! (the format of drivers/md/dm-log-writes.c, replayable with `replay-log`).
//!
//! Layout with sector size 512: sector 0 holds the super block {magic u64 =
//! 0x6a736677736872, version u64 = 1, nr_entries u64, sectorsize u32}; entries follow from
//! sector 1, each a sector holding {sector u64, nr_sectors u64, flags u64, data_len u64}
//! (a mark's label follows the entry inside that sector), then, for a write, its data in
//! `nr_sectors` sectors. Discards carry no data. All little-endian.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::error::JournalError;
use super::format::Op;
use super::media::{MediaSet, RecordRef};

pub const LOG_WRITES_MAGIC: u64 = 0x006a_7366_7773_6872;
pub const LOG_WRITES_VERSION: u64 = 1;
pub const LOG_FLUSH_FLAG: u64 = 1 << 0;
pub const LOG_FUA_FLAG: u64 = 1 << 1;
pub const LOG_DISCARD_FLAG: u64 = 1 << 2;
pub const LOG_MARK_FLAG: u64 = 1 << 3;
/// The sector size the export uses (virtio-blk's and the guest's logical block size).
pub const EXPORT_SECTOR_BYTES: u64 = 512;
const SECTOR: usize = EXPORT_SECTOR_BYTES as usize;
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
    let err = |step| export_err(out, step);
    let file = File::create(out).map_err(err("create"))?;
    let mut w = BufWriter::new(file);
    // Sector 0 is the super block, which holds the entry count: it is written last.
    w.write_all(&[0u8; SECTOR]).map_err(err("write"))?;
    let mut entries = 0u64;
    for r in set.sequenced() {
        let r = r?;
        let h = r.record.header;
        let Some(flags) = entry_flags(h.op, streams.contains(&h.stream_id)) else {
            continue;
        };
        write_entry(&mut w, set, &r, flags, out)?;
        entries += 1;
    }
    let mut file = w.into_inner().map_err(|e| err("flush")(e.into_error()))?;
    let bytes = file.seek(SeekFrom::End(0)).map_err(err("seek"))?;
    file.seek(SeekFrom::Start(0)).map_err(err("seek"))?;
    file.write_all(&superblock_sector(entries))
        .map_err(err("write"))?;
    file.sync_all().map_err(err("sync"))?;
    Ok(ExportReport {
        volume: volume.to_string(),
        out: out.to_path_buf(),
        entries,
        bytes,
    })
}

/// The flags of the entry a record of operation `op` becomes (`ours`: it belongs to the
/// exported volume), or `None` when it is not exported. Marks belong to the journal itself
/// (stream 0), not to a volume, so every one is exported.
fn entry_flags(op: Op, ours: bool) -> Option<u64> {
    match op {
        Op::Write | Op::WriteZeroes if ours => Some(0),
        Op::Discard if ours => Some(LOG_DISCARD_FLAG),
        Op::Flush if ours => Some(LOG_FLUSH_FLAG),
        Op::Mark => Some(LOG_MARK_FLAG),
        _ => None,
    }
}

/// Writes the entry of record `r`: its sector, then a write's data (zeros for
/// write-zeroes, which dm-log-writes has no flag for).
fn write_entry(
    w: &mut impl Write,
    set: &MediaSet,
    r: &RecordRef,
    flags: u64,
    out: &Path,
) -> Result<(), JournalError> {
    let h = r.record.header;
    if h.op != Op::Mark
        && !(h.offset_bytes.is_multiple_of(EXPORT_SECTOR_BYTES)
            && h.len_bytes.is_multiple_of(EXPORT_SECTOR_BYTES))
    {
        return Err(JournalError::Invalid(format!(
            "seq {}: offset {} length {} is not sector-aligned; dm-log-writes cannot express it",
            h.seq, h.offset_bytes, h.len_bytes
        )));
    }
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
        label = set.payload(r)?;
        label.truncate(SECTOR - ENTRY_BYTES - 1);
    }
    let err = |step| export_err(out, step);
    w.write_all(&entry_sector(first, count, flags, &label))
        .map_err(err("write"))?;
    match h.op {
        Op::Write => w.write_all(&set.payload(r)?).map_err(err("write")),
        Op::WriteZeroes => write_zero_bytes(w, h.len_bytes).map_err(err("write")),
        _ => Ok(()),
    }
}

/// An entry's sector: {sector, nr_sectors, flags, data_len}, then the label of a mark.
fn entry_sector(first: u64, count: u64, flags: u64, label: &[u8]) -> [u8; SECTOR] {
    let mut block = [0u8; SECTOR];
    block[0..8].copy_from_slice(&first.to_le_bytes());
    block[8..16].copy_from_slice(&count.to_le_bytes());
    block[16..24].copy_from_slice(&flags.to_le_bytes());
    block[24..32].copy_from_slice(&(label.len() as u64).to_le_bytes());
    block[ENTRY_BYTES..ENTRY_BYTES + label.len()].copy_from_slice(label);
    block
}

/// Sector 0: {magic, version, nr_entries, sectorsize}.
fn superblock_sector(entries: u64) -> [u8; SECTOR] {
    let mut superblock = [0u8; SECTOR];
    superblock[0..8].copy_from_slice(&LOG_WRITES_MAGIC.to_le_bytes());
    superblock[8..16].copy_from_slice(&LOG_WRITES_VERSION.to_le_bytes());
    superblock[16..24].copy_from_slice(&entries.to_le_bytes());
    superblock[24..28].copy_from_slice(&(EXPORT_SECTOR_BYTES as u32).to_le_bytes());
    superblock
}

/// Maps an I/O error of `step` on the exported log to a journal error naming the file.
fn export_err(path: &Path, step: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Medium { path, step, source }
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
