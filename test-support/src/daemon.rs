//! A server process run by a test (`ferry serve`, qemu-nbd, qemu-storage-daemon, nbdkit):
//! its output kept in a log, readiness waited for by polling, killed when its handle drops.

use crate::wait::{is_socket, unix_listening, wait_until};
use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// Default bound on a daemon's start (until it listens); only a hang reaches it.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

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

    /// Spawns `cmd` and returns once it listens on the unix socket `socket` (failing early
    /// if the process exits). A socket file left by a killed predecessor is removed first.
    pub fn spawn_listening(name: &str, cmd: Command, socket: &Path) -> Result<Self> {
        if is_socket(socket) && !unix_listening(socket) {
            std::fs::remove_file(socket)
                .with_context(|| format!("remove stale socket {}", socket.display()))?;
        }
        let mut daemon = Self::spawn(name, cmd)?;
        daemon.wait_listening(socket, START_TIMEOUT)?;
        Ok(daemon)
    }

    /// Waits until the process listens on the unix socket `socket` (bound under this very
    /// path, as the kernel's socket table says); fails with the log if it exits first.
    pub fn wait_listening(&mut self, socket: &Path, timeout: Duration) -> Result<()> {
        let what = format!("listening on {}", socket.display());
        self.wait_ready(&what, timeout, || unix_listening(socket))
    }

    /// Waits until `ready()` holds (e.g. the process accepts connections); fails with the log
    /// if the process exits first, or after `timeout` (a hang).
    pub fn wait_ready(
        &mut self,
        what: &str,
        timeout: Duration,
        ready: impl Fn() -> bool,
    ) -> Result<()> {
        let waited = wait_until(&format!("{} ready ({what})", self.name), timeout, || {
            if ready() {
                return Ok(true);
            }
            if let Some(status) = self.child.try_wait().context("poll daemon")? {
                bail!("{} exited ({status}) before {what}", self.name);
            }
            Ok(false)
        });
        waited.map_err(|e| e.context(format!("log of {}:\n{}", self.name, self.log())))
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory, in KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .context("read /proc/PID/status")?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS in /proc/PID/status")
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
        let mut status = None;
        let what = format!("{} exits", self.name);
        let waited = wait_until(&what, timeout, || {
            status = self.child.try_wait().context("poll daemon")?;
            Ok(status.is_some())
        });
        match (waited, status) {
            (Ok(()), Some(status)) => Ok(status),
            (Err(e), _) => Err(e.context(format!("log of {}:\n{}", self.name, self.log()))),
            (Ok(()), None) => bail!("{} exited without a status", self.name),
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
