//! Waiting in tests for something to happen: the condition is polled until it holds, and the
//! deadline only catches a hang. A test never sleeps a fixed time to let something happen,
//! and never asserts that something was fast.

use anyhow::{bail, Result};
use std::os::unix::fs::FileTypeExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

/// Bound on waits for what should happen at once (a server listening, a request completing,
/// a state being reached): generous, so that only a hang reaches it, on a loaded machine too.
pub const HANG_TIMEOUT: Duration = Duration::from_secs(60);

/// The first pause between two polls; it doubles up to [`POLL_INTERVAL_MAX`].
const POLL_INTERVAL_MIN: Duration = Duration::from_millis(1);
/// The longest pause between two polls.
const POLL_INTERVAL_MAX: Duration = Duration::from_millis(20);

/// Polls `done` until it returns `Ok(true)`; fails when it returns an error, or after
/// `timeout` naming `what` was waited for.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = POLL_INTERVAL_MIN;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(POLL_INTERVAL_MAX);
    }
}

/// True when `path` is a unix socket.
pub fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// `__SO_ACCEPTCON` in the flags of `/proc/net/unix`: the socket listens.
const UNIX_FLAG_LISTENING: u32 = 0x0001_0000;
/// `TCP_LISTEN` in the `st` column of `/proc/net/tcp`.
const TCP_STATE_LISTEN: &str = "0A";

/// True when a socket bound to `path` listens, as the kernel's socket table
/// (`/proc/net/unix`) says. Asking the kernel rather than connecting leaves a server that
/// serves one client at a time free for the test's own client.
pub fn unix_listening(path: &Path) -> bool {
    unix_listening_at(Path::new("/proc/net"), path)
}

/// [`unix_listening`] in the network namespace of process `pid` (the socket tables are per
/// network namespace, the socket's path is not): for a daemon run in a namespace.
pub fn unix_listening_in(pid: u32, path: &Path) -> bool {
    unix_listening_at(&Path::new("/proc").join(pid.to_string()).join("net"), path)
}

fn unix_listening_at(tables: &Path, path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string(tables.join("unix")) else {
        return false;
    };
    let path = path.as_os_str().to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = fields.get(3).and_then(|f| u32::from_str_radix(f, 16).ok());
        fields.get(7) == Some(&path.as_ref()) && flags.is_some_and(|f| f & UNIX_FLAG_LISTENING != 0)
    })
}

/// True when a TCP socket listens on `port` (any address), as `/proc/net/tcp` and
/// `/proc/net/tcp6` say.
pub fn tcp_listening(port: u16) -> bool {
    tcp_listening_at(Path::new("/proc/net"), port)
}

/// [`tcp_listening`] in the network namespace of process `pid`.
pub fn tcp_listening_in(pid: u32, port: u16) -> bool {
    tcp_listening_at(&Path::new("/proc").join(pid.to_string()).join("net"), port)
}

fn tcp_listening_at(tables: &Path, port: u16) -> bool {
    !tcp_listener_inodes(tables, port).is_empty()
}

/// The socket inodes of the listeners on `port` in the socket tables under `tables`.
fn tcp_listener_inodes(tables: &Path, port: u16) -> Vec<String> {
    let port = format!("{port:04X}");
    let mut inodes = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(table) = std::fs::read_to_string(tables.join(table)) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1).and_then(|a| a.rsplit(':').next());
            if local_port == Some(port.as_str()) && fields.get(3) == Some(&TCP_STATE_LISTEN) {
                if let Some(inode) = fields.get(9) {
                    inodes.push((*inode).to_string());
                }
            }
        }
    }
    inodes
}

/// True when process `pid` itself holds a socket listening on TCP `port` (in its network
/// namespace): another process that happens to listen on the same port, while `pid` failed
/// to bind it, does not count.
pub fn tcp_listening_by(pid: u32, port: u16) -> bool {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let inodes = tcp_listener_inodes(&proc_dir.join("net"), port);
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            inodes
                .iter()
                .any(|inode| target == format!("socket:[{inode}]"))
        })
    })
}

/// Waits until `path` exists and is a unix socket (for a server whose bound path is not
/// known; `Daemon::wait_listening` waits until it listens).
pub fn wait_for_socket_file(path: &Path, timeout: Duration) -> Result<()> {
    let what = format!("socket {}", path.display());
    wait_until(&what, timeout, || Ok(is_socket(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_once_the_condition_holds() -> Result<()> {
        let mut polls = 0;
        wait_until("three polls", HANG_TIMEOUT, || {
            polls += 1;
            Ok(polls == 3)
        })?;
        assert_eq!(polls, 3);
        Ok(())
    }

    #[test]
    fn fails_on_an_error_or_at_the_deadline() {
        let err = wait_until("x", HANG_TIMEOUT, || bail!("broken")).err();
        assert_eq!(err.map(|e| e.to_string()), Some("broken".into()));
        let err = wait_until("never", Duration::ZERO, || Ok(false)).err();
        assert!(err.is_some_and(|e| e.to_string().starts_with("never: not within")));
    }

    #[test]
    fn sees_listening_sockets_in_the_kernel_tables() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.sock");
        assert!(!unix_listening(&path));
        let unix = std::os::unix::net::UnixListener::bind(&path)?;
        assert!(unix_listening(&path));
        assert!(unix_listening_in(std::process::id(), &path));
        drop(unix);
        assert!(!unix_listening(&path));
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        assert!(tcp_listening(port));
        assert!(tcp_listening_in(std::process::id(), port));
        assert!(tcp_listening_by(std::process::id(), port));
        assert!(!tcp_listening_by(1, port));
        drop(tcp);
        assert!(!tcp_listening(port));
        Ok(())
    }
}
