//! Where an NBD export is: the server's address and the export's name, and the URIs that
//! name them (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, as qemu and
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

/// An export on a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportUri {
    pub address: NbdAddress,
    pub export: String,
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
        text.starts_with("nbd://") || text.starts_with("nbd+unix://")
    }

    /// Parses `nbd://HOST[:PORT]/EXPORT` (IPv6 hosts in brackets) or
    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub fn parse(text: &str) -> Result<Self, UriError> {
        let bad = |reason| UriError { reason };
        if let Some(rest) = text.strip_prefix("nbd+unix://") {
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
            });
        }
        let rest = text
            .strip_prefix("nbd://")
            .ok_or_else(|| bad("not an NBD URI"))?;
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad HOST:PORT"))?;
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        Ok(Self {
            address: NbdAddress::Tcp { host, port },
            export: export.to_string(),
        })
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
        match &self.address {
            NbdAddress::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
            NbdAddress::Unix { socket } => {
                write!(f, "nbd+unix:///{export}?socket={}", socket.display())
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
                export: "disk0".into()
            }
        );
        assert_eq!(
            ExportUri::parse("nbd://host/e")?,
            ExportUri {
                address: NbdAddress::Tcp {
                    host: "host".into(),
                    port: NBD_DEFAULT_PORT
                },
                export: "e".into()
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
                export: "disk".into()
            }
        );
        assert_eq!(uri.to_string(), "nbd+unix:///disk?socket=/tmp/s.sock");
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
