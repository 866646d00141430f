//! An NBD export as a volume's backing: where it is, how it is reached (plain or over TLS,
//! with the volume's credentials), what the server offers (flags and size constraints: an
//! export whose minimum block size exceeds a sector is refused at open), and the
//! connections made outside the queues (the probe at open, the flush on shutdown, the
//! mirror copier's reads). Each queue's own connection is made by [`NbdExport::connect`]
//! and driven by [`super::nbd_queue`].

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::nbd::connection::Connection;
use crate::nbd::handshake::{handshake, ExportInfo};
use crate::nbd::protocol::{
    NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
};
use crate::nbd::tls_stream::ClientTls;
use crate::nbd::{BlockSizes, ClientOptions, ExportUri, NbdClient};
use crate::tls::TlsCredentials;

/// How long a connection attempt (TCP connect, then the handshake) may take. A queue makes
/// its attempts on its worker thread, so this also bounds how long one request can stall.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request outside the queues (flush on shutdown, a copier read) waits for its reply.
pub const SIDE_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An NBD export a volume lives on: address, name and what the server offered at open.
pub struct NbdExport {
    uri: String,
    location: ExportUri,
    size_bytes: u64,
    transmission_flags: u16,
    block_sizes: BlockSizes,
    /// What the volume's requests are whole multiples of (its logical block).
    request_block_bytes: u64,
    /// The credentials connections present (TLS on every connection when given).
    credentials: Option<Arc<TlsCredentials>>,
    /// What every connection's TLS handshake uses, built once so that the queues'
    /// connections share one configuration (and its session tickets).
    tls: Option<ClientTls>,
    /// A blocking client for reads outside the queues (a migration away from this export),
    /// connected on first use.
    reader: Mutex<Option<Arc<NbdClient>>>,
}

impl std::fmt::Debug for NbdExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdExport")
            .field("uri", &self.uri)
            .field("tls", &self.tls.is_some())
            .field("size_bytes", &self.size_bytes)
            .field("transmission_flags", &self.transmission_flags)
            .field("block_sizes", &self.block_sizes)
            .finish()
    }
}

/// Parses a volume path that names an NBD export (`nbd://HOST[:PORT]/EXPORT`,
/// `nbd+unix:///EXPORT?socket=PATH`, or `nbds://…` / `nbds+unix://…` over TLS); `None` for
/// anything else (a file path).
pub fn parse_uri(path: &Path) -> Option<Result<ExportUri, String>> {
    let text = path.to_str()?;
    if !ExportUri::has_scheme(text) {
        return None;
    }
    // One parser and one message for an NBD URI, whether it names a volume or a target.
    Some(ExportUri::parse(text).map_err(|e| format!("bad target {text:?}: {e}")))
}

impl NbdExport {
    /// Connects once to learn the export's size, flags and size constraints, then
    /// disconnects. Refuses constraints the volume's requests, whole multiples of
    /// `request_block_bytes`, cannot meet (a larger minimum block size), with a reason that
    /// names both sizes. With `credentials` every connection uses TLS (see
    /// [`ClientOptions::tls`]).
    pub fn probe(
        location: &ExportUri,
        request_block_bytes: u64,
        credentials: Option<Arc<TlsCredentials>>,
    ) -> Result<Self, String> {
        let uri = location.to_string();
        let tls = ClientTls::for_uri(location, credentials.as_deref())
            .map_err(|e| format!("{uri}: {e}"))?;
        let (conn, info) = open_conn(location, tls.as_ref())?;
        conn.disconnect();
        info.block_sizes
            .check_usable(request_block_bytes)
            .map_err(|reason| {
                let min = info.block_sizes.block_bytes_min;
                if u64::from(min) > request_block_bytes {
                    format!("{uri}: {reason} (serve it with logical-block-size={min})")
                } else {
                    format!("{uri}: {reason}")
                }
            })?;
        let ExportInfo {
            size_bytes,
            transmission_flags,
            block_sizes,
        } = info;
        log::info!("{uri}: {size_bytes} bytes, {block_sizes}");
        if transmission_flags & NBD_FLAG_CAN_MULTI_CONN == 0 {
            log::warn!(
                "{uri}: the server does not advertise multi-conn: a guest flush on one queue \
                 may not cover writes completed on another queue's connection"
            );
        }
        Ok(Self {
            uri,
            location: location.clone(),
            size_bytes,
            transmission_flags,
            block_sizes,
            request_block_bytes,
            credentials,
            tls,
            reader: Mutex::new(None),
        })
    }

