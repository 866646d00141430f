//! Migration destinations: where a mirror copies volumes to, behind one synchronous
//! interface. The operator calls a destination the migration's *target*, and every message
//! and status field does too.
//!
//! A destination is a byte range that many threads write at once (the copier's workers and
//! the mirror's workers): a local file or block device ([`file::FileDestination`]) or a
//! remote NBD export ([`nbd::NbdDestination`]). [`DestinationSpec`] is the operator's text
//! form of one.

pub mod file;
pub mod nbd;

use std::os::fd::RawFd;
use std::path::PathBuf;

use crate::nbd::{BlockSizes, ExportUri};

/// Why a destination operation failed. Any of these fails a migration job; the guest keeps
/// running on its source.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
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
pub trait Destination: Send + Sync {
    /// How the operator named it (for messages and status).
    fn describe(&self) -> String;
    /// The usable size in bytes.
    fn size_bytes(&self) -> u64;
    fn write_at(&self, offset_bytes: u64, data: &[u8]) -> Result<(), DestinationError>;
    /// Makes the range read back as zeros; `unmap` allows deallocating it.
    fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
    ) -> Result<(), DestinationError>;
    fn read_at(&self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), DestinationError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), DestinationError>;
    /// True when the destination reads as zeros wherever nothing was written (a file ferry
    /// just created sparse): holes of the source need not be copied then.
    fn known_zero(&self) -> bool {
        false
    }
    /// True when every request waits a network round trip (NBD).
    fn is_remote(&self) -> bool {
        false
    }
    /// Lets go of what the destination holds on the far side (an NBD connection: servers limit
    /// their clients) once nothing will use it again; later calls fail.
    fn close(&self) {}
    /// The size constraints an NBD export negotiated (`None` for other destinations).
    fn block_sizes(&self) -> Option<BlockSizes> {
        None
    }
    /// True when [`send_writes`](Self::send_writes) keeps writes in flight without a thread
    /// waiting on each (an NBD export).
    fn pipelines_writes(&self) -> bool {
        false
    }
    /// Sends `writes` (drained) without waiting for them where the destination can (see
    /// [`pipelines_writes`](Self::pipelines_writes)); each one's `done` runs once its write
    /// has ended, on whichever thread sees the end. The default writes them one by one.
    fn send_writes(&self, writes: &mut Vec<OwnedWrite>) {
        for write in writes.drain(..) {
            let result = self.write_at(write.offset_bytes, &write.data);
            (write.done)(result);
        }
    }
    /// Fails the destination when a write sent by [`send_writes`](Self::send_writes) has
    /// waited too long to end; its sender calls this now and then.
    fn expire_overdue(&self) {}
    /// The descriptor of a local file or block device that a volume's queue may write
    /// mirrored guest writes to itself (`None` for other destinations). It stays open for as
    /// long as the destination does.
    fn local_file(&self) -> Option<LocalFile> {
        None
    }
}

/// A write handed to [`Destination::send_writes`], and what to run once it has ended.
pub struct OwnedWrite {
    pub offset_bytes: u64,
    pub data: Vec<u8>,
    pub done: Box<dyn FnOnce(Result<(), DestinationError>) + Send>,
}

/// A destination's open local file, as a volume queue writes to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalFile {
    pub fd: RawFd,
    /// The file lives in memory (tmpfs): its writes never wait for a device.
    pub memory_backed: bool,
}

/// A destination as the operator names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationSpec {
    /// A local file or block device (created sparse when missing).
    File(PathBuf),
    /// An NBD export: `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`, or
    /// their TLS forms `nbds://…` and `nbds+unix://…`.
    Nbd(ExportUri),
}

impl DestinationSpec {
    /// Parses `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH` (or `nbds://…`,
    /// `nbds+unix://…`), or a path (optionally `file:PATH`).
    pub fn parse(text: &str) -> Result<Self, DestinationError> {
        let bad = |reason: &str| DestinationError::BadSpec {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        if ExportUri::has_scheme(text) {
            return ExportUri::parse(text)
                .map(Self::Nbd)
                .map_err(|e| bad(e.reason));
        }
        if text.contains("://") {
            return Err(bad(
                "unknown scheme (use a path, nbd://, nbd+unix://, nbds:// or nbds+unix://)",
            ));
        }
        let path = text.strip_prefix("file:").unwrap_or(text);
        if path.is_empty() {
            return Err(bad("empty path"));
        }
        Ok(Self::File(PathBuf::from(path)))
    }
}

impl std::fmt::Display for DestinationSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Nbd(uri) => write!(f, "{uri}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::{NbdAddress, NBD_DEFAULT_PORT};

    #[test]
    fn parses_nbd_uris() -> Result<(), DestinationError> {
        assert_eq!(
            DestinationSpec::parse("nbd://127.0.0.1:10810/disk0")?,
            DestinationSpec::Nbd(ExportUri {
                address: NbdAddress::Tcp {
                    host: "127.0.0.1".into(),
                    port: 10810
                },
                export: "disk0".into(),
                tls: false
            })
        );
        assert_eq!(
            DestinationSpec::parse("nbd://host/e")?.to_string(),
            format!("nbd://host:{NBD_DEFAULT_PORT}/e")
        );
        assert_eq!(
            DestinationSpec::parse("nbd+unix:///disk?socket=/tmp/s.sock")?,
            DestinationSpec::Nbd(ExportUri {
                address: NbdAddress::Unix {
                    socket: "/tmp/s.sock".into()
                },
                export: "disk".into(),
                tls: false
            })
        );
        Ok(())
    }

    #[test]
    fn parses_files() -> Result<(), DestinationError> {
        assert_eq!(
            DestinationSpec::parse("/dev/sdb")?,
            DestinationSpec::File("/dev/sdb".into())
        );
        assert_eq!(
            DestinationSpec::parse("file:a.img")?,
            DestinationSpec::File("a.img".into())
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
                matches!(
                    DestinationSpec::parse(text),
                    Err(DestinationError::BadSpec { .. })
                ),
                "{text:?} should be refused"
            );
        }
        let refused = DestinationSpec::parse("nbd://:12/x").map_err(|e| e.to_string());
        assert_eq!(
            refused,
            Err("bad target \"nbd://:12/x\": missing host".to_string())
        );
    }
}
