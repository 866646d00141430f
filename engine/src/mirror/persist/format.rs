//! The job file's bytes (`IMAGE.ferry-migration`, `docs/migration.md` draws them): encoded
//! and decoded here and nowhere else. Decoding is a plain function from bytes to a
//! [`JobFile`] that never panics (it is fuzzed: `fuzz/fuzz_targets/job_file.rs`).
//!
//! A file is a fixed header, a body (the job and each volume's bitmaps) covered by one
//! CRC32C, and then an append-only log of *arm* records, each with its own CRC32C: the
//! chunks the guest was about to write since the file was written (see `super`).

use crate::journal::checksum::crc32c;
use crate::mirror::options::MirrorMode;

/// The first bytes of every job file.
pub const MAGIC: [u8; 8] = *b"FERRYMIG";
/// The format described in `docs/migration.md`.
pub const VERSION: u32 = 1;
/// The header's size; the body follows it.
pub const HEADER_BYTES: usize = 64;
/// Header flag: the daemon that wrote the file was running the job (a crash leaves it set).
pub const FLAG_IN_USE: u32 = 1;
/// The tag that opens every arm record ("ARM1" in little-endian bytes).
pub const ARM_TAG: u32 = u32::from_le_bytes(*b"ARM1");
/// An arm record's size.
pub const ARM_BYTES: usize = 32;

/// The most volumes one job file holds.
pub const VOLUMES_MAX: usize = 64;
/// The longest volume name.
pub const NAME_BYTES_MAX: usize = 255;
/// The longest target (a path or an NBD URI).
pub const TARGET_BYTES_MAX: usize = 4096;
/// The most chunks one volume tracks: 2^32 chunks of at least 4 KiB (16 TiB at the least
/// granularity), a 512 MiB bitmap at most, checked against the bytes present before any
/// allocation.
pub const CHUNKS_MAX: u64 = 1 << 32;

/// One volume of a job, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub name: String,
    /// Where the volume starts in the target.
    pub placement_offset_bytes: u64,
    pub length_bytes: u64,
    /// One bit per chunk: not yet on the target when the file was written (dirty or being
    /// copied). `chunks.div_ceil(64)` words; bits past the last chunk are zero.
    pub pending: Vec<u64>,
    /// One bit per chunk: a guest write was in flight on it when the file was written.
    pub armed: Vec<u64>,
}

impl VolumeRecord {
    pub fn chunks(&self, granularity_bytes: u64) -> u64 {
        self.length_bytes.div_ceil(granularity_bytes)
    }
}

/// The job as recorded at the last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub in_use: bool,
    /// Incremented by every rewrite of the file; arm records carry it.
    pub sequence: u64,
    pub mode: MirrorMode,
    pub granularity_bytes: u64,
    pub speed_bytes_per_s: u64,
    /// The target as the operator gave it (a path or an NBD URI).
    pub target: String,
    pub volumes: Vec<VolumeRecord>,
}

/// Chunks `first_chunk..first_chunk + chunk_count` of volume `volume_index` were about to
/// be written by the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArmRecord {
    pub volume_index: u32,
    pub sequence: u64,
    pub first_chunk: u64,
    pub chunk_count: u32,
}

/// A decoded file: the record and the arms appended since it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFile {
    pub record: JobRecord,
    pub arms: Vec<ArmRecord>,
    /// Bytes at the end too short for an arm record, or one whose checksum failed: an
    /// append the process did not finish (its guest write never started).
    pub torn_tail_bytes: usize,
}

/// Why bytes are not a job file. Each names the first check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{0} bytes, shorter than the {HEADER_BYTES}-byte header")]
    TooShort(usize),
    #[error("not a ferry migration job file (bad magic)")]
    BadMagic,
    #[error("format version {0}, this ferry reads version {VERSION}")]
    Version(u32),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("the body needs {needed} bytes, the file has {present}")]
    Truncated { needed: u64, present: u64 },
    #[error("body checksum mismatch")]
    BodyChecksum,
    #[error("bad field: {0}")]
    Field(&'static str),
    #[error("arm record {index} is damaged (checksum or contents)")]
    Arm { index: usize },
}

fn words_for(chunks: u64) -> usize {
    chunks.div_ceil(64) as usize
}

