//! systemd's readiness protocol (`Type=notify`, sd_notify(3)): state lines sent as one
//! datagram each to the unix socket named by `$NOTIFY_SOCKET` (a path, or an abstract
//! name after `@`). `READY=1` once every socket of the daemon is bound, so that units
//! ordered after ferry's start only when QEMU can connect; `STATUS=` lines for
//! `systemctl status`; `STOPPING=1` when shutdown begins. Without `$NOTIFY_SOCKET` (not
//! started by systemd) nothing is sent. A failed send is logged, never fatal: the daemon
//! serves whether or not its supervisor hears it.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where notifications go.
pub struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
    /// `$NOTIFY_SOCKET` as given, for messages.
    name: String,
}

impl Notifier {
    /// The notifier of `$NOTIFY_SOCKET`, if systemd (or a test) set it.
    pub fn from_env() -> Option<Self> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        let name = name.to_string_lossy().into_owned();
        match Self::connect(&name) {
            Ok(notifier) => Some(notifier),
            Err(e) => {
                log::warn!("NOTIFY_SOCKET={name}: {e}; systemd will not hear from ferry");
                None
            }
        }
    }

    fn connect(name: &str) -> std::io::Result<Self> {
        let address = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
            None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not an absolute path nor an abstract name (@NAME)",
                ))
            }
        };
        Ok(Self {
            socket: UnixDatagram::unbound()?,
            address,
            name: name.to_string(),
        })
    }

    /// Sends state lines (`READY=1`, `STATUS=...`) as one datagram.
    pub fn notify(&self, lines: &[&str]) {
        let mut message = lines.join("\n");
        message.push('\n');
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.address) {
            log::warn!("NOTIFY_SOCKET={}: {e}", self.name);
        }
    }
}

/// Sends `lines` when a notifier is there.
pub fn notify(notifier: Option<&Notifier>, lines: &[&str]) {
    if let Some(notifier) = notifier {
        notifier.notify(lines);
    }
}
