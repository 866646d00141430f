//! The NBD wire protocol: every constant ferry uses, and each message as a type with pure
//! `encode`/`decode` functions over byte slices, for both sides of a connection (a client
//! encodes requests and options and decodes replies; a server does the opposite).
//!
//! The layouts follow the NBD protocol (`doc/proto.md` of NetworkBlockDevice/nbd); every
//! field is big-endian ("network byte order"). The fixed-newstyle handshake and simple
//! replies are here; what only a server sends is in [`options`] (metadata contexts, export
//! lists, `NBD_OPT_EXPORT_NAME`'s reply) and [`structured`] (structured reply chunks and
//! block status). ferry's client negotiates neither structured replies nor extended
//! headers; its server offers structured replies and no extended headers. Nothing here
//! does I/O, allocates on the transmission path, or panics on bytes a peer sent: a message
//! that does not fit its layout is a [`DecodeError`]. `tests/protocol_golden.rs` pins every
//! layout against bytes written out by hand from the protocol text.

mod options;
mod structured;

pub use options::*;
pub use structured::*;

/// The first 8 bytes a server sends: ASCII `NBDMAGIC`.
pub const NBD_INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// Ends the newstyle greeting and starts every option request: ASCII `IHAVEOPT`.
pub const NBD_OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every request of the transmission phase.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts every simple reply of the transmission phase.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle (it answers options it does not know).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the server leaves out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: select an export and enter transmission (no option reply; the oldest form).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: the client ends the session.
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list the exports (`NBD_REP_SERVER` replies).
pub const NBD_OPT_LIST: u32 = 3;
/// Option: upgrade the connection to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: describe an export (as `NBD_OPT_GO`, without entering transmission).
pub const NBD_OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission on it.
pub const NBD_OPT_GO: u32 = 7;
/// Option: ask for structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply: the option succeeded (the last reply to it).
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: one export of an `NBD_OPT_LIST`.
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: one information block of `NBD_OPT_INFO` or `NBD_OPT_GO` ([`Info`]).
pub const NBD_REP_INFO: u32 = 3;
/// The bit every error reply type has set; its data is a message for humans.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// Error reply: the server does not know the option.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// Error reply: the server's policy forbids the option.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// Error reply: the option is malformed.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// Error reply: the server wants TLS first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// Error reply: no such export.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// Error reply: the server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// Error reply: the server serves only clients that ask for `NBD_INFO_BLOCK_SIZE`.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;

/// Information type: the export's size and transmission flags ([`InfoExport`]).
pub const NBD_INFO_EXPORT: u16 = 0;
/// Information type: the export's canonical name.
pub const NBD_INFO_NAME: u16 = 1;
/// Information type: a description of the export for humans.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Information type: the export's size constraints ([`InfoBlockSize`]).
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the other flags are valid (always set).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: a flush on one connection covers writes completed on every other
/// connection to the same export.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
/// The client ends the session; there is no reply, offset and length are zero.
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: reply only once the command's data is durable.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag of `NBD_CMD_WRITE_ZEROES`: keep the range allocated.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// The error values of a reply (NBD protocol, "Error values"): Linux's errno values.
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// The longest string the protocol allows (export names, error messages).
pub const NBD_STRING_BYTES_MAX: usize = 4096;
/// The longest option reply a client reads (a server's error message, an information
/// block): what it allocates for one is bounded before it reads the data.
pub const OPTION_REPLY_BYTES_MAX: u32 = 64 * 1024;

pub const GREETING_BYTES: usize = 18;
pub const CLIENT_FLAGS_BYTES: usize = 4;
pub const OPTION_HEADER_BYTES: usize = 16;
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
pub const INFO_EXPORT_BYTES: usize = 12;
pub const INFO_BLOCK_SIZE_BYTES: usize = 14;
pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_BYTES: usize = 16;

