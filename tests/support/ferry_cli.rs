//! Runs `ferry serve` and drives it the way an operator does: through the `ferry` command
//! line (`ferry migrate ...`, `ferry query ...`) against its control socket.

use super::daemon::Daemon;
use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

/// How long a job may take to reach the state a test waits for.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// What one `ferry` command printed.
#[derive(Debug)]
pub struct CliOutput {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Fails unless the command exited 0.
    pub fn ok(self) -> Result<Self> {
        ensure!(
            self.status.success(),
            "ferry {:?} failed ({}):\n{}{}",
            self.args,
            self.status,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }

    /// Stdout parsed as one JSON value.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(self.stdout.trim())
            .with_context(|| format!("ferry {:?} printed no JSON: {:?}", self.args, self.stdout))
    }

    /// Expects a failure with a one-line error on stderr that contains `needle`; returns it.
    pub fn expect_error(&self, needle: &str) -> Result<String> {
        ensure!(
            !self.status.success(),
            "ferry {:?} succeeded but should have failed:\n{}",
            self.args,
            self.stdout
        );
        let text = self.stderr.trim();
        ensure!(
            text.lines().count() == 1,
            "ferry {:?}: the error is not one line:\n{text}",
            self.args
        );
        ensure!(
            text.contains(needle),
            "ferry {:?}: error {text:?} does not mention {needle:?}",
            self.args
        );
        Ok(text.to_string())
    }
}

/// Runs the `ferry` binary with `args` and collects its output.
pub fn ferry(args: &[&str]) -> Result<CliOutput> {
    let out = Command::new(super::ferry_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("run ferry {args:?}"))?;
    Ok(CliOutput {
        args: args.iter().map(|s| s.to_string()).collect(),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A running `ferry serve` with a control socket; killed when dropped.
pub struct FerryServe {
    pub daemon: Daemon,
    pub control: PathBuf,
}

impl FerryServe {
    /// Starts `ferry serve --volume SPEC... --control CONTROL` and waits for the control socket
    /// (bound after every volume socket).
    pub fn start(volumes: &[String], control: &Path) -> Result<Self> {
        Self::start_with(volumes, control, &[])
    }

    /// As [`FerryServe::start`], with more options of `ferry serve` (`--tls-creds DIR`).
    pub fn start_with(volumes: &[String], control: &Path, options: &[&str]) -> Result<Self> {
        let mut cmd = Command::new(super::ferry_bin());
        cmd.arg("serve");
        cmd.args(options);
        for spec in volumes {
            cmd.arg("--volume").arg(spec);
        }
        cmd.arg("--control").arg(control);
        cmd.env("RUST_LOG", "info");
        let daemon = Daemon::spawn_listening("ferry-serve", cmd, control)?;
        Ok(Self {
            daemon,
            control: control.to_path_buf(),
        })
    }

    fn control_str(&self) -> Result<&str> {
        self.control.to_str().context("control path is not UTF-8")
    }

    /// `ferry migrate SUB --control CTL ARGS...`.
    pub fn migrate(&self, sub: &str, args: &[&str]) -> Result<CliOutput> {
        let mut all = vec!["migrate", sub, "--control", self.control_str()?];
        all.extend_from_slice(args);
        ferry(&all)
    }

    /// `ferry migrate start ... --json`; returns the job id.
    pub fn start_migration(&self, args: &[&str]) -> Result<u64> {
        let mut all = args.to_vec();
        all.push("--json");
        let reply = self.migrate("start", &all)?.ok()?.json()?;
        reply["job"]
            .as_u64()
            .with_context(|| format!("migrate start replied {reply}"))
    }

    /// The status of job `id` from `ferry migrate status --json`.
    pub fn job_status(&self, id: u64) -> Result<Value> {
        let id_text = id.to_string();
        let list = self
            .migrate("status", &["--job", &id_text, "--json"])?
            .ok()?
            .json()?;
        let Value::Array(mut list) = list else {
            bail!("migrate status --json printed no list: {list}");
        };
        ensure!(list.len() == 1, "no status of job {id}: {list:?}");
        Ok(list.remove(0))
    }

    /// Polls `migrate status --json` until job `id` is in a state `done` accepts.
    pub fn wait_state(&self, id: u64, done: impl Fn(&str) -> bool) -> Result<Value> {
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            let status = self.job_status(id)?;
            if done(status["state"].as_str().unwrap_or("")) {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("job {id} did not reach the awaited state within {JOB_TIMEOUT:?}: {status}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until job `id` is `ready`; fails early if it ends.
    pub fn wait_ready(&self, id: u64) -> Result<Value> {
        let status = self.wait_state(id, |s| s != "copying")?;
        ensure!(
            status["state"] == "ready",
            "job {id} is not ready: {status}"
        );
        Ok(status)
    }

    /// `ferry migrate cutover --job ID --json`: the cutover report.
    pub fn cutover(&self, id: u64) -> Result<Value> {
        self.migrate("cutover", &["--job", &id.to_string(), "--json"])?
            .ok()?
            .json()
    }

    /// `ferry query --control CTL query-volumes`: the volume named `name`.
    pub fn volume_info(&self, name: &str) -> Result<Value> {
        let out = ferry(&["query", "--control", self.control_str()?, "query-volumes"])?.ok()?;
        let list = out.json()?;
        list.as_array()
            .and_then(|l| l.iter().find(|v| v["name"] == name))
            .cloned()
            .with_context(|| format!("query-volumes has no volume {name}: {list}"))
    }

    /// The image path volume `name` is served from now.
    pub fn volume_path(&self, name: &str) -> Result<PathBuf> {
        let info = self.volume_info(name)?;
        let path = info["path"]
            .as_str()
            .with_context(|| format!("no path in {info}"))?;
        Ok(PathBuf::from(path))
    }
}
