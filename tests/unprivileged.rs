//! `ferry serve --user`: started as root, the daemon runs as a user the test creates (every
//! thread, no capability left) and still serves its volume; its socket files get the
//! configured mode and owner (0600 by default); the control socket refuses a client under
//! another uid unless `--control-group` names a group the client is in.

#[path = "support/mod.rs"]
mod support;

use anyhow::{bail, ensure, Context as _, Result};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::blkio_client::{BlkioClient, BlkioOpts, Op};
use support::daemon::Daemon;

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// System users and a group made for one test, removed on drop.
struct Accounts {
    daemon: String,
    other: String,
    group: String,
}

impl Accounts {
    /// `None` when useradd is missing (a failure under FERRY_REQUIRE_ALL).
    fn create() -> Result<Option<Self>> {
        // useradd and groupadd have no --version: that they start is enough.
        let available = ["useradd", "groupadd", "setpriv"].iter().all(|c| {
            Command::new(c)
                .arg("--help")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok()
        });
        let what = "useradd, groupadd (Debian package passwd) and setpriv (util-linux)";
        if !support::require::require(what, available) {
            return Ok(None);
        }
        let tag = std::process::id();
        let accounts = Self {
            daemon: format!("ferryd{tag}"),
            other: format!("ferryo{tag}"),
            group: format!("ferryg{tag}"),
        };
        run(Command::new("groupadd").args(["--system", &accounts.group]))?;
        run(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            &accounts.daemon,
        ]))?;
        run(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--groups",
            &accounts.group,
            &accounts.other,
        ]))?;
        Ok(Some(accounts))
    }

    fn uid_gid(name: &str) -> Result<(u32, u32)> {
        let user =
            nix::unistd::User::from_name(name)?.with_context(|| format!("no user {name}"))?;
        Ok((user.uid.as_raw(), user.gid.as_raw()))
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for user in [&self.daemon, &self.other] {
            let _ = Command::new("userdel").arg(user).status();
        }
        let _ = Command::new("groupdel").arg(&self.group).status();
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A directory and image owned by the daemon's user, and a copy of the ferry binary that
/// every user may run.
struct Setup {
    dir: tempfile::TempDir,
    ferry: PathBuf,
    image: PathBuf,
    socket: PathBuf,
    control: PathBuf,
}

impl Setup {
    fn new(owner: (u32, u32)) -> Result<Self> {
        let dir = support::scratch_dir()?;
        let ferry = dir.path().join("ferry");
        std::fs::copy(support::ferry_bin(), &ferry)?;
        std::fs::set_permissions(&ferry, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let image = dir.path().join("vol.img");
        support::create_image(&image, 16 << 20)?;
        let chown = |p: &Path| {
            nix::unistd::chown(
                p,
                Some(nix::unistd::Uid::from_raw(owner.0)),
                Some(nix::unistd::Gid::from_raw(owner.1)),
            )
        };
        chown(dir.path())?;
        chown(&image)?;
        Ok(Self {
            socket: dir.path().join("vol.sock"),
            control: dir.path().join("ctl.sock"),
            dir,
            ferry,
            image,
        })
    }

    fn serve(&self, extra: &[&str]) -> Result<Daemon> {
        let mut cmd = Command::new(&self.ferry);
        cmd.arg("serve")
            .arg("--volume")
            .arg(format!(
                "name=vol,path={},socket={}",
                self.image.display(),
                self.socket.display()
            ))
            .arg("--control")
            .arg(&self.control)
            .args(extra);
        let mut daemon = Daemon::spawn_listening("ferry-serve", cmd, &self.socket)?;
        daemon.wait_listening(&self.control, EXIT_TIMEOUT)?;
        Ok(daemon)
    }

    /// `ferry query query-version` as `user` (its uid, primary gid and the supplementary
    /// groups the system lists for it, set by util-linux's setpriv), or as root.
    fn query_as(&self, user: Option<&str>) -> Result<std::process::Output> {
        let mut cmd = match user {
            Some(user) => {
                let (uid, gid) = Accounts::uid_gid(user)?;
                let mut cmd = Command::new("setpriv");
                cmd.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--init-groups")
                    .arg(&self.ferry);
                cmd
            }
            None => Command::new(&self.ferry),
        };
        cmd.args(["query", "--control"])
            .arg(&self.control)
            .arg("query-version");
        Ok(cmd.output()?)
    }
}

/// The ids of every thread of `pid`: (name, Uid line, CapEff line).
fn thread_ids(pid: u32) -> Result<Vec<(String, String, String)>> {
    let mut all = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        all.push((field("Name:"), field("Uid:"), field("CapEff:")));
    }
    Ok(all)
}

#[test]
fn the_daemon_runs_as_its_user_and_its_control_socket_refuses_other_uids() -> Result<()> {
    let Some(accounts) = Accounts::create()? else {
        return Ok(());
    };
    let daemon_ids = Accounts::uid_gid(&accounts.daemon)?;
    let setup = Setup::new(daemon_ids)?;
    let mut daemon = setup.serve(&["--user", &accounts.daemon, "--socket-mode", "0666"])?;

    // Every thread runs as the user, with no capability; the volume still serves.
    let mut client = BlkioClient::connect(&setup.socket, &BlkioOpts::default())?;
    client.buf_mut()[..4096].fill(0x5a);
    client.run_batch_ok(
        0,
        &[Op::Write {
            offset_bytes: 4096,
            len_bytes: 4096,
            buf_offset: 0,
            fua: true,
        }],
    )?;
    let expected = format!("{0} {0} {0} {0}", daemon_ids.0);
    let threads = thread_ids(daemon.pid())?;
    for (name, uid, caps) in &threads {
        ensure!(
            *uid == expected && *caps == "0000000000000000",
            "thread {name}: Uid {uid}, CapEff {caps} (all: {threads:?})"
        );
    }
    drop(client);
    let image = std::fs::read(&setup.image)?;
    ensure!(
        image[4096..8192].iter().all(|&b| b == 0x5a),
        "the write is not in the image"
    );

    // The sockets belong to the user with the mode asked for.
    for socket in [&setup.socket, &setup.control] {
        let meta = std::fs::metadata(socket)?;
        ensure!(
            meta.uid() == daemon_ids.0 && meta.mode() & 0o777 == 0o666,
            "{}: uid {} mode {:o}",
            socket.display(),
            meta.uid(),
            meta.mode() & 0o777
        );
    }

    // Root and the daemon's user are served; another uid is refused, even through a socket
    // anyone may connect to.
    let root = setup.query_as(None)?;
    ensure!(root.status.success(), "root refused: {root:?}");
    let own = setup.query_as(Some(&accounts.daemon))?;
    ensure!(own.status.success(), "the daemon's user refused: {own:?}");
    let other = setup.query_as(Some(&accounts.other))?;
    let stderr = String::from_utf8_lossy(&other.stderr);
    ensure!(
        !other.status.success() && stderr.contains("AccessDenied"),
        "another uid was not refused: {other:?}"
    );
    let status = daemon.terminate(EXIT_TIMEOUT)?;
    ensure!(status.success(), "exit {status}: {}", daemon.log());
    ensure!(!setup.socket.exists(), "socket left behind");

    // With --control-group, a member of the group is served.
    let mut daemon = setup.serve(&[
        "--user",
        &accounts.daemon,
        "--socket-mode",
        "0666",
        "--control-group",
        &accounts.group,
    ])?;
    let member = setup.query_as(Some(&accounts.other))?;
    ensure!(
        member.status.success(),
        "a member of --control-group was refused: {member:?}\n{}",
        daemon.log()
    );
    daemon.terminate(EXIT_TIMEOUT)?;
    let _ = &setup.dir;
    Ok(())
}

#[test]
fn socket_files_are_owner_only_by_default() -> Result<()> {
    let dir = support::scratch_dir()?;
    let image = dir.path().join("vol.img");
    support::create_image(&image, 1 << 20)?;
    let socket = dir.path().join("vol.sock");
    let control = dir.path().join("ctl.sock");
    let nbd = dir.path().join("nbd.sock");
    let args = vec![
        "--volume".to_string(),
        format!(
            "name=vol,path={},socket={},nbd=rw",
            image.display(),
            socket.display()
        ),
        "--control".to_string(),
        control.display().to_string(),
        "--nbd-listen".to_string(),
        format!("unix:{}", nbd.display()),
    ];
    let mut daemon = support::ferry::serve(&args, &[&socket, &control, &nbd])?;
    for path in [&socket, &control, &nbd] {
        let mode = std::fs::metadata(path)?.mode() & 0o777;
        if mode != 0o600 {
            bail!("{}: mode {mode:o}, expected 600", path.display());
        }
    }
    daemon.terminate(EXIT_TIMEOUT)?;
    Ok(())
}
