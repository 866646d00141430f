//! Real NBD servers for tests: `qemu-nbd`, `qemu-storage-daemon --nbd-server` and `nbdkit`,
//! on a loopback TCP port or a unix socket, plain or (the QEMU ones) requiring TLS with
//! `tls-creds-x509` credentials (`crate::pki`), started once they listen, killed when their
//! handle drops.

use crate::daemon::{Daemon, START_TIMEOUT};
use crate::wait::{is_socket, tcp_listening, unix_listening};
use anyhow::{ensure, Context as _, Result};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;

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
        self.uri_with_scheme(export, false)
    }

    /// The URI of `export` with the TLS schemes (`nbds://…`, `nbds+unix://…`) when `tls`.
    pub fn uri_with_scheme(&self, export: &str, tls: bool) -> String {
        let s = if tls { "s" } else { "" };
        match self {
            Self::Tcp(port) => format!("nbd{s}://127.0.0.1:{port}/{export}"),
            Self::Unix(path) => format!("nbd{s}+unix:///{export}?socket={}", path.display()),
        }
    }

    /// True when a server listens on this address.
    pub fn listening(&self) -> bool {
        match self {
            Self::Tcp(port) => tcp_listening(*port),
            Self::Unix(path) => unix_listening(path),
        }
    }

    /// The `addr.*` options of a QEMU socket address (`--nbd-server` of qemu-storage-daemon).
    fn qemu_socket_options(&self) -> String {
        match self {
            Self::Tcp(port) => format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
            Self::Unix(path) => format!("addr.type=unix,addr.path={}", path.display()),
        }
    }
}

/// A loopback TCP port that is free right now (bound and released; tiny race accepted).
/// A TCP port on 127.0.0.1 that nothing listens on now, for a server a test starts.
///
/// Drawn at random below the kernel's ephemeral range (`ip_local_port_range`, which starts at
/// 32768 unless changed): a port the kernel hands out for `bind(0)` is also what it hands the
/// next outgoing connection of any process, and tests running side by side would draw the same
/// sequence. A server started on the port is checked to be the one listening
/// ([`crate::wait::tcp_listening_by`]), so a collision that remains shows as that server failing
/// to start, with its log.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    const LOW: u16 = 20000;
    const HIGH: u16 = 32767;
    let seed = u64::from(std::process::id()) << 32
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
        ^ DRAWS
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut rng = crate::rng::Rng::new(seed | 1);
    for _ in 0..200 {
        let port = LOW + rng.below(u64::from(HIGH - LOW)) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    // Everything drawn was taken: let the kernel choose.
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
    /// The server requires TLS (started with credentials).
    pub tls: bool,
}

/// The id of the `tls-creds-x509` object the QEMU servers are started with.
const TLS_OBJECT_ID: &str = "tls0";

/// QEMU's `--object` for server credentials in `dir` (QEMU's x509 layout, see `crate::pki`).
fn tls_object(dir: &Path) -> String {
    format!(
        "tls-creds-x509,id={TLS_OBJECT_ID},dir={},endpoint=server",
        dir.display()
    )
}

impl NbdServer {
    /// The URI clients connect to: `nbds://…` / `nbds+unix://…` when the server requires
    /// TLS.
    pub fn uri(&self) -> String {
        self.addr.uri_with_scheme(&self.export, self.tls)
    }

    /// The URI with the plain schemes (`nbd://…`) even when the server requires TLS.
    pub fn plain_uri(&self) -> String {
        self.addr.uri(&self.export)
    }

    /// `qemu-nbd -f raw -x EXPORT --persistent --shared=8 IMG` on `addr` (writable).
    pub fn qemu_nbd(image: &Path, export: &str, addr: &NbdAddr) -> Result<Self> {
        Self::qemu_nbd_with(image, export, addr, QemuNbdOpts::default())
    }

    /// As [`qemu_nbd`](Self::qemu_nbd), serving at most `clients` connections at once.
    pub fn qemu_nbd_clients(
        image: &Path,
        export: &str,
        addr: &NbdAddr,
        clients: u32,
    ) -> Result<Self> {
        let opts = QemuNbdOpts {
            clients,
            ..QemuNbdOpts::default()
        };
        Self::qemu_nbd_with(image, export, addr, opts)
    }

