//! The replication stream's wire format: encoding and decoding of record and
//! acknowledgment frames, and nothing else.
//!
//! This is the only module that knows the byte layout; `docs/replication.md` describes it
//! byte by byte and `tests/frame_golden.rs` pins it. Every frame is a 56-byte little-endian
//! header followed by its payload (a write's data or a mark's label). The CRC32C covers the
//! header (with its checksum field zero) and the payload, so a frame is checked as a whole
//! before anything in it is believed. The DR site's log stores the same frames, so a frame
//! read back after a crash is checked the same way as one read from the network.

/// "FRPL" read as a little-endian u32: the first four bytes of every frame.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"FRPL");
/// The format version written into every frame; the decoder reads only this version.
pub const FRAME_VERSION: u16 = 1;
/// Size of a frame header.
pub const HEADER_BYTES: usize = 56;
/// The largest payload a frame may carry: bounds what a decoder allocates for one frame
/// (a guest write of virtio-blk is at most a few MiB; larger writes are split by the sender).
pub const PAYLOAD_MAX_BYTES: u32 = 8 << 20;
/// The longest mark label.
pub const MARK_LABEL_MAX_BYTES: u32 = 256;
/// Header flag on a write-zeroes record: the guest allowed deallocation.
pub const FLAG_UNMAP: u8 = 0x01;

const _: () = assert!(MARK_LABEL_MAX_BYTES <= PAYLOAD_MAX_BYTES);

/// Kind codes (byte 6 of the header).
const KIND_WRITE: u8 = 1;
const KIND_DISCARD: u8 = 2;
const KIND_WRITE_ZEROES: u8 = 3;
const KIND_FLUSH: u8 = 4;
const KIND_MARK: u8 = 5;
const KIND_RESYNC_BEGIN: u8 = 6;
const KIND_RESYNC_END: u8 = 7;
const KIND_ACK: u8 = 16;

/// What one record of a group's write order did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOp {
    /// `data` written at `offset_bytes`.
    Write { offset_bytes: u64, data: Vec<u8> },
    /// The range was discarded (reads back as zeros on ferry's volumes).
    Discard { offset_bytes: u64, len_bytes: u64 },
    /// The range was zeroed; `unmap` says the guest allowed deallocation.
    WriteZeroes {
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
    },
    /// Everything before it in the group's order was made durable on the primary.
    Flush,
    /// A named point in the stream that failover can be asked to stop at.
    Mark { label: String },
    /// A bitmap resync begins after this record: up to its end, the records send ranges
    /// with their newest content, so no point between them is a prefix of the write order.
    ResyncBegin,
    /// The resync that began last ended: from here on every point is a prefix again.
    ResyncEnd,
}

/// One record of a replication group's write order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's place in the group's order, starting at 1, without gaps.
    pub seq: u64,
    /// Which volume of the group (the order the group was started with).
    pub volume_index: u32,
    /// When the primary completed the request, in nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    pub op: RecordOp,
}

/// The DR site's answer: every record up to `durable_seq` is in its log on stable storage,
/// and the replicas equal the primary after `applied_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub durable_seq: u64,
    pub applied_seq: u64,
    /// When the DR site sent it, in nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Record(Record),
    Ack(Ack),
}

/// Why bytes are not a frame. Each names what is wrong, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("truncated frame: {needed} bytes needed, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("not a replication frame (magic {found:#010x}, expected {FRAME_MAGIC:#010x})")]
    BadMagic { found: u32 },
    #[error("unsupported replication frame version {found} (this ferry speaks {FRAME_VERSION})")]
    UnsupportedVersion { found: u16 },
    #[error("unknown frame kind {code}")]
    UnknownKind { code: u8 },
    #[error("oversized frame: payload of {len_bytes} bytes exceeds the limit of {max_bytes}")]
    Oversized { len_bytes: u32, max_bytes: u32 },
    #[error(
        "bad frame checksum: stored {stored:#010x}, computed {computed:#010x} (sequence {seq})"
    )]
    BadChecksum {
        stored: u32,
        computed: u32,
        seq: u64,
    },
    #[error("inconsistent frame (sequence {seq}): {reason}")]
    Inconsistent { seq: u64, reason: &'static str },
}

/// The fields of a header, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub flags: u8,
    pub payload_len_bytes: u32,
    pub crc: u32,
    pub seq: u64,
    pub volume_index: u32,
    pub timestamp_ns: u64,
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

