//! The journal's on-medium record format: encoding and decoding of record headers and payloads.
//!
//! This is the only module that knows the byte layout; `docs/journal.md` describes it
//! byte by byte. Every record is a 64-byte little-endian header followed by its payload,
//! zero-padded to a multiple of [`RECORD_ALIGN_BYTES`].

use super::checksum;
use super::error::FormatError;

/// "FJRN" read as a little-endian u32: the first four bytes of every record.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"FJRN");
/// The format version written into every record header (version 2 has the stop record).
pub const FORMAT_VERSION: u16 = 2;
/// The oldest format version the decoder reads (version 1 media have no stop records).
pub const FORMAT_VERSION_MIN: u16 = 1;
/// Size of a record header.
pub const HEADER_BYTES: usize = 64;
/// Records start at multiples of this many bytes.
pub const RECORD_ALIGN_BYTES: usize = 8;
/// Media are written in appends of whole blocks of this size.
pub const BLOCK_BYTES: usize = 4096;
/// The largest payload a record may carry (bounds what a decoder will allocate).
pub const PAYLOAD_MAX_BYTES: u32 = 64 << 20;

/// Header flag: the record is bookkeeping (prologue, padding, trailer) and takes no
/// sequence number of its own; its `seq` field repeats the last sequence number assigned.
pub const FLAG_UNSEQUENCED: u8 = 0x80;
/// Header flag on a write-zeroes record: the guest allowed deallocation.
pub const FLAG_UNMAP: u8 = 0x01;
/// Header flag on a gap record written by recovery: how many writes are missing is not
/// known (`missing_count` is a lower bound of 1); some may be missing.
pub const FLAG_GAP_ESTIMATED: u8 = 0x02;
/// Header flag on a trailer record: another trailer record follows (a medium's log longer
/// than [`TRAILER_ENTRIES_PER_RECORD`] entries is split over several).
pub const FLAG_TRAILER_CONTINUES: u8 = 0x04;
/// Medium-header flag: the medium was produced by `demux`; sequence numbers of other
/// streams are missing from it on purpose.
pub const MEDIUM_FLAG_DEMUXED: u32 = 0x1;

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    Write,
    Discard,
    WriteZeroes,
    Flush,
    Mark,
    StreamDef,
    LogInit,
    Gap,
    MediumHeader,
    Trailer,
    Padding,
    Stop,
}

impl Op {
    pub fn code(self) -> u8 {
        match self {
            Op::Write => 1,
            Op::Discard => 2,
            Op::WriteZeroes => 3,
            Op::Flush => 4,
            Op::Mark => 5,
            Op::StreamDef => 6,
            Op::LogInit => 7,
            Op::Gap => 8,
            Op::MediumHeader => 9,
            Op::Trailer => 10,
            Op::Padding => 11,
            Op::Stop => 12,
        }
    }

    pub fn from_code(code: u8) -> Option<Op> {
        Some(match code {
            1 => Op::Write,
            2 => Op::Discard,
            3 => Op::WriteZeroes,
            4 => Op::Flush,
            5 => Op::Mark,
            6 => Op::StreamDef,
            7 => Op::LogInit,
            8 => Op::Gap,
            9 => Op::MediumHeader,
            10 => Op::Trailer,
            11 => Op::Padding,
            12 => Op::Stop,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Discard => "discard",
            Op::WriteZeroes => "write-zeroes",
            Op::Flush => "flush",
            Op::Mark => "mark",
            Op::StreamDef => "stream-def",
            Op::LogInit => "log-init",
            Op::Gap => "gap",
            Op::MediumHeader => "medium-header",
            Op::Trailer => "trailer",
            Op::Padding => "padding",
            Op::Stop => "stop",
        }
    }

    /// True for operations that change a volume's contents.
    pub fn is_data(self) -> bool {
        matches!(self, Op::Write | Op::Discard | Op::WriteZeroes)
    }
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub op: Op,
    pub flags: u8,
    pub seq: u64,
    pub stream_id: u32,
    pub log_id: u32,
    pub timestamp_ns: u64,
    pub offset_bytes: u64,
    pub len_bytes: u64,
    pub payload_len_bytes: u32,
    pub payload_crc: u32,
}

impl RecordHeader {
    /// Bytes the whole record occupies on the medium (header, payload, alignment).
    pub fn record_bytes(&self) -> u64 {
        record_bytes(self.payload_len_bytes as usize) as u64
    }

    pub fn is_sequenced(&self) -> bool {
        self.flags & FLAG_UNSEQUENCED == 0
    }

