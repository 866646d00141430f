//! A `ferry serve` exporting volumes over NBD for the tests, the commands of the real
//! clients (`qemu-img`, `qemu-io`, `nbdinfo`, `nbdcopy`) run to their end, and TLS
//! credential directories for the server and its clients.

use anyhow::{bail, ensure, Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support;
use support::daemon::Daemon;
use support::nbd::free_port;
use support::wait::{tcp_listening, HANG_TIMEOUT};

/// Bound on one client command: only a hang reaches it.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
pub const MIB: u64 = 1 << 20;

/// A running `ferry serve` with NBD listeners on a loopback port and a unix socket.
pub struct Ferry {
    pub daemon: Daemon,
    pub port: u16,
    pub nbd_socket: PathBuf,
    pub control: PathBuf,
}

impl Ferry {
    /// `ferry serve` with `volumes` (`--volume` specs), listening for NBD on 127.0.0.1 and
    /// on a unix socket in `dir`, with `extra` arguments; returns once both listen.
    pub fn start(dir: &Path, volumes: &[String], extra: &[String]) -> Result<Self> {
        let port = free_port()?;
        let nbd_socket = dir.join("nbd.sock");
        let control = dir.join("ctl.sock");
        let mut cmd = Command::new(support::ferry_bin());
        cmd.arg("serve");
        for spec in volumes {
            cmd.arg("--volume").arg(spec);
        }
        cmd.arg("--nbd-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--nbd-listen")
            .arg(format!("unix:{}", nbd_socket.display()))
            .arg("--control")
            .arg(&control)
            .args(extra)
            .env("RUST_LOG", "info");
        let mut daemon = Daemon::spawn_listening("ferry-serve", cmd, &control)?;
        daemon.wait_ready("NBD on TCP", HANG_TIMEOUT, || tcp_listening(port))?;
        Ok(Self {
            daemon,
            port,
            nbd_socket,
            control,
        })
    }

    /// `nbd://127.0.0.1:PORT/EXPORT` (`nbds://` for TLS).
    pub fn uri(&self, export: &str, tls: bool) -> String {
        let scheme = if tls { "nbds" } else { "nbd" };
        format!("{scheme}://127.0.0.1:{}/{export}", self.port)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_socket.display())
    }

    /// query-volumes' entry for `name`.
    pub fn volume_info(&self, name: &str) -> Result<serde_json::Value> {
        support::ferry::query_volume(&self.control, name)
    }

    /// The daemon's resident memory, in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        self.daemon.rss_kib()
    }
}

/// The output of a finished client command.
#[derive(Debug)]
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(self) -> Result<Self> {
        ensure!(self.success, "failed: {}\n{}", self.stdout, self.stderr);
        Ok(self)
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("not JSON: {}", self.stdout))
    }
}

/// Runs `program args` to its end (killed after [`CLIENT_TIMEOUT`]: a hang).
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let dir = tempfile::tempdir()?;
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?)
        .spawn()
        .with_context(|| format!("spawn {program}"))?;
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        success: status.success(),
        stdout: std::fs::read_to_string(out)?,
        stderr: std::fs::read_to_string(err)?,
    })
}

/// Bytes of `path` allocated on disk.
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// Writes `data` at `offset` of the file `path`.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, offset)?;
    Ok(())
}

/// TLS credentials: the server's directory, a client directory per client name from the
/// same CA, and one from a foreign CA.
pub struct Pki {
    pub server: PathBuf,
    ca: support::pki::Pki,
    foreign: support::pki::Pki,
}

impl Pki {
    pub fn new() -> Result<Self> {
        let ca = support::pki::Pki::new("ferry test CA")?;
        let server = ca.server_credentials("server", &support::pki::Subject::named("localhost"))?;
        let foreign = support::pki::Pki::new("someone else's CA")?;
        Ok(Self {
            server,
            ca,
            foreign,
        })
    }

    /// A client directory with a certificate for `cn` from the server's CA.
    pub fn client(&self, cn: &str) -> Result<PathBuf> {
        self.ca.client_credentials(&format!("client-{cn}"), cn)
    }

    /// A client directory whose CA (and so certificate) the server does not know.
    pub fn foreign_client(&self, cn: &str) -> Result<PathBuf> {
        self.foreign
            .client_credentials(&format!("foreign-{cn}"), cn)
    }
}
