//! Tests of the NBD server in-process: ferry's own NBD client and a hand-written raw
//! client against a server on a unix socket, over a volume on a temporary image.

mod fencing;
mod handshake;
pub(crate) mod raw_client;
mod tls;
mod transmission;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{ExportConfig, ListenAddress, NbdServer, ServerOptions};
use crate::{Volume, VolumeConfig};
use raw_client::{RawClient, Res};

pub(crate) const MIB: u64 = 1 << 20;

pub(crate) struct Fixture {
    pub _dir: tempfile::TempDir,
    pub server: NbdServer,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub volume: Arc<Volume>,
}

/// A server on a unix socket exporting one volume (`v`, `size_bytes`) on a new sparse image.
pub(crate) fn fixture(size_bytes: u64, read_only: bool, options: ServerOptions) -> Res<Fixture> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("v.img");
    let volume = Volume::open(VolumeConfig {
        name: "v".into(),
        path: image.clone(),
        size_bytes: Some(size_bytes),
        ..VolumeConfig::default()
    })?;
    let server = NbdServer::new(options)?;
    let socket = dir.path().join("nbd.sock");
    server.listen(&ListenAddress::Unix {
        path: socket.clone(),
    })?;
    server.add_export(ExportConfig {
        name: "v".into(),
        volume: volume.clone(),
        read_only,
        description: "a test volume".into(),
        clients: None,
    })?;
    Ok(Fixture {
        _dir: dir,
        server,
        socket,
        image,
        volume,
    })
}

impl Fixture {
    pub fn stream(&self) -> Res<UnixStream> {
        let s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        Ok(s)
    }

    /// A raw client past the greeting.
    pub fn client(&self) -> Res<RawClient<UnixStream>> {
        RawClient::greet(self.stream()?)
    }

    /// A raw client in the transmission phase on export `v`.
    pub fn session(&self, structured: bool) -> Res<RawClient<UnixStream>> {
        let mut c = self.client()?;
        c.go("v", structured)?;
        Ok(c)
    }

    pub fn image_bytes(&self) -> Res<Vec<u8>> {
        Ok(std::fs::read(&self.image)?)
    }
}

/// True when the peer closed the stream: a read returns the end or a reset (not the
/// read timeout, which only catches a hang).
pub(crate) fn is_closed(s: &mut UnixStream) -> bool {
    use std::io::{ErrorKind, Read};
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}
