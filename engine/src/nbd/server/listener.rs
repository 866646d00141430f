//! Where a server listens (`HOST:PORT` or `unix:PATH`), the accept loop, and admission:
//! at most [`super::ServerOptions::connections_max`] connections at once, handshakes
//! included; one more is closed as soon as it is accepted, before the server reads or
//! writes anything on it. Each admitted connection gets its own thread for its handshake
//! and, if it gets there, its transmission phase.

use std::io;
use std::net::{IpAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::negotiation::{negotiate, HandshakeEnd};
use super::transport::Transport;
use super::{transmission, Shared};
use crate::confine::{self, Allowlist};
use crate::nbd::connection::Socket;

/// The accepting thread accepts, admits and starts a thread per connection (which inherits
/// this filter under its own).
pub(super) const ACCEPT_SYSCALLS: Allowlist = Allowlist {
    kind: "nbd-accept",
    groups: &[
        confine::RUNTIME,
        confine::SPAWN,
        confine::NET,
        confine::FILE_IO,
        confine::FILE_PATHS,
        confine::URING_SETUP,
    ],
    extra: &[],
};

/// A connection negotiates (TLS included) and serves requests on the export's volume
/// through a queue of its own: its own descriptor of the image (`openat`; Landlock limits
/// which paths) and an io_uring it sets up; its writes may move the journal onto its next
/// medium like a vhost queue's.
const CONNECTION_SYSCALLS: Allowlist = Allowlist {
    kind: "nbd-connection",
    groups: &[
        confine::RUNTIME,
        confine::NET,
        confine::FILE_IO,
        confine::FILE_PATHS,
        confine::URING_SETUP,
    ],
    extra: &[],
};

/// An address to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// A host name or IP address and a port (0: any free port).
    Tcp {
        host: String,
        port: u16,
    },
    Unix {
        path: PathBuf,
    },
}

impl ListenAddress {
    /// Parses `HOST:PORT` (`[V6]:PORT` for IPv6) or `unix:PATH`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{text:?}: expected unix:PATH"));
            }
            return Ok(Self::Unix { path: path.into() });
        }
        let bad = || format!("{text:?}: expected HOST:PORT, [IPV6]:PORT or unix:PATH");
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse::<u16>().map_err(|_| bad())?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.strip_suffix(']').ok_or_else(bad)?,
            None if host.contains(':') => return Err(bad()),
            None => host,
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Self::Tcp {
            host: host.to_string(),
            port,
        })
    }

    /// True for a unix socket, or a host whose every address is a loopback address:
    /// where plaintext NBD may be served without `--insecure`.
    pub fn is_local(&self) -> bool {
        match self {
            Self::Unix { .. } => true,
            Self::Tcp { host, port } => match (host.as_str(), *port).to_socket_addrs() {
                Ok(addrs) => {
                    let addrs: Vec<_> = addrs.collect();
                    !addrs.is_empty() && addrs.iter().all(|a| is_loopback(a.ip()))
                }
                Err(_) => false,
            },
        }
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "{host}:{port}"),
            Self::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound listening socket.
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds `address`; a unix socket left behind by a process that is gone is replaced,
    /// one in use is refused. Returns the address bound (with the port a `:0` got).
    pub fn bind(address: &ListenAddress) -> io::Result<(Self, ListenAddress)> {
        match address {
            ListenAddress::Tcp { host, port } => {
                let listener = TcpListener::bind((host.as_str(), *port))?;
                let local = listener.local_addr()?;
                let bound = ListenAddress::Tcp {
                    host: local.ip().to_string(),
                    port: local.port(),
                };
                Ok((Self::Tcp(listener), bound))
            }
            ListenAddress::Unix { path } => {
                remove_stale_socket(path)?;
                Ok((Self::Unix(UnixListener::bind(path)?), address.clone()))
            }
        }
    }

    /// A handle to shut the socket down with, which ends a blocked `accept`.
    pub fn handle(&self) -> io::Result<OwnedFd> {
        match self {
            Self::Tcp(l) => l.as_fd().try_clone_to_owned(),
            Self::Unix(l) => l.as_fd().try_clone_to_owned(),
        }
    }

    fn accept(&self) -> io::Result<Socket> {
        match self {
            Self::Tcp(l) => {
                let (stream, _) = l.accept()?;
                // Replies are small and latency bound, as requests are.
                stream.set_nodelay(true)?;
                Ok(Socket::Tcp(stream))
            }
            Self::Unix(l) => Ok(Socket::Unix(l.accept()?.0)),
        }
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process listens on the socket",
        ));
    }
    std::fs::remove_file(path)
}

/// Shuts a listening socket down: its blocked `accept` returns.
pub(crate) fn shut_down_listener(handle: &OwnedFd) {
    let _ = nix::sys::socket::shutdown(handle.as_raw_fd(), nix::sys::socket::Shutdown::Both);
}

/// Accepts connections until the server stops.
pub(crate) fn accept_loop(shared: Arc<Shared>, listener: Listener, address: ListenAddress) {
    loop {
        let socket = match listener.accept() {
            Ok(socket) => socket,
            Err(_) if shared.is_stopping() => break,
            Err(e) => {
                // Out of descriptors or memory: give the connections that hold them time
                // to end instead of spinning on the error.
                log::warn!("nbd: accepting on {address}: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.is_stopping() {
            break;
        }
        let Some(admission) = shared.admit(&socket) else {
            socket.shutdown();
            continue;
        };
        let worker = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("ferry-nbd".into())
            .spawn(move || {
                confine::enter(&CONNECTION_SYSCALLS);
                serve_connection(&worker, socket, admission)
            });
        if let Err(e) = spawned {
            log::warn!("nbd: cannot start a connection thread: {e}");
        }
    }
    log::info!("nbd: stopped listening on {address}");
}

/// Negotiates, then serves the transmission phase, of one admitted connection.
fn serve_connection(shared: &Shared, socket: Socket, admission: super::Admission) {
    let deadline = Instant::now() + shared.options.handshake_timeout;
    let mut transport = Transport::plain(socket);
    match negotiate(shared, &mut transport, deadline) {
        Ok(negotiated) => transmission::serve(transport, negotiated),
        Err(end) => {
            match end {
                HandshakeEnd::Client => log::debug!("nbd: a client ended its handshake"),
                HandshakeEnd::Refused(reason) => {
                    let client = super::exports::client_name(transport.socket(), None);
                    log::info!("nbd: client {client} refused: {reason}");
                }
            }
            transport.close();
        }
    }
    drop(admission);
}

/// Counts refused connections so that a flood logs a line now and then, not one each.
pub(crate) fn log_refused(shared: &Shared) {
    let refused = shared.refused.fetch_add(1, Ordering::Relaxed) + 1;
    if refused.is_power_of_two() {
        log::warn!(
            "nbd: {refused} connections refused so far: {} at once is the limit (--nbd-max-connections)",
            shared.options.connections_max
        );
    }
}
