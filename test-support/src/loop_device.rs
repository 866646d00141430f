//! A loop block device over an image file, for tests of block devices as volumes and as
//! journal media; detached when its handle drops. Needs root and the loop driver: callers
//! pass the outcome through [`require_ok`](crate::require_ok).

use anyhow::{ensure, Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device attached to a file; detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// Attaches `backing` to a free loop device (`losetup --find --show`).
    pub fn attach(backing: &Path) -> Result<Self> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .context("run losetup (util-linux)")?;
        ensure!(
            out.status.success(),
            "losetup {}: {}",
            backing.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let path = PathBuf::from(String::from_utf8(out.stdout)?.trim());
        Ok(Self { path })
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}
