//! An independent reader of the Linux dm-log-writes log format, written from the kernel's
//! Documentation/admin-guide/device-mapper/log-writes.rst and drivers/md/dm-log-writes.c
//! (not from ferry's exporter): super block in sector 0, then one sector-sized entry per
//! logged bio followed by its data sectors; replays the log onto an image.

use anyhow::{bail, ensure, Context as _, Result};

pub const MAGIC: u64 = 0x006a_7366_7773_6872;
pub const VERSION: u64 = 1;
pub const FLUSH: u64 = 1 << 0;
pub const DISCARD: u64 = 1 << 2;
pub const MARK: u64 = 1 << 3;
/// `struct log_write_entry`: sector, nr_sectors, flags, data_len (4 x le64).
const ENTRY_BYTES: usize = 32;

/// One entry of the log.
#[derive(Debug, Clone)]
pub struct Entry {
    pub sector: u64,
    pub nr_sectors: u64,
    pub flags: u64,
    /// A mark's label (the inline data of a mark entry).
    pub mark: Option<String>,
    /// Byte range of the entry's data sectors in the log (writes only).
    pub data: Option<std::ops::Range<usize>>,
}

/// A decoded log.
pub struct Log {
    pub sector_bytes: usize,
    pub entries: Vec<Entry>,
    pub bytes: Vec<u8>,
}

fn le64(b: &[u8], at: usize) -> Result<u64> {
    let s = b.get(at..at + 8).context("truncated field")?;
    Ok(u64::from_le_bytes(s.try_into()?))
}

/// Decodes a whole log file.
pub fn decode(bytes: Vec<u8>) -> Result<Log> {
    ensure!(le64(&bytes, 0)? == MAGIC, "bad super block magic");
    ensure!(le64(&bytes, 8)? == VERSION, "bad version");
    let nr_entries = le64(&bytes, 16)?;
    let sector_bytes = u32::from_le_bytes(bytes.get(24..28).context("short super")?.try_into()?);
    let sector_bytes = sector_bytes as usize;
    ensure!(
        sector_bytes >= 512 && sector_bytes.is_power_of_two(),
        "sector size {sector_bytes}"
    );
    let mut pos = sector_bytes; // entries start at sector 1
    let mut entries = Vec::new();
    for n in 0..nr_entries {
        let e = bytes
            .get(pos..pos + ENTRY_BYTES)
            .with_context(|| format!("entry {n} at {pos} past the end"))?;
        let (sector, nr_sectors, flags, data_len) = (
            le64(e, 0)?,
            le64(e, 8)?,
            le64(e, 16)?,
            le64(e, 24)? as usize,
        );
        // Inline data (a mark's label) follows the entry; entry + inline data are padded
        // to whole sectors.
        let inline = bytes
            .get(pos + ENTRY_BYTES..pos + ENTRY_BYTES + data_len)
            .with_context(|| format!("entry {n}: inline data past the end"))?;
        let mark = (flags & MARK != 0).then(|| String::from_utf8_lossy(inline).into_owned());
        pos += (ENTRY_BYTES + data_len).div_ceil(sector_bytes) * sector_bytes;
        let mut data = None;
        if flags & (DISCARD | MARK) == 0 && nr_sectors > 0 {
            let len = nr_sectors as usize * sector_bytes;
            ensure!(
                pos + len <= bytes.len(),
                "entry {n}: data past the end of the log"
            );
            data = Some(pos..pos + len);
            pos += len;
        }
        entries.push(Entry {
            sector,
            nr_sectors,
            flags,
            mark,
            data,
        });
    }
    ensure!(
        pos == bytes.len(),
        "{} bytes after the last entry",
        bytes.len() - pos
    );
    Ok(Log {
        sector_bytes,
        entries,
        bytes,
    })
}

impl Log {
    /// Replays every entry onto `image` (as replay-log would onto a device): writes their
    /// data, discards read back as zeros (ferry punches holes). Stops before the mark
    /// `until_mark` if given.
    pub fn replay(&self, image: &mut [u8], until_mark: Option<&str>) -> Result<usize> {
        let mut applied = 0;
        for e in &self.entries {
            if let (Some(m), Some(label)) = (&e.mark, until_mark) {
                if m == label {
                    return Ok(applied);
                }
            }
            let at = e.sector as usize * self.sector_bytes;
            let len = e.nr_sectors as usize * self.sector_bytes;
            if let Some(r) = &e.data {
                image
                    .get_mut(at..at + len)
                    .context("write past the image")?
                    .copy_from_slice(&self.bytes[r.clone()]);
            } else if e.flags & DISCARD != 0 {
                image
                    .get_mut(at..at + len)
                    .context("discard past the image")?
                    .fill(0);
            }
            applied += 1;
        }
        if let Some(label) = until_mark {
            bail!("no mark {label:?} in the log");
        }
        Ok(applied)
    }
}
