//! Real NBD servers for the migration tests: `qemu-nbd` and `qemu-storage-daemon --nbd-server`,
//! on a loopback TCP port or a unix socket, killed when their handle drops.

use super::daemon::{Daemon, START_TIMEOUT};
use anyhow::{bail, Context as _, Result};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    /// 127.0.0.1:port
    Tcp(u16),
    /// A unix socket path.
    Unix(PathBuf),
}

impl NbdAddr {
    /// A TCP address on a port that was free a moment ago.
    pub fn free_tcp() -> Result<Self> {
        Ok(Self::Tcp(free_port()?))
    }

    /// The NBD URI of `export` on this address (`nbd://127.0.0.1:P/E` or `nbd+unix:///E?socket=S`).
    pub fn uri(&self, export: &str) -> String {
        match self {
            Self::Tcp(port) => format!("nbd://127.0.0.1:{port}/{export}"),
            Self::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
        }
    }
}

/// A loopback TCP port that is free right now (bound and released; tiny race accepted).
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0 to pick a port")?;
    Ok(listener
        .local_addr()
        .context("local addr of probe listener")?
        .port())
}

/// A running NBD server process serving one export.
pub struct NbdServer {
    pub daemon: Daemon,
    pub addr: NbdAddr,
    pub export: String,
}

impl NbdServer {
    /// The URI clients connect to.
    pub fn uri(&self) -> String {
        self.addr.uri(&self.export)
    }

    /// `qemu-nbd -f raw -x EXPORT --persistent --shared=8 IMG` on `addr` (writable).
    pub fn qemu_nbd(image: &Path, export: &str, addr: &NbdAddr) -> Result<Self> {
        Self::qemu_nbd_clients(image, export, addr, 8)
    }

    /// As [`qemu_nbd`](Self::qemu_nbd), serving at most `clients` connections at once.
    pub fn qemu_nbd_clients(
        image: &Path,
        export: &str,
        addr: &NbdAddr,
        clients: u32,
    ) -> Result<Self> {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "-x", export, "--persistent"]);
        cmd.arg(format!("--shared={clients}"));
        match addr {
            NbdAddr::Tcp(port) => cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]),
            NbdAddr::Unix(path) => cmd.arg("-k").arg(path),
        };
        cmd.arg(image);
        Self::start("qemu-nbd", cmd, addr, export)
    }

    /// `qemu-storage-daemon --nbd-server` exporting the raw `image` as `export` (writable).
    pub fn qsd(image: &Path, export: &str, addr: &NbdAddr) -> Result<Self> {
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=f0,filename={},aio=io_uring",
            image.display()
        ));
        let server = match addr {
            NbdAddr::Tcp(port) => format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
            NbdAddr::Unix(path) => format!("addr.type=unix,addr.path={}", path.display()),
        };
        cmd.arg("--nbd-server").arg(server);
        cmd.arg("--export").arg(format!(
            "type=nbd,id=n0,node-name=f0,name={export},writable=on"
        ));
        Self::start("qemu-storage-daemon-nbd", cmd, addr, export)
    }

    fn start(name: &str, cmd: Command, addr: &NbdAddr, export: &str) -> Result<Self> {
        let mut daemon = Daemon::spawn(name, cmd)?;
        match addr {
            NbdAddr::Unix(path) => daemon.wait_for_socket(path, START_TIMEOUT)?,
            NbdAddr::Tcp(port) => wait_for_port(&mut daemon, *port, START_TIMEOUT)?,
        }
        Ok(Self {
            daemon,
            addr: addr.clone(),
            export: export.to_string(),
        })
    }
}

/// Waits until 127.0.0.1:`port` accepts connections (the probe connection is closed at once).
fn wait_for_port(daemon: &mut Daemon, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if !daemon.is_running() {
            bail!(
                "NBD server exited before listening on {addr}:\n{}",
                daemon.log()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "NBD server not listening on {addr} within {timeout:?}:\n{}",
                daemon.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