/// Why bytes are not the message they should be. Carries no allocation, so decoding costs
/// nothing on the transmission path even when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what} of {len_bytes} bytes ({expected_bytes} expected)")]
    Length {
        what: &'static str,
        len_bytes: usize,
        expected_bytes: usize,
    },
    #[error("{what} of {len_bytes} bytes (at least {min_bytes} expected)")]
    TooShort {
        what: &'static str,
        len_bytes: usize,
        min_bytes: usize,
    },
    #[error("bad {what} magic {magic:#x}")]
    BadMagic { what: &'static str, magic: u64 },
    #[error("{what}: {reason}")]
    Invalid {
        what: &'static str,
        reason: &'static str,
    },
}

/// Why a message cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the export name is too long ({len_bytes} bytes, at most {NBD_STRING_BYTES_MAX})")]
    NameTooLong { len_bytes: usize },
}

/// `bytes` as an array of exactly `N` bytes, or why not.
fn exact<const N: usize>(bytes: &[u8], what: &'static str) -> Result<[u8; N], DecodeError> {
    bytes.try_into().map_err(|_| DecodeError::Length {
        what,
        len_bytes: bytes.len(),
        expected_bytes: N,
    })
}

fn u16_at<const N: usize>(b: &[u8; N], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at<const N: usize>(b: &[u8; N], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at<const N: usize>(b: &[u8; N], at: usize) -> u64 {
    (u64::from(u32_at(b, at)) << 32) | u64::from(u32_at(b, at + 4))
}

/// The server's greeting in newstyle negotiation.
///
/// ```text
/// S: 64 bits  NBD_INIT_MAGIC ("NBDMAGIC")
/// S: 64 bits  NBD_OPTS_MAGIC ("IHAVEOPT")
/// S: 16 bits  handshake flags
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub handshake_flags: u16,
}

impl Greeting {
    pub fn encode(&self) -> [u8; GREETING_BYTES] {
        let mut b = [0u8; GREETING_BYTES];
        b[0..8].copy_from_slice(&NBD_INIT_MAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
        b[16..18].copy_from_slice(&self.handshake_flags.to_be_bytes());
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; GREETING_BYTES] = exact(bytes, "greeting")?;
        for (at, magic) in [(0, NBD_INIT_MAGIC), (8, NBD_OPTS_MAGIC)] {
            let found = u64_at(&b, at);
            if found != magic {
                return Err(DecodeError::BadMagic {
                    what: "greeting",
                    magic: found,
                });
            }
        }
        Ok(Self {
            handshake_flags: u16_at(&b, 16),
        })
    }
}

/// The client's answer to the greeting.
///
/// ```text
/// C: 32 bits  client flags
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub flags: u32,
}

impl ClientFlags {
    pub fn encode(&self) -> [u8; CLIENT_FLAGS_BYTES] {
        self.flags.to_be_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(Self {
            flags: u32::from_be_bytes(exact(bytes, "client flags")?),
        })
    }
}

/// The head of an option request; `len_bytes` of option data follow it.
///
/// ```text
/// C: 64 bits  NBD_OPTS_MAGIC ("IHAVEOPT")
/// C: 32 bits  option (NBD_OPT_*)
/// C: 32 bits  length of the option data
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len_bytes: u32,
}

impl OptionHeader {
    pub fn encode(&self) -> [u8; OPTION_HEADER_BYTES] {
        let mut b = [0u8; OPTION_HEADER_BYTES];
        b[0..8].copy_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.len_bytes.to_be_bytes());
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; OPTION_HEADER_BYTES] = exact(bytes, "option")?;
        let magic = u64_at(&b, 0);
        if magic != NBD_OPTS_MAGIC {
            return Err(DecodeError::BadMagic {
                what: "option",
                magic,
            });
        }
        Ok(Self {
            option: u32_at(&b, 8),
            len_bytes: u32_at(&b, 12),
        })
    }
}