    /// Encodes the header; the header CRC is computed over bytes 0..60.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[6] = self.op.code();
        b[7] = self.flags;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.stream_id.to_le_bytes());
        b[20..24].copy_from_slice(&self.log_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.timestamp_ns.to_le_bytes());
        b[32..40].copy_from_slice(&self.offset_bytes.to_le_bytes());
        b[40..48].copy_from_slice(&self.len_bytes.to_le_bytes());
        b[48..52].copy_from_slice(&self.payload_len_bytes.to_le_bytes());
        b[52..56].copy_from_slice(&self.payload_crc.to_le_bytes());
        // 56..60 reserved, zero.
        let crc = checksum::crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header: magic, version, header CRC, operation, payload bound.
    pub fn decode(b: &[u8]) -> Result<RecordHeader, FormatError> {
        if b.len() < HEADER_BYTES {
            return Err(FormatError::Truncated {
                needed_bytes: HEADER_BYTES as u64,
                available_bytes: b.len() as u64,
            });
        }
        let magic = le32(b, 0);
        if magic != RECORD_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let stored_crc = le32(b, 60);
        let crc = checksum::crc32c(&b[0..60]);
        if crc != stored_crc {
            return Err(FormatError::HeaderCrc {
                stored: stored_crc,
                computed: crc,
            });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
            return Err(FormatError::UnsupportedVersion { version });
        }
        let op = Op::from_code(b[6]).ok_or(FormatError::UnknownOp { code: b[6] })?;
        let payload_len_bytes = le32(b, 48);
        if payload_len_bytes > PAYLOAD_MAX_BYTES {
            return Err(FormatError::PayloadTooLarge {
                len_bytes: payload_len_bytes,
            });
        }
        Ok(RecordHeader {
            op,
            flags: b[7],
            seq: le64(b, 8),
            stream_id: le32(b, 16),
            log_id: le32(b, 20),
            timestamp_ns: le64(b, 24),
            offset_bytes: le64(b, 32),
            len_bytes: le64(b, 40),
            payload_len_bytes,
            payload_crc: le32(b, 52),
        })
    }

    /// Checks `payload` (exactly `payload_len_bytes` long) against the header's CRC.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), FormatError> {
        let crc = checksum::crc32c(payload);
        if crc != self.payload_crc {
            return Err(FormatError::PayloadCrc {
                stored: self.payload_crc,
                computed: crc,
            });
        }
        Ok(())
    }
}

/// Bytes a record with `payload_len` bytes of payload occupies.
pub fn record_bytes(payload_len: usize) -> usize {
    HEADER_BYTES + payload_len.next_multiple_of(RECORD_ALIGN_BYTES)
}

/// Appends one record to `out`: header, `payload`, zero padding to the record alignment.
/// `header.payload_len_bytes` and `header.payload_crc` are filled in here.
pub fn encode_record(out: &mut Vec<u8>, mut header: RecordHeader, payload: &[u8]) {
    header.payload_len_bytes = payload.len() as u32;
    header.payload_crc = checksum::crc32c(payload);
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    pad_to_align(out);
}

/// Appends a record of `payload_len` bytes of payload, produced by `fill` straight into
/// its place in `out` (no intermediate copy).
pub fn encode_record_with(
    out: &mut Vec<u8>,
    mut header: RecordHeader,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
) {
    header.payload_len_bytes = payload_len as u32;
    let start = out.len();
    out.resize(start + record_bytes(payload_len), 0);
    encode_record_in(&mut out[start..], header, fill);
}

/// Encodes a record whose payload is `header.payload_len_bytes` long into `dst`, which is
/// exactly [`record_bytes`] of that long: `fill` writes the payload in place, the alignment
/// bytes are zeroed, the payload CRC is taken over what `fill` left there (not over a
/// buffer someone else may still change), and the header goes in last.
pub fn encode_record_in(dst: &mut [u8], mut header: RecordHeader, fill: impl FnOnce(&mut [u8])) {
    let payload_len = header.payload_len_bytes as usize;
    let (head, rest) = dst.split_at_mut(HEADER_BYTES);
    let (payload, align) = rest.split_at_mut(payload_len);
    fill(payload);
    align.fill(0);
    header.payload_crc = checksum::crc32c(payload);
    head.copy_from_slice(&header.encode());
}

fn pad_to_align(out: &mut Vec<u8>) {
    let aligned = out.len().next_multiple_of(RECORD_ALIGN_BYTES);
    out.resize(aligned, 0);
}

