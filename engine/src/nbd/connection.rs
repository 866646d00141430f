//! One NBD connection's byte stream ([`Connection`]): a TCP or unix socket, plain or (a
//! client's) under TLS after `NBD_OPT_STARTTLS`, the socket under TLS being a [`Socket`];
//! connecting with a deadline, socket timeouts, and shutting it down. The protocol above it reads and writes bytes through [`Read`] and
//! [`Write`] and does not know which transport carries them.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{send, MsgFlags};
use rustls::ClientConnection;

use super::protocol::RequestHeader;
use super::tls_stream::TlsStream;
use super::NbdAddress;

/// A socket to an NBD server (or, on a server, from a client).
#[derive(Debug)]
pub(crate) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A connection: a plain socket, or a client's TLS session over one.
#[derive(Debug)]
pub(crate) enum Connection {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A client's TLS session over a TCP or unix socket (after `NBD_OPT_STARTTLS`).
    Tls(TlsStream),
}

impl Socket {
    /// Connects to `address` (TCP with `TCP_NODELAY`: requests are small and latency
    /// bound); a TCP connect gives up after `timeout`.
    pub(crate) fn connect(address: &NbdAddress, timeout: Duration) -> std::io::Result<Self> {
        match address {
            NbdAddress::Tcp { host, port } => {
                let mut last = None;
                for addr in std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), *port))? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(stream) => {
                            stream.set_nodelay(true)?;
                            return Ok(Self::Tcp(stream));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "host has no address")
                }))
            }
            NbdAddress::Unix { socket } => Ok(Self::Unix(UnixStream::connect(socket)?)),
        }
    }

    /// Bounds blocking reads and writes separately (`None`: no bound).
    pub(crate) fn set_timeouts(
        &self,
        read: Option<Duration>,
        write: Option<Duration>,
    ) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Self::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }

    pub(crate) fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_nonblocking(on),
            Self::Unix(s) => s.set_nonblocking(on),
        }
    }

    pub(crate) fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    /// Shuts both directions down: blocked reads and writes on every handle of the socket
    /// return, and the peer sees the end of the stream.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
            Self::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Sends what the socket takes at once, without blocking (best effort: a peer that
    /// stopped reading must not hold the caller).
    pub(crate) fn send_without_blocking(&self, bytes: &[u8]) {
        send_without_blocking(self.as_raw_fd(), bytes);
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            Self::Unix(s) => s.write_vectored(bufs),
        }
    }

    /// Nothing to do: writes go straight to the socket.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl From<Socket> for Connection {
    fn from(socket: Socket) -> Self {
        match socket {
            Socket::Tcp(s) => Self::Tcp(s),
            Socket::Unix(s) => Self::Unix(s),
        }
    }
}

impl Connection {
    /// A plain connection to `address` (see [`Socket::connect`]).
    pub(crate) fn connect(address: &NbdAddress, timeout: Duration) -> std::io::Result<Self> {
        Socket::connect(address, timeout).map(Self::from)
    }

    /// The socket of a plain connection; a TLS connection comes back as the error.
    pub(crate) fn into_socket(self) -> Result<Socket, Self> {
        match self {
            Self::Tcp(s) => Ok(Socket::Tcp(s)),
            Self::Unix(s) => Ok(Socket::Unix(s)),
            Self::Tls(_) => Err(self),
        }
    }

    /// The socket and, over TLS, the session: for a caller that moves the bytes itself (a
    /// volume queue's non-blocking connection). See [`TlsStream::into_parts`].
    pub(crate) fn into_parts(self) -> std::io::Result<(Socket, Option<ClientConnection>)> {
        match self {
            Self::Tcp(s) => Ok((Socket::Tcp(s), None)),
            Self::Unix(s) => Ok((Socket::Unix(s), None)),
            Self::Tls(tls) => tls
                .into_parts()
                .map(|(socket, session)| (socket, Some(session))),
        }
    }

    /// True once TLS is on.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// Bounds every blocking read and write (the handshake), or lifts the bound (`None`).
    pub(crate) fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_timeouts(timeout, timeout)
    }

    /// Bounds blocking reads and writes separately (`None`: no bound).
    pub(crate) fn set_timeouts(
        &self,
        read: Option<Duration>,
        write: Option<Duration>,
    ) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Self::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Self::Tls(tls) => tls.socket().set_timeouts(read, write),
        }
    }

    pub(crate) fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_nonblocking(on),
            Self::Unix(s) => s.set_nonblocking(on),
            Self::Tls(tls) => tls.socket().set_nonblocking(on),
        }
    }

    /// Another handle on the same socket (and TLS session): a reader thread's, or one to
    /// shut it down with while a sender is blocked on it.
    pub(crate) fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
            Self::Tls(tls) => Self::Tls(tls.try_clone()?),
        })
    }

    /// Shuts both directions down: blocked reads and writes on every handle of the socket
    /// return, and the peer sees the end of the stream.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
            Self::Unix(s) => s.shutdown(Shutdown::Both),
            Self::Tls(tls) => {
                tls.socket().shutdown();
                Ok(())
            }
        };
    }

    /// Ends a client's session in the transmission phase: `NBD_CMD_DISC` (and TLS's
    /// `close_notify`), best effort and without blocking (a server that stopped reading
    /// must not hold the caller), then shuts the connection down.
    pub(crate) fn disconnect(&self) {
        let header = RequestHeader::DISCONNECT.encode();
        match self {
            Self::Tls(tls) => tls.send_last_without_blocking(&header),
            _ => send_without_blocking(self.as_raw_fd(), &header),
        }
        self.shutdown();
    }
}

/// Sends what the socket `fd` takes at once, without blocking (best effort: a peer that
/// stopped reading must not hold the caller).
fn send_without_blocking(fd: RawFd, bytes: &[u8]) {
    let _ = send(fd, bytes, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT);
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
            Self::Tls(tls) => tls.socket().as_raw_fd(),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
            Self::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
            Self::Tls(tls) => tls.write(buf),
        }
    }

    /// Nothing to do: writes go to the socket before they return.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
