//! One `ferry serve --journal` with its volumes, base images, journal directory and control
//! socket in a scratch directory, and the `ferry journal ...` commands run against it.

use crate::support::{self, daemon::Daemon, ferry};
use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bound on the daemon's clean exit after SIGTERM.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Vol {
    pub name: String,
    pub image: PathBuf,
    /// A copy of the image as it was before the daemon (and so the journal) started.
    pub base: PathBuf,
    pub socket: PathBuf,
    pub size_bytes: u64,
}

pub struct Rig {
    pub dir: tempfile::TempDir,
    /// Where the journal is: in `dir`, or on tmpfs (see [`Rig::journal_in_memory`]).
    pub jdir: PathBuf,
    memory_dir: Option<tempfile::TempDir>,
    pub control: PathBuf,
    pub vols: Vec<Vol>,
}

impl Rig {
    /// Volumes `v0, v1, ...` of `sizes`, each image filled with a pattern (so a restore from
    /// the wrong base shows), its base copy taken now.
    pub fn new(sizes: &[u64]) -> Result<Self> {
        let dir = support::scratch_dir()?;
        let mut vols = Vec::new();
        for (i, &size_bytes) in sizes.iter().enumerate() {
            let name = format!("v{i}");
            let image = dir.path().join(format!("{name}.img"));
            let base = dir.path().join(format!("{name}.base"));
            std::fs::write(
                &image,
                support::pattern(900 + i as u64, size_bytes as usize),
            )
            .context("write image")?;
            std::fs::copy(&image, &base).context("copy base")?;
            vols.push(Vol {
                socket: dir.path().join(format!("{name}.sock")),
                name,
                image,
                base,
                size_bytes,
            });
        }
        Ok(Self {
            jdir: dir.path().join("journal"),
            memory_dir: None,
            control: dir.path().join("ctl.sock"),
            dir,
            vols,
        })
    }

