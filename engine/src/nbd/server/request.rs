//! Checks one transmission-phase request against what the connection negotiated, as a pure
//! function from a decoded [`RequestHeader`] and the export's [`ExportLimits`] to the
//! [`Command`] to run or the [`Refusal`] to answer with (the fuzz target
//! `nbd_server_request` feeds it every header and limits it can make).
//!
//! The errors follow the NBD protocol ("Request types", "Error values") as qemu's server
//! answers them: `EINVAL` for an unknown command or flag, a misaligned, empty or oversized
//! range, a read or trim past the end; `ENOSPC` for a write or write-zeroes past the end;
//! `EPERM` for a change to a read-only export. A write's payload follows its header
//! whatever the verdict, so a refused write names the bytes to read and drop before the
//! error is sent; a write whose payload exceeds the maximum payload cannot be skipped
//! safely (the client may not even send it) and closes the connection.

use crate::nbd::protocol::{
    RequestHeader, NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM,
    NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_EPERM,
};

/// What a connection's requests are checked against: the export as the handshake
/// described it, and what the client negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    pub size_bytes: u64,
    /// Every offset and length is a multiple of this (the advertised minimum block size,
    /// a power of two).
    pub block_bytes: u32,
    /// The largest read or write payload (the advertised maximum payload).
    pub payload_bytes_max: u32,
    pub read_only: bool,
    /// `NBD_OPT_STRUCTURED_REPLY` was agreed (and so `NBD_CMD_FLAG_DF` offered).
    pub structured_replies: bool,
    /// A metadata context was selected, so `NBD_CMD_BLOCK_STATUS` may be sent.
    pub block_status: bool,
}

/// A request that passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset_bytes: u64,
        len_bytes: u32,
    },
    /// `len_bytes` of payload follow the header.
    Write {
        offset_bytes: u64,
        len_bytes: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset_bytes: u64,
        len_bytes: u32,
        fua: bool,
    },
    WriteZeroes {
        offset_bytes: u64,
        len_bytes: u32,
        fua: bool,
        /// `NBD_CMD_FLAG_NO_HOLE`: the range must stay allocated.
        no_hole: bool,
    },
    BlockStatus {
        offset_bytes: u64,
        len_bytes: u32,
        /// `NBD_CMD_FLAG_REQ_ONE`: one descriptor is enough.
        req_one: bool,
    },
    /// `NBD_CMD_DISC`: no reply; the server finishes what is in flight and closes.
    Disconnect,
}

impl Command {
    /// True for the commands that change the export (fenced exports refuse them).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Self::Write { .. } | Self::Trim { .. } | Self::WriteZeroes { .. }
        )
    }
}

/// Why a request is not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Read and drop `payload_bytes` after the header, then reply with `error`.
    Error {
        error: u32,
        payload_bytes: u32,
        reason: &'static str,
    },
    /// End the connection: the stream cannot be followed past this request.
    Close { reason: &'static str },
}

/// The flags each command may carry (`NBD_CMD_FLAG_FUA` is allowed on every command, as
/// the protocol lets a client set it anywhere and a server ignore it where it means
/// nothing).
fn allowed_flags(command: u16, limits: &ExportLimits) -> u16 {
    let specific = match command {
        NBD_CMD_READ if limits.structured_replies => NBD_CMD_FLAG_DF,
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_NO_HOLE,
        NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
        _ => 0,
    };
    NBD_CMD_FLAG_FUA | specific
}

