//! The byte streams the control protocol runs over: a unix socket, or TLS 1.3 over TCP with
//! certificates on both ends. Connecting and the TLS handshake on either side are bounded in
//! time, and a TLS failure becomes one line a person can act on (whose certificate was
//! refused, and why).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};

use super::address::ControlAddress;
use super::control_protocol::{is_timeout, TimedRead};
use crate::tls::{self, PeerIdentity};

/// The first byte of every TLS record of a handshake (`ContentType::Handshake`): what a
/// TLS client sends first, and a JSON request never starts with.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Why a stream could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("TLS handshake with {address} failed: {reason}")]
    Handshake { address: String, reason: String },
}

/// A client's connection to a daemon.
pub enum ClientStream {
    Unix(UnixStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

/// A daemon's end of a TLS connection, the client's certificate verified.
pub type ServerTlsStream = StreamOwned<ServerConnection, TcpStream>;

impl ClientStream {
    /// Connects to `address`: a unix socket as is; a TCP listener within `connect_timeout`,
    /// then the TLS handshake with `tls` within `handshake_timeout`, the daemon's
    /// certificate checked against the CA and the host connected to.
    pub fn connect(
        address: &ControlAddress,
        tls: Option<&Arc<ClientConfig>>,
        connect_timeout: Duration,
        handshake_timeout: Duration,
    ) -> Result<Self, TransportError> {
        let failed = |reason: String| TransportError::Connect {
            address: address.to_string(),
            reason,
        };
        match address {
            ControlAddress::Unix(path) => UnixStream::connect(path)
                .map(Self::Unix)
                .map_err(|e| failed(e.to_string())),
            ControlAddress::Tcp { host, port } => {
                let config = tls.ok_or_else(|| {
                    failed("a TCP control listener speaks TLS only: TLS credentials are needed (--tls-creds)".into())
                })?;
                let socket = connect_tcp(host, *port, connect_timeout).map_err(failed)?;
                client_handshake(socket, config.clone(), host, handshake_timeout)
                    .map(|stream| Self::Tls(Box::new(stream)))
                    .map_err(|reason| TransportError::Handshake {
                        address: address.to_string(),
                        reason,
                    })
            }
        }
    }

    /// Sets the timeout of every write (a peer that does not read).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(stream) => stream.set_write_timeout(timeout),
            Self::Tls(stream) => stream.sock.set_write_timeout(timeout),
        }
    }
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(stream) => stream.read(buf),
            Self::Tls(stream) => stream.read(buf),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(stream) => stream.write(buf),
            Self::Tls(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Unix(stream) => stream.flush(),
            Self::Tls(stream) => stream.flush(),
        }
    }
}

impl TimedRead for ClientStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(stream) => UnixStream::set_read_timeout(stream, timeout),
            Self::Tls(stream) => stream.sock.set_read_timeout(timeout),
        }
    }
}

impl TimedRead for ServerTlsStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(timeout)
    }
}

/// Connects to the first address of `host` that answers, each try bounded by `timeout`.
fn connect_tcp(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let addresses = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    let mut last = format!("{host} has no address");
    for address in addresses {
        match TcpStream::connect_timeout(&address, timeout) {
            Ok(socket) => {
                // Requests and replies are single small lines: send them at once.
                socket.set_nodelay(true).map_err(|e| e.to_string())?;
                return Ok(socket);
            }
            Err(e) if is_timeout(&e) => last = format!("no answer within {timeout:?}"),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// Drives `connection`'s handshake on `socket` until it is done or `timeout` has passed.
fn handshake<C, D>(
    connection: &mut C,
    socket: &mut TcpStream,
    timeout: Duration,
) -> Result<(), String>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    let deadline = Instant::now() + timeout;
    while connection.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("not completed within {timeout:?}"));
        }
        socket
            .set_read_timeout(Some(left))
            .and_then(|()| socket.set_write_timeout(Some(left)))
            .map_err(|e| e.to_string())?;
        match connection.complete_io(socket) {
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return Err(format!("not completed within {timeout:?}")),
            Err(e) => return Err(describe_io_error(&e)),
        }
    }
    Ok(())
}

