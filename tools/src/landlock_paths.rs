//! The paths `ferry serve` may reach once started (Landlock, see
//! `ferry_engine::confine::landlock`): the directories of its images, sockets and control
//! socket (new images, incoming volumes and sockets are created there), its journal
//! directory, its TLS credentials, the directories given with `--allow-path`, and the few
//! system paths it reads.

use std::path::{Path, PathBuf};

use ferry_engine::confine::landlock::PathRules;
use ferry_engine::nbd::ListenAddress;

/// System paths ferry reads: its own process's `/proc` entries (thread and memory state),
/// sysfs (block device limits), and `/etc` (host name resolution for NBD targets and peers).
const SYSTEM_READ_ONLY: &[&str] = &["/proc/self", "/sys", "/etc"];

/// Devices every process may use.
const SYSTEM_READ_WRITE: &[&str] = &["/dev/null", "/dev/zero", "/dev/urandom"];

/// What the daemon was configured with.
pub struct Configured<'a> {
    pub images: Vec<&'a Path>,
    pub sockets: Vec<&'a Path>,
    pub journal_dir: Option<&'a Path>,
    pub tls_creds: Vec<&'a Path>,
    pub nbd_listen: &'a [ListenAddress],
    pub allowed: &'a [PathBuf],
}

pub fn rules(configured: &Configured) -> PathRules {
    let mut rules = PathRules::default();
    for image in &configured.images {
        if image.to_string_lossy().contains("://") {
            continue; // an NBD export
        }
        // A block device is allowed alone, not the whole of /dev beside it.
        if image.starts_with("/dev") {
            rules.read_write.push(image.to_path_buf());
        } else {
            rules.read_write.push(directory_of(image));
        }
    }
    for socket in &configured.sockets {
        rules.read_write.push(directory_of(socket));
    }
    for address in configured.nbd_listen {
        if let ListenAddress::Unix { path } = address {
            rules.read_write.push(directory_of(path));
        }
    }
    if let Some(dir) = configured.journal_dir {
        // Created at start when missing: its parent must allow that.
        if dir.is_dir() {
            rules.read_write.push(dir.to_path_buf());
        } else {
            rules.read_write.push(directory_of(dir));
        }
    }
    rules.read_write.extend(configured.allowed.iter().cloned());
    rules
        .read_write
        .extend(SYSTEM_READ_WRITE.iter().map(PathBuf::from));
    rules
        .read_only
        .extend(configured.tls_creds.iter().map(|p| p.to_path_buf()));
    rules
        .read_only
        .extend(SYSTEM_READ_ONLY.iter().map(PathBuf::from));
    rules.read_write.sort();
    rules.read_write.dedup();
    rules
}

/// The directory holding `path` (the current directory for a bare name).
fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_give_their_directory_and_devices_only_themselves() {
        let allowed = [PathBuf::from("/srv/extra")];
        let configured = Configured {
            images: vec![
                Path::new("/srv/images/a.img"),
                Path::new("/dev/loop3"),
                Path::new("nbd://host/export"),
                Path::new("bare.img"),
            ],
            sockets: vec![Path::new("/run/ferry/a.sock")],
            journal_dir: Some(Path::new("/nonexistent/journal")),
            tls_creds: vec![Path::new("/etc/ferry/tls")],
            nbd_listen: &[],
            allowed: &allowed,
        };
        let rules = rules(&configured);
        for expected in [
            "/srv/images",
            "/dev/loop3",
            ".",
            "/run/ferry",
            "/nonexistent",
            "/srv/extra",
        ] {
            assert!(
                rules.read_write.contains(&PathBuf::from(expected)),
                "{expected} missing from {rules:?}"
            );
        }
        assert!(!rules.read_write.contains(&PathBuf::from("/dev")));
        assert!(rules.read_only.contains(&PathBuf::from("/etc/ferry/tls")));
    }
}
