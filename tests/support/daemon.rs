//! Starts and stops backend processes for tests: any daemon (e.g. `ferry serve`) and
//! qemu-storage-daemon as the reference vhost-user-blk backend. Processes die with their handle.

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Default bound on a daemon's start (until its socket exists).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Poll interval while waiting for sockets and exits.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Waits until `path` exists and is a unix socket.
pub fn wait_for_socket(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !is_socket(path) {
        if Instant::now() >= deadline {
            bail!(
                "socket {} did not appear within {timeout:?}",
                path.display()
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    Ok(())
}

fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// A child process whose stdout and stderr go to a log file; killed (SIGKILL) on drop.
pub struct Daemon {
    name: String,
    child: Child,
    log_path: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Daemon {
    /// Spawns `cmd` and returns at once.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        let log_dir = tempfile::Builder::new()
            .prefix("ferry-daemon-")
            .tempdir()
            .context("create daemon log dir")?;
        let log_path = log_dir.path().join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).context("create daemon log")?;
        let log2 = log.try_clone().context("clone daemon log fd")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log_path,
            _log_dir: log_dir,
        })
    }

    /// Spawns `cmd` and waits until `socket` exists (failing early if the process exits).
    /// A stale socket file left by a killed predecessor is removed first.
    pub fn spawn_with_socket(name: &str, cmd: Command, socket: &Path) -> Result<Self> {
        if is_socket(socket) {
            std::fs::remove_file(socket)
                .with_context(|| format!("remove stale socket {}", socket.display()))?;
        }
        let mut daemon = Self::spawn(name, cmd)?;
        daemon.wait_for_socket(socket, START_TIMEOUT)?;
        Ok(daemon)
    }

    /// Waits until `socket` exists; fails with the log if the process exits first.
    pub fn wait_for_socket(&mut self, socket: &Path, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !is_socket(socket) {
            if let Some(status) = self.child.try_wait().context("poll daemon")? {
                bail!(
                    "{} exited ({status}) before creating {}:\n{}",
                    self.name,
                    socket.display(),
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not create {} within {timeout:?}:\n{}",
                    self.name,
                    socket.display(),
                    self.log()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        Ok(())
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (e.g. SIGTERM, SIGSTOP, SIGCONT).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = i32::try_from(self.child.id()).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal).with_context(|| format!("send {signal} to {}", self.name))
    }

    /// Waits for the exit; fails after `timeout` (the process keeps running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("poll daemon")? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still running after {timeout:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit (SIGKILL after it, and an error).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait().context("poll daemon")? {
            return Ok(status);
        }
        self.signal(Signal::SIGTERM)?;
        let result = self.wait_exit(timeout);
        if result.is_err() {
            self.kill();
        }
        result
    }

    /// SIGKILL and reap (a crash, as far as clients can tell).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

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

/// qemu-storage-daemon exporting one raw image over vhost-user-blk (the reference backend).
pub struct Qsd {
    pub daemon: Daemon,
    pub socket: PathBuf,
}

impl Qsd {
    /// Starts qsd and waits for its socket.
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
        let daemon = Daemon::spawn_with_socket("qemu-storage-daemon", cmd, &opts.socket)?;
        Ok(Self {
            daemon,
            socket: opts.socket.clone(),
        })
    }
}