/// Encodes a padding record that takes `total_bytes` (a multiple of 8, at least a header).
pub fn padding_record(total_bytes: usize, seq: u64, timestamp_ns: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(total_bytes);
    let payload = vec![0u8; total_bytes.saturating_sub(HEADER_BYTES)];
    let header = RecordHeader {
        op: Op::Padding,
        flags: FLAG_UNSEQUENCED,
        seq,
        stream_id: 0,
        log_id: 0,
        timestamp_ns,
        offset_bytes: 0,
        len_bytes: 0,
        payload_len_bytes: 0,
        payload_crc: 0,
    };
    encode_record(&mut out, header, &payload);
    out
}

/// Bytes of padding record needed after `len` bytes to reach a block boundary (0 if aligned).
pub fn padding_needed(len: usize) -> usize {
    let gap = len.next_multiple_of(BLOCK_BYTES) - len;
    if gap == 0 {
        0
    } else if gap < HEADER_BYTES {
        gap + BLOCK_BYTES
    } else {
        gap
    }
}

/// The payload of a medium-header record: the first record of every medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MediumHeader {
    /// Identifies the journal (set of media); random at creation.
    pub journal_id: u64,
    pub medium_index: u32,
    pub flags: u32,
    /// The capacity the writer used for this medium.
    pub capacity_bytes: u64,
    /// Where the valid records of the previous medium end (`u64::MAX`: it was sealed or
    /// there is none). Set when a torn tail was cut on recovery.
    pub prev_valid_end_bytes: u64,
}

pub const MEDIUM_HEADER_PAYLOAD_BYTES: usize = 32;

impl MediumHeader {
    pub fn encode(&self) -> [u8; MEDIUM_HEADER_PAYLOAD_BYTES] {
        let mut b = [0u8; MEDIUM_HEADER_PAYLOAD_BYTES];
        b[0..8].copy_from_slice(&self.journal_id.to_le_bytes());
        b[8..12].copy_from_slice(&self.medium_index.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.capacity_bytes.to_le_bytes());
        b[24..32].copy_from_slice(&self.prev_valid_end_bytes.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        need(b, MEDIUM_HEADER_PAYLOAD_BYTES, "medium-header")?;
        Ok(Self {
            journal_id: le64(b, 0),
            medium_index: le32(b, 8),
            flags: le32(b, 12),
            capacity_bytes: le64(b, 16),
            prev_valid_end_bytes: le64(b, 24),
        })
    }
}

/// The payload of a stream-def record: which volume and queue a stream id stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct StreamDef {
    pub volume: String,
    pub queue_index: u16,
}

impl StreamDef {
    pub fn encode(&self) -> Vec<u8> {
        let name = self.volume.as_bytes();
        let mut b = Vec::with_capacity(4 + name.len());
        b.extend_from_slice(&self.queue_index.to_le_bytes());
        b.extend_from_slice(&(name.len().min(u16::MAX as usize) as u16).to_le_bytes());
        b.extend_from_slice(&name[..name.len().min(u16::MAX as usize)]);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        need(b, 4, "stream-def")?;
        let queue_index = u16::from_le_bytes([b[0], b[1]]);
        let name_len = u16::from_le_bytes([b[2], b[3]]) as usize;
        need(b, 4 + name_len, "stream-def")?;
        let volume = String::from_utf8(b[4..4 + name_len].to_vec()).map_err(|_| {
            FormatError::BadPayload {
                what: "stream-def volume name is not UTF-8",
            }
        })?;
        Ok(Self {
            volume,
            queue_index,
        })
    }
}

/// The payload of a gap record: sequence numbers that were assigned but never journaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GapInfo {
    pub first_missing_seq: u64,
    pub missing_count: u64,
}

impl GapInfo {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.first_missing_seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.missing_count.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        need(b, 16, "gap")?;
        Ok(Self {
            first_missing_seq: le64(b, 0),
            missing_count: le64(b, 8),
        })
    }
}

/// Why the journal stopped taking writes (the cause byte of a stop record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopCause {
    /// A clean close (daemon shutdown): the volumes were stopped first.
    Closed,
    /// A write error on the medium: the guest went on unjournaled.
    Error,
    /// The last allowed medium is full (on-full=stop): the guest went on unjournaled.
    Full,
}

impl StopCause {
    pub fn code(self) -> u8 {
        match self {
            StopCause::Closed => 1,
            StopCause::Error => 2,
            StopCause::Full => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => StopCause::Closed,
            2 => StopCause::Error,
            3 => StopCause::Full,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            StopCause::Closed => "closed",
            StopCause::Error => "error",
            StopCause::Full => "full",
        }
    }

