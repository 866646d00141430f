//! The option-haggling messages a server sends, and the option data only a server reads:
//! metadata-context queries and replies (`NBD_OPT_LIST_META_CONTEXT`,
//! `NBD_OPT_SET_META_CONTEXT`), the entries of `NBD_OPT_LIST`, the string information
//! blocks of `NBD_OPT_INFO`/`NBD_OPT_GO`, and the reply to `NBD_OPT_EXPORT_NAME`.
//!
//! Every string is bounded by [`NBD_STRING_BYTES_MAX`] before it is copied; the caller
//! bounds the option data as a whole before reading it.

use super::{DecodeError, EncodeError, NBD_INFO_DESCRIPTION, NBD_INFO_NAME, NBD_STRING_BYTES_MAX};

/// Option: list the metadata contexts an export offers.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select the metadata contexts `NBD_CMD_BLOCK_STATUS` reports.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Option reply: one metadata context ([`MetaContextReply`]).
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Error reply: the option is not available on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = super::NBD_REP_FLAG_ERROR | 4;
/// Error reply: the request or the reply would be too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = super::NBD_REP_FLAG_ERROR | 9;
/// The one metadata context the protocol defines: which extents are allocated.
pub const NBD_META_CONTEXT_BASE_ALLOCATION: &str = "base:allocation";

/// The reply to `NBD_OPT_EXPORT_NAME` without the 124 zero bytes (export size and
/// transmission flags).
pub const EXPORT_NAME_REPLY_BYTES: usize = 10;
/// The zero bytes that follow it unless both sides agreed on `NBD_FLAG_C_NO_ZEROES`.
pub const EXPORT_NAME_REPLY_ZEROES: usize = 124;

fn invalid(what: &'static str, reason: &'static str) -> DecodeError {
    DecodeError::Invalid { what, reason }
}

/// Splits a 32-bit length and that many bytes of UTF-8 string (at most 4096 bytes) off the
/// front of `bytes`.
fn take_string<'a>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<(&'a str, &'a [u8]), DecodeError> {
    let (len_field, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or(DecodeError::TooShort {
            what,
            len_bytes: bytes.len(),
            min_bytes: 4,
        })?;
    let len = u32::from_be_bytes(*len_field) as usize;
    if len > NBD_STRING_BYTES_MAX {
        return Err(invalid(what, "a string is longer than 4096 bytes"));
    }
    let (text, rest) = rest
        .split_at_checked(len)
        .ok_or(invalid(what, "a string runs past the data"))?;
    let text = std::str::from_utf8(text).map_err(|_| invalid(what, "a string is not UTF-8"))?;
    Ok((text, rest))
}

fn put_string(out: &mut Vec<u8>, text: &str) -> Result<(), EncodeError> {
    if text.len() > NBD_STRING_BYTES_MAX {
        return Err(EncodeError::NameTooLong {
            len_bytes: text.len(),
        });
    }
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    Ok(())
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: an export and
/// the queries that select contexts on it (none: every context, for a list).
///
/// ```text
/// C: 32 bits  length of the export name
/// C: string   export name
/// C: 32 bits  number of queries
/// C: per query: 32 bits length, string (e.g. "base:allocation" or "base:")
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export_name: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// The largest number of queries a server takes in one option: each is at least 4 bytes
    /// of the option data, which the caller bounded, so this bounds the list it allocates.
    pub const QUERIES_MAX: usize = 128;

    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut b = Vec::new();
        put_string(&mut b, &self.export_name)?;
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for query in &self.queries {
            put_string(&mut b, query)?;
        }
        Ok(b)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "metadata context option";
        let (export_name, rest) = take_string(bytes, WHAT)?;
        let (count, mut rest) = rest
            .split_first_chunk::<4>()
            .ok_or(invalid(WHAT, "the query count is missing"))?;
        let count = u32::from_be_bytes(*count) as usize;
        if count > Self::QUERIES_MAX {
            return Err(invalid(WHAT, "too many queries"));
        }
        let mut queries = Vec::with_capacity(count);
        for _ in 0..count {
            let (query, tail) = take_string(rest, WHAT)?;
            queries.push(query.to_string());
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(invalid(WHAT, "bytes after the last query"));
        }
        Ok(Self {
            export_name: export_name.to_string(),
            queries,
        })
    }
}

/// The data of an `NBD_REP_META_CONTEXT`: the id `NBD_CMD_BLOCK_STATUS` replies carry for
/// a context (0 in reply to a list), and its name.
///
/// ```text
/// S: 32 bits  metadata context id
/// S: string   its name (the rest of the reply data)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextReply {
    pub context_id: u32,
    pub name: String,
}

