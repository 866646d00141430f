//! qemu-storage-daemon exporting a raw image over vhost-user-blk: the reference backend that
//! ferry's clients and benchmarks are checked against.

use crate::daemon::Daemon;
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Options of a qemu-storage-daemon vhost-user-blk export.
#[derive(Clone, Debug)]
pub struct QsdOpts {
    /// Raw image file to export.
    pub image: PathBuf,
    /// vhost-user socket path to listen on.
    pub socket: PathBuf,
    /// `num-queues` of the export (None: qsd's default of 1).
    pub num_queues: Option<u16>,
    /// `aio` of the file blockdev: "io_uring" (default), "threads" or "native".
    pub aio: String,
    pub writable: bool,
}

impl QsdOpts {
    pub fn new(image: &Path, socket: &Path) -> Self {
        Self {
            image: image.to_path_buf(),
            socket: socket.to_path_buf(),
            num_queues: None,
            aio: "io_uring".to_string(),
            writable: true,
        }
    }
}

/// qemu-storage-daemon exporting one raw image over vhost-user-blk.
pub struct Qsd {
    pub daemon: Daemon,
    pub socket: PathBuf,
}

impl Qsd {
    /// Starts qsd and returns once it listens on its socket.
    pub fn start(opts: &QsdOpts) -> Result<Self> {
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=f0,filename={},aio={}",
            opts.image.display(),
            opts.aio
        ));
        let mut export = format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable={}",
            opts.socket.display(),
            if opts.writable { "on" } else { "off" }
        );
        if let Some(n) = opts.num_queues {
            export.push_str(&format!(",num-queues={n}"));
        }
        cmd.arg("--export").arg(export);
        let daemon = Daemon::spawn_listening("qemu-storage-daemon", cmd, &opts.socket)?;
        Ok(Self {
            daemon,
            socket: opts.socket.clone(),
        })
    }
}