fn client_handshake(
    mut socket: TcpStream,
    config: Arc<ClientConfig>,
    host: &str,
    timeout: Duration,
) -> Result<StreamOwned<ClientConnection, TcpStream>, String> {
    let name = tls::server_name(host).map_err(|e| e.to_string())?;
    let mut connection = ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    handshake(&mut connection, &mut socket, timeout)?;
    Ok(StreamOwned::new(connection, socket))
}

/// Why a daemon did not take a TLS connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    /// The client's first bytes are not a TLS handshake (a plaintext client).
    #[error("the client does not speak TLS")]
    Plaintext,
    #[error("{0}")]
    Handshake(String),
}

/// Whether the client on `socket` starts a TLS handshake, from its first byte (peeked, so it
/// stays for the handshake). Waits for that byte up to `timeout`.
pub fn starts_tls(socket: &TcpStream, timeout: Duration) -> Result<bool, AcceptError> {
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| AcceptError::Handshake(e.to_string()))?;
    let mut first = [0u8; 1];
    match socket.peek(&mut first) {
        Ok(0) => Err(AcceptError::Handshake(
            "the client closed the connection before the handshake".into(),
        )),
        Ok(_) => Ok(first[0] == TLS_HANDSHAKE_RECORD),
        Err(e) if is_timeout(&e) => Err(AcceptError::Handshake(format!(
            "the client sent nothing within {timeout:?}"
        ))),
        Err(e) => Err(AcceptError::Handshake(e.to_string())),
    }
}

/// The daemon's side of the handshake, bounded by `timeout`; returns the stream and the
/// names in the client's certificate (which the configuration required and verified).
pub fn accept_tls(
    mut socket: TcpStream,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<(ServerTlsStream, PeerIdentity), AcceptError> {
    if !starts_tls(&socket, timeout)? {
        return Err(AcceptError::Plaintext);
    }
    let mut connection =
        ServerConnection::new(config).map_err(|e| AcceptError::Handshake(e.to_string()))?;
    handshake(&mut connection, &mut socket, timeout).map_err(AcceptError::Handshake)?;
    let identity = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(PeerIdentity::of)
        .ok_or_else(|| {
            AcceptError::Handshake("the client's certificate has no readable subject".into())
        })?;
    Ok((StreamOwned::new(connection, socket), identity))
}

/// A stream error in words: the TLS error it carries, if any, said for a person.
pub fn describe_io_error(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return "the peer closed the connection".into();
    }
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls_error) => describe_tls_error(tls_error),
        None => e.to_string(),
    }
}

/// A TLS error in words, for both ends ("the peer" is the other end).
pub fn describe_tls_error(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    match e {
        Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => {
            "the peer's certificate is not signed by our CA".into()
        }
        Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            "the peer's certificate is not valid for the address connected to (subjectAltName)"
                .into()
        }
        Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            "the peer's certificate has expired".into()
        }
        Error::InvalidCertificate(Cert::InvalidPurpose | Cert::InvalidPurposeContext { .. }) => {
            "the peer's certificate is not for this use (extendedKeyUsage)".into()
        }
        Error::InvalidCertificate(other) => format!("the peer's certificate is refused: {other:?}"),
        Error::NoCertificatesPresented => "the peer presented no certificate".into(),
        Error::AlertReceived(
            alert @ (Alert::UnknownCA
            | Alert::BadCertificate
            | Alert::CertificateUnknown
            | Alert::CertificateRequired
            | Alert::CertificateExpired
            | Alert::UnsupportedCertificate
            | Alert::AccessDenied),
        ) => format!("the peer refused our certificate (TLS alert {alert:?})"),
        // A signature that does not verify: in practice our certificate names an issuer
        // the peer knows, but another key signed it (a CA of the same name).
        Error::AlertReceived(Alert::DecryptError) => {
            "the peer refused our certificate's signature (TLS alert DecryptError): is it signed by the peer's CA?".into()
        }
        Error::AlertReceived(alert) => format!("the peer sent TLS alert {alert:?}"),
        Error::InvalidMessage(_)
        | Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. } => {
            "the peer does not speak TLS (is it a ferry control listener?)".into()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
