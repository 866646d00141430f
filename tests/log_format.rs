//! `ferry serve --log-format json`: every line the daemon logs on stderr is one JSON object
//! with the fields log shippers index (time, level, target, module, thread, message,
//! fields), the program's own output on stdout untouched.

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use support::ferry;
use support::wait::{unix_listening, wait_until, HANG_TIMEOUT};

/// Kills the daemon if the test ends early.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_log_line_is_one_json_object() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let stderr_path = d.join("stderr.log");
    let stdout_path = d.join("stdout.log");
    let socket = d.join("a.sock");
    let child = Command::new(support::ferry_bin())
        .args(["--log-format", "json", "serve"])
        .args(ferry::vol(d, "a", "a.img", "a.sock", ",size=4M"))
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path)?)
        .stderr(std::fs::File::create(&stderr_path)?)
        .spawn()
        .context("spawn ferry serve")?;
    let mut child = Killed(child);
    wait_until("ferry listens", HANG_TIMEOUT, || {
        Ok(unix_listening(&socket))
    })?;
    kill(Pid::from_raw(child.0.id() as i32), Signal::SIGTERM)?;
    let status = child.0.wait()?;
    ensure!(status.success(), "ferry exited {status}");

    let stderr = std::fs::read_to_string(&stderr_path)?;
    let mut records = Vec::new();
    for line in stderr.lines() {
        let record: Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
        for key in ["time", "level", "target", "message"] {
            ensure!(record[key].is_string(), "{key} missing: {line}");
        }
        ensure!(record["fields"].is_object(), "fields missing: {line}");
        let time = record["time"].as_str().unwrap_or_default();
        ensure!(
            time.len() == "2026-01-02T03:04:05.678Z".len() && time.ends_with('Z'),
            "time is not RFC 3339 UTC with milliseconds: {time}"
        );
        records.push(record);
    }
    let shutdown = records
        .iter()
        .find(|r| r["fields"]["signal"] == "SIGTERM")
        .with_context(|| format!("no shutdown record with its signal field:\n{stderr}"))?;
    ensure!(
        shutdown["level"] == "INFO" && shutdown["target"] == "ferry::serve",
        "{shutdown}"
    );
    ensure!(
        std::fs::read_to_string(&stdout_path)?.contains("ferry: serving volume a"),
        "stdout changed"
    );
    Ok(())
}
