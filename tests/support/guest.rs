//! Boots a QEMU (TCG) guest on a vhost-user-blk socket and runs a shell script in it.
//!
//! The guest is the host's kernel with the busybox initramfs of `initramfs.rs`; `/init` loads
//! the virtio modules, waits for `/dev/vda`, runs the script with `sh` and powers off. The script
//! reports to the test by printing lines `RESULT key=value [key=value...]` on the console.
//! The console is the serial port on QEMU's stdio: `RunningGuest::send_line` types into it, so
//! a script can wait for the host with `read -r line < /dev/console`.

use super::initramfs;
use anyhow::{bail, Context as _, Result};
use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Default bound on one guest run (TCG boot takes ~8-20 s alone; CI machines are slow).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(240);

/// Options of one guest run.
#[derive(Clone, Debug)]
pub struct GuestOpts {
    /// `num-queues` of the vhost-user-blk-pci device (None: QEMU's default).
    pub num_queues: Option<u16>,
    /// `reconnect-ms` of the chardev: QEMU reconnects when the backend restarts.
    pub reconnect_ms: Option<u64>,
    /// Guest memory in MiB (the memfd backend shared with the vhost-user backend).
    pub mem_mib: u32,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Bound on the whole run, boot included.
    pub timeout: Duration,
    /// Further vhost-user-blk sockets, seen by the guest as /dev/vdb, /dev/vdc, ...
    pub extra_sockets: Vec<PathBuf>,
    /// Appended to the kernel command line.
    pub extra_cmdline: String,
    /// Further QEMU arguments (e.g. `-qmp unix:PATH,server=on,wait=off`, `-incoming URI`).
    pub extra_args: Vec<String>,
    /// The network namespace QEMU runs in (`ip netns exec`), for a host of a test network.
    pub namespace: Option<String>,
}

impl Default for GuestOpts {
    fn default() -> Self {
        Self {
            num_queues: None,
            reconnect_ms: None,
            mem_mib: 512,
            cpus: 1,
            timeout: timeout_from_env(),
            extra_sockets: Vec::new(),
            extra_cmdline: String::new(),
            extra_args: Vec::new(),
            namespace: None,
        }
    }
}

/// `FERRY_GUEST_TIMEOUT_SECS` overrides the default bound of a guest run.
fn timeout_from_env() -> Duration {
    std::env::var("FERRY_GUEST_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT)
}

/// The outcome of a finished guest run.
#[derive(Clone, Debug)]
pub struct GuestOutput {
    /// The console output (carriage returns removed).
    pub console: String,
    /// The exit status of the test script (None: it never finished, e.g. a kernel panic).
    pub script_exit: Option<i32>,
    /// How long QEMU ran.
    pub elapsed: Duration,
}

impl GuestOutput {
    /// All `RESULT key=value` pairs; a later key overrides an earlier one.
    pub fn results(&self) -> HashMap<String, String> {
        parse_results(&self.console)
    }

    /// The value of one `RESULT` key, or an error quoting the console.
    pub fn result(&self, key: &str) -> Result<String> {
        self.results()
            .remove(key)
            .with_context(|| format!("guest printed no RESULT {key}=...\n{}", self.tail()))
    }

    /// Fails unless the script exited 0.
    pub fn ensure_success(&self) -> Result<&Self> {
        match self.script_exit {
            Some(0) => Ok(self),
            other => bail!("guest script exit {other:?}\n{}", self.tail()),
        }
    }

    /// The last lines of the console, for error messages.
    pub fn tail(&self) -> String {
        console_tail(&self.console)
    }
}

/// Parses every `RESULT k=v k2=v2` line of a console.
pub fn parse_results(console: &str) -> HashMap<String, String> {
    let mut map = HashMap::new();
    for line in console.lines() {
        let Some(rest) = line.trim().strip_prefix("RESULT ") else {
            continue;
        };
        for pair in rest.split_whitespace() {
            if let Some((k, v)) = pair.split_once('=') {
                map.insert(k.to_string(), v.to_string());
            }
        }
    }
    map
}

fn console_tail(console: &str) -> String {
    const TAIL_LINES: usize = 60;
    let lines: Vec<&str> = console.lines().collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    format!(
        "--- guest console (last {TAIL_LINES} lines) ---\n{}",
        lines[start..].join("\n")
    )
}

/// Entry points for guest runs.
pub struct Guest;

impl Guest {
    /// Boots a guest on `socket`, runs `script` to the end, returns the console.
    pub fn run_script(socket: &Path, script: &str, opts: &GuestOpts) -> Result<GuestOutput> {
        let guest = Self::spawn(socket, script, opts)?;
        guest.wait(opts.timeout)
    }

    /// Boots a guest in the background; use `wait_for` / `send_line` / `wait` on it.
    pub fn spawn(socket: &Path, script: &str, opts: &GuestOpts) -> Result<RunningGuest> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-guest-")
            .tempdir()
            .context("create guest temp dir")?;
        let initrd = dir.path().join("initrd.cpio");
        initramfs::write_initramfs(&initrd, script)?;
        let kernel = &initramfs::boot_assets()?.kernel;
        let mut cmd = qemu_command(socket, kernel, &initrd, opts);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn qemu-system-x86_64 (install qemu-system-x86)")?;
        let console = Arc::new(Console::default());
        let mut pumps = Vec::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let console = Arc::clone(&console);
            pumps.push(std::thread::spawn(move || console.pump(stream)));
        }
        Ok(RunningGuest {
            stdin: child.stdin.take(),
            pumps,
            child,
            console,
            started: Instant::now(),
            _dir: dir,
        })
    }
}

