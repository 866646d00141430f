//! Where a ferry daemon's control protocol is served: a unix socket path, or
//! `ferry://HOST:PORT` for its TCP listener (mutual TLS). A URL may go on with a path
//! (`ferry://HOST:PORT/vm1`, a volume on that daemon), which [`FerryUrl`] keeps apart.

use std::fmt;
use std::path::PathBuf;

/// The scheme of a daemon's TCP control listener.
pub const SCHEME: &str = "ferry://";

/// A daemon's control endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAddress {
    /// The daemon's unix control socket (`--control PATH`).
    Unix(PathBuf),
    /// Its TCP listener (`--control-listen HOST:PORT`); `host` without IPv6 brackets.
    Tcp { host: String, port: u16 },
}

/// A `ferry://HOST:PORT[/PATH]` URL: the daemon's listener and what the path names on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FerryUrl {
    pub address: ControlAddress,
    /// The path after the port, without its leading `/` (empty when there is none).
    pub path: String,
}

impl ControlAddress {
    /// `ferry://HOST:PORT` (no path) or a unix socket path.
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with(SCHEME) {
            if text.is_empty() {
                return Err("an empty control address".into());
            }
            if text.contains("://") {
                return Err(format!(
                    "{text}: expected a unix socket path or {SCHEME}HOST:PORT"
                ));
            }
            return Ok(Self::Unix(PathBuf::from(text)));
        }
        let url = FerryUrl::parse(text)?;
        if !url.path.is_empty() {
            return Err(format!(
                "{text}: a control address is {SCHEME}HOST:PORT, without a path"
            ));
        }
        Ok(url.address)
    }

    /// True for a TCP listener (which speaks TLS only).
    pub fn is_tcp(&self) -> bool {
        matches!(self, Self::Tcp { .. })
    }
}

impl FerryUrl {
    /// Parses `ferry://HOST:PORT[/PATH]`; HOST may be a name, an IPv4 address or an IPv6
    /// address in brackets. The port is required: the control listener has no default.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |reason: &str| format!("{text}: {reason} (expected {SCHEME}HOST:PORT)");
        let rest = text
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("not a ferry:// URL"))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.strip_prefix('[') {
            Some(bracketed) => {
                let (host, after) = bracketed
                    .split_once(']')
                    .ok_or_else(|| bad("an IPv6 address without its closing bracket"))?;
                let port = after.strip_prefix(':').ok_or_else(|| bad("no port"))?;
                (host, port)
            }
            None => authority.rsplit_once(':').ok_or_else(|| bad("no port"))?,
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.contains(':') && !authority.starts_with('[') {
            return Err(bad("an IPv6 address must be in brackets"));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?;
        Ok(Self {
            address: ControlAddress::Tcp {
                host: host.to_string(),
                port,
            },
            path: path.to_string(),
        })
    }
}

impl fmt::Display for ControlAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "{}", path.display()),
            Self::Tcp { host, port } if host.contains(':') => write!(f, "{SCHEME}[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "{SCHEME}{host}:{port}"),
        }
    }
}

impl std::str::FromStr for ControlAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> ControlAddress {
        ControlAddress::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn addresses_are_paths_or_ferry_urls() {
        let cases = [
            (
                "/run/ferry/ctl.sock",
                Ok(ControlAddress::Unix("/run/ferry/ctl.sock".into())),
            ),
            ("ctl.sock", Ok(ControlAddress::Unix("ctl.sock".into()))),
            ("ferry://10.77.0.2:7000", Ok(tcp("10.77.0.2", 7000))),
            ("ferry://hostb.example:7000", Ok(tcp("hostb.example", 7000))),
            ("ferry://[::1]:7000", Ok(tcp("::1", 7000))),
            ("ferry://hostb", Err("no port")),
            ("ferry://hostb:0", Err("from 1 to 65535")),
            ("ferry://hostb:x", Err("from 1 to 65535")),
            ("ferry://:7000", Err("no host")),
            ("ferry://::1:7000", Err("in brackets")),
            ("ferry://[::1:7000", Err("closing bracket")),
            ("ferry://h:7000/vm1", Err("without a path")),
            ("nbd://h:10809/e", Err("unix socket path or ferry://")),
            ("", Err("empty")),
        ];
        for (text, expected) in cases {
            match (ControlAddress::parse(text), expected) {
                (Ok(address), Ok(want)) => {
                    assert_eq!(address, want, "{text}");
                    assert_eq!(address.to_string(), text, "{text} prints back");
                }
                (Err(e), Err(needle)) => assert!(e.contains(needle), "{text}: {e}"),
                (got, want) => panic!("{text}: got {got:?}, expected {want:?}"),
            }
        }
    }

    #[test]
    fn a_url_keeps_its_path_apart() {
        let url = FerryUrl::parse("ferry://10.77.0.2:7000/vm1");
        assert_eq!(
            url,
            Ok(FerryUrl {
                address: tcp("10.77.0.2", 7000),
                path: "vm1".into(),
            })
        );
        let bare = FerryUrl::parse("ferry://[fd00::2]:7000");
        assert_eq!(bare.map(|u| u.path), Ok(String::new()));
    }
}