impl Header {
    /// Decodes and checks a header's framing fields (magic, version, kind, payload bound),
    /// so a reader knows how many payload bytes follow before it allocates for them. The
    /// other fields are believed only once [`Frame::decode`] has checked the CRC32C.
    pub fn decode(bytes: &[u8]) -> Result<Header, FrameError> {
        let Some(h) = bytes.get(..HEADER_BYTES) else {
            return Err(FrameError::Truncated {
                needed: HEADER_BYTES,
                available: bytes.len(),
            });
        };
        let magic = u32_at(h, 0);
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != FRAME_VERSION {
            return Err(FrameError::UnsupportedVersion { found: version });
        }
        let header = Header {
            kind: h[6],
            flags: h[7],
            payload_len_bytes: u32_at(h, 8),
            crc: u32_at(h, 12),
            seq: u64_at(h, 16),
            volume_index: u32_at(h, 24),
            timestamp_ns: u64_at(h, 32),
            offset_bytes: u64_at(h, 40),
            len_bytes: u64_at(h, 48),
        };
        if !matches!(
            header.kind,
            KIND_WRITE
                | KIND_DISCARD
                | KIND_WRITE_ZEROES
                | KIND_FLUSH
                | KIND_MARK
                | KIND_RESYNC_BEGIN
                | KIND_RESYNC_END
                | KIND_ACK
        ) {
            return Err(FrameError::UnknownKind { code: header.kind });
        }
        if header.payload_len_bytes > PAYLOAD_MAX_BYTES {
            return Err(FrameError::Oversized {
                len_bytes: header.payload_len_bytes,
                max_bytes: PAYLOAD_MAX_BYTES,
            });
        }
        Ok(header)
    }

    /// The whole frame's length: header and payload.
    pub fn frame_len_bytes(&self) -> usize {
        HEADER_BYTES + self.payload_len_bytes as usize
    }

    fn inconsistent(&self, reason: &'static str) -> FrameError {
        FrameError::Inconsistent {
            seq: self.seq,
            reason,
        }
    }
}

impl Frame {
    /// Decodes the frame at the start of `bytes`; returns it and how many bytes it took.
    pub fn decode(bytes: &[u8]) -> Result<(Frame, usize), FrameError> {
        let header = Header::decode(bytes)?;
        let len = header.frame_len_bytes();
        let Some(whole) = bytes.get(..len) else {
            return Err(FrameError::Truncated {
                needed: len,
                available: bytes.len(),
            });
        };
        let computed = frame_crc(whole);
        if computed != header.crc {
            return Err(FrameError::BadChecksum {
                stored: header.crc,
                computed,
                seq: header.seq,
            });
        }
        if u32_at(whole, 28) != 0 {
            return Err(header.inconsistent("reserved bytes 28..32 are not zero"));
        }
        Ok((Frame::from_parts(&header, &whole[HEADER_BYTES..])?, len))
    }

    /// Builds the frame from a checked header and its payload; refuses field combinations
    /// no encoder writes (so every decoded frame encodes back to the same bytes).
    fn from_parts(h: &Header, payload: &[u8]) -> Result<Frame, FrameError> {
        let flags_allowed = if h.kind == KIND_WRITE_ZEROES {
            FLAG_UNMAP
        } else {
            0
        };
        if h.flags & !flags_allowed != 0 {
            return Err(h.inconsistent("flags not defined for this kind"));
        }
        let ranged = matches!(h.kind, KIND_WRITE | KIND_DISCARD | KIND_WRITE_ZEROES);
        if ranged && h.offset_bytes.checked_add(h.len_bytes).is_none() {
            return Err(h.inconsistent("offset + length overflows"));
        }
        if !ranged && h.kind != KIND_ACK && (h.offset_bytes != 0 || h.len_bytes != 0) {
            return Err(h.inconsistent("offset and length must be zero for this kind"));
        }
        let carries_payload = matches!(h.kind, KIND_WRITE | KIND_MARK);
        if !carries_payload && !payload.is_empty() {
            return Err(h.inconsistent("payload on a kind that carries none"));
        }
        if h.kind != KIND_ACK && h.seq == 0 {
            return Err(h.inconsistent("records are numbered from 1"));
        }
        let boundary = matches!(h.kind, KIND_RESYNC_BEGIN | KIND_RESYNC_END);
        if boundary && h.volume_index != 0 {
            return Err(h.inconsistent("a resync boundary belongs to no volume"));
        }
        let op = match h.kind {
            KIND_WRITE => {
                if h.len_bytes != payload.len() as u64 || payload.is_empty() {
                    return Err(h.inconsistent("a write's length must equal its payload (> 0)"));
                }
                RecordOp::Write {
                    offset_bytes: h.offset_bytes,
                    data: payload.to_vec(),
                }
            }
            KIND_DISCARD => RecordOp::Discard {
                offset_bytes: h.offset_bytes,
                len_bytes: h.len_bytes,
            },
            KIND_WRITE_ZEROES => RecordOp::WriteZeroes {
                offset_bytes: h.offset_bytes,
                len_bytes: h.len_bytes,
                unmap: h.flags & FLAG_UNMAP != 0,
            },
            KIND_FLUSH => RecordOp::Flush,
            KIND_RESYNC_BEGIN => RecordOp::ResyncBegin,
            KIND_RESYNC_END => RecordOp::ResyncEnd,
            KIND_MARK => {
                if payload.len() > MARK_LABEL_MAX_BYTES as usize {
                    return Err(h.inconsistent("mark label longer than 256 bytes"));
                }
                let Ok(label) = std::str::from_utf8(payload) else {
                    return Err(h.inconsistent("mark label is not UTF-8"));
                };
                RecordOp::Mark {
                    label: label.to_owned(),
                }
            }
            _ => {
                if h.volume_index != 0 || h.len_bytes != 0 {
                    return Err(h.inconsistent("an acknowledgment has no volume or length"));
                }
                if h.offset_bytes > h.seq {
                    return Err(h.inconsistent("applied sequence beyond the durable one"));
                }
                return Ok(Frame::Ack(Ack {
                    durable_seq: h.seq,
                    applied_seq: h.offset_bytes,
                    timestamp_ns: h.timestamp_ns,
                }));
            }
        };
        Ok(Frame::Record(Record {
            seq: h.seq,
            volume_index: h.volume_index,
            timestamp_ns: h.timestamp_ns,
            op,
        }))
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Record(r) => r.encode_into(out),
            Frame::Ack(a) => a.encode_into(out),
        }
    }

    /// The encoded frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