/// The file's bytes for `record`, with no arm records.
pub fn encode(record: &JobRecord) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, &record.target);
    for v in &record.volumes {
        put_str(&mut body, &v.name);
        body.extend_from_slice(&v.placement_offset_bytes.to_le_bytes());
        body.extend_from_slice(&v.length_bytes.to_le_bytes());
        let chunks = v.chunks(record.granularity_bytes);
        body.extend_from_slice(&chunks.to_le_bytes());
        for bits in [&v.pending, &v.armed] {
            for i in 0..words_for(chunks) {
                let word = bits.get(i).copied().unwrap_or(0) & word_mask(chunks, i);
                body.extend_from_slice(&word.to_le_bytes());
            }
        }
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    let flags = if record.in_use { FLAG_IN_USE } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&record.sequence.to_le_bytes());
    out.extend_from_slice(&record.granularity_bytes.to_le_bytes());
    out.extend_from_slice(&record.speed_bytes_per_s.to_le_bytes());
    out.push(mode_byte(record.mode));
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&(record.volumes.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c(&body).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let header_crc = crc32c(&out[..60]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    debug_assert_eq!(out.len(), HEADER_BYTES);
    out.extend_from_slice(&body);
    out
}

/// The bytes of one arm record.
pub fn encode_arm(arm: &ArmRecord) -> [u8; ARM_BYTES] {
    let mut out = [0u8; ARM_BYTES];
    out[0..4].copy_from_slice(&ARM_TAG.to_le_bytes());
    out[4..8].copy_from_slice(&arm.volume_index.to_le_bytes());
    out[8..16].copy_from_slice(&arm.sequence.to_le_bytes());
    out[16..24].copy_from_slice(&arm.first_chunk.to_le_bytes());
    out[24..28].copy_from_slice(&arm.chunk_count.to_le_bytes());
    let crc = crc32c(&out[..28]);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Reads a whole file.
pub fn decode(bytes: &[u8]) -> Result<JobFile, FormatError> {
    if bytes.len() < HEADER_BYTES {
        return Err(FormatError::TooShort(bytes.len()));
    }
    let header = &bytes[..HEADER_BYTES];
    if header[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    if crc32c(&header[..60]) != le32(header, 60) {
        return Err(FormatError::HeaderChecksum);
    }
    let version = le32(header, 8);
    if version != VERSION {
        return Err(FormatError::Version(version));
    }
    let flags = le32(header, 12);
    if flags & !FLAG_IN_USE != 0 || header[41..44] != [0; 3] || le32(header, 56) != 0 {
        return Err(FormatError::Field("reserved bits or bytes are not zero"));
    }
    let granularity_bytes = le64(header, 24);
    if !granularity_bytes.is_power_of_two() || granularity_bytes < 4096 {
        return Err(FormatError::Field("granularity"));
    }
    let mode = match header[40] {
        0 => MirrorMode::Active,
        1 => MirrorMode::Background,
        _ => return Err(FormatError::Field("mode")),
    };
    let volume_count = le32(header, 44) as usize;
    if volume_count == 0 || volume_count > VOLUMES_MAX {
        return Err(FormatError::Field("volume count"));
    }
    let body_bytes = le32(header, 48) as usize;
    let present = bytes.len() - HEADER_BYTES;
    if body_bytes > present {
        return Err(FormatError::Truncated {
            needed: body_bytes as u64,
            present: present as u64,
        });
    }
    let body = &bytes[HEADER_BYTES..HEADER_BYTES + body_bytes];
    if crc32c(body) != le32(header, 52) {
        return Err(FormatError::BodyChecksum);
    }
    let mut reader = Reader { bytes: body, at: 0 };
    let target = reader.string(TARGET_BYTES_MAX, "target")?;
    let mut volumes = Vec::with_capacity(volume_count);
    for _ in 0..volume_count {
        volumes.push(read_volume(&mut reader, granularity_bytes)?);
    }
    if reader.at != body.len() {
        return Err(FormatError::Field("bytes after the last volume"));
    }
    let record = JobRecord {
        in_use: flags & FLAG_IN_USE != 0,
        sequence: le64(header, 16),
        mode,
        granularity_bytes,
        speed_bytes_per_s: le64(header, 32),
        target,
        volumes,
    };
    let (arms, torn_tail_bytes) = decode_arms(&record, &bytes[HEADER_BYTES + body_bytes..])?;
    Ok(JobFile {
        record,
        arms,
        torn_tail_bytes,
    })
}

fn read_volume(
    reader: &mut Reader<'_>,
    granularity_bytes: u64,
) -> Result<VolumeRecord, FormatError> {
    let name = reader.string(NAME_BYTES_MAX, "volume name")?;
    if name.is_empty() {
        return Err(FormatError::Field("volume name"));
    }
    let placement_offset_bytes = reader.u64()?;
    let length_bytes = reader.u64()?;
    let chunks = reader.u64()?;
    if length_bytes == 0
        || chunks != length_bytes.div_ceil(granularity_bytes)
        || chunks > CHUNKS_MAX
    {
        return Err(FormatError::Field("volume length or chunk count"));
    }
    let words = words_for(chunks);
    let mut bitmaps = [Vec::new(), Vec::new()];
    for bits in &mut bitmaps {
        // Checked against the bytes present before allocating.
        if reader.remaining() / 8 < words {
            return Err(FormatError::Field("bitmap runs past the body"));
        }
        bits.reserve_exact(words);
        for i in 0..words {
            let word = reader.u64()?;
            if word & !word_mask(chunks, i) != 0 {
                return Err(FormatError::Field("bits set past the last chunk"));
            }
            bits.push(word);
        }
    }
    let [pending, armed] = bitmaps;
    Ok(VolumeRecord {
        name,
        placement_offset_bytes,
        length_bytes,
        pending,
        armed,
    })
}

/// The arm records after the body. A short or damaged *last* record is a torn append
/// (`SIGKILL` between the two halves of a `pwrite` cannot happen, but a full disk can cut
/// one short); a damaged record followed by others is corruption.
fn decode_arms(record: &JobRecord, log: &[u8]) -> Result<(Vec<ArmRecord>, usize), FormatError> {
    let mut arms = Vec::with_capacity(log.len() / ARM_BYTES);
    let count = log.len() / ARM_BYTES;
    for index in 0..count {
        let at = index * ARM_BYTES;
        let bytes = &log[at..at + ARM_BYTES];
        match decode_arm(record, bytes) {
            Some(arm) => arms.push(arm),
            // Only the very last bytes can be a torn append.
            None if index + 1 == count && log.len().is_multiple_of(ARM_BYTES) => {
                return Ok((arms, ARM_BYTES))
            }
            None => return Err(FormatError::Arm { index }),
        }
    }
    Ok((arms, log.len() % ARM_BYTES))
}

fn decode_arm(record: &JobRecord, b: &[u8]) -> Option<ArmRecord> {
    if le32(b, 0) != ARM_TAG || crc32c(&b[..28]) != le32(b, 28) {
        return None;
    }
    let arm = ArmRecord {
        volume_index: le32(b, 4),
        sequence: le64(b, 8),
        first_chunk: le64(b, 16),
        chunk_count: le32(b, 24),
    };
    let volume = record.volumes.get(arm.volume_index as usize)?;
    let end = arm.first_chunk.checked_add(u64::from(arm.chunk_count))?;
    let fits = arm.chunk_count > 0 && end <= volume.chunks(record.granularity_bytes);
    (fits && arm.sequence == record.sequence).then_some(arm)
}

impl JobFile {
    /// The chunks of volume `index` that must be copied on resume, as bitmap words: the
    /// pending chunks, those armed when the file was written, and those armed since.
    pub fn uncopied(&self, index: usize) -> Vec<u64> {
        let Some(volume) = self.record.volumes.get(index) else {
            return Vec::new();
        };
        let mut words: Vec<u64> = volume
            .pending
            .iter()
            .zip(&volume.armed)
            .map(|(p, a)| p | a)
            .collect();
        for arm in self
            .arms
            .iter()
            .filter(|a| a.volume_index as usize == index)
        {
            for c in arm.first_chunk..arm.first_chunk + u64::from(arm.chunk_count) {
                words[(c / 64) as usize] |= 1 << (c % 64);
            }
        }
        words
    }
}

/// The valid bits of word `i` of a bitmap of `chunks` bits.
fn word_mask(chunks: u64, i: usize) -> u64 {
    let first = i as u64 * 64;
    match chunks.saturating_sub(first) {
        n if n >= 64 => u64::MAX,
        n => (1u64 << n) - 1,
    }
}

fn mode_byte(mode: MirrorMode) -> u8 {
    match mode {
        MirrorMode::Active => 0,
        MirrorMode::Background => 1,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A cursor over the body that fails instead of reading past it.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&[u8], FormatError> {
        if self.remaining() < n {
            return Err(FormatError::Field("a field runs past the body"));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        self.take(8).map(|b| le64(b, 0))
    }

    fn string(&mut self, max: usize, what: &'static str) -> Result<String, FormatError> {
        let len = self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))? as usize;
        if len > max {
            return Err(FormatError::Field(what));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FormatError::Field(what))
    }
}
