//! TLS on a client's NBD connection: what a client needs to reach an export over TLS
//! ([`ClientTls`]), the TLS handshake that follows `NBD_OPT_STARTTLS`, and [`TlsStream`],
//! the blocking stream that a sender and a reader thread share.
//!
//! rustls keeps one session state for both directions of a connection. The stream's handles
//! share it behind a mutex held only while bytes are encrypted or decrypted, never across a
//! socket read or write: a sender blocked on a full socket must not keep the reader from
//! taking replies in, since the server may wait for its replies to be read before it reads
//! more requests. Senders are serialized by their caller (the client's send lock), which
//! keeps the records on the wire in the order the session numbered them.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

use super::connection::Socket;
use super::ExportUri;
use crate::tls::{server_name, TlsCredentials};

/// Ciphertext read from the socket at once by a handle that reads.
const TLS_INPUT_BYTES: usize = 64 << 10;

/// How a client reaches one export over TLS: its configuration (the credentials it presents
/// and the CA it trusts) and the name the server's certificate must carry.
#[derive(Clone)]
pub(crate) struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl ClientTls {
    /// TLS for connecting to `uri`. With credentials the connection always uses TLS (an
    /// `nbd://` URI is upgraded with `NBD_OPT_STARTTLS` too); without them an `nbds://` URI
    /// is refused, and any other connects in plaintext (`None`).
    pub(crate) fn for_uri(
        uri: &ExportUri,
        credentials: Option<&TlsCredentials>,
    ) -> Result<Option<Self>, String> {
        let Some(credentials) = credentials else {
            if uri.tls {
                return Err(
                    "TLS is required (nbds://) but no TLS credentials were given (tls-creds=DIR \
                     on a volume, migrate start --target-tls-creds DIR, or serve --tls-creds \
                     DIR)"
                        .into(),
                );
            }
            return Ok(None);
        };
        let config = credentials.client_config().map_err(|e| e.to_string())?;
        let server_name = server_name(uri.tls_server_name()).map_err(|e| e.to_string())?;
        Ok(Some(Self {
            config,
            server_name,
        }))
    }
}

/// A TLS session over a socket; handles made by [`TlsStream::try_clone`] share the session.
pub(crate) struct TlsStream {
    socket: Socket,
    session: Arc<Mutex<ClientConnection>>,
    input: ReadAhead,
    /// Ciphertext on its way from the session to the socket.
    output: Vec<u8>,
}

/// Ciphertext a handle read that the session has not taken yet: `bytes[start..end]`
/// (allocated on the handle's first read).
#[derive(Default)]
struct ReadAhead {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadAhead {
    /// Feeds what the session takes into it and decrypts it; false when nothing was left.
    fn feed(&mut self, session: &mut ClientConnection) -> io::Result<bool> {
        if self.start == self.end {
            return Ok(false);
        }
        let mut pending = &self.bytes[self.start..self.end];
        let n = session.read_tls(&mut pending)?;
        if n == 0 {
            return Err(io::Error::other("TLS: the session takes no more input"));
        }
        self.start += n;
        session.process_new_packets().map_err(tls_error)?;
        Ok(true)
    }

    /// Reads the socket once (blocking) into the buffer, which must be empty; returns the
    /// bytes read.
    fn fill(&mut self, socket: &mut Socket) -> io::Result<usize> {
        if self.bytes.is_empty() {
            self.bytes = vec![0; TLS_INPUT_BYTES];
        }
        let n = socket.read(&mut self.bytes)?;
        (self.start, self.end) = (0, n);
        Ok(n)
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("socket", &self.socket)
            .finish()
    }
}

/// A rustls error as an I/O error, one line, saying it is TLS's.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

fn lock(session: &Mutex<ClientConnection>) -> io::Result<MutexGuard<'_, ClientConnection>> {
    session
        .lock()
        .map_err(|_| io::Error::other("TLS session lock poisoned"))
}