    /// Moves the journal directory to tmpfs (`/dev/shm`), where the daemon appends records
    /// through a mapping of the medium (`mapped=auto`).
    pub fn journal_in_memory(mut self) -> Result<Self> {
        let memory = tempfile::Builder::new()
            .prefix("ferry-test-journal-")
            .tempdir_in("/dev/shm")
            .context("create a journal directory in /dev/shm")?;
        self.jdir = memory.path().join("journal");
        self.memory_dir = Some(memory);
        Ok(self)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ferry serve` of every volume with `queues` queues and `--journal dir=JDIR,OPTIONS`.
    pub fn serve(&self, options: &str, queues: u16) -> Result<Daemon> {
        let mut args = Vec::new();
        for v in &self.vols {
            args.extend(ferry::volume_args(&format!(
                "name={},path={},socket={},queues={queues}",
                v.name,
                v.image.display(),
                v.socket.display()
            )));
        }
        args.push("--control".into());
        args.push(self.control.display().to_string());
        args.push("--journal".into());
        args.push(format!("dir={},{options}", self.jdir.display()));
        let mut sockets: Vec<&Path> = self.vols.iter().map(|v| v.socket.as_path()).collect();
        sockets.push(&self.control);
        ferry::serve(&args, &sockets)
    }

    /// `ferry journal SUB --control CTL EXTRA...`, which must succeed; its stdout.
    pub fn control_cmd(&self, sub: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["journal", sub, "--control"];
        let control = self.control.display().to_string();
        args.push(&control);
        args.extend_from_slice(extra);
        Ok(ok(&args)?.stdout)
    }

    /// `ferry journal status` as JSON.
    pub fn status(&self) -> Result<Value> {
        let out = self.control_cmd("status", &["--json"])?;
        serde_json::from_str(&out).with_context(|| format!("status is not JSON: {out}"))
    }

    /// `ferry journal mark --label LABEL`; the mark's sequence number.
    pub fn mark(&self, label: &str) -> Result<u64> {
        let out = self.control_cmd("mark", &["--label", label])?;
        let v: Value = serde_json::from_str(&out).context("mark reply")?;
        ensure!(v["label"] == label, "mark reply {v}");
        v["seq"].as_u64().context("mark reply without seq")
    }

    /// `ferry journal restore INPUTS --volume V --base BASE --out OUT [--until U] EXTRA`.
    pub fn restore(
        &self,
        inputs: &[&Path],
        vol: &Vol,
        until: Option<&str>,
        out: &str,
        extra: &[&str],
    ) -> Result<PathBuf> {
        let out_path = self.path(out);
        let f = restore_cmd(inputs, vol, until, &out_path, extra)?;
        ensure!(
            f.status.success(),
            "restore {} until {until:?} failed ({}): {}",
            vol.name,
            f.status,
            f.stderr
        );
        Ok(out_path)
    }
}

/// Runs `ferry journal restore ...` to its end (success or not).
pub fn restore_cmd(
    inputs: &[&Path],
    vol: &Vol,
    until: Option<&str>,
    out: &Path,
    extra: &[&str],
) -> Result<ferry::Finished> {
    let mut args: Vec<String> = vec!["journal".into(), "restore".into()];
    args.extend(inputs.iter().map(|p| p.display().to_string()));
    for (k, v) in [
        ("--volume", vol.name.clone()),
        ("--base", vol.base.display().to_string()),
        ("--out", out.display().to_string()),
    ] {
        args.push(k.into());
        args.push(v);
    }
    if let Some(u) = until {
        args.push("--until".into());
        args.push(u.into());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    run(&args)
}

/// Runs `ferry ARGS` to its end; fails if it panicked or was killed by a signal.
pub fn run<S: AsRef<str>>(args: &[S]) -> Result<ferry::Finished> {
    let args: Vec<String> = args.iter().map(|s| s.as_ref().to_string()).collect();
    let f = ferry::run(&args, None, ferry::COMMAND_TIMEOUT)?;
    ensure!(
        !f.stderr.contains("panicked") && f.status.code().is_some_and(|c| c != 101),
        "ferry {args:?} panicked ({}): {}",
        f.status,
        f.stderr
    );
    Ok(f)
}

/// Runs `ferry ARGS`, which must succeed.
pub fn ok<S: AsRef<str>>(args: &[S]) -> Result<ferry::Finished> {
    let f = run(args)?;
    let shown: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    ensure!(
        f.status.success(),
        "ferry {shown:?} failed ({}): {}{}",
        f.status,
        f.stdout,
        f.stderr
    );
    Ok(f)
}

/// Runs `ferry ARGS`, which must fail with exit code 1 (an error, not a crash).
pub fn fails<S: AsRef<str>>(args: &[S]) -> Result<ferry::Finished> {
    let f = run(args)?;
    let shown: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    ensure!(
        f.status.code() == Some(1),
        "ferry {shown:?} should have failed with exit code 1 ({}): {}{}",
        f.status,
        f.stdout,
        f.stderr
    );
    Ok(f)
}

/// Parses JSON lines.
pub fn json_lines(text: &str) -> Result<Vec<Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect()
}

/// One request on the control socket, directly (no process): for fast polling.
pub fn control_request(control: &Path, command: &str) -> Result<Value> {
    let v = control_reply(control, command, serde_json::json!({}))?;
    v.get("return")
        .cloned()
        .with_context(|| format!("{command}: {v}"))
}

/// One request with `arguments`; the whole reply (`return` or `error`).
pub fn control_reply(control: &Path, command: &str, arguments: Value) -> Result<Value> {
    control_line(
        control,
        &serde_json::json!({ "command": command, "arguments": arguments }),
    )
}

/// One request object as given (e.g. with an `id`); the whole reply.
pub fn control_line(control: &Path, request: &Value) -> Result<Value> {
    let mut s = std::os::unix::net::UnixStream::connect(control).context("connect control")?;
    writeln!(s, "{request}")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| format!("reply {line}"))
}

/// SIGTERM; the daemon must exit 0.
pub fn stop(daemon: &mut Daemon) -> Result<()> {
    let status = daemon.terminate(EXIT_TIMEOUT)?;
    ensure!(status.success(), "ferry exited {status}:\n{}", daemon.log());
    Ok(())
}
