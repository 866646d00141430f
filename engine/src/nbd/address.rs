//! Where an NBD export is: the server's address, the export's name and whether TLS is
//! required, and the URIs that name them (`nbd://HOST[:PORT]/EXPORT`,
//! `nbd+unix:///EXPORT?socket=PATH`, and `nbds://…` / `nbds+unix://…` for TLS, as qemu and
//! libnbd write them).

use std::path::PathBuf;

/// The IANA port of NBD, used when an `nbd://` URI names none.
pub const NBD_DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    Tcp { host: String, port: u16 },
    Unix { socket: PathBuf },
}

/// The name a client checks a server's certificate against on a unix socket, which names no
/// host: the server of a local socket is this host.
pub const UNIX_TLS_SERVER_NAME: &str = "localhost";

/// An export on a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportUri {
    pub address: NbdAddress,
    pub export: String,
    /// The scheme asks for TLS (`nbds://`, `nbds+unix://`): a connection without it is
    /// refused. (`nbd://` with credentials given uses TLS too.)
    pub tls: bool,
}

/// Why a text is not an NBD URI; the reason only (the caller names the text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct UriError {
    pub reason: &'static str,
}

impl ExportUri {
    /// True when `text` has one of the NBD schemes (whether or not the rest parses).
    pub fn has_scheme(text: &str) -> bool {
        ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"]
            .iter()
            .any(|scheme| text.starts_with(scheme))
    }

    /// Parses `nbd://HOST[:PORT]/EXPORT` (IPv6 hosts in brackets) or
    /// `nbd+unix:///EXPORT?socket=PATH`, and their TLS forms `nbds://…` and `nbds+unix://…`.
    pub fn parse(text: &str) -> Result<Self, UriError> {
        let (tls, rest) = match text.strip_prefix("nbds") {
            Some(rest) => (true, rest),
            None => (false, text.strip_prefix("nbd").unwrap_or(text)),
        };
        let mut uri = Self::parse_plain(rest)?;
        uri.tls = tls;
        Ok(uri)
    }

    /// Parses what follows `nbd` or `nbds`: `://HOST[:PORT]/EXPORT` or
    /// `+unix:///EXPORT?socket=PATH`.
    fn parse_plain(text: &str) -> Result<Self, UriError> {
        let bad = |reason| UriError { reason };
        if let Some(rest) = text.strip_prefix("+unix://") {
            let rest = rest
                .strip_prefix('/')
                .ok_or_else(|| bad("expected nbd+unix:///EXPORT?socket=PATH"))?;
            let (export, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("missing ?socket=PATH"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("missing socket=PATH"))?;
            return Ok(Self {
                address: NbdAddress::Unix {
                    socket: PathBuf::from(socket),
                },
                export: export.to_string(),
                tls: false,
            });
        }
        let rest = text
            .strip_prefix("://")
            .ok_or_else(|| bad("not an NBD URI"))?;
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad HOST:PORT"))?;
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        Ok(Self {
            address: NbdAddress::Tcp { host, port },
            export: export.to_string(),
            tls: false,
        })
    }

    /// The name the server's certificate must carry: the URI's host (a DNS name or an IP
    /// address), or [`UNIX_TLS_SERVER_NAME`] on a unix socket.
    pub fn tls_server_name(&self) -> &str {
        match &self.address {
            NbdAddress::Tcp { host, .. } => host,
            NbdAddress::Unix { .. } => UNIX_TLS_SERVER_NAME,
        }
    }
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(authority: &str) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, tail) = rest.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if tail.is_empty() => NBD_DEFAULT_PORT,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.to_string(), port.parse().ok()?)),
        None => Some((authority.to_string(), NBD_DEFAULT_PORT)),
    }
}

impl std::fmt::Display for ExportUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let export = &self.export;
        let scheme = if self.tls { "nbds" } else { "nbd" };
        match &self.address {
            NbdAddress::Tcp { host, port } => write!(f, "{scheme}://{host}:{port}/{export}"),
            NbdAddress::Unix { socket } => {
                write!(f, "{scheme}+unix:///{export}?socket={}", socket.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp() -> Result<(), UriError> {
        assert_eq!(
            ExportUri::parse("nbd://127.0.0.1:10810/disk0")?,
            ExportUri {
                address: NbdAddress::Tcp {
                    host: "127.0.0.1".into(),
                    port: 10810
                },
                export: "disk0".into(),
                tls: false
            }
        );
        assert_eq!(
            ExportUri::parse("nbd://host/e")?,
            ExportUri {
                address: NbdAddress::Tcp {
                    host: "host".into(),
                    port: NBD_DEFAULT_PORT
                },
                export: "e".into(),
                tls: false
            }
        );
        assert_eq!(
            ExportUri::parse("nbd://[::1]:99/x")?.to_string(),
            "nbd://::1:99/x".to_string()
        );
        Ok(())
    }

    #[test]
    fn parses_unix() -> Result<(), UriError> {
        let uri = ExportUri::parse("nbd+unix:///disk?socket=/tmp/s.sock")?;
        assert_eq!(
            uri,
            ExportUri {
                address: NbdAddress::Unix {
                    socket: "/tmp/s.sock".into()
                },
                export: "disk".into(),
                tls: false
            }
        );
        assert_eq!(uri.to_string(), "nbd+unix:///disk?socket=/tmp/s.sock");
        assert_eq!(uri.tls_server_name(), UNIX_TLS_SERVER_NAME);
        Ok(())
    }

    #[test]
    fn parses_tls_schemes() -> Result<(), UriError> {
        let uri = ExportUri::parse("nbds://10.0.0.2:10810/vm1")?;
        assert_eq!(
            uri,
            ExportUri {
                address: NbdAddress::Tcp {
                    host: "10.0.0.2".into(),
                    port: 10810
                },
                export: "vm1".into(),
                tls: true
            }
        );
        assert_eq!(uri.to_string(), "nbds://10.0.0.2:10810/vm1");
        assert_eq!(uri.tls_server_name(), "10.0.0.2");
        let uri = ExportUri::parse("nbds+unix:///vm1?socket=/run/n.sock")?;
        assert!(uri.tls);
        assert_eq!(uri.to_string(), "nbds+unix:///vm1?socket=/run/n.sock");
        assert_eq!(
            ExportUri::parse("nbds://host.example/e")?.tls_server_name(),
            "host.example"
        );
        assert!(ExportUri::has_scheme("nbds://h/e") && ExportUri::has_scheme("nbds+unix:///e"));
        Ok(())
    }

    #[test]
    fn refuses_bad_uris() {
        for text in [
            "nbd+unix:///disk",
            "nbd+unix://disk?socket=/s",
            "nbd://:12/x",
            "nbd://h:notaport/x",
            "nbd://[::1]x/y",
            "nbds+unix:///disk",
            "nbds:/h/e",
            "nbdx://h/e",
            "/dev/sdb",
        ] {
            assert!(
                ExportUri::parse(text).is_err(),
                "{text:?} should be refused"
            );
        }
        assert!(ExportUri::has_scheme("nbd+unix:///disk"));
        assert!(!ExportUri::has_scheme("file:nbd://x"));
    }
}