    /// `qemu-nbd` exporting the raw `image` as `export` as `opts` say.
    pub fn qemu_nbd_with(
        image: &Path,
        export: &str,
        addr: &NbdAddr,
        opts: QemuNbdOpts,
    ) -> Result<Self> {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "-x", export, "--persistent"]);
        cmd.arg(format!("--shared={}", opts.clients));
        if opts.read_only {
            cmd.arg("--read-only");
        }
        if let Some(dir) = &opts.tls_creds {
            cmd.arg("--object").arg(tls_object(dir));
            cmd.args(["--tls-creds", TLS_OBJECT_ID]);
        }
        match addr {
            NbdAddr::Tcp(port) => cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]),
            NbdAddr::Unix(path) => cmd.arg("-k").arg(path),
        };
        cmd.arg(image);
        let mut server = Self::start("qemu-nbd", cmd, addr, export)?;
        server.tls = opts.tls_creds.is_some();
        Ok(server)
    }

    /// `qemu-storage-daemon --nbd-server` exporting the raw `image` as `export` (writable).
    pub fn qsd(image: &Path, export: &str, addr: &NbdAddr) -> Result<Self> {
        Self::qsd_with(image, export, addr, QsdOpts::default())
    }

    /// As [`qsd`](Self::qsd), as `opts` say (TLS).
    pub fn qsd_with(image: &Path, export: &str, addr: &NbdAddr, opts: QsdOpts) -> Result<Self> {
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=f0,filename={},aio=io_uring",
            image.display()
        ));
        let mut server_options = addr.qemu_socket_options();
        if let Some(dir) = &opts.tls_creds {
            cmd.arg("--object").arg(tls_object(dir));
            server_options.push_str(&format!(",tls-creds={TLS_OBJECT_ID}"));
        }
        cmd.arg("--nbd-server").arg(server_options);
        cmd.arg("--export").arg(format!(
            "type=nbd,id=n0,node-name=f0,name={export},writable=on"
        ));
        let mut server = Self::start("qemu-storage-daemon-nbd", cmd, addr, export)?;
        server.tls = opts.tls_creds.is_some();
        Ok(server)
    }

    /// `qemu-storage-daemon --nbd-server` exporting the raw `image` through blkdebug with
    /// `align=` and `max-transfer=`, which qemu's NBD server advertises as the export's minimum
    /// block size and maximum payload (`NBD_INFO_BLOCK_SIZE`). Every request it receives is
    /// traced to its log (`nbd_receive_request`), for [`requests`](Self::requests).
    pub fn qsd_block_limits(
        image: &Path,
        export: &str,
        addr: &NbdAddr,
        limits: BlockLimits,
    ) -> Result<Self> {
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ));
        cmd.arg("--blockdev").arg(format!(
            "driver=blkdebug,node-name=d0,image=f0,align={},max-transfer={}",
            limits.align_bytes, limits.max_transfer_bytes
        ));
        cmd.arg("--nbd-server").arg(addr.qemu_socket_options());
        cmd.arg("--export").arg(format!(
            "type=nbd,id=n0,node-name=d0,name={export},writable=on"
        ));
        cmd.arg("--trace").arg("nbd_receive_request");
        Self::start("qemu-storage-daemon-nbd-limits", cmd, addr, export)
    }

    /// `nbdkit PLUGIN ARGS...` serving `export` on `addr`, e.g. `&["memory", "size=16M"]`, or
    /// a plugin behind filters (`&["--filter=error", "memory", "size=16M", "error-rate=1"]`).
    /// Should the handle never drop, it exits with the thread that started it
    /// (`--exit-with-parent`).
    pub fn nbdkit(export: &str, addr: &NbdAddr, plugin_and_args: &[&str]) -> Result<Self> {
        let mut cmd = Command::new("nbdkit");
        cmd.args(["--foreground", "--exit-with-parent", "--exportname", export]);
        match addr {
            NbdAddr::Tcp(port) => cmd.args(["--ipaddr", "127.0.0.1", "--port", &port.to_string()]),
            NbdAddr::Unix(path) => cmd.arg("--unix").arg(path),
        };
        cmd.args(plugin_and_args);
        Self::start("nbdkit", cmd, addr, export)
    }

    /// SIGKILL and reap (the server crashed, as far as clients can tell).
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// The requests the server has received so far, from its `nbd_receive_request` trace
    /// (servers started by [`qsd_block_limits`](Self::qsd_block_limits)).
    pub fn requests(&self) -> Result<Vec<NbdRequest>> {
        self.daemon
            .log()
            .lines()
            .filter_map(|line| line.split_once("Got request: ").map(|(_, r)| r))
            .map(NbdRequest::parse)
            .collect()
    }

    /// Fails unless every request the server received (see [`requests`](Self::requests)) is
    /// aligned to `align` and every read and write carries at most `payload_max` bytes;
    /// returns how many reads and writes carried exactly `payload_max` (pieces of split ones).
    pub fn check_requests(&self, align: u64, payload_max: u64) -> Result<usize> {
        let requests = self.requests()?;
        ensure!(!requests.is_empty(), "the server traced no request");
        for r in &requests {
            ensure!(
                r.offset_bytes % align == 0 && r.len_bytes % align == 0,
                "request not aligned to {align}: {r:?}"
            );
            ensure!(
                !r.has_payload() || r.len_bytes <= payload_max,
                "payload above the export's maximum {payload_max}: {r:?}"
            );
        }
        Ok(requests
            .iter()
            .filter(|r| r.has_payload() && r.len_bytes == payload_max)
            .count())
    }

    /// Spawns `cmd` and returns once it listens on `addr` (a socket file left by a killed
    /// predecessor on the same path is removed first).
    fn start(name: &str, cmd: Command, addr: &NbdAddr, export: &str) -> Result<Self> {
        if let NbdAddr::Unix(path) = addr {
            if is_socket(path) && !unix_listening(path) {
                std::fs::remove_file(path)
                    .with_context(|| format!("remove stale socket {}", path.display()))?;
            }
        }
        let mut daemon = Daemon::spawn(name, cmd)?;
        let pid = daemon.pid();
        daemon.wait_ready(&addr.uri(export), START_TIMEOUT, || match addr {
            NbdAddr::Tcp(port) => crate::wait::tcp_listening_by(pid, *port),
            NbdAddr::Unix(_) => addr.listening(),
        })?;
        Ok(Self {
            daemon,
            addr: addr.clone(),
            export: export.to_string(),
            tls: false,
        })
    }
}

