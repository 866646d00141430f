//! A queue's NBD connection as the queue holds it: the non-blocking socket and, when the
//! export is reached over TLS, the rustls session over it, whose plaintext side the queue
//! writes requests into and reads replies out of while the queue moves the ciphertext.
//!
//! The plaintext path never comes through the session: it sends straight from the guest's
//! iovecs. Over TLS rustls copies (it encrypts into its own buffers and decrypts out of
//! them) and allocates per record; that is TLS's cost, paid only by TLS connections.

use std::io::{self, BufRead, IoSlice, Write};
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::socket::{send, sendmsg, MsgFlags, UnixAddr};
use rustls::ClientConnection;

use crate::nbd::connection::{Connection, Socket};
use crate::nbd::protocol::RequestHeader;

/// How the queue sends: without blocking (readiness comes from its ring's polls) and
/// without `SIGPIPE` (a closed connection is an error, not a signal).
const SEND_FLAGS: MsgFlags = MsgFlags::MSG_NOSIGNAL.union(MsgFlags::MSG_DONTWAIT);

/// A queue's connection in the transmission phase.
pub(super) struct Link {
    socket: Socket,
    /// The TLS session, when the connection uses TLS (boxed: rustls's state is large and
    /// a plain connection should not carry its room).
    tls: Option<Box<ClientConnection>>,
}

/// What feeding received ciphertext to the session came to.
pub(super) enum Decrypted {
    /// Every byte was taken; the plaintext went to the caller.
    Taken,
    /// The server ended the TLS session (`close_notify`).
    Closed,
}

impl Link {
    /// Takes a connection apart for the queue (the socket must be non-blocking already).
    pub(super) fn new(conn: Connection) -> io::Result<Self> {
        let (socket, session) = conn.into_parts()?;
        Ok(Self {
            socket,
            tls: session.map(Box::new),
        })
    }

    pub(super) fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    pub(super) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// True while the session holds ciphertext not yet written to the socket.
    pub(super) fn tls_wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| tls.wants_write())
    }

    /// Puts what the session takes of the bytes `iovecs` describe into it as plaintext
    /// (its ciphertext waits for [`Link::flush_tls`]); returns the bytes taken.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory valid for reads for the whole call.
    pub(super) unsafe fn write_plaintext(&mut self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return Err(io::Error::other("not a TLS connection"));
        };
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix (std documents it), so
        // the slice reinterprets the same array; the memory behind each iovec is valid for
        // reads for the whole call (the caller's contract), during which the slices live.
        let slices = unsafe {
            std::slice::from_raw_parts(iovecs.as_ptr().cast::<IoSlice<'_>>(), iovecs.len())
        };
        tls.writer().write_vectored(slices)
    }

    /// Writes the session's pending ciphertext to the socket: `Ok(true)` once all of it is
    /// out, `Ok(false)` when the socket is full (wait for `POLLOUT`); `wrote` is told of
    /// every write that moved bytes.
    pub(super) fn flush_tls(&mut self, mut wrote: impl FnMut()) -> io::Result<bool> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(true);
        };
        let mut socket = SocketWriter(self.socket.as_raw_fd());
        while tls.wants_write() {
            match tls.write_tls(&mut socket) {
                Ok(_) => wrote(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Feeds `ciphertext` (all of it) to the session and hands every piece of plaintext it
    /// decrypts to `on_plaintext`, in order. A TLS error is the connection's failure (the
    /// session's alert to the server goes out best effort).
    pub(super) fn decrypt(
        &mut self,
        mut ciphertext: &[u8],
        mut on_plaintext: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<Decrypted, String> {
        let Some(tls) = self.tls.as_mut() else {
            return Err("not a TLS connection".into());
        };
        while !ciphertext.is_empty() {
            let n = tls
                .read_tls(&mut ciphertext)
                .map_err(|e| format!("TLS: {e}"))?;
            if n == 0 {
                return Ok(Decrypted::Closed);
            }
            if let Err(e) = tls.process_new_packets() {
                let _ = tls.write_tls(&mut SocketWriter(self.socket.as_raw_fd()));
                return Err(format!("TLS: {e}"));
            }
            loop {
                let mut reader = tls.reader();
                let chunk = match reader.fill_buf() {
                    Ok([]) => return Ok(Decrypted::Closed),
                    Ok(chunk) => chunk,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("TLS: {e}")),
                };
                let len = chunk.len();
                on_plaintext(chunk)?;
                reader.consume(len);
            }
        }
        Ok(Decrypted::Taken)
    }

    /// Ends the session in the transmission phase: `NBD_CMD_DISC` (and TLS's
    /// `close_notify`), best effort and without blocking, then shuts the socket down.
    pub(super) fn disconnect(&mut self) {
        let header = RequestHeader::DISCONNECT.encode();
        match self.tls.as_mut() {
            None => {
                let _ = send(self.socket.as_raw_fd(), &header, SEND_FLAGS);
            }
            Some(tls) => {
                let _ = tls.writer().write_all(&header);
                tls.send_close_notify();
                let _ = self.flush_tls(|| {});
            }
        }
        self.socket.shutdown();
    }
}

/// The socket as rustls writes to it: `sendmsg` with the queue's flags.
struct SocketWriter(RawFd);

impl Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send(self.0, buf, SEND_FLAGS).map_err(io::Error::from)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        sendmsg::<UnixAddr>(self.0, bufs, &[], SEND_FLAGS, None).map_err(io::Error::from)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