impl TlsStream {
    /// The TLS handshake over `socket`, after the server accepted `NBD_OPT_STARTTLS`.
    /// `bound` is called before every socket read and write: it sets the socket's timeouts
    /// to what is left of the caller's deadline, or fails once nothing is.
    pub(crate) fn handshake(
        mut socket: Socket,
        tls: &ClientTls,
        mut bound: impl FnMut(&Socket) -> Result<(), String>,
    ) -> Result<Self, String> {
        let mut session = ClientConnection::new(tls.config.clone(), tls.server_name.clone())
            .map_err(|e| format!("TLS: {e}"))?;
        while session.is_handshaking() || session.wants_write() {
            bound(&socket)?;
            if session.wants_write() {
                session
                    .write_tls(&mut socket)
                    .map_err(|e| format!("TLS handshake: sending: {e}"))?;
                continue;
            }
            match session.read_tls(&mut socket) {
                Ok(0) => return Err("TLS handshake: the server closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("TLS handshake: receiving: {e}")),
            }
            if let Err(e) = session.process_new_packets() {
                // Tell the server why (the alert rustls queued), best effort.
                let _ = session.write_tls(&mut socket);
                return Err(format!("TLS handshake: {e}"));
            }
        }
        Ok(Self {
            socket,
            session: Arc::new(Mutex::new(session)),
            input: ReadAhead::default(),
            output: Vec::new(),
        })
    }

    pub(crate) fn socket(&self) -> &Socket {
        &self.socket
    }

    /// Another handle on the same socket and session.
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            socket: self.socket.try_clone()?,
            session: self.session.clone(),
            input: ReadAhead::default(),
            output: Vec::new(),
        })
    }

    /// The socket and the session, for a caller that moves the bytes itself (a volume
    /// queue's non-blocking connection). Only the sole handle can be taken apart; the
    /// ciphertext it read ahead goes into the session first, so nothing read is lost.
    pub(crate) fn into_parts(mut self) -> io::Result<(Socket, ClientConnection)> {
        {
            let mut session = lock(&self.session)?;
            while self.input.feed(&mut session)? {}
        }
        let session = Arc::try_unwrap(self.session)
            .map_err(|_| io::Error::other("TLS session still shared"))?
            .into_inner()
            .map_err(|_| io::Error::other("TLS session lock poisoned"))?;
        Ok((self.socket, session))
    }

    /// Sends `bytes` as the last data of the session, then TLS's `close_notify`, best
    /// effort and without blocking.
    pub(crate) fn send_last_without_blocking(&self, bytes: &[u8]) {
        let mut output = Vec::new();
        if let Ok(mut session) = lock(&self.session) {
            let _ = session.writer().write_all(bytes);
            session.send_close_notify();
            while session.wants_write() {
                if session.write_tls(&mut output).is_err() {
                    break;
                }
            }
        }
        self.socket.send_without_blocking(&output);
    }
}

impl Read for TlsStream {
    /// Plaintext the session holds; otherwise ciphertext read ahead goes into it; otherwise
    /// the socket is read (blocking, bounded by its timeouts) without holding the session.
    /// A `close_notify` from the server reads as the end of the stream; an end of the
    /// stream without it is an error (`UnexpectedEof`).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut session = lock(&self.session)?;
                match session.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    other => return other,
                }
                if self.input.feed(&mut session)? {
                    continue;
                }
            }
            if self.input.fill(&mut self.socket)? == 0 {
                // Tells the session the stream ended: its reader says whether cleanly.
                let mut session = lock(&self.session)?;
                let _ = session.read_tls(&mut io::empty());
                return match session.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e)
                        if e.kind() == io::ErrorKind::UnexpectedEof
                            || e.kind() == io::ErrorKind::WouldBlock =>
                    {
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the server closed the connection without ending the TLS session",
                        ))
                    }
                    Err(e) => Err(e),
                };
            }
        }
    }
}

impl Write for TlsStream {
    /// Encrypts what the session takes of `buf` (and anything it queued itself) under the
    /// session's lock, then writes the ciphertext to the socket without it.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.output.clear();
        let accepted = {
            let mut session = lock(&self.session)?;
            let accepted = session.writer().write(buf)?;
            // Everything the session holds goes out in order, what it queued itself first.
            while session.wants_write() {
                session.write_tls(&mut self.output)?;
            }
            accepted
        };
        self.socket.write_all(&self.output)?;
        Ok(accepted)
    }

    /// Nothing to do: writes go to the socket before they return.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
