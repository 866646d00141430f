//! Structured replies (`NBD_OPT_STRUCTURED_REPLY`) and block status
//! (`NBD_CMD_BLOCK_STATUS` with the `base:allocation` metadata context): the chunk header,
//! the chunks a server sends (read data, errors, block status descriptors) and the request
//! flags and transmission flags that go with them.
//!
//! Chunks are encoded into fixed arrays (the payload of a read is sent from the caller's
//! buffer, after the array), so a server replies without allocating.

use super::{exact, u16_at, u32_at, u64_at, DecodeError};

/// Starts every structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Chunk flag: the last chunk of its reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// The bit every error chunk type has set.
pub const NBD_REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Chunk: no payload (ends a reply whose other chunks said everything).
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Chunk: an offset and data read from it.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk: an offset and the length of a hole read as zeroes.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk: a metadata context id and its extents ([`BlockDescriptor`]s).
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk: the request failed (an error value and a message).
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 1;
/// Chunk: the request failed at an offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 2;

/// Command: the export's state (per selected metadata context) over a range.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// Command: prefetch a range (ferry does not offer it).
pub const NBD_CMD_CACHE: u16 = 5;
/// Command flag of a read: reply in one chunk ("don't fragment").
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag of a block status: one descriptor is enough.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag of a write-zeroes: fail rather than be slow (ferry does not offer it).
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Transmission flag: reads honour `NBD_CMD_FLAG_DF` (only with structured replies).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: `NBD_CMD_CACHE` is offered.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is offered.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// `base:allocation` state: the extent is not allocated.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;
/// A read data chunk's header and offset; the data follow.
pub const OFFSET_DATA_HEADER_BYTES: usize = STRUCTURED_REPLY_HEADER_BYTES + 8;
/// An error chunk without a message.
pub const ERROR_CHUNK_BYTES: usize = STRUCTURED_REPLY_HEADER_BYTES + 4 + 2;
/// A block status chunk's header and context id; the descriptors follow.
pub const BLOCK_STATUS_HEADER_BYTES: usize = STRUCTURED_REPLY_HEADER_BYTES + 4;
pub const BLOCK_DESCRIPTOR_BYTES: usize = 8;

/// The head of a structured reply chunk; `len_bytes` of payload follow it.
///
/// ```text
/// S: 32 bits  NBD_STRUCTURED_REPLY_MAGIC (0x668e33ef)
/// S: 16 bits  flags (NBD_REPLY_FLAG_DONE)
/// S: 16 bits  type (NBD_REPLY_TYPE_*)
/// S: 64 bits  cookie of the request
/// S: 32 bits  length of the payload
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructuredReplyHeader {
    pub flags: u16,
    pub reply_type: u16,
    pub cookie: u64,
    pub len_bytes: u32,
}

impl StructuredReplyHeader {
    pub fn encode(&self) -> [u8; STRUCTURED_REPLY_HEADER_BYTES] {
        let mut b = [0u8; STRUCTURED_REPLY_HEADER_BYTES];
        self.encode_into(&mut b);
        b
    }

    fn encode_into(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.reply_type.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.len_bytes.to_be_bytes());
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; STRUCTURED_REPLY_HEADER_BYTES] = exact(bytes, "structured reply")?;
        let magic = u32_at(&b, 0);
        if magic != NBD_STRUCTURED_REPLY_MAGIC {
            return Err(DecodeError::BadMagic {
                what: "structured reply",
                magic: u64::from(magic),
            });
        }
        Ok(Self {
            flags: u16_at(&b, 4),
            reply_type: u16_at(&b, 6),
            cookie: u64_at(&b, 8),
            len_bytes: u32_at(&b, 16),
        })
    }
}

/// The head of the one `NBD_REPLY_TYPE_OFFSET_DATA` chunk (flagged done) that answers a
/// successful read; the `data_len_bytes` bytes read follow it.
///
/// ```text
/// S: structured reply header (payload length: 8 + data length)
/// S: 64 bits  offset of the data
/// S: the data
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetDataHeader {
    pub cookie: u64,
    pub offset_bytes: u64,
    pub data_len_bytes: u32,
}

impl OffsetDataHeader {
    /// The chunk's header and offset; `None` when 8 + the data length overflows the
    /// chunk's 32-bit length (the caller never reads that much in one request).
    pub fn encode(&self) -> Option<[u8; OFFSET_DATA_HEADER_BYTES]> {
        let mut b = [0u8; OFFSET_DATA_HEADER_BYTES];
        StructuredReplyHeader {
            flags: NBD_REPLY_FLAG_DONE,
            reply_type: NBD_REPLY_TYPE_OFFSET_DATA,
            cookie: self.cookie,
            len_bytes: self.data_len_bytes.checked_add(8)?,
        }
        .encode_into(&mut b);
        b[20..28].copy_from_slice(&self.offset_bytes.to_be_bytes());
        Some(b)
    }

