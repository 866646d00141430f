//! Running unprivileged: `--user USER[:GROUP]` (root is dropped once every socket is bound
//! and every image opened), the owner, group and mode of the socket files ferry creates
//! (`--socket-mode`, `--socket-group`), and the check of the control socket's peers
//! (`SO_PEERCRED`: root, the daemon's own user, or a member of `--control-group`).

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{bail, Context};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Group, Uid, User};

/// The user and group to run as after start-up.
#[derive(Debug, Clone)]
pub struct Identity {
    pub uid: Uid,
    pub gid: Gid,
}

impl Identity {
    /// Reads `USER[:GROUP]` (names or numbers); the group defaults to the user's own.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let (user, group) = match text.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (text, None),
        };
        let user = lookup_user(user).with_context(|| format!("--user {text}"))?;
        let gid = match group {
            Some(g) => lookup_group(g).with_context(|| format!("--user {text}"))?,
            None => user.gid,
        };
        Ok(Self { uid: user.uid, gid })
    }

    /// Becomes this user and group for good, in every thread of the process: glibc's
    /// `setresuid` and friends signal each thread to make the same call (the seccomp filters
    /// allow exactly these calls with these ids, `ferry_engine::confine::plan_identity_drop`).
    /// Every capability goes with root.
    pub fn assume(&self) -> anyhow::Result<()> {
        let groups = [self.gid.as_raw()];
        // SAFETY: setgroups reads one gid from the array, which outlives the call.
        if unsafe { libc::setgroups(1, groups.as_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setgroups");
        }
        let gid = self.gid.as_raw();
        // SAFETY: plain system call wrapper, no memory passed.
        if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setresgid");
        }
        let uid = self.uid.as_raw();
        // SAFETY: plain system call wrapper, no memory passed.
        if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setresuid");
        }
        // A change of uid makes the process undumpable, which turns its /proc/self entries
        // root-owned and unreadable to it; ferry reads them (metrics, thread state).
        // SAFETY: PR_SET_DUMPABLE takes an integer argument only.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) };
        if Uid::effective() != self.uid || Gid::effective() != self.gid {
            bail!(
                "still running as uid {} gid {}",
                Uid::effective(),
                Gid::effective()
            );
        }
        Ok(())
    }
}

fn lookup_user(text: &str) -> anyhow::Result<User> {
    let found = match text.parse::<u32>() {
        Ok(n) => User::from_uid(Uid::from_raw(n))?,
        Err(_) => User::from_name(text)?,
    };
    found.with_context(|| format!("no user {text}"))
}

fn lookup_group(text: &str) -> anyhow::Result<Gid> {
    let found = match text.parse::<u32>() {
        Ok(n) => Group::from_gid(Gid::from_raw(n))?,
        Err(_) => Group::from_name(text)?,
    };
    Ok(found.with_context(|| format!("no group {text}"))?.gid)
}

/// How ferry's socket files are left after binding.
#[derive(Debug, Clone)]
pub struct SocketAccess {
    pub mode: u32,
    pub owner: Option<Uid>,
    pub group: Option<Gid>,
}

/// Set once by `ferry serve` before any socket is bound.
static SOCKET_ACCESS: OnceLock<SocketAccess> = OnceLock::new();

/// Parses `--socket-mode` (octal) and `--socket-group`; `owner` is the `--user` to run as.
pub fn set_socket_access(
    mode: &str,
    group: Option<&str>,
    owner: Option<Uid>,
) -> anyhow::Result<()> {
    let mode = u32::from_str_radix(mode.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .with_context(|| format!("--socket-mode {mode}: expected octal permissions, e.g. 0660"))?;
    let group = group
        .map(|g| lookup_group(g).with_context(|| format!("--socket-group {g}")))
        .transpose()?;
    let _ = SOCKET_ACCESS.set(SocketAccess { mode, owner, group });
    Ok(())
}

/// Gives the socket file at `path` its configured mode, owner and group (0600, unchanged
/// owner, when `ferry serve` set nothing).
pub fn apply_socket_access(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let access = SOCKET_ACCESS.get().cloned().unwrap_or(SocketAccess {
        mode: 0o600,
        owner: None,
        group: None,
    });
    if access.owner.is_some() || access.group.is_some() {
        nix::unistd::chown(path, access.owner, access.group)
            .with_context(|| format!("cannot chown socket {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode))
        .with_context(|| format!("cannot set the mode of socket {}", path.display()))
}

/// Who may use the control socket besides root and the daemon's own user.
static CONTROL_GROUP: OnceLock<Option<Gid>> = OnceLock::new();

pub fn set_control_group(group: Option<&str>) -> anyhow::Result<()> {
    let gid = group
        .map(|g| lookup_group(g).with_context(|| format!("--control-group {g}")))
        .transpose()?;
    let _ = CONTROL_GROUP.set(gid);
    Ok(())
}

/// Whether the peer of an accepted control connection may use it: root, the daemon's user,
/// or (with `--control-group`) a user whose primary group it is or who is listed in it.
pub fn control_peer_allowed(stream: &impl AsFd) -> Result<(), String> {
    let creds = getsockopt(stream, PeerCredentials).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    let uid = Uid::from_raw(creds.uid());
    if uid.is_root() || uid == Uid::effective() {
        return Ok(());
    }
    if let Some(Some(group)) = CONTROL_GROUP.get() {
        if Gid::from_raw(creds.gid()) == *group || is_member(uid, *group) {
            return Ok(());
        }
    }
    Err(format!(
        "uid {uid} is neither root nor the daemon's user{}",
        match CONTROL_GROUP.get() {
            Some(Some(g)) => format!(" nor in group {g}"),
            _ => " (--control-group allows a group)".to_string(),
        }
    ))
}

fn is_member(uid: Uid, group: Gid) -> bool {
    let Ok(Some(user)) = User::from_uid(uid) else {
        return false;
    };
    matches!(Group::from_gid(group), Ok(Some(g)) if g.mem.contains(&user.name))
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_parses_and_bad_modes_are_refused() {
        let root = super::Identity::parse("root").expect("root exists");
        assert!(root.uid.is_root());
        assert!(super::Identity::parse("0:0").is_ok());
        assert!(super::Identity::parse("no-such-user-ferry").is_err());
        assert!(super::set_socket_access("0999", None, None).is_err());
        assert!(super::set_socket_access("rw", None, None).is_err());
    }
}