/// Checks `header` against `limits` (see the module comment for the errors).
pub fn validate(header: &RequestHeader, limits: &ExportLimits) -> Result<Command, Refusal> {
    let is_write = header.command == NBD_CMD_WRITE;
    if is_write && header.len_bytes > limits.payload_bytes_max {
        return Err(Refusal::Close {
            reason: "a write payload larger than the maximum payload",
        });
    }
    let payload_bytes = if is_write { header.len_bytes } else { 0 };
    let refuse = |error, reason| {
        Err(Refusal::Error {
            error,
            payload_bytes,
            reason,
        })
    };
    if header.flags & !allowed_flags(header.command, limits) != 0 {
        return refuse(NBD_EINVAL, "a flag this command does not take");
    }
    let fua = header.flags & NBD_CMD_FLAG_FUA != 0;
    match header.command {
        NBD_CMD_DISC => return Ok(Command::Disconnect),
        NBD_CMD_FLUSH => return Ok(Command::Flush),
        NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES => {}
        NBD_CMD_BLOCK_STATUS if limits.block_status => {}
        NBD_CMD_BLOCK_STATUS => return refuse(NBD_EINVAL, "block status without a context"),
        _ => return refuse(NBD_EINVAL, "an unknown command"),
    }
    let changes = header.command != NBD_CMD_READ && header.command != NBD_CMD_BLOCK_STATUS;
    if changes && limits.read_only {
        return refuse(NBD_EPERM, "a change to a read-only export");
    }
    let (offset_bytes, len_bytes) = (header.offset_bytes, header.len_bytes);
    let past_end = offset_bytes
        .checked_add(u64::from(len_bytes))
        .is_none_or(|end| end > limits.size_bytes);
    if past_end {
        let error = match header.command {
            NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES => NBD_ENOSPC,
            _ => NBD_EINVAL,
        };
        return refuse(error, "a range past the end of the export");
    }
    if len_bytes == 0 {
        return refuse(NBD_EINVAL, "an empty range");
    }
    let block = u64::from(limits.block_bytes.max(1));
    if !offset_bytes.is_multiple_of(block) || !u64::from(len_bytes).is_multiple_of(block) {
        return refuse(NBD_EINVAL, "a range not in whole blocks");
    }
    Ok(match header.command {
        NBD_CMD_READ if len_bytes > limits.payload_bytes_max => {
            return refuse(NBD_EINVAL, "a read larger than the maximum payload")
        }
        NBD_CMD_READ => Command::Read {
            offset_bytes,
            len_bytes,
        },
        NBD_CMD_WRITE => Command::Write {
            offset_bytes,
            len_bytes,
            fua,
        },
        NBD_CMD_TRIM => Command::Trim {
            offset_bytes,
            len_bytes,
            fua,
        },
        NBD_CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset_bytes,
            len_bytes,
            fua,
            no_hole: header.flags & NBD_CMD_FLAG_NO_HOLE != 0,
        },
        _ => Command::BlockStatus {
            offset_bytes,
            len_bytes,
            req_one: header.flags & NBD_CMD_FLAG_REQ_ONE != 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::protocol::{NBD_CMD_CACHE, NBD_CMD_FLAG_FAST_ZERO};

    const LIMITS: ExportLimits = ExportLimits {
        size_bytes: 1 << 20,
        block_bytes: 512,
        payload_bytes_max: 32 << 20,
        read_only: false,
        structured_replies: true,
        block_status: true,
    };

    fn header(command: u16, flags: u16, offset_bytes: u64, len_bytes: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 1,
            offset_bytes,
            len_bytes,
        }
    }

    fn error_of(result: Result<Command, Refusal>) -> Option<(u32, u32)> {
        match result {
            Err(Refusal::Error {
                error,
                payload_bytes,
                ..
            }) => Some((error, payload_bytes)),
            _ => None,
        }
    }

    #[test]
    fn accepts_well_formed_requests() {
        let ok = |h| validate(&h, &LIMITS);
        assert_eq!(
            ok(header(NBD_CMD_READ, NBD_CMD_FLAG_DF, 4096, 4096)),
            Ok(Command::Read {
                offset_bytes: 4096,
                len_bytes: 4096
            })
        );
        assert_eq!(
            ok(header(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0, 1 << 20)),
            Ok(Command::Write {
                offset_bytes: 0,
                len_bytes: 1 << 20,
                fua: true
            })
        );
        assert_eq!(
            ok(header(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 512, 512)),
            Ok(Command::WriteZeroes {
                offset_bytes: 512,
                len_bytes: 512,
                fua: false,
                no_hole: true
            })
        );
        assert_eq!(
            ok(header(
                NBD_CMD_BLOCK_STATUS,
                NBD_CMD_FLAG_REQ_ONE,
                0,
                1 << 20
            )),
            Ok(Command::BlockStatus {
                offset_bytes: 0,
                len_bytes: 1 << 20,
                req_one: true
            })
        );
        assert_eq!(ok(header(NBD_CMD_FLUSH, 0, 0, 0)), Ok(Command::Flush));
        assert_eq!(ok(header(NBD_CMD_DISC, 0, 0, 0)), Ok(Command::Disconnect));
    }

    #[test]
    fn refuses_with_the_errors_the_protocol_names() {
        let check = |h: RequestHeader, limits: &ExportLimits, want: (u32, u32)| {
            assert_eq!(error_of(validate(&h, limits)), Some(want), "{h:?}");
        };
        let ro = ExportLimits {
            read_only: true,
            ..LIMITS
        };
        check(header(NBD_CMD_WRITE, 0, 0, 4096), &ro, (NBD_EPERM, 4096));
        check(header(NBD_CMD_TRIM, 0, 0, 4096), &ro, (NBD_EPERM, 0));
        check(header(NBD_CMD_WRITE_ZEROES, 0, 0, 512), &ro, (NBD_EPERM, 0));
        check(
            header(NBD_CMD_WRITE, 0, 1 << 20, 512),
            &LIMITS,
            (NBD_ENOSPC, 512),
        );
        check(
            header(NBD_CMD_WRITE_ZEROES, 0, 1 << 20, 512),
            &LIMITS,
            (NBD_ENOSPC, 0),
        );
        check(
            header(NBD_CMD_READ, 0, (1 << 20) - 512, 1024),
            &LIMITS,
            (NBD_EINVAL, 0),
        );
        check(
            header(NBD_CMD_TRIM, 0, u64::MAX, 512),
            &LIMITS,
            (NBD_EINVAL, 0),
        );
        check(header(NBD_CMD_READ, 0, 100, 512), &LIMITS, (NBD_EINVAL, 0));
        check(header(NBD_CMD_WRITE, 0, 0, 100), &LIMITS, (NBD_EINVAL, 100));
        check(header(NBD_CMD_READ, 0, 0, 0), &LIMITS, (NBD_EINVAL, 0));
        check(header(NBD_CMD_CACHE, 0, 0, 512), &LIMITS, (NBD_EINVAL, 0));
        check(header(99, 0, 0, 512), &LIMITS, (NBD_EINVAL, 0));
        check(
            header(NBD_CMD_READ, NBD_CMD_FLAG_NO_HOLE, 0, 512),
            &LIMITS,
            (NBD_EINVAL, 0),
        );
        check(
            header(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 512),
            &LIMITS,
            (NBD_EINVAL, 0),
        );
        let simple = ExportLimits {
            structured_replies: false,
            block_status: false,
            ..LIMITS
        };
        check(
            header(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512),
            &simple,
            (NBD_EINVAL, 0),
        );
        check(
            header(NBD_CMD_BLOCK_STATUS, 0, 0, 512),
            &simple,
            (NBD_EINVAL, 0),
        );
        let small = ExportLimits {
            size_bytes: 64 << 20,
            payload_bytes_max: 1 << 20,
            ..LIMITS
        };
        check(header(NBD_CMD_READ, 0, 0, 2 << 20), &small, (NBD_EINVAL, 0));
        // Trims and write-zeroes carry no payload: the payload bound does not apply.
        assert!(validate(&header(NBD_CMD_TRIM, 0, 0, 2 << 20), &small).is_ok());
    }

    #[test]
    fn an_oversized_write_payload_closes_the_connection() {
        let h = header(NBD_CMD_WRITE, 0, 0, (32 << 20) + 512);
        assert!(matches!(validate(&h, &LIMITS), Err(Refusal::Close { .. })));
        let ro = ExportLimits {
            read_only: true,
            ..LIMITS
        };
        assert!(matches!(validate(&h, &ro), Err(Refusal::Close { .. })));
    }
}