    /// The export as a URI (`nbd://…`, `nbd+unix://…`, `nbds://…` or `nbds+unix://…`).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// True when the connections use TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn read_only(&self) -> bool {
        self.transmission_flags & NBD_FLAG_READ_ONLY != 0
    }

    pub(crate) fn has_flush(&self) -> bool {
        self.transmission_flags & NBD_FLAG_SEND_FLUSH != 0
    }

    pub(crate) fn has_fua(&self) -> bool {
        self.transmission_flags & NBD_FLAG_SEND_FUA != 0
    }

    pub(crate) fn has_trim(&self) -> bool {
        self.transmission_flags & NBD_FLAG_SEND_TRIM != 0
    }

    pub(crate) fn has_write_zeroes(&self) -> bool {
        self.transmission_flags & NBD_FLAG_SEND_WRITE_ZEROES != 0
    }

    /// The server says a flush on one connection covers writes completed on every other.
    pub(crate) fn can_multi_conn(&self) -> bool {
        self.transmission_flags & NBD_FLAG_CAN_MULTI_CONN != 0
    }

    /// The size constraints the server advertised at open (or the protocol's defaults).
    pub fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }

    /// The largest READ or WRITE payload a queue sends (see [`BlockSizes::request_bytes_max`]).
    pub(crate) fn request_bytes_max(&self) -> u64 {
        self.block_sizes.request_bytes_max()
    }

    /// The largest WRITE_ZEROES or TRIM a queue sends (see [`BlockSizes::effect_bytes_max`]).
    pub(crate) fn effect_bytes_max(&self) -> u64 {
        self.block_sizes.effect_bytes_max()
    }

    /// A new connection in the transmission phase, non-blocking, for one queue. Refuses an
    /// export whose size, flags or size constraints changed since open (another export now
    /// answers): the queues split and align requests by what the probe learned.
    pub(crate) fn connect(&self) -> Result<Connection, String> {
        let (conn, info) = open_conn(&self.location, self.tls.as_ref())?;
        let was = ExportInfo {
            size_bytes: self.size_bytes,
            transmission_flags: self.transmission_flags,
            block_sizes: self.block_sizes,
        };
        if info != was {
            conn.disconnect();
            return Err(format!(
                "{}: the export changed (size {}, flags {:#x}, {}; was {}, {:#x}, {})",
                self.uri,
                info.size_bytes,
                info.transmission_flags,
                info.block_sizes,
                was.size_bytes,
                was.transmission_flags,
                was.block_sizes
            ));
        }
        conn.set_nonblocking(true)
            .map_err(|e| format!("{}: {e}", self.uri))?;
        Ok(conn)
    }

    /// `NBD_CMD_FLUSH` on a connection of its own (shutdown); a no-op without `SEND_FLUSH`.
    pub fn flush(&self) -> io::Result<()> {
        if !self.has_flush() {
            return Ok(());
        }
        let client = self.side_client()?;
        client.flush().map_err(|e| self.side_error(e))
    }

    /// Reads at an absolute offset of the export on the side connection.
    pub fn read_exact_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        let client = self.side_client()?;
        client
            .read_at(offset_bytes, buf)
            .map_err(|e| self.side_error(e))
    }

    /// A side connection's failure in the words of a migration target's (`target URI: …`):
    /// one client, one message.
    fn side_error(&self, e: crate::nbd::ClientError) -> io::Error {
        io::Error::other(format!("target {}: {e}", self.uri))
    }

    /// The side connection (made on first use, made again after it broke).
    fn side_client(&self) -> io::Result<Arc<NbdClient>> {
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| io::Error::other("NBD side client lock poisoned"))?;
        if let Some(client) = reader.as_ref() {
            if !client.is_dead() {
                return Ok(client.clone());
            }
        }
        let options = ClientOptions {
            request_timeout: SIDE_REQUEST_TIMEOUT,
            accept_read_only: true,
            request_block_bytes: self.request_block_bytes,
            tls: self.credentials.clone(),
        };
        let client =
            NbdClient::connect(&self.location, &options).map_err(|e| self.side_error(e))?;
        let client = Arc::new(client);
        *reader = Some(client.clone());
        Ok(client)
    }
}

/// Connects and negotiates the export; returns the connection and what the server told.
fn open_conn(
    location: &ExportUri,
    tls: Option<&ClientTls>,
) -> Result<(Connection, ExportInfo), String> {
    let conn = Connection::connect(&location.address, CONNECT_TIMEOUT)
        .map_err(|e| format!("cannot connect to {location}: {e}"))?;
    let (conn, info) = handshake(conn, &location.export, CONNECT_TIMEOUT, tls)
        .map_err(|e| format!("{location}: NBD handshake: {e}"))?;
    conn.set_timeout(None)
        .map_err(|e| format!("{location}: {e}"))?;
    Ok((conn, info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::protocol::NBD_CMD_DISC;
    use crate::nbd::tests::fake_server::{block_size_info, fake_server, served};
    use crate::nbd::NbdAddress;

    /// An export whose minimum block size exceeds the volume's logical block is refused at
    /// open (`ferry serve --volume path=nbd://…`), the reason saying how to serve it.
    #[test]
    fn an_export_with_big_blocks_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("s");
        let server = fake_server(&socket, 1 << 20, vec![block_size_info(4096, 4096, 1 << 20)])?;
        let location = ExportUri {
            address: NbdAddress::Unix {
                socket: socket.clone(),
            },
            export: "e".into(),
            tls: false,
        };
        let reason = NbdExport::probe(&location, 512, None)
            .err()
            .ok_or("the export was accepted")?;
        assert_eq!(
            reason,
            format!(
                "nbd+unix:///e?socket={}: the export's minimum block size is 4096 bytes; \
                 ferry's volumes take 512-byte requests (serve it with \
                 logical-block-size=4096)",
                socket.display()
            )
        );
        assert_eq!(served(server)?.requests, vec![(NBD_CMD_DISC, 0, 0)]);
        // A volume of 4 KiB logical blocks takes it.
        std::fs::remove_file(&socket)?;
        let server = fake_server(&socket, 1 << 20, vec![block_size_info(4096, 4096, 1 << 20)])?;
        let export = NbdExport::probe(&location, 4096, None)?;
        assert_eq!(export.block_sizes().block_bytes_min, 4096);
        served(server)?;
        Ok(())
    }
}
