//! The server side of the fixed-newstyle handshake: the greeting, option haggling up to
//! `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`), and `NBD_OPT_STARTTLS`.
//!
//! With TLS credentials the server runs in the protocol's FORCEDTLS mode: before TLS,
//! every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` gets `NBD_REP_ERR_TLS_REQD`
//! (and `NBD_OPT_EXPORT_NAME`, which cannot be refused, ends the session). After the TLS
//! handshake the client's certificate must pass `--tls-authz`, else the session ends.
//!
//! Everything a client sends here is bounded: option data (a longer option ends the
//! session: skipping it would let a client make the server read without limit), the
//! number of options, and the whole handshake's time (the caller's deadline bounds every
//! read and write, so a client that stops halfway costs its connection only that long).

use std::io;
use std::sync::Arc;
use std::time::Instant;

use super::exports::{client_name, AttachRefused, Attachment, Export};
use super::request::ExportLimits;
use super::transport::Transport;
use super::Shared;
use crate::nbd::protocol::*;
use crate::tls::PeerIdentity;

/// The largest option data read (an export name of the protocol's 4096 bytes and its
/// information requests fit).
pub const OPTION_DATA_BYTES_MAX: u32 = 8 * 1024;
/// The most options one handshake may send.
pub const OPTIONS_MAX: u32 = 256;
/// The maximum payload advertised (the protocol's default maximum, and qemu's).
pub const PAYLOAD_BYTES_MAX: u32 = 32 << 20;
/// The id `NBD_CMD_BLOCK_STATUS` replies give `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// The smallest preferred block size advertised (a page: smaller writes cost the host a
/// read-modify-write of it).
const PREFERRED_BLOCK_BYTES_MIN: u32 = 4096;

/// How a session in the transmission phase was set up.
pub(crate) struct Negotiated {
    pub attachment: Attachment,
    pub limits: ExportLimits,
    pub client: String,
}

/// Why a handshake ended without the transmission phase; logged, never sent.
#[derive(Debug)]
pub(crate) enum HandshakeEnd {
    /// The client ended it (`NBD_OPT_ABORT`, or closed the connection).
    Client,
    /// The client broke the protocol, was refused, or was too slow.
    Refused(String),
}

impl From<io::Error> for HandshakeEnd {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => Self::Client,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                Self::Refused("the handshake took too long".into())
            }
            _ => Self::Refused(e.to_string()),
        }
    }
}

/// What the client has negotiated so far.
struct Haggling<'a> {
    shared: &'a Shared,
    transport: &'a mut Transport,
    deadline: Instant,
    no_zeroes: bool,
    structured: bool,
    peer: Option<PeerIdentity>,
    /// The export `NBD_OPT_SET_META_CONTEXT` selected `base:allocation` on.
    meta_context_export: Option<String>,
}

/// Runs the handshake on a new connection, up to the transmission phase.
pub(crate) fn negotiate(
    shared: &Shared,
    transport: &mut Transport,
    deadline: Instant,
) -> Result<Negotiated, HandshakeEnd> {
    let mut h = Haggling {
        shared,
        transport,
        deadline,
        no_zeroes: false,
        structured: false,
        peer: None,
        meta_context_export: None,
    };
    h.bound()?;
    let greeting = Greeting {
        handshake_flags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
    };
    h.transport.write_all(&greeting.encode())?;
    let mut flags = [0u8; CLIENT_FLAGS_BYTES];
    h.bound()?;
    h.transport.read_exact(&mut flags)?;
    let flags = ClientFlags::decode(&flags).map_or(0, |f| f.flags);
    if flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeEnd::Refused(format!(
            "unknown client flags {flags:#x}"
        )));
    }
    h.no_zeroes = flags & NBD_FLAG_C_NO_ZEROES != 0;
    let mut data = Vec::new();
    for _ in 0..OPTIONS_MAX {
        let option = h.read_option(&mut data)?;
        if let Some(negotiated) = h.handle_option(option, &data)? {
            return Ok(negotiated);
        }
    }
    Err(HandshakeEnd::Refused(format!(
        "more than {OPTIONS_MAX} options"
    )))
}

