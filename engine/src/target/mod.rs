//! Migration targets: where a mirror copies a volume to, behind one synchronous interface.
//!
//! A target is a byte range that many threads write at once (the copier's workers and the
//! mirror's workers): a local file or block device ([`file::FileTarget`]) or a remote NBD
//! export ([`nbd::NbdTarget`]). [`TargetSpec`] is the operator's text form of a target.

pub mod file;
pub mod nbd;

use std::path::PathBuf;

use crate::nbd::{BlockSizes, ExportUri};
pub use crate::nbd::{NbdAddress, NBD_DEFAULT_PORT};

/// Why a target operation failed. Any of these fails a migration job; the guest keeps
/// running on its source.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("target {target}: cannot open: {source}")]
    Open {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("target {target}: {reason}")]
    Unusable { target: String, reason: String },
    #[error("target {target}: cannot connect: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("target {target}: NBD handshake failed: {reason}")]
    Handshake { target: String, reason: String },
    #[error("target {target}: {op} at offset {offset_bytes} ({len_bytes} bytes) failed: {source}")]
    Io {
        target: String,
        op: &'static str,
        offset_bytes: u64,
        len_bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("target {target}: the NBD connection is lost: {reason}")]
    Disconnected { target: String, reason: String },
    #[error(
        "target {target}: the server refused {op} at offset {offset_bytes}: NBD error {errno}"
    )]
    Refused {
        target: String,
        op: &'static str,
        offset_bytes: u64,
        errno: u32,
    },
    #[error("bad target {text:?}: {reason}")]
    BadSpec { text: String, reason: String },
}

/// A byte-addressed place to copy to. Every method may be called from many threads at once.
pub trait Target: Send + Sync {
    /// How the operator named it (for messages and status).
    fn describe(&self) -> String;
    /// The usable size in bytes.
    fn size_bytes(&self) -> u64;
    fn write_at(&self, offset_bytes: u64, data: &[u8]) -> Result<(), TargetError>;
    /// Makes the range read back as zeros; `unmap` allows deallocating it.
    fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
    ) -> Result<(), TargetError>;
    fn read_at(&self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), TargetError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), TargetError>;
    /// True when the target reads as zeros wherever nothing was written (a file ferry
    /// just created sparse): holes of the source need not be copied then.
    fn known_zero(&self) -> bool {
        false
    }
    /// True when every request waits a network round trip (NBD).
    fn is_remote(&self) -> bool {
        false
    }
    /// Lets go of what the target holds on the far side (an NBD connection: servers limit
    /// their clients) once nothing will use it again; later calls fail.
    fn close(&self) {}
    /// The size constraints an NBD export negotiated (`None` for other targets).
    fn block_sizes(&self) -> Option<BlockSizes> {
        None
    }
}

/// A target as the operator names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// A local file or block device (created sparse when missing).
    File(PathBuf),
    /// An NBD export: `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    Nbd { address: NbdAddress, export: String },
}

impl TargetSpec {
    /// Parses `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, or a path
    /// (optionally `file:PATH`).
    pub fn parse(text: &str) -> Result<Self, TargetError> {
        let bad = |reason: &str| TargetError::BadSpec {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        if ExportUri::has_scheme(text) {
            let ExportUri { address, export } =
                ExportUri::parse(text).map_err(|e| bad(e.reason))?;
            return Ok(Self::Nbd { address, export });
        }
        if text.contains("://") {
            return Err(bad("unknown scheme (use a path, nbd:// or nbd+unix://)"));
        }
        let path = text.strip_prefix("file:").unwrap_or(text);
        if path.is_empty() {
            return Err(bad("empty path"));
        }
        Ok(Self::File(PathBuf::from(path)))
    }
}

impl std::fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Nbd {
                address: NbdAddress::Tcp { host, port },
                export,
            } => write!(f, "nbd://{host}:{port}/{export}"),
            Self::Nbd {
                address: NbdAddress::Unix { socket },
                export,
            } => write!(f, "nbd+unix:///{export}?socket={}", socket.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nbd_tcp() -> Result<(), TargetError> {
        assert_eq!(
            TargetSpec::parse("nbd://127.0.0.1:10810/disk0")?,
            TargetSpec::Nbd {
                address: NbdAddress::Tcp {
                    host: "127.0.0.1".into(),
                    port: 10810
                },
                export: "disk0".into()
            }
        );
        assert_eq!(
            TargetSpec::parse("nbd://host/e")?,
            TargetSpec::Nbd {
                address: NbdAddress::Tcp {
                    host: "host".into(),
                    port: NBD_DEFAULT_PORT
                },
                export: "e".into()
            }
        );
        assert_eq!(
            TargetSpec::parse("nbd://[::1]:99/x")?.to_string(),
            "nbd://::1:99/x".to_string()
        );
        Ok(())
    }

    #[test]
    fn parses_nbd_unix_and_files() -> Result<(), TargetError> {
        assert_eq!(
            TargetSpec::parse("nbd+unix:///disk?socket=/tmp/s.sock")?,
            TargetSpec::Nbd {
                address: NbdAddress::Unix {
                    socket: "/tmp/s.sock".into()
                },
                export: "disk".into()
            }
        );
        assert_eq!(
            TargetSpec::parse("/dev/sdb")?,
            TargetSpec::File("/dev/sdb".into())
        );
        assert_eq!(
            TargetSpec::parse("file:a.img")?,
            TargetSpec::File("a.img".into())
        );
        Ok(())
    }

    #[test]
    fn refuses_bad_specs() {
        for text in [
            "",
            "nbd+unix:///disk",
            "nbd://:12/x",
            "nbd://h:notaport/x",
            "http://x/y",
        ] {
            assert!(
                matches!(TargetSpec::parse(text), Err(TargetError::BadSpec { .. })),
                "{text:?} should be refused"
            );
        }
    }
}
