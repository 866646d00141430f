//! The client side of the fixed-newstyle handshake: read the greeting, upgrade to TLS with
//! `NBD_OPT_STARTTLS` when the client has credentials, send `NBD_OPT_GO` asking for the
//! export's size constraints, read the option replies up to the final ACK. What the server
//! tells is an [`ExportInfo`]; the connection is then in the transmission phase.
//!
//! A client that asked for TLS never falls back to plaintext: a server that refuses
//! `NBD_OPT_STARTTLS` fails the handshake, with the server's reason.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::connection::Connection;
use super::protocol::{
    ClientFlags, ExportRequest, Greeting, Info, OptionHeader, OptionReplyHeader, GREETING_BYTES,
    NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE, NBD_OPT_GO, NBD_OPT_STARTTLS, NBD_REP_ACK, NBD_REP_ERR_BLOCK_SIZE_REQD,
    NBD_REP_ERR_INVALID, NBD_REP_ERR_POLICY, NBD_REP_ERR_SHUTDOWN, NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_STRING_BYTES_MAX,
    OPTION_REPLY_BYTES_MAX, OPTION_REPLY_HEADER_BYTES,
};
use super::sizes::BlockSizes;
use super::tls_stream::{ClientTls, TlsStream};

/// What `NBD_OPT_GO` told about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExportInfo {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    pub block_sizes: BlockSizes,
}

/// The fixed-newstyle handshake up to the transmission phase, all of it within `timeout`
/// (each read and write is bounded by what is left, so a server that trickles replies
/// cannot hold it longer); returns the connection (under TLS when `tls` is given) and what
/// the server told about the export. Leaves the socket's timeouts set: the caller sets its
/// own.
///
/// `NBD_OPT_GO` asks for `NBD_INFO_BLOCK_SIZE`, which commits the client to the size
/// constraints the server sends: a caller that cannot honour them (see
/// [`BlockSizes::check_usable`]) must end the session ([`Connection::disconnect`]) without
/// a request.
pub(crate) fn handshake(
    mut conn: Connection,
    export: &str,
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<(Connection, ExportInfo), String> {
    let deadline = Deadline {
        at: Instant::now() + timeout,
        timeout,
    };
    let client_flags = read_greeting(&mut conn, &deadline)?;
    let mut msg = ClientFlags {
        flags: client_flags,
    }
    .encode()
    .to_vec();
    if let Some(tls) = tls {
        let starttls = OptionHeader {
            option: NBD_OPT_STARTTLS,
            len_bytes: 0,
        };
        msg.extend_from_slice(&starttls.encode());
        deadline.bound(&conn)?;
        conn.write_all(&msg)
            .map_err(|e| format!("sending NBD_OPT_STARTTLS: {e}"))?;
        msg.clear();
        conn = start_tls(conn, tls, &deadline)?;
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
    msg.extend_from_slice(&header.encode());
    msg.extend_from_slice(&data);
    deadline.bound(&conn)?;
    conn.write_all(&msg)
        .map_err(|e| format!("sending NBD_OPT_GO: {e}"))?;
    let info = read_go_replies(&mut conn, &deadline)?;
    Ok((conn, info))
}

/// Reads the server's greeting; returns the client flags to answer it with.
fn read_greeting(conn: &mut Connection, deadline: &Deadline) -> Result<u32, String> {
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
    Ok(client_flags)
}

/// Reads the reply to `NBD_OPT_STARTTLS` and, when the server accepts, runs the TLS
/// handshake on the socket. A refusal fails: the client asked for TLS and does not fall
/// back to plaintext.
fn start_tls(
    mut conn: Connection,
    tls: &ClientTls,
    deadline: &Deadline,
) -> Result<Connection, String> {
    deadline.bound(&conn)?;
    let (reply, data) = read_option_reply(&mut conn)?;
    if reply.is_error() {
        return Err(format!(
            "the server does not offer TLS: it refused NBD_OPT_STARTTLS ({}): {}",
            reply_name(reply.reply_type),
            server_text(&data)
        ));
    }
    if reply.reply_type != NBD_REP_ACK {
        return Err(format!(
            "unexpected reply {} to NBD_OPT_STARTTLS",
            reply.reply_type
        ));
    }
    let socket = conn
        .into_socket()
        .map_err(|_| "TLS is already on".to_string())?;
    let stream = TlsStream::handshake(socket, tls, |socket| {
        let left = deadline.left()?;
        socket
            .set_timeouts(Some(left), Some(left))
            .map_err(|e| format!("setting a socket timeout: {e}"))
    })?;
    Ok(Connection::Tls(stream))
}

/// The deadline of a handshake.
struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    /// What is left, or why nothing is.
    fn left(&self) -> Result<Duration, String> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("the handshake took longer than {:?}", self.timeout));
        }
        Ok(left)
    }

    /// Sets the connection's timeouts to what is left, or fails once nothing is.
    fn bound(&self, conn: &Connection) -> Result<(), String> {
        conn.set_timeout(Some(self.left()?))
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
    let mut first = true;
    loop {
        deadline.bound(conn)?;
        let (reply, data) = read_option_reply(conn).map_err(|e| {
            // TLS 1.3 ends the client's handshake before the server has checked the
            // client's certificate: a server that refuses it closes the connection here.
            if first && conn.is_tls() {
                format!("{e} (the server may have refused this client's certificate)")
            } else {
                e
            }
        })?;
        first = false;
        if reply.reply_type == NBD_REP_ERR_TLS_REQD && !conn.is_tls() {
            return Err(format!(
                "the server requires TLS (connect with nbds:// and TLS credentials): {}",
                server_text(&data)
            ));
        }
        if reply.is_error() {
            return Err(format!(
                "the server refused the export ({}): {}",
                reply_name(reply.reply_type),
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

/// An option reply's type as messages name it (the protocol's name, and the number).
fn reply_name(reply_type: u32) -> String {
    let name = match reply_type {
        NBD_REP_ERR_UNSUP => "unsupported",
        NBD_REP_ERR_POLICY => "forbidden by policy",
        NBD_REP_ERR_INVALID => "invalid",
        NBD_REP_ERR_TLS_REQD => "TLS required",
        NBD_REP_ERR_UNKNOWN => "unknown export",
        NBD_REP_ERR_SHUTDOWN => "shutting down",
        NBD_REP_ERR_BLOCK_SIZE_REQD => "block size required",
        _ => "reply",
    };
    format!("{name}, {reply_type:#x}")
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