impl MetaContextReply {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        if self.name.len() > NBD_STRING_BYTES_MAX {
            return Err(EncodeError::NameTooLong {
                len_bytes: self.name.len(),
            });
        }
        let mut b = Vec::with_capacity(4 + self.name.len());
        b.extend_from_slice(&self.context_id.to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        Ok(b)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "NBD_REP_META_CONTEXT";
        let (id, name) = bytes
            .split_first_chunk::<4>()
            .ok_or(DecodeError::TooShort {
                what: WHAT,
                len_bytes: bytes.len(),
                min_bytes: 4,
            })?;
        if name.len() > NBD_STRING_BYTES_MAX {
            return Err(invalid(WHAT, "the name is longer than 4096 bytes"));
        }
        let name = std::str::from_utf8(name).map_err(|_| invalid(WHAT, "the name is not UTF-8"))?;
        Ok(Self {
            context_id: u32::from_be_bytes(*id),
            name: name.to_string(),
        })
    }
}

/// The data of an `NBD_REP_SERVER` (one export of `NBD_OPT_LIST`): its name, then a
/// description for humans in the rest of the data.
///
/// ```text
/// S: 32 bits  length of the name
/// S: string   export name
/// S: string   description (the rest of the reply data, may be empty)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListEntry {
    pub name: String,
    pub description: String,
}

impl ExportListEntry {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut b = Vec::with_capacity(4 + self.name.len() + self.description.len());
        put_string(&mut b, &self.name)?;
        if self.description.len() > NBD_STRING_BYTES_MAX {
            return Err(EncodeError::NameTooLong {
                len_bytes: self.description.len(),
            });
        }
        b.extend_from_slice(self.description.as_bytes());
        Ok(b)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "NBD_REP_SERVER";
        let (name, rest) = take_string(bytes, WHAT)?;
        if rest.len() > NBD_STRING_BYTES_MAX {
            return Err(invalid(WHAT, "the description is longer than 4096 bytes"));
        }
        let description =
            std::str::from_utf8(rest).map_err(|_| invalid(WHAT, "the description is not UTF-8"))?;
        Ok(Self {
            name: name.to_string(),
            description: description.to_string(),
        })
    }
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`, the data of an `NBD_REP_INFO`: a string.
///
/// ```text
/// S: 16 bits  NBD_INFO_NAME (1) or NBD_INFO_DESCRIPTION (2)
/// S: string   the export's canonical name, or its description (the rest of the data)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoText {
    pub info_type: u16,
    pub text: String,
}

impl InfoText {
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        if self.text.len() > NBD_STRING_BYTES_MAX {
            return Err(EncodeError::NameTooLong {
                len_bytes: self.text.len(),
            });
        }
        let mut b = Vec::with_capacity(2 + self.text.len());
        b.extend_from_slice(&self.info_type.to_be_bytes());
        b.extend_from_slice(self.text.as_bytes());
        Ok(b)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "NBD_INFO_NAME/NBD_INFO_DESCRIPTION";
        let (info_type, text) = bytes
            .split_first_chunk::<2>()
            .ok_or(DecodeError::TooShort {
                what: WHAT,
                len_bytes: bytes.len(),
                min_bytes: 2,
            })?;
        let info_type = u16::from_be_bytes(*info_type);
        if info_type != NBD_INFO_NAME && info_type != NBD_INFO_DESCRIPTION {
            return Err(invalid(WHAT, "another information type"));
        }
        if text.len() > NBD_STRING_BYTES_MAX {
            return Err(invalid(WHAT, "the text is longer than 4096 bytes"));
        }
        let text = std::str::from_utf8(text).map_err(|_| invalid(WHAT, "the text is not UTF-8"))?;
        Ok(Self {
            info_type,
            text: text.to_string(),
        })
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME` (no option reply header: the server enters the
/// transmission phase).
///
/// ```text
/// S: 64 bits  size of the export in bytes
/// S: 16 bits  transmission flags
/// S: 124 bytes of zeroes, unless NBD_FLAG_C_NO_ZEROES was agreed
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size_bytes: u64,
    pub transmission_flags: u16,
}

impl ExportNameReply {
    /// All [`EXPORT_NAME_REPLY_BYTES`] + [`EXPORT_NAME_REPLY_ZEROES`] bytes; a server that
    /// agreed on no zeroes sends only the first [`EXPORT_NAME_REPLY_BYTES`].
    pub fn encode(&self) -> [u8; EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_REPLY_ZEROES] {
        let mut b = [0u8; EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_REPLY_ZEROES];
        b[0..8].copy_from_slice(&self.size_bytes.to_be_bytes());
        b[8..10].copy_from_slice(&self.transmission_flags.to_be_bytes());
        b
    }

    /// Parses the first [`EXPORT_NAME_REPLY_BYTES`] bytes (the zeroes, if any, are the
    /// reader's to skip).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; EXPORT_NAME_REPLY_BYTES] =
            bytes.try_into().map_err(|_| DecodeError::Length {
                what: "NBD_OPT_EXPORT_NAME reply",
                len_bytes: bytes.len(),
                expected_bytes: EXPORT_NAME_REPLY_BYTES,
            })?;
        let mut size = [0u8; 8];
        size.copy_from_slice(&b[0..8]);
        Ok(Self {
            size_bytes: u64::from_be_bytes(size),
            transmission_flags: u16::from_be_bytes([b[8], b[9]]),
        })
    }
}