impl Haggling<'_> {
    /// Bounds the next blocking read or write by what is left of the handshake's time.
    fn bound(&self) -> Result<(), HandshakeEnd> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeEnd::Refused("the handshake took too long".into()));
        }
        self.transport.set_timeout(Some(left))?;
        Ok(())
    }

    fn read_option(&mut self, data: &mut Vec<u8>) -> Result<u32, HandshakeEnd> {
        let mut header = [0u8; OPTION_HEADER_BYTES];
        self.bound()?;
        self.transport.read_exact(&mut header)?;
        let header = OptionHeader::decode(&header)
            .map_err(|e| HandshakeEnd::Refused(format!("bad option: {e}")))?;
        if header.len_bytes > OPTION_DATA_BYTES_MAX {
            return Err(HandshakeEnd::Refused(format!(
                "option {} with {} bytes of data (at most {OPTION_DATA_BYTES_MAX})",
                header.option, header.len_bytes
            )));
        }
        data.clear();
        data.resize(header.len_bytes as usize, 0);
        self.bound()?;
        self.transport.read_exact(data)?;
        Ok(header.option)
    }

    fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) -> Result<(), HandshakeEnd> {
        let header = OptionReplyHeader {
            option,
            reply_type,
            len_bytes: data.len() as u32,
        };
        self.bound()?;
        self.transport.write_all(&header.encode())?;
        if !data.is_empty() {
            self.transport.write_all(data)?;
        }
        Ok(())
    }

    fn error(&mut self, option: u32, reply_type: u32, message: &str) -> Result<(), HandshakeEnd> {
        self.reply(option, reply_type, message.as_bytes())
    }

    /// Answers one option; `Some` when it entered the transmission phase.
    fn handle_option(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Negotiated>, HandshakeEnd> {
        let tls_required = self.shared.tls.is_some() && !self.transport.is_tls();
        match option {
            NBD_OPT_ABORT => {
                let _ = self.reply(option, NBD_REP_ACK, &[]);
                return Err(HandshakeEnd::Client);
            }
            NBD_OPT_STARTTLS => self.start_tls(data)?,
            NBD_OPT_EXPORT_NAME if tls_required => {
                return Err(HandshakeEnd::Refused(
                    "NBD_OPT_EXPORT_NAME before TLS (FORCEDTLS)".into(),
                ))
            }
            _ if tls_required => self.error(
                option,
                NBD_REP_ERR_TLS_REQD,
                "TLS is required (NBD_OPT_STARTTLS)",
            )?,
            _ if self.shared.is_stopping() => {
                self.error(option, NBD_REP_ERR_SHUTDOWN, "the server is shutting down")?
            }
            NBD_OPT_EXPORT_NAME => return self.export_name(data).map(Some),
            NBD_OPT_LIST => self.list(data)?,
            NBD_OPT_INFO | NBD_OPT_GO => return self.info_or_go(option, data),
            NBD_OPT_STRUCTURED_REPLY => self.structured_reply(data)?,
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                self.meta_context(option, data)?
            }
            _ => self.error(option, NBD_REP_ERR_UNSUP, "option not supported")?,
        }
        Ok(None)
    }

    fn start_tls(&mut self, data: &[u8]) -> Result<(), HandshakeEnd> {
        const OPTION: u32 = NBD_OPT_STARTTLS;
        let Some(config) = self.shared.tls.clone() else {
            return self.error(
                OPTION,
                NBD_REP_ERR_POLICY,
                "this server has no TLS credentials",
            );
        };
        if self.transport.is_tls() {
            return self.error(OPTION, NBD_REP_ERR_INVALID, "TLS is already running");
        }
        if !data.is_empty() {
            return self.error(
                OPTION,
                NBD_REP_ERR_INVALID,
                "NBD_OPT_STARTTLS takes no data",
            );
        }
        self.reply(OPTION, NBD_REP_ACK, &[])?;
        self.bound()?;
        let peer = self
            .transport
            .start_tls(config)
            .map_err(HandshakeEnd::Refused)?;
        self.shared
            .authz
            .check(&peer)
            .map_err(HandshakeEnd::Refused)?;
        self.peer = Some(peer);
        Ok(())
    }

    fn structured_reply(&mut self, data: &[u8]) -> Result<(), HandshakeEnd> {
        const OPTION: u32 = NBD_OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            return self.error(OPTION, NBD_REP_ERR_INVALID, "the option takes no data");
        }
        if self.structured {
            return self.error(
                OPTION,
                NBD_REP_ERR_INVALID,
                "structured replies already agreed",
            );
        }
        self.structured = true;
        self.reply(OPTION, NBD_REP_ACK, &[])
    }

    /// The export a client names, if it exists and this client may use it.
    fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.shared
            .exports
            .find(name)
            .filter(|e| e.admits(self.peer.as_ref()))
    }

    fn list(&mut self, data: &[u8]) -> Result<(), HandshakeEnd> {
        if !data.is_empty() {
            return self.error(
                NBD_OPT_LIST,
                NBD_REP_ERR_INVALID,
                "NBD_OPT_LIST takes no data",
            );
        }
        for export in self.shared.exports.all() {
            if !export.admits(self.peer.as_ref()) {
                continue;
            }
            let entry = ExportListEntry {
                name: export.config.name.clone(),
                description: export.config.description.clone(),
            };
            if let Ok(bytes) = entry.encode() {
                self.reply(NBD_OPT_LIST, NBD_REP_SERVER, &bytes)?;
            }
        }
        self.reply(NBD_OPT_LIST, NBD_REP_ACK, &[])
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), HandshakeEnd> {
        if !self.structured {
            return self.error(option, NBD_REP_ERR_INVALID, "structured replies come first");
        }
        let Ok(request) = MetaContextRequest::decode(data) else {
            return self.error(
                option,
                NBD_REP_ERR_INVALID,
                "malformed metadata context option",
            );
        };
        let Some(export) = self.find(&request.export_name) else {
            return self.error(option, NBD_REP_ERR_UNKNOWN, "no such export");
        };
        let list = option == NBD_OPT_LIST_META_CONTEXT;
        let selects = |q: &String| q == NBD_META_CONTEXT_BASE_ALLOCATION || q == "base:";
        let found = (list && request.queries.is_empty()) || request.queries.iter().any(selects);
        if !list {
            self.meta_context_export = found.then(|| export.config.name.clone());
        }
        if found {
            let reply = MetaContextReply {
                context_id: if list { 0 } else { BASE_ALLOCATION_ID },
                name: NBD_META_CONTEXT_BASE_ALLOCATION.into(),
            };
            if let Ok(bytes) = reply.encode() {
                self.reply(option, NBD_REP_META_CONTEXT, &bytes)?;
            }
        }
        self.reply(option, NBD_REP_ACK, &[])
    }

    /// The transmission flags of `export` for this client.
    fn transmission_flags(&self, export: &Export) -> u16 {
        let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
        if export.read_only() {
            flags |= NBD_FLAG_READ_ONLY;
        } else {
            flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
        }
        if self.structured {
            flags |= NBD_FLAG_SEND_DF;
        }
        if can_multi_conn(export) {
            flags |= NBD_FLAG_CAN_MULTI_CONN;
        }
        flags
    }

    fn limits(&self, export: &Export) -> ExportLimits {
        ExportLimits {
            size_bytes: export.config.volume.size_bytes(),
            block_bytes: block_bytes(export),
            payload_bytes_max: PAYLOAD_BYTES_MAX,
            read_only: export.read_only(),
            structured_replies: self.structured,
            block_status: self.meta_context_export.as_deref() == Some(&export.config.name),
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Option<Negotiated>, HandshakeEnd> {
        let Ok(request) = ExportRequest::decode(data) else {
            self.error(option, NBD_REP_ERR_INVALID, "malformed export request")?;
            return Ok(None);
        };
        let Some(export) = self.find(&request.export_name) else {
            self.error(option, NBD_REP_ERR_UNKNOWN, "no such export")?;
            return Ok(None);
        };
        // Attach before the final ACK, so that a fenced export is refused with an error
        // the client can show instead of a closed connection.
        let attachment = if option == NBD_OPT_GO {
            match self.attach(&export) {
                Ok(a) => Some(a),
                Err(refused) => {
                    let (reply_type, message) = match refused {
                        AttachRefused::Fenced => (NBD_REP_ERR_POLICY, "the export is fenced"),
                        AttachRefused::Removed => (NBD_REP_ERR_UNKNOWN, "no such export"),
                        AttachRefused::Full => (NBD_REP_ERR_POLICY, "too many connections"),
                    };
                    self.error(option, reply_type, message)?;
                    return Ok(None);
                }
            }
        } else {
            None
        };
        self.send_infos(option, &export, &request.info_types)?;
        self.reply(option, NBD_REP_ACK, &[])?;
        Ok(attachment.map(|attachment| self.negotiated(attachment)))
    }

    fn send_infos(
        &mut self,
        option: u32,
        export: &Export,
        info_types: &[u16],
    ) -> Result<(), HandshakeEnd> {
        let info = InfoExport {
            size_bytes: export.config.volume.size_bytes(),
            transmission_flags: self.transmission_flags(export),
        };
        self.reply(option, NBD_REP_INFO, &info.encode())?;
        let block = block_bytes(export);
        let sizes = InfoBlockSize {
            block_bytes_min: block,
            block_bytes_preferred: block.max(PREFERRED_BLOCK_BYTES_MIN),
            payload_bytes_max: PAYLOAD_BYTES_MAX,
        };
        self.reply(option, NBD_REP_INFO, &sizes.encode())?;
        let texts = [
            (NBD_INFO_NAME, &export.config.name),
            (NBD_INFO_DESCRIPTION, &export.config.description),
        ];
        for (info_type, text) in texts {
            if !info_types.contains(&info_type) || text.is_empty() {
                continue;
            }
            let info = InfoText {
                info_type,
                text: text.clone(),
            };
            if let Ok(bytes) = info.encode() {
                self.reply(option, NBD_REP_INFO, &bytes)?;
            }
        }
        Ok(())
    }

    fn attach(&self, export: &Arc<Export>) -> Result<Attachment, AttachRefused> {
        let handle = self
            .transport
            .socket()
            .try_clone()
            .map_err(|_| AttachRefused::Full)?;
        let client = client_name(self.transport.socket(), self.peer.as_ref());
        export.attach(handle, client)
    }

    fn negotiated(&self, attachment: Attachment) -> Negotiated {
        let export = attachment.export().clone();
        Negotiated {
            limits: self.limits(&export),
            client: client_name(self.transport.socket(), self.peer.as_ref()),
            attachment,
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: enters the transmission phase, or ends the session (this
    /// option cannot be answered with an error).
    fn export_name(&mut self, data: &[u8]) -> Result<Negotiated, HandshakeEnd> {
        let name = std::str::from_utf8(data)
            .map_err(|_| HandshakeEnd::Refused("an export name that is not UTF-8".into()))?;
        let export = self
            .find(name)
            .ok_or_else(|| HandshakeEnd::Refused(format!("no export {name:?}")))?;
        let attachment = self
            .attach(&export)
            .map_err(|r| HandshakeEnd::Refused(format!("export {name:?}: {r:?}")))?;
        let reply = ExportNameReply {
            size_bytes: export.config.volume.size_bytes(),
            transmission_flags: self.transmission_flags(&export),
        };
        let bytes = reply.encode();
        let len = if self.no_zeroes {
            EXPORT_NAME_REPLY_BYTES
        } else {
            bytes.len()
        };
        self.bound()?;
        self.transport.write_all(&bytes[..len])?;
        Ok(self.negotiated(attachment))
    }
}

/// The export's block size: the volume's logical block, what every request is whole
/// multiples of (advertised as the minimum block size).
fn block_bytes(export: &Export) -> u32 {
    let bytes = export.config.volume.config().request_block_bytes();
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// True when a flush on one connection covers writes completed on every other: a file's
/// `fdatasync` covers every write to the file, whichever queue made it; an NBD backing
/// only if its own server says so.
fn can_multi_conn(export: &Export) -> bool {
    let backing = export.config.volume.backing();
    match backing.nbd() {
        None => true,
        Some(nbd) => nbd.can_multi_conn(),
    }
}
