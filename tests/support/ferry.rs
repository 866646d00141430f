//! Runs the real `ferry` binary for tests: `ferry serve` as a daemon (waiting for all its
//! sockets), one-shot commands with a time bound, and `ferry query` against a control socket.

use super::daemon::{Daemon, START_TIMEOUT};
use anyhow::{bail, ensure, Context as _, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Bound on a `ferry` command that is expected to finish by itself (an error, a query).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// `ferry serve` with `args`, as a running daemon once it listens on every path of `sockets`.
pub fn serve(args: &[String], sockets: &[&Path]) -> Result<Daemon> {
    let mut cmd = Command::new(super::ferry_bin());
    cmd.arg("serve").args(args);
    let (first, rest) = sockets
        .split_first()
        .context("serve needs a socket to wait for")?;
    let mut daemon = Daemon::spawn_listening("ferry-serve", cmd, first)?;
    for socket in rest {
        daemon.wait_listening(socket, START_TIMEOUT)?;
    }
    Ok(daemon)
}

/// `--volume` argument pair for a spec such as `name=a,path=..,socket=..`.
pub fn volume_args(spec: &str) -> [String; 2] {
    ["--volume".to_string(), spec.to_string()]
}

/// The outcome of a finished `ferry` command.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `ferry ARGS` in `cwd` (None: the test's cwd) to its end; kills it and fails after
/// `timeout` (e.g. a `serve` that should have refused to start but is serving).
pub fn run(args: &[String], cwd: Option<&Path>, timeout: Duration) -> Result<Finished> {
    let out_dir = tempfile::Builder::new()
        .prefix("ferry-cmd-")
        .tempdir()
        .context("create output dir")?;
    let out_path = out_dir.path().join("stdout");
    let err_path = out_dir.path().join("stderr");
    let mut cmd = Command::new(super::ferry_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).context("create stdout file")?)
        .stderr(std::fs::File::create(&err_path).context("create stderr file")?);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawn ferry {args:?}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("poll ferry")? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "ferry {args:?} still running after {timeout:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Finished {
        status,
        stdout: std::fs::read_to_string(&out_path).context("read stdout")?,
        stderr: std::fs::read_to_string(&err_path).context("read stderr")?,
    })
}

/// `ferry query --control CONTROL COMMAND`, parsed from its JSON output.
pub fn query(control: &Path, command: &str) -> Result<serde_json::Value> {
    let args = [
        "query".to_string(),
        "--control".to_string(),
        control.display().to_string(),
        command.to_string(),
    ];
    let out = run(&args, None, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "ferry query {command} failed ({}): {}",
            out.status,
            out.stderr
        );
    }
    serde_json::from_str(&out.stdout)
        .with_context(|| format!("ferry query printed no JSON: {}", out.stdout))
}

/// The entry of volume `name` in `query-volumes`.
pub fn query_volume(control: &Path, name: &str) -> Result<serde_json::Value> {
    let volumes = query(control, "query-volumes")?;
    volumes
        .as_array()
        .and_then(|list| list.iter().find(|v| v["name"] == name))
        .cloned()
        .with_context(|| format!("volume {name} not in query-volumes: {volumes}"))
}

/// A path inside `dir`, as a `String` for `--volume` specs.
pub fn path_str(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// Names and sizes of the files in `dir`.
pub fn listing(dir: &Path) -> Result<BTreeMap<String, u64>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).context("list dir")? {
        let entry = entry.context("dir entry")?;
        let len = entry.metadata().context("stat")?.len();
        files.insert(entry.file_name().to_string_lossy().into_owned(), len);
    }
    Ok(files)
}

/// Runs `ferry serve ARGS`, which must fail with one line on stderr naming `expect`, and must
/// leave `dir` as it was.
pub fn refused(dir: &Path, args: &[String], expect: &str) -> Result<String> {
    let before = listing(dir)?;
    let mut full = vec!["serve".to_string()];
    full.extend_from_slice(args);
    let out = run(&full, Some(dir), COMMAND_TIMEOUT)?;
    ensure!(
        !out.status.success(),
        "ferry serve {args:?} succeeded; stderr:\n{}",
        out.stderr
    );
    let stderr = out.stderr.trim();
    ensure!(
        stderr.lines().count() == 1 && stderr.starts_with("ferry: "),
        "ferry serve {args:?}: expected one error line, got:\n{stderr}"
    );
    ensure!(
        stderr.contains(expect),
        "ferry serve {args:?}: error does not mention {expect:?}: {stderr}"
    );
    let after = listing(dir)?;
    ensure!(
        before == after,
        "ferry serve {args:?} changed the directory: {before:?} -> {after:?}"
    );
    eprintln!("refused as expected: {stderr}");
    Ok(stderr.to_string())
}

pub fn vol(dir: &Path, name: &str, image: &str, socket: &str, rest: &str) -> [String; 2] {
    volume_args(&format!(
        "name={name},path={},socket={}{rest}",
        path_str(dir, image),
        path_str(dir, socket)
    ))
}

/// The port of the address `ferry serve` announces on the line starting with `prefix` (such
/// as `ferry: control protocol on ferry://` or `ferry: metrics on http://`), once printed.
pub fn announced_port(log: &str, prefix: &str) -> Option<u16> {
    log.lines()
        .find_map(|line| line.strip_prefix(prefix))
        .and_then(|rest| rest.split(['/', ' ']).next())
        .and_then(|address| address.rsplit(':').next())
        .and_then(|port| port.parse().ok())
}