impl Record {
    /// Appends the encoded record frame to `out`. A write's data must be at most
    /// [`PAYLOAD_MAX_BYTES`] and a mark's label at most [`MARK_LABEL_MAX_BYTES`]: senders
    /// split larger writes and refuse longer labels before building a record.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (kind, flags, offset, len, payload): (u8, u8, u64, u64, &[u8]) = match &self.op {
            RecordOp::Write { offset_bytes, data } => {
                (KIND_WRITE, 0, *offset_bytes, data.len() as u64, data)
            }
            RecordOp::Discard {
                offset_bytes,
                len_bytes,
            } => (KIND_DISCARD, 0, *offset_bytes, *len_bytes, &[]),
            RecordOp::WriteZeroes {
                offset_bytes,
                len_bytes,
                unmap,
            } => {
                let flags = if *unmap { FLAG_UNMAP } else { 0 };
                (KIND_WRITE_ZEROES, flags, *offset_bytes, *len_bytes, &[])
            }
            RecordOp::Flush => (KIND_FLUSH, 0, 0, 0, &[]),
            RecordOp::Mark { label } => (KIND_MARK, 0, 0, 0, label.as_bytes()),
            RecordOp::ResyncBegin => (KIND_RESYNC_BEGIN, 0, 0, 0, &[]),
            RecordOp::ResyncEnd => (KIND_RESYNC_END, 0, 0, 0, &[]),
        };
        let fields = Header {
            kind,
            flags,
            payload_len_bytes: payload.len() as u32,
            crc: 0,
            seq: self.seq,
            volume_index: self.volume_index,
            timestamp_ns: self.timestamp_ns,
            offset_bytes: offset,
            len_bytes: len,
        };
        encode_frame(&fields, payload, out);
    }
}

impl Ack {
    /// Appends the encoded acknowledgment frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let fields = Header {
            kind: KIND_ACK,
            flags: 0,
            payload_len_bytes: 0,
            crc: 0,
            seq: self.durable_seq,
            volume_index: 0,
            timestamp_ns: self.timestamp_ns,
            offset_bytes: self.applied_seq,
            len_bytes: 0,
        };
        encode_frame(&fields, &[], out);
    }
}

fn encode_frame(h: &Header, payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&FRAME_VERSION.to_le_bytes());
    out.push(h.kind);
    out.push(h.flags);
    out.extend_from_slice(&h.payload_len_bytes.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&h.seq.to_le_bytes());
    out.extend_from_slice(&h.volume_index.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&h.timestamp_ns.to_le_bytes());
    out.extend_from_slice(&h.offset_bytes.to_le_bytes());
    out.extend_from_slice(&h.len_bytes.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = frame_crc(&out[start..]);
    out[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
}

/// The CRC32C of a whole frame with its checksum field (bytes 12..16) taken as zero.
fn frame_crc(frame: &[u8]) -> u32 {
    let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    digest.update(&frame[..12]);
    digest.update(&[0u8; 4]);
    digest.update(&frame[16..]);
    digest.finalize() as u32
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}
