//! The client side of the fixed-newstyle handshake: read the greeting, send `NBD_OPT_GO`
//! asking for the export's size constraints, read the option replies up to the final ACK.
//! What the server tells is an [`ExportInfo`]; the connection is then in the transmission
//! phase.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::connection::Connection;
use super::protocol::{
    ClientFlags, ExportRequest, Greeting, Info, OptionHeader, OptionReplyHeader, GREETING_BYTES,
    NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE, NBD_OPT_GO, NBD_REP_ACK, NBD_REP_INFO, NBD_STRING_BYTES_MAX,
    OPTION_REPLY_BYTES_MAX, OPTION_REPLY_HEADER_BYTES,
};
use super::sizes::BlockSizes;

/// What `NBD_OPT_GO` told about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExportInfo {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    pub block_sizes: BlockSizes,
}

/// The fixed-newstyle handshake up to the transmission phase, all of it within `timeout`
/// (each read and write is bounded by what is left, so a server that trickles replies
/// cannot hold it longer); returns what the server told about the export. Leaves the
/// socket's timeouts set: the caller sets its own.
///
/// `NBD_OPT_GO` asks for `NBD_INFO_BLOCK_SIZE`, which commits the client to the size
/// constraints the server sends: a caller that cannot honour them (see
/// [`BlockSizes::check_usable`]) must end the session ([`Connection::disconnect`]) without
/// a request.
pub(crate) fn handshake(
    conn: &mut Connection,
    export: &str,
    timeout: Duration,
) -> Result<ExportInfo, String> {
    let deadline = Deadline {
        at: Instant::now() + timeout,
        timeout,
    };
    deadline.bound(conn)?;
    let mut greeting = [0u8; GREETING_BYTES];
    conn.read_exact(&mut greeting)
        .map_err(greeting_read_failure)?;
    let server_flags = Greeting::decode(&greeting)
        .map_err(|_| "not a newstyle NBD server (bad magic)")?
        .handshake_flags;
    if server_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err("the server does not speak fixed newstyle".into());
    }
    let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if server_flags & NBD_FLAG_NO_ZEROES != 0 {
        client_flags |= NBD_FLAG_C_NO_ZEROES;
    }
    let data = ExportRequest {
        export_name: export.to_string(),
        info_types: vec![NBD_INFO_BLOCK_SIZE],
    }
    .encode()
    .map_err(|_| "the export name is too long")?;
    let header = OptionHeader {
        option: NBD_OPT_GO,
        // The name is at most NBD_STRING_BYTES_MAX bytes, so the length fits.
        len_bytes: data.len() as u32,
    };
    let mut msg = ClientFlags {
        flags: client_flags,
    }
    .encode()
    .to_vec();
    msg.extend_from_slice(&header.encode());
    msg.extend_from_slice(&data);
    deadline.bound(conn)?;
    conn.write_all(&msg)
        .map_err(|e| format!("sending NBD_OPT_GO: {e}"))?;
    read_go_replies(conn, &deadline)
}

/// The deadline of a handshake.
struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    /// Sets the socket's timeouts to what is left, or fails once nothing is.
    fn bound(&self, conn: &Connection) -> Result<(), String> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("the handshake took longer than {:?}", self.timeout));
        }
        conn.set_timeout(Some(left))
            .map_err(|e| format!("setting a socket timeout: {e}"))
    }
}

/// Why no greeting came. A server at its connection limit accepts and then says nothing:
/// the reason says so instead of only "Resource temporarily unavailable".
fn greeting_read_failure(e: std::io::Error) -> String {
    if matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ) {
        format!(
            "no greeting from the server ({e}): it may be at its connection limit \
             (qemu-nbd serves one client unless started with -e N; ferry needs one \
             connection per volume queue plus one for a migration job)"
        )
    } else {
        format!("reading the greeting: {e}")
    }
}

/// Reads option replies to `NBD_OPT_GO` until the final ACK or an error, bounding each by
/// what is left of the handshake. Information types other than `NBD_INFO_EXPORT` and
/// `NBD_INFO_BLOCK_SIZE` are ignored, as the protocol asks; without `NBD_INFO_BLOCK_SIZE`
/// the protocol's default constraints apply.
fn read_go_replies(conn: &mut Connection, deadline: &Deadline) -> Result<ExportInfo, String> {
    let mut export = None;
    let mut block_sizes = BlockSizes::DEFAULT;
    loop {
        deadline.bound(conn)?;
        let (reply, data) = read_option_reply(conn)?;
        if reply.is_error() {
            return Err(format!(
                "the server refused the export (reply {:#x}): {}",
                reply.reply_type,
                server_text(&data)
            ));
        }
        match reply.reply_type {
            NBD_REP_INFO => match Info::decode(&data).map_err(|e| e.to_string())? {
                Info::Export(info) => export = Some(info),
                Info::BlockSize(info) => block_sizes = BlockSizes::from_info(info)?,
                Info::Other { .. } => {}
            },
            NBD_REP_ACK => {
                let info =
                    export.ok_or_else(|| "the server sent no export information".to_string())?;
                return Ok(ExportInfo {
                    size_bytes: info.size_bytes,
                    transmission_flags: info.transmission_flags,
                    block_sizes,
                });
            }
            other => return Err(format!("unexpected option reply {other}")),
        }
    }
}

/// Reads one option reply, its data bounded by [`OPTION_REPLY_BYTES_MAX`] before anything
/// is allocated for it.
fn read_option_reply(conn: &mut Connection) -> Result<(OptionReplyHeader, Vec<u8>), String> {
    let mut head = [0u8; OPTION_REPLY_HEADER_BYTES];
    conn.read_exact(&mut head)
        .map_err(|e| format!("reading an option reply: {e}"))?;
    let reply = OptionReplyHeader::decode(&head).map_err(|_| "bad option reply magic")?;
    if reply.len_bytes > OPTION_REPLY_BYTES_MAX {
        return Err(format!(
            "option reply of {} bytes is too long",
            reply.len_bytes
        ));
    }
    let mut data = vec![0u8; reply.len_bytes as usize];
    conn.read_exact(&mut data)
        .map_err(|e| format!("reading an option reply: {e}"))?;
    Ok((reply, data))
}

/// A server's message as it may go into errors, logs and status: at most the protocol's
/// limit for strings, control characters escaped.
pub(crate) fn server_text(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(NBD_STRING_BYTES_MAX)];
    let mut text: String = String::from_utf8_lossy(shown).escape_debug().collect();
    if bytes.len() > shown.len() {
        text.push_str("...");
    }
    text
}
