//! The NBD-backed backend: the volume served from an export of a real server, `qemu-nbd` on a
//! unix socket (the whole export), `qemu-storage-daemon` on loopback TCP (a slice of a
//! larger export, at an offset), or `qemu-storage-daemon` with a small maximum payload, so
//! that larger requests go to the server in pieces. After the case the exported image holds
//! what the volume reads, the bytes around a slice are untouched, and every request the
//! server received kept to its limits.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context as _, Result};
use ferry_engine::{Volume, VolumeConfig, SECTOR_SIZE};
use ferry_test_support::nbd::{BlockLimits, NbdAddr, NbdServer, QemuNbdOpts};
use ferry_test_support::{command_available, require, scratch_dir};
use tempfile::TempDir;

use super::file::filled_image;
use crate::fixture::{Access, Beside, Fixture, FixtureIo, FILL_BYTE, VOLUME_BYTES};
use ferry_test_support::compare_bytes;

/// Which server exports the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// `qemu-nbd` on a unix socket, the whole export. A read-only case gets a read-only
    /// export (`--read-only`): the export makes the volume read-only.
    QemuNbdUnix,
    /// `qemu-storage-daemon` on loopback TCP; the volume is the slice at
    /// [`SLICE_OFFSET_BYTES`] of a larger export.
    QsdSliceTcp,
    /// `qemu-storage-daemon` over blkdebug on a unix socket, advertising a maximum payload of
    /// [`SPLIT_PAYLOAD_BYTES`]: every larger read or write is split, and its pieces continue
    /// one another.
    QsdSplitUnix,
}

/// The maximum payload of a [`Server::QsdSplitUnix`] export.
const SPLIT_PAYLOAD_BYTES: u64 = 64 << 10;

/// Where a [`Server::QsdSliceTcp`] volume starts in its export (and how much export follows it).
const SLICE_OFFSET_BYTES: u64 = 1 << 20;

impl Server {
    fn program(self) -> &'static str {
        match self {
            Self::QemuNbdUnix => "qemu-nbd",
            Self::QsdSliceTcp | Self::QsdSplitUnix => "qemu-storage-daemon",
        }
    }
}

/// A volume on an export of `server`; `None` when the server program is missing.
pub fn open(server: Server, access: Access) -> Result<Option<Fixture>> {
    if !require(server.program(), command_available(server.program())) {
        return Ok(None);
    }
    // In /tmp: a unix socket's path must stay short.
    let dir = scratch_dir()?;
    let (offset_bytes, image_bytes) = match server {
        Server::QemuNbdUnix | Server::QsdSplitUnix => (0, VOLUME_BYTES),
        Server::QsdSliceTcp => (SLICE_OFFSET_BYTES, VOLUME_BYTES + 2 * SLICE_OFFSET_BYTES),
    };
    let image = filled_image(dir.path(), "e.img", image_bytes)?;
    let process = start(server, &image, dir.path(), access)?;
    let volume = Volume::open(VolumeConfig {
        name: "v".into(),
        path: PathBuf::from(process.uri()),
        read_only: access.read_only() && server != Server::QemuNbdUnix,
        offset_bytes,
        length_bytes: (offset_bytes > 0).then_some(VOLUME_BYTES),
        ..Default::default()
    })
    .with_context(|| format!("open {} as a volume", process.uri()))?;
    ensure!(volume.backing().nbd().is_some(), "the volume is not on NBD");
    ensure!(volume.size_bytes() == VOLUME_BYTES);
    ensure!(volume.read_only() == access.read_only());
    let export = Export {
        image,
        offset_bytes,
        traced: server == Server::QsdSplitUnix,
        server: process,
        _dir: dir,
    };
    Ok(Some(Fixture::new(FixtureIo::new(volume)?, export)))
}

/// Starts `server` exporting `image` as `e`, its unix socket (if any) in `dir`.
fn start(server: Server, image: &Path, dir: &Path, access: Access) -> Result<NbdServer> {
    let socket = NbdAddr::Unix(dir.join("nbd.sock"));
    match server {
        Server::QemuNbdUnix => {
            let opts = QemuNbdOpts {
                read_only: access.read_only(),
                ..QemuNbdOpts::default()
            };
            NbdServer::qemu_nbd_with(image, "e", &socket, opts)
        }
        Server::QsdSliceTcp => NbdServer::qsd(image, "e", &NbdAddr::free_tcp()?),
        Server::QsdSplitUnix => {
            let limits = BlockLimits {
                align_bytes: SECTOR_SIZE,
                max_transfer_bytes: SPLIT_PAYLOAD_BYTES,
            };
            NbdServer::qsd_block_limits(image, "e", &socket, limits)
        }
    }
}

/// The server and the image it exports.
struct Export {
    image: PathBuf,
    /// Where the volume starts in the image.
    offset_bytes: u64,
    /// True when the server traces the requests it receives.
    traced: bool,
    /// Killed on drop, after the volume's queue has closed its connection.
    server: NbdServer,
    _dir: TempDir,
}

impl Beside for Export {
    fn check_after(&mut self, _: &mut FixtureIo, content: &[u8]) -> Result<()> {
        // The volume flushed before reading back: the server has written everything.
        let image = std::fs::read(&self.image).context("read the exported image")?;
        let start = self.offset_bytes as usize;
        let end = start + content.len();
        compare_bytes(
            "the export's slice after the case",
            &image[start..end],
            content,
        )?;
        ensure!(
            image[..start]
                .iter()
                .chain(&image[end..])
                .all(|&b| b == FILL_BYTE),
            "the case changed the export outside the volume's slice"
        );
        if self.traced {
            // The read-back's 1 MiB requests, at least, reach the server in whole pieces.
            let pieces = self
                .server
                .check_requests(SECTOR_SIZE, SPLIT_PAYLOAD_BYTES)?;
            ensure!(pieces > 0, "no request was split at the maximum payload");
        }
        Ok(())
    }
}