    /// True when the guest may have gone on writing after the stop.
    pub fn loses_writes(self) -> bool {
        self != StopCause::Closed
    }
}

/// The payload of a stop record: the journal takes no more writes in this run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StopInfo {
    pub cause: StopCause,
    /// The first sequence number that is not journaled.
    pub first_unjournaled_seq: u64,
    /// Numbers assigned to unjournaled writes when the record was made (more may follow
    /// for `error`/`full`).
    pub unjournaled_count: u64,
    pub reason: String,
}

/// Fixed part of a stop payload (the reason follows).
pub const STOP_PAYLOAD_FIXED_BYTES: usize = 24;

impl StopInfo {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(STOP_PAYLOAD_FIXED_BYTES + self.reason.len());
        b.push(self.cause.code());
        b.extend_from_slice(&[0u8; 7]);
        b.extend_from_slice(&self.first_unjournaled_seq.to_le_bytes());
        b.extend_from_slice(&self.unjournaled_count.to_le_bytes());
        b.extend_from_slice(self.reason.as_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        need(b, STOP_PAYLOAD_FIXED_BYTES, "stop")?;
        let cause = StopCause::from_code(b[0]).ok_or(FormatError::BadPayload {
            what: "stop record with an unknown cause",
        })?;
        Ok(Self {
            cause,
            first_unjournaled_seq: le64(b, 8),
            unjournaled_count: le64(b, 16),
            reason: String::from_utf8_lossy(&b[STOP_PAYLOAD_FIXED_BYTES..]).into_owned(),
        })
    }
}

/// Bytes of one log entry inside a trailer payload.
pub const TRAILER_ENTRY_BYTES: usize = 56;

/// Entries per trailer record: its payload (56 MiB) stays under [`PAYLOAD_MAX_BYTES`].
pub const TRAILER_ENTRIES_PER_RECORD: usize = 1 << 20;

/// Bytes the trailer records of a medium holding `entries` log entries take (without the
/// padding of their append).
pub fn trailer_records_bytes(entries: usize) -> usize {
    let full = entries / TRAILER_ENTRIES_PER_RECORD;
    let rest = entries % TRAILER_ENTRIES_PER_RECORD;
    let last = if rest > 0 || full == 0 {
        record_bytes(rest * TRAILER_ENTRY_BYTES)
    } else {
        0
    };
    full * record_bytes(TRAILER_ENTRIES_PER_RECORD * TRAILER_ENTRY_BYTES) + last
}

/// Encodes one log entry for a trailer (see `docs/journal.md`).
pub fn encode_trailer_entry(out: &mut Vec<u8>, e: &super::entry::LogEntry) {
    out.extend_from_slice(&e.seq.to_le_bytes());
    out.extend_from_slice(&e.stream_id.to_le_bytes());
    out.extend_from_slice(&e.log_id.to_le_bytes());
    out.extend_from_slice(&e.timestamp_ns.to_le_bytes());
    out.push(e.op.code());
    out.extend_from_slice(&[0u8; 3]);
    out.extend_from_slice(&e.medium.to_le_bytes());
    out.extend_from_slice(&e.offset_bytes.to_le_bytes());
    out.extend_from_slice(&e.len_bytes.to_le_bytes());
    out.extend_from_slice(&e.position_bytes.to_le_bytes());
}

/// Decodes the entries of a trailer payload.
pub fn decode_trailer(b: &[u8]) -> Result<Vec<super::entry::LogEntry>, FormatError> {
    if !b.len().is_multiple_of(TRAILER_ENTRY_BYTES) {
        return Err(FormatError::BadPayload {
            what: "trailer length is not a whole number of entries",
        });
    }
    b.chunks_exact(TRAILER_ENTRY_BYTES)
        .map(|c| {
            Ok(super::entry::LogEntry {
                seq: le64(c, 0),
                stream_id: le32(c, 8),
                log_id: le32(c, 12),
                timestamp_ns: le64(c, 16),
                op: Op::from_code(c[24]).ok_or(FormatError::UnknownOp { code: c[24] })?,
                medium: le32(c, 28),
                offset_bytes: le64(c, 32),
                len_bytes: le64(c, 40),
                position_bytes: le64(c, 48),
            })
        })
        .collect()
}

fn need(b: &[u8], len: usize, what: &'static str) -> Result<(), FormatError> {
    if b.len() < len {
        return Err(FormatError::ShortPayload {
            what,
            needed_bytes: len as u64,
            available_bytes: b.len() as u64,
        });
    }
    Ok(())
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
