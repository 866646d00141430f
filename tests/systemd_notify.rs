//! `ferry serve` under systemd's `Type=notify` protocol, with the test in systemd's place: a
//! datagram socket named by `NOTIFY_SOCKET` (a path, and an abstract name). `READY=1` comes
//! once every socket of the daemon listens, with a `STATUS=` line; SIGTERM brings
//! `STOPPING=1` before the exit.

#[path = "support/mod.rs"]
mod support;

use anyhow::{bail, ensure, Context as _, Result};
use nix::sys::signal::Signal;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::process::Command;
use support::daemon::Daemon;
use support::ferry;
use support::wait::{unix_listening, HANG_TIMEOUT};

/// The state lines of the next notification.
fn next_notification(socket: &UnixDatagram) -> Result<Vec<String>> {
    let mut buf = vec![0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .context("no notification from ferry (a hang)")?;
    let text = String::from_utf8(buf[..n].to_vec()).context("a notification not UTF-8")?;
    Ok(text.lines().map(str::to_string).collect())
}

/// Notifications until one carries `line`; all of them.
fn until(socket: &UnixDatagram, line: &str) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    loop {
        let lines = next_notification(socket)?;
        let found = lines.iter().any(|l| l == line);
        seen.extend(lines);
        if found {
            return Ok(seen);
        }
        ensure!(seen.len() < 100, "no {line} among {seen:?}");
    }
}

fn serve_notified(d: &Path, notify_socket: &str, listener: &UnixDatagram) -> Result<()> {
    let control = d.join("ctl.sock");
    let sockets = [d.join("a.sock"), d.join("b.sock"), control.clone()];
    let mut command = Command::new(support::ferry_bin());
    command
        .arg("serve")
        .args(ferry::vol(d, "a", "a.img", "a.sock", ",size=4M"))
        .args(ferry::vol(d, "b", "b.img", "b.sock", ",size=4M"))
        .arg("--control")
        .arg(&control)
        .env("NOTIFY_SOCKET", notify_socket);
    let mut daemon = Daemon::spawn("ferry-serve", command)?;
    let before_ready = until(listener, "READY=1")?;
    for socket in &sockets {
        ensure!(
            unix_listening(socket),
            "READY=1 before {} listens",
            socket.display()
        );
    }
    ensure!(
        before_ready
            .iter()
            .any(|l| l == "STATUS=serving 2 volume(s)"),
        "{before_ready:?}"
    );
    ferry::query(&control, "query-version")?;
    daemon.signal(Signal::SIGTERM)?;
    let stopping = until(listener, "STOPPING=1")?;
    ensure!(
        stopping.iter().any(|l| l.starts_with("STATUS=SIGTERM")),
        "{stopping:?}"
    );
    let status = daemon.wait_exit(HANG_TIMEOUT)?;
    ensure!(status.success(), "ferry exited {status}");
    ensure!(until(listener, "STATUS=stopped").is_ok(), "no final status");
    Ok(())
}

#[test]
fn ready_once_every_socket_listens_and_stopping_on_sigterm() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let path = d.join("notify.sock");
    let listener = UnixDatagram::bind(&path).context("bind the notify socket")?;
    listener.set_read_timeout(Some(HANG_TIMEOUT))?;
    serve_notified(d, &path.display().to_string(), &listener)
}

#[test]
fn an_abstract_notify_socket_is_reached_too() -> Result<()> {
    let dir = support::scratch_dir()?;
    let name = format!("ferry-test-notify-{}", std::process::id());
    let address = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixDatagram::bind_addr(&address).context("bind the notify socket")?;
    listener.set_read_timeout(Some(HANG_TIMEOUT))?;
    serve_notified(dir.path(), &format!("@{name}"), &listener)
}

/// A daemon that refuses to start sends no `READY=1` (systemd sees the exit).
#[test]
fn a_refused_start_is_never_ready() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let path = d.join("notify.sock");
    let listener = UnixDatagram::bind(&path).context("bind the notify socket")?;
    listener.set_nonblocking(true)?;
    let mut args = vec!["serve".to_string()];
    args.extend(ferry::vol(d, "a", "missing.img", "a.sock", ""));
    let mut command = Command::new(support::ferry_bin());
    command.args(&args).env("NOTIFY_SOCKET", &path);
    let out = command.output().context("run ferry serve")?;
    ensure!(
        !out.status.success(),
        "ferry serve of a missing image started"
    );
    let mut buf = [0u8; 4096];
    loop {
        match listener.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                if text.lines().any(|l| l == "READY=1") {
                    bail!("READY=1 from a daemon that did not start: {text}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}