    /// Parses a chunk's header and offset (the data are the reader's to take).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; OFFSET_DATA_HEADER_BYTES] = exact(bytes, "NBD_REPLY_TYPE_OFFSET_DATA")?;
        let header = StructuredReplyHeader::decode(&b[..STRUCTURED_REPLY_HEADER_BYTES])?;
        if header.reply_type != NBD_REPLY_TYPE_OFFSET_DATA
            || header.flags != NBD_REPLY_FLAG_DONE
            || header.len_bytes < 8
        {
            return Err(DecodeError::Invalid {
                what: "NBD_REPLY_TYPE_OFFSET_DATA",
                reason: "another chunk type, not the last chunk, or shorter than its offset",
            });
        }
        Ok(Self {
            cookie: header.cookie,
            offset_bytes: u64_at(&b, 20),
            data_len_bytes: header.len_bytes - 8,
        })
    }
}

/// An `NBD_REPLY_TYPE_ERROR` chunk flagged done, without a message (ferry logs the reason
/// instead: a message would cost an allocation per failed request).
///
/// ```text
/// S: structured reply header (payload length 6)
/// S: 32 bits  error (NBD_E*)
/// S: 16 bits  length of the message (0)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorChunk {
    pub cookie: u64,
    pub error: u32,
}

impl ErrorChunk {
    pub fn encode(&self) -> [u8; ERROR_CHUNK_BYTES] {
        let mut b = [0u8; ERROR_CHUNK_BYTES];
        StructuredReplyHeader {
            flags: NBD_REPLY_FLAG_DONE,
            reply_type: NBD_REPLY_TYPE_ERROR,
            cookie: self.cookie,
            len_bytes: 6,
        }
        .encode_into(&mut b);
        b[20..24].copy_from_slice(&self.error.to_be_bytes());
        b
    }

    /// Parses an error chunk without a message.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; ERROR_CHUNK_BYTES] = exact(bytes, "NBD_REPLY_TYPE_ERROR")?;
        let header = StructuredReplyHeader::decode(&b[..STRUCTURED_REPLY_HEADER_BYTES])?;
        if header.reply_type != NBD_REPLY_TYPE_ERROR
            || header.flags != NBD_REPLY_FLAG_DONE
            || header.len_bytes != 6
            || u16_at(&b, 24) != 0
        {
            return Err(DecodeError::Invalid {
                what: "NBD_REPLY_TYPE_ERROR",
                reason: "another chunk type, not the last chunk, or a message",
            });
        }
        Ok(Self {
            cookie: header.cookie,
            error: u32_at(&b, 20),
        })
    }
}

/// The head of the one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (flagged done) that answers a
/// block status for one metadata context; `descriptors` [`BlockDescriptor`]s follow it.
///
/// ```text
/// S: structured reply header (payload length: 4 + 8 * descriptors)
/// S: 32 bits  metadata context id
/// S: per descriptor: 32 bits length, 32 bits state flags (NBD_STATE_*)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatusHeader {
    pub cookie: u64,
    pub context_id: u32,
    pub descriptors: u32,
}

impl BlockStatusHeader {
    /// The chunk's header and context id; `None` when the descriptors overflow the
    /// chunk's 32-bit length.
    pub fn encode(&self) -> Option<[u8; BLOCK_STATUS_HEADER_BYTES]> {
        let payload = self
            .descriptors
            .checked_mul(BLOCK_DESCRIPTOR_BYTES as u32)?
            .checked_add(4)?;
        let mut b = [0u8; BLOCK_STATUS_HEADER_BYTES];
        StructuredReplyHeader {
            flags: NBD_REPLY_FLAG_DONE,
            reply_type: NBD_REPLY_TYPE_BLOCK_STATUS,
            cookie: self.cookie,
            len_bytes: payload,
        }
        .encode_into(&mut b);
        b[20..24].copy_from_slice(&self.context_id.to_be_bytes());
        Some(b)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; BLOCK_STATUS_HEADER_BYTES] = exact(bytes, "NBD_REPLY_TYPE_BLOCK_STATUS")?;
        let header = StructuredReplyHeader::decode(&b[..STRUCTURED_REPLY_HEADER_BYTES])?;
        let descriptors_bytes = header.len_bytes.wrapping_sub(4);
        if header.reply_type != NBD_REPLY_TYPE_BLOCK_STATUS
            || header.flags != NBD_REPLY_FLAG_DONE
            || header.len_bytes < 4
            || !descriptors_bytes.is_multiple_of(BLOCK_DESCRIPTOR_BYTES as u32)
        {
            return Err(DecodeError::Invalid {
                what: "NBD_REPLY_TYPE_BLOCK_STATUS",
                reason: "another chunk type, not the last chunk, or not whole descriptors",
            });
        }
        Ok(Self {
            cookie: header.cookie,
            context_id: u32_at(&b, 20),
            descriptors: descriptors_bytes / BLOCK_DESCRIPTOR_BYTES as u32,
        })
    }
}

/// One extent of a block status reply: its length and its state (`NBD_STATE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub len_bytes: u32,
    pub flags: u32,
}

impl BlockDescriptor {
    pub fn encode(&self) -> [u8; BLOCK_DESCRIPTOR_BYTES] {
        let mut b = [0u8; BLOCK_DESCRIPTOR_BYTES];
        b[0..4].copy_from_slice(&self.len_bytes.to_be_bytes());
        b[4..8].copy_from_slice(&self.flags.to_be_bytes());
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; BLOCK_DESCRIPTOR_BYTES] = exact(bytes, "block descriptor")?;
        Ok(Self {
            len_bytes: u32_at(&b, 0),
            flags: u32_at(&b, 4),
        })
    }
}
