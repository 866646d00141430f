//! One server connection's byte stream: the client's socket, and TLS over it once the
//! client sent `NBD_OPT_STARTTLS` (a rustls `ServerConnection` driven over the socket).
//!
//! The handshake uses it blocking, each read and write bounded by the socket's timeouts;
//! the transmission phase uses it non-blocking: [`Transport::recv`] and
//! [`Transport::send`] return `WouldBlock` instead of waiting, and the connection's loop
//! polls the socket. Over TLS, data the socket delivered may sit decrypted inside rustls
//! where `poll` cannot see it: the loop reads until `WouldBlock` whenever it has room,
//! which drains it.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{sendmsg, MsgFlags};
use rustls::{ServerConfig, ServerConnection};

use crate::nbd::connection::Socket;
use crate::nbd::tls_intake::TlsIntake;
use crate::tls::PeerIdentity;

/// Encrypted bytes rustls may hold for the socket before it accepts no more plaintext:
/// enough records to keep the socket busy between two passes of the loop. rustls allocates
/// every record it encrypts, so a larger bound only makes the heap grow and shrink (page
/// faults on fresh memory) with every batch of large read replies.
const TLS_PENDING_BYTES_MAX: usize = 256 << 10;

pub(crate) struct Transport {
    socket: Socket,
    tls: Option<Box<ServerConnection>>,
    tls_in: TlsIntake,
}

impl Transport {
    pub fn plain(socket: Socket) -> Self {
        Self {
            socket,
            tls: None,
            tls_in: TlsIntake::default(),
        }
    }

    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Bounds the blocking reads and writes of the handshake (`None`: unbounded).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        // A zero timeout means "none" to the socket: keep at least a millisecond.
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        self.socket.set_timeouts(timeout, timeout)
    }

    pub fn set_nonblocking(&self) -> io::Result<()> {
        self.socket.set_timeouts(None, None)?;
        self.socket.set_nonblocking(true)
    }

    /// Reads exactly `buf.len()` bytes (blocking phase).
    pub fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        match &mut self.tls {
            None => self.socket.read_exact(buf),
            Some(tls) => rustls::Stream::new(tls.as_mut(), &mut self.socket).read_exact(buf),
        }
    }

    /// Writes all of `buf` (blocking phase).
    pub fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match &mut self.tls {
            None => self.socket.write_all(buf),
            Some(tls) => {
                let mut stream = rustls::Stream::new(tls.as_mut(), &mut self.socket);
                stream.write_all(buf)?;
                stream.flush()
            }
        }
    }

    /// Upgrades the connection to TLS (after the `NBD_REP_ACK` to `NBD_OPT_STARTTLS`) and
    /// runs the handshake, blocking within the socket's timeouts. Returns the client's
    /// certificate names (the configuration requires a certificate the CA signed).
    pub fn start_tls(&mut self, config: Arc<ServerConfig>) -> Result<PeerIdentity, String> {
        let mut tls = ServerConnection::new(config).map_err(|e| format!("TLS: {e}"))?;
        tls.set_buffer_limit(Some(TLS_PENDING_BYTES_MAX));
        while tls.is_handshaking() {
            tls.complete_io(&mut self.socket)
                .map_err(|e| format!("TLS handshake: {e}"))?;
        }
        // The client's last flight may have carried data after the handshake; flush what
        // rustls still has to send (a session ticket) before the option replies.
        while tls.wants_write() {
            tls.write_tls(&mut self.socket)
                .map_err(|e| format!("TLS handshake: {e}"))?;
        }
        let peer = tls
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(PeerIdentity::of)
            .ok_or("TLS handshake: the client presented no readable certificate")?;
        self.tls = Some(Box::new(tls));
        Ok(peer)
    }

    /// Reads what is available into `buf` without blocking: `WouldBlock` when nothing is,
    /// `Ok(0)` at the end of the stream.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return self.socket.read(buf);
        };
        self.tls_in.recv(tls.as_mut(), &mut self.socket, buf)
    }

    /// Sends as much of `slices` as the socket (or, over TLS, rustls's buffer) takes now;
    /// returns the bytes taken, or `WouldBlock` when none was.
    pub fn send(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return sendmsg::<()>(
                self.socket.as_raw_fd(),
                slices,
                &[],
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(io::Error::from);
        };
        let taken = tls.writer().write_vectored(slices)?;
        match self.flush_tls() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if taken == 0 && slices.iter().any(|s| !s.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }

    /// Writes the encrypted bytes rustls holds to the socket until it has none or the
    /// socket is full (`WouldBlock`).
    pub fn flush_tls(&mut self) -> io::Result<()> {
        if let Some(tls) = &mut self.tls {
            while tls.wants_write() {
                tls.write_tls(&mut self.socket)?;
            }
        }
        Ok(())
    }

    /// True when encrypted bytes wait for the socket to take them.
    pub fn has_pending_output(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| tls.wants_write())
    }

    /// Ends the connection: over TLS a close_notify first (without waiting for a socket
    /// that is full), then the socket is shut down both ways.
    pub fn close(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.send_close_notify();
            let _ = self.socket.set_nonblocking(true);
            while tls.wants_write() {
                if tls.write_tls(&mut self.socket).is_err() {
                    break;
                }
            }
        }
        self.socket.shutdown();
    }
}