/// The data of `NBD_OPT_GO` and `NBD_OPT_INFO`: which export, and which information
/// blocks the client asks for (`NBD_INFO_*`).
///
/// ```text
/// C: 32 bits  length of the export name
/// C: string   export name (UTF-8, at most 4096 bytes)
/// C: 16 bits  number of information requests
/// C: 16 bits  each information type requested
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub export_name: String,
    pub info_types: Vec<u16>,
}

impl ExportRequest {
    /// The option data; refuses a name longer than the protocol allows.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let name = self.export_name.as_bytes();
        if name.len() > NBD_STRING_BYTES_MAX {
            return Err(EncodeError::NameTooLong {
                len_bytes: name.len(),
            });
        }
        // At most 2^16 - 1 requests go into the count; nobody asks for more than a few.
        let count = self.info_types.len().min(usize::from(u16::MAX));
        let mut b = Vec::with_capacity(4 + name.len() + 2 + 2 * count);
        b.extend_from_slice(&(name.len() as u32).to_be_bytes());
        b.extend_from_slice(name);
        b.extend_from_slice(&(count as u16).to_be_bytes());
        for info_type in &self.info_types[..count] {
            b.extend_from_slice(&info_type.to_be_bytes());
        }
        Ok(b)
    }

    /// Parses option data whose length the option header gave (and the reader bounded).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "NBD_OPT_GO data";
        let invalid = |reason| DecodeError::Invalid { what: WHAT, reason };
        let (len_field, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or(DecodeError::TooShort {
                what: WHAT,
                len_bytes: bytes.len(),
                min_bytes: 6,
            })?;
        let name_len = u32::from_be_bytes(*len_field) as usize;
        if name_len > NBD_STRING_BYTES_MAX {
            return Err(invalid("the export name is longer than 4096 bytes"));
        }
        let (name, rest) = rest
            .split_at_checked(name_len)
            .ok_or(invalid("the export name runs past the data"))?;
        let (count, rest) = rest
            .split_first_chunk::<2>()
            .ok_or(invalid("the information request count is missing"))?;
        if rest.len() != 2 * usize::from(u16::from_be_bytes(*count)) {
            return Err(invalid("the information requests do not match their count"));
        }
        let export_name = std::str::from_utf8(name)
            .map_err(|_| invalid("the export name is not UTF-8"))?
            .to_string();
        let info_types = rest
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Ok(Self {
            export_name,
            info_types,
        })
    }
}

/// The head of an option reply; `len_bytes` of reply data follow it.
///
/// ```text
/// S: 64 bits  NBD_REP_MAGIC (0x0003e889045565a9)
/// S: 32 bits  the option replied to
/// S: 32 bits  reply type (NBD_REP_*)
/// S: 32 bits  length of the reply data
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub len_bytes: u32,
}

impl OptionReplyHeader {
    pub fn encode(&self) -> [u8; OPTION_REPLY_HEADER_BYTES] {
        let mut b = [0u8; OPTION_REPLY_HEADER_BYTES];
        b[0..8].copy_from_slice(&NBD_REP_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.reply_type.to_be_bytes());
        b[16..20].copy_from_slice(&self.len_bytes.to_be_bytes());
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; OPTION_REPLY_HEADER_BYTES] = exact(bytes, "option reply")?;
        let magic = u64_at(&b, 0);
        if magic != NBD_REP_MAGIC {
            return Err(DecodeError::BadMagic {
                what: "option reply",
                magic,
            });
        }
        Ok(Self {
            option: u32_at(&b, 8),
            reply_type: u32_at(&b, 12),
            len_bytes: u32_at(&b, 16),
        })
    }

    /// True for every `NBD_REP_ERR_*` type.
    pub fn is_error(&self) -> bool {
        self.reply_type & NBD_REP_FLAG_ERROR != 0
    }
}

/// `NBD_INFO_EXPORT`, the data of an `NBD_REP_INFO`.
///
/// ```text
/// S: 16 bits  NBD_INFO_EXPORT (0)
/// S: 64 bits  size of the export in bytes
/// S: 16 bits  transmission flags (NBD_FLAG_*)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoExport {
    pub size_bytes: u64,
    pub transmission_flags: u16,
}