/// How [`NbdServer::qemu_nbd_with`] serves.
#[derive(Clone, Debug)]
pub struct QemuNbdOpts {
    /// Connections served at once (`--shared`).
    pub clients: u32,
    /// Refuse writes (`--read-only`): the export says it is read-only.
    pub read_only: bool,
    /// Require TLS with the server credentials in this directory (`--tls-creds`).
    pub tls_creds: Option<PathBuf>,
}

impl Default for QemuNbdOpts {
    fn default() -> Self {
        Self {
            clients: 8,
            read_only: false,
            tls_creds: None,
        }
    }
}

/// How [`NbdServer::qsd_with`] serves.
#[derive(Clone, Debug, Default)]
pub struct QsdOpts {
    /// Require TLS with the server credentials in this directory (`--nbd-server
    /// ...,tls-creds=`).
    pub tls_creds: Option<PathBuf>,
}

/// What blkdebug makes qemu's NBD server advertise: the minimum block size (`align`) and the
/// maximum payload (`max-transfer`, a multiple of `align`).
#[derive(Clone, Copy, Debug)]
pub struct BlockLimits {
    pub align_bytes: u64,
    pub max_transfer_bytes: u64,
}

/// One request as qemu's NBD server traced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NbdRequest {
    /// `NBD_CMD_*`: 0 read, 1 write, 2 disconnect, 3 flush, 4 trim, 6 write-zeroes.
    pub cmd: u16,
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

impl NbdRequest {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;

    /// Parses `{ magic = 0x25609513, .flags = 0x0, .type = 0x1, from = 0, len = 1048576 }`.
    fn parse(text: &str) -> Result<Self> {
        let field = |name: &str| -> Result<u64> {
            let value = text
                .split([',', '{', '}'])
                .find_map(|part| part.trim().strip_prefix(name)?.trim().strip_prefix('='))
                .map(str::trim)
                .with_context(|| format!("no {name} in traced request {text:?}"))?;
            let parsed = match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => value.parse(),
            };
            parsed.with_context(|| format!("bad {name} in traced request {text:?}"))
        };
        Ok(Self {
            cmd: u16::try_from(field(".type")?).context("request type")?,
            offset_bytes: field("from")?,
            len_bytes: field("len")?,
        })
    }

    /// True for a read or a write: the commands with a payload.
    pub fn has_payload(&self) -> bool {
        self.cmd == Self::READ || self.cmd == Self::WRITE
    }
}
