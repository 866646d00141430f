//! `ferry serve`'s confinement: every thread runs under a seccomp filter once a frontend is
//! attached (`Seccomp: 2` in `/proc/PID/task/*/status`), none with `--seccomp=off`; and a
//! thread that makes a call its filter forbids (made to, through the
//! `FERRY_SECCOMP_PROBE=KIND` hook) stops the daemon with a report naming the call and the
//! thread's kind.

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use support::blkio_client::{BlkioClient, BlkioOpts, Op};
use support::daemon::Daemon;

/// Bound on the daemon's exit after a denied call or SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The exit status the `SIGSYS` handler ends the process with (128 + SIGSYS).
const EXIT_DENIED: i32 = 128 + libc::SIGSYS;

/// One `ferry serve` with one volume and a control socket.
struct Served {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    socket: PathBuf,
    control: PathBuf,
}

impl Served {
    fn start(extra_args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_waiting(extra_args, env, true)
    }

    /// Starts the daemon; `wait` for its volume socket, or not when it stops early on purpose.
    fn start_waiting(extra_args: &[&str], env: &[(&str, &str)], wait: bool) -> Result<Self> {
        let dir = support::scratch_dir()?;
        let image = dir.path().join("vol.img");
        support::create_image(&image, 16 << 20)?;
        let socket = dir.path().join("vol.sock");
        let control = dir.path().join("ctl.sock");
        let mut cmd = Command::new(support::ferry_bin());
        cmd.arg("serve")
            .arg("--volume")
            .arg(format!(
                "name=vol,path={},socket={},queues=2",
                image.display(),
                socket.display()
            ))
            .arg("--control")
            .arg(&control)
            .args(extra_args)
            .env("RUST_LOG", "debug");
        for (key, value) in env {
            cmd.env(key, value);
        }
        let daemon = if wait {
            Daemon::spawn_listening("ferry-serve", cmd, &socket)?
        } else {
            Daemon::spawn("ferry-serve", cmd)?
        };
        Ok(Self {
            _dir: dir,
            daemon,
            socket,
            control,
        })
    }

    fn connect(&self) -> Result<BlkioClient> {
        let opts = BlkioOpts {
            num_queues: 2,
            ..BlkioOpts::default()
        };
        BlkioClient::connect(&self.socket, &opts)
    }
}

fn read_one() -> [Op; 1] {
    [Op::Read {
        offset_bytes: 0,
        len_bytes: 4096,
        buf_offset: 0,
    }]
}

/// The `Seccomp:` mode of every thread of `pid`, by thread name.
fn seccomp_modes(pid: u32) -> Result<Vec<(String, String)>> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        modes.push((field("Name:"), field("Seccomp:")));
    }
    Ok(modes)
}

#[test]
fn every_thread_is_filtered_once_a_frontend_is_attached() -> Result<()> {
    let mut served = Served::start(&[], &[])?;
    let mut client = served.connect()?;
    client.run_batch_ok(0, &read_one())?;
    client.run_batch_ok(1, &read_one())?;
    support::ferry::query(&served.control, "query-volumes")?;
    let modes = seccomp_modes(served.daemon.pid())?;
    let unfiltered: Vec<_> = modes.iter().filter(|(_, mode)| mode != "2").collect();
    ensure!(
        unfiltered.is_empty(),
        "threads without a filter: {unfiltered:?} (all: {modes:?})"
    );
    ensure!(modes.len() >= 5, "expected the daemon's threads: {modes:?}");
    drop(client);
    let status = served.daemon.terminate(EXIT_TIMEOUT)?;
    ensure!(status.success(), "exit {status}: {}", served.daemon.log());
    Ok(())
}

#[test]
fn seccomp_off_installs_no_filter() -> Result<()> {
    let mut served = Served::start(&["--seccomp=off"], &[])?;
    let mut client = served.connect()?;
    client.run_batch_ok(0, &read_one())?;
    let modes = seccomp_modes(served.daemon.pid())?;
    ensure!(
        modes.iter().all(|(_, mode)| mode == "0"),
        "filters with --seccomp=off: {modes:?}"
    );
    drop(client);
    served.daemon.terminate(EXIT_TIMEOUT)?;
    Ok(())
}

/// Waits for the daemon to stop on a denied call and returns its log.
fn denied_exit(served: &mut Served) -> Result<String> {
    let status = served.daemon.wait_exit(EXIT_TIMEOUT)?;
    let log = served.daemon.log();
    ensure!(
        status.code() == Some(EXIT_DENIED),
        "expected exit {EXIT_DENIED} after the denied call, got {status}:\n{log}"
    );
    Ok(log)
}