impl InfoExport {
    pub fn encode(&self) -> [u8; INFO_EXPORT_BYTES] {
        let mut b = [0u8; INFO_EXPORT_BYTES];
        b[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
        b[2..10].copy_from_slice(&self.size_bytes.to_be_bytes());
        b[10..12].copy_from_slice(&self.transmission_flags.to_be_bytes());
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; INFO_EXPORT_BYTES] = exact(bytes, "NBD_INFO_EXPORT")?;
        if u16_at(&b, 0) != NBD_INFO_EXPORT {
            return Err(DecodeError::Invalid {
                what: "NBD_INFO_EXPORT",
                reason: "another information type",
            });
        }
        Ok(Self {
            size_bytes: u64_at(&b, 2),
            transmission_flags: u16_at(&b, 10),
        })
    }
}

/// `NBD_INFO_BLOCK_SIZE`, the data of an `NBD_REP_INFO`: the export's size constraints as
/// sent (checking them against the protocol is [`super::sizes::BlockSizes`]'s job).
///
/// ```text
/// S: 16 bits  NBD_INFO_BLOCK_SIZE (3)
/// S: 32 bits  minimum block size
/// S: 32 bits  preferred block size
/// S: 32 bits  maximum payload size
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoBlockSize {
    pub block_bytes_min: u32,
    pub block_bytes_preferred: u32,
    pub payload_bytes_max: u32,
}

impl InfoBlockSize {
    pub fn encode(&self) -> [u8; INFO_BLOCK_SIZE_BYTES] {
        let mut b = [0u8; INFO_BLOCK_SIZE_BYTES];
        b[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        b[2..6].copy_from_slice(&self.block_bytes_min.to_be_bytes());
        b[6..10].copy_from_slice(&self.block_bytes_preferred.to_be_bytes());
        b[10..14].copy_from_slice(&self.payload_bytes_max.to_be_bytes());
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; INFO_BLOCK_SIZE_BYTES] = exact(bytes, "NBD_INFO_BLOCK_SIZE")?;
        if u16_at(&b, 0) != NBD_INFO_BLOCK_SIZE {
            return Err(DecodeError::Invalid {
                what: "NBD_INFO_BLOCK_SIZE",
                reason: "another information type",
            });
        }
        Ok(Self {
            block_bytes_min: u32_at(&b, 2),
            block_bytes_preferred: u32_at(&b, 6),
            payload_bytes_max: u32_at(&b, 10),
        })
    }
}

/// The data of one `NBD_REP_INFO`, by its leading 16-bit information type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    Export(InfoExport),
    BlockSize(InfoBlockSize),
    /// A type this module does not parse (a client ignores it, as the protocol asks).
    Other {
        info_type: u16,
    },
}

impl Info {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let Some(&[high, low]) = bytes.first_chunk::<2>() else {
            return Err(DecodeError::TooShort {
                what: "NBD_REP_INFO",
                len_bytes: bytes.len(),
                min_bytes: 2,
            });
        };
        Ok(match u16::from_be_bytes([high, low]) {
            NBD_INFO_EXPORT => Self::Export(InfoExport::decode(bytes)?),
            NBD_INFO_BLOCK_SIZE => Self::BlockSize(InfoBlockSize::decode(bytes)?),
            info_type => Self::Other { info_type },
        })
    }
}

/// A request of the transmission phase; a write's `len_bytes` of data follow it.
///
/// ```text
/// C: 32 bits  NBD_REQUEST_MAGIC (0x25609513)
/// C: 16 bits  command flags (NBD_CMD_FLAG_*)
/// C: 16 bits  type (NBD_CMD_*)
/// C: 64 bits  cookie (the protocol's "handle": echoed in the reply)
/// C: 64 bits  offset in bytes
/// C: 32 bits  length in bytes
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset_bytes: u64,
    pub len_bytes: u32,
}