fn qemu_command(socket: &Path, kernel: &Path, initrd: &Path, opts: &GuestOpts) -> Command {
    let mut cmd = match &opts.namespace {
        Some(namespace) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", namespace, "qemu-system-x86_64"]);
            cmd
        }
        None => Command::new("qemu-system-x86_64"),
    };
    let mem = opts.mem_mib;
    cmd.args([
        "-accel",
        "tcg",
        "-m",
        &format!("{mem}M"),
        "-smp",
        &opts.cpus.to_string(),
    ]);
    cmd.args([
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
    ]);
    cmd.args(["-numa", "node,memdev=mem"]);
    let sockets = std::iter::once(socket).chain(opts.extra_sockets.iter().map(PathBuf::as_path));
    for (i, sock) in sockets.enumerate() {
        let mut chardev = format!("socket,id=c{i},path={}", sock.display());
        if let Some(ms) = opts.reconnect_ms {
            chardev.push_str(&format!(",reconnect-ms={ms}"));
        }
        let mut device = format!("vhost-user-blk-pci,chardev=c{i}");
        if let Some(n) = opts.num_queues {
            device.push_str(&format!(",num-queues={n}"));
        }
        cmd.args(["-chardev", &chardev, "-device", &device]);
    }
    cmd.args([
        "-nographic",
        "-nodefaults",
        "-serial",
        "stdio",
        "-monitor",
        "none",
    ]);
    cmd.args(["-no-reboot", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd);
    let cmdline = format!(
        "console=ttyS0 panic=-1 quiet loglevel=4 {}",
        opts.extra_cmdline
    );
    cmd.args(["-append", cmdline.trim()]);
    cmd.args(&opts.extra_args);
    cmd
}

/// The console text collected so far, with a condition variable for waiters.
#[derive(Default)]
struct Console {
    text: Mutex<String>,
    changed: Condvar,
}

impl Console {
    fn pump(&self, mut stream: Box<dyn std::io::Read + Send>) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            let chunk = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
            if let Ok(mut text) = self.text.lock() {
                text.push_str(&chunk);
            }
            self.changed.notify_all();
        }
    }

    fn snapshot(&self) -> String {
        self.text.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// A guest being run; QEMU is killed when this is dropped.
pub struct RunningGuest {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Console>,
    pumps: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
    _dir: tempfile::TempDir,
}

impl RunningGuest {
    /// The console output so far.
    pub fn console(&self) -> String {
        self.console.snapshot()
    }

    /// Waits until the console contains `marker` (e.g. "RESULT phase=writing").
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(marker) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().context("poll qemu")? {
                bail!(
                    "qemu exited ({status}) before {marker:?}\n{}",
                    console_tail(&self.console())
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "timeout waiting for {marker:?}\n{}",
                    console_tail(&self.console())
                );
            }
            let guard = self
                .console
                .text
                .lock()
                .map_err(|_| anyhow::anyhow!("console lock"))?;
            let _ = self
                .console
                .changed
                .wait_timeout(guard, Duration::from_millis(200));
        }
    }

    /// Types one line into the guest's console (read it with `read -r x < /dev/console`).
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("guest stdin closed")?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .context("write to guest console")
    }

    /// Waits for QEMU to exit (the script powers the guest off); kills it after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Result<GuestOutput> {
        let deadline = self.started + timeout;
        loop {
            if self.child.try_wait().context("poll qemu")?.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "guest timed out after {timeout:?}\n{}",
                    console_tail(&self.console())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The pipes reach EOF once QEMU has exited: collect everything.
        for pump in self.pumps.drain(..) {
            let _ = pump.join();
        }
        let console = self.console();
        let script_exit = console
            .lines()
            .rev()
            .filter_map(|l| l.trim().strip_prefix("FERRY-GUEST script-exit="))
            .find_map(|v| v.parse().ok());
        Ok(GuestOutput {
            console,
            script_exit,
            elapsed: self.started.elapsed(),
        })
    }

    /// Kills QEMU now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        self.kill();
    }
}