fn expect_report(log: &str, kind: &str) -> Result<()> {
    let expected = format!("ferry: seccomp: a {kind} thread (");
    let line = log
        .lines()
        .find(|l| l.contains(&expected))
        .with_context(|| format!("no report of a denied call by a {kind} thread:\n{log}"))?;
    ensure!(
        line.contains("(sysinfo), which its filter forbids"),
        "the report does not name the call: {line}"
    );
    ensure!(
        !log.contains("the filter did not stop it"),
        "the call went through:\n{log}"
    );
    Ok(())
}

#[test]
fn a_queue_worker_making_a_forbidden_call_stops_the_daemon_and_is_reported() -> Result<()> {
    let mut served = Served::start(&[], &[("FERRY_SECCOMP_PROBE", "vhost-queue")])?;
    // The worker confines itself at its first event, probes, and the daemon stops: the
    // request never completes, so the client runs on a thread of its own, left behind.
    let socket = served.socket.clone();
    std::thread::spawn(move || {
        let opts = BlkioOpts {
            num_queues: 2,
            ..BlkioOpts::default()
        };
        if let Ok(mut client) = BlkioClient::connect(&socket, &opts) {
            let _ = client.run_batch(0, &read_one());
        }
    });
    let log = denied_exit(&mut served)?;
    expect_report(&log, "vhost-queue")
}

#[test]
fn a_control_thread_making_a_forbidden_call_stops_the_daemon_and_is_reported() -> Result<()> {
    let mut served = Served::start_waiting(&[], &[("FERRY_SECCOMP_PROBE", "control")], false)?;
    let log = denied_exit(&mut served)?;
    expect_report(&log, "control")
}

#[test]
fn the_main_thread_making_a_forbidden_call_stops_the_daemon_and_is_reported() -> Result<()> {
    let mut served = Served::start_waiting(&[], &[("FERRY_SECCOMP_PROBE", "main")], false)?;
    let log = denied_exit(&mut served)?;
    expect_report(&log, "main")
}

#[test]
fn the_probe_does_nothing_with_seccomp_off() -> Result<()> {
    let mut served = Served::start(
        &["--seccomp=off"],
        &[("FERRY_SECCOMP_PROBE", "vhost-queue")],
    )?;
    let mut client = served.connect()?;
    client.run_batch_ok(0, &read_one())?;
    ensure!(served.daemon.is_running(), "{}", served.daemon.log());
    drop(client);
    served.daemon.terminate(EXIT_TIMEOUT)?;
    Ok(())
}

/// `ferry migrate start` of the served volume to `target`, as the CLI reports it.
fn migrate_to(served: &Served, target: &std::path::Path) -> Result<support::ferry::Finished> {
    let args: Vec<String> = [
        "migrate",
        "start",
        "--control",
        served.control.to_str().context("path is not UTF-8")?,
        "--volume",
        "vol",
        "--target",
        target.to_str().context("path is not UTF-8")?,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    support::ferry::run(&args, None, EXIT_TIMEOUT)
}

#[test]
fn landlock_refuses_a_file_outside_the_configured_paths() -> Result<()> {
    let elsewhere = support::scratch_dir()?;
    let target = elsewhere.path().join("dst.img");
    let mut served = Served::start(&[], &[])?;
    let refused = migrate_to(&served, &target)?;
    ensure!(
        !refused.status.success() && refused.stderr.contains("Permission denied"),
        "a migration target outside the daemon's paths was not refused: {refused:?}"
    );
    ensure!(!target.exists(), "the refused target was created");
    ensure!(
        served.daemon.log().contains("landlock: paths limited to"),
        "{}",
        served.daemon.log()
    );
    ensure!(served.daemon.is_running(), "{}", served.daemon.log());
    served.daemon.terminate(EXIT_TIMEOUT)?;
    Ok(())
}

#[test]
fn allow_path_and_landlock_off_let_a_file_elsewhere_through() -> Result<()> {
    for how in ["--allow-path", "--landlock=off"] {
        let elsewhere = support::scratch_dir()?;
        let target = elsewhere.path().join("dst.img");
        let allowed = elsewhere.path().display().to_string();
        let args: Vec<&str> = match how {
            "--allow-path" => vec![how, &allowed],
            _ => vec![how],
        };
        let mut served = Served::start(&args, &[])?;
        let started = migrate_to(&served, &target)?;
        ensure!(
            started.status.success() && target.exists(),
            "{how}: the migration to {} did not start: {started:?}",
            target.display()
        );
        served.daemon.terminate(EXIT_TIMEOUT)?;
    }
    Ok(())
}