impl RequestHeader {
    /// The `NBD_CMD_DISC` that ends a session.
    pub const DISCONNECT: Self = Self {
        flags: 0,
        command: NBD_CMD_DISC,
        cookie: 0,
        offset_bytes: 0,
        len_bytes: 0,
    };

    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset_bytes.to_be_bytes());
        b[24..28].copy_from_slice(&self.len_bytes.to_be_bytes());
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; REQUEST_HEADER_BYTES] = exact(bytes, "request")?;
        let magic = u32_at(&b, 0);
        if magic != NBD_REQUEST_MAGIC {
            return Err(DecodeError::BadMagic {
                what: "request",
                magic: u64::from(magic),
            });
        }
        Ok(Self {
            flags: u16_at(&b, 4),
            command: u16_at(&b, 6),
            cookie: u64_at(&b, 8),
            offset_bytes: u64_at(&b, 16),
            len_bytes: u32_at(&b, 24),
        })
    }
}

/// A simple reply; a successful read's data (the request's length) follow it.
///
/// ```text
/// S: 32 bits  NBD_SIMPLE_REPLY_MAGIC (0x67446698)
/// S: 32 bits  error (0, or NBD_E*)
/// S: 64 bits  cookie of the request
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_BYTES] {
        let mut b = [0u8; SIMPLE_REPLY_BYTES];
        b[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; SIMPLE_REPLY_BYTES] = exact(bytes, "reply")?;
        let magic = u32_at(&b, 0);
        if magic != NBD_SIMPLE_REPLY_MAGIC {
            return Err(DecodeError::BadMagic {
                what: "reply",
                magic: u64::from(magic),
            });
        }
        Ok(Self {
            error: u32_at(&b, 4),
            cookie: u64_at(&b, 8),
        })
    }
}

/// A reply's error as the errno a request fails with on this host. NBD's values are
/// Linux's; one the protocol does not define is `EIO`.
pub fn errno_from_wire(error: u32) -> i32 {
    match error {
        NBD_EPERM | NBD_EIO | NBD_ENOMEM | NBD_EINVAL | NBD_ENOSPC | NBD_EOVERFLOW
        | NBD_ENOTSUP | NBD_ESHUTDOWN => error as i32,
        _ => libc::EIO,
    }
}

/// An errno as the error a server replies with: `EDQUOT` and `EFBIG` become `ENOSPC` (as
/// the protocol asks), one the protocol does not define becomes `EIO`.
pub fn errno_to_wire(errno: i32) -> u32 {
    match errno {
        libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        _ => match u32::try_from(errno) {
            Ok(error) if errno_from_wire(error) == errno => error,
            _ => NBD_EIO,
        },
    }
}

/// The command's name in messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        NBD_CMD_READ => "read",
        NBD_CMD_WRITE => "write",
        NBD_CMD_FLUSH => "flush",
        NBD_CMD_TRIM => "trim",
        NBD_CMD_WRITE_ZEROES => "write-zeroes",
        NBD_CMD_DISC => "disconnect",
        NBD_CMD_BLOCK_STATUS => "block-status",
        NBD_CMD_CACHE => "cache",
        _ => "request",
    }
}

// NBD's error values are the host's errno values (ferry runs on Linux).
const _: () = assert!(NBD_EPERM as i32 == libc::EPERM);
const _: () = assert!(NBD_EIO as i32 == libc::EIO);
const _: () = assert!(NBD_ENOMEM as i32 == libc::ENOMEM);
const _: () = assert!(NBD_EINVAL as i32 == libc::EINVAL);
const _: () = assert!(NBD_ENOSPC as i32 == libc::ENOSPC);
const _: () = assert!(NBD_EOVERFLOW as i32 == libc::EOVERFLOW);
const _: () = assert!(NBD_ENOTSUP as i32 == libc::ENOTSUP);
const _: () = assert!(NBD_ESHUTDOWN as i32 == libc::ESHUTDOWN);
