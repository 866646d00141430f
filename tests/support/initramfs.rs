//! Builds the test guest's boot files: a busybox initramfs (newc cpio) with the virtio-blk modules.
//!
//! The base archive (busybox, the host kernel's virtio modules, `/init`) is built once per test
//! process and kept in memory; each guest run appends a second small archive holding its script
//! (`/test.sh`). Linux unpacks concatenated newc archives in order.

use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Kernel modules loaded by `/init`, in dependency order.
pub const MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
];

/// Where the static busybox lives on Debian (package `busybox-static`).
const BUSYBOX_CANDIDATES: [&str; 2] = ["/bin/busybox", "/usr/bin/busybox"];

/// How long `/init` waits for the first virtio disk node to appear.
const DISK_WAIT_TENTHS: u32 = 100;

/// The guest's boot assets, built once per test process.
pub struct BootAssets {
    /// The host kernel image (`/boot/vmlinuz-VERSION`).
    pub kernel: PathBuf,
    /// The kernel version whose modules are in the archive.
    pub kernel_version: String,
    /// The base newc archive (with trailer).
    pub base_cpio: Vec<u8>,
}

/// The process-wide boot assets (built on first use).
pub fn boot_assets() -> Result<&'static BootAssets> {
    static ASSETS: OnceLock<std::result::Result<BootAssets, String>> = OnceLock::new();
    ASSETS
        .get_or_init(|| build_assets().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("building the guest initramfs failed: {e}"))
}

/// Writes the initramfs for one run (base archive + `/test.sh`) to `path`.
pub fn write_initramfs(path: &Path, script: &str) -> Result<()> {
    let assets = boot_assets()?;
    let mut extra = Cpio::default();
    extra.file("test.sh", 0o755, script.as_bytes());
    let mut bytes = assets.base_cpio.clone();
    bytes.extend_from_slice(&extra.finish());
    std::fs::write(path, bytes).with_context(|| format!("write initramfs {}", path.display()))
}

fn build_assets() -> Result<BootAssets> {
    let (kernel, kernel_version) = find_kernel()?;
    let busybox = BUSYBOX_CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .context("no busybox found (install busybox-static)")?;
    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "etc",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(dir);
    }
    cpio.char_dev("dev/console", 5, 1);
    let busybox_bytes =
        std::fs::read(busybox).with_context(|| format!("read {}", busybox.display()))?;
    cpio.file("bin/busybox", 0o755, &busybox_bytes);
    cpio.symlink("bin/sh", "busybox");
    for module in MODULES {
        if let Some(bytes) = module_bytes(&kernel_version, module)? {
            cpio.file(&format!("lib/modules/{module}.ko"), 0o644, &bytes);
        }
    }
    cpio.file("init", 0o755, init_script().as_bytes());
    Ok(BootAssets {
        kernel,
        kernel_version,
        base_cpio: cpio.finish(),
    })
}

/// The newest `/boot/vmlinuz-V` whose modules directory `/lib/modules/V` exists.
fn find_kernel() -> Result<(PathBuf, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/boot").context("read /boot")? {
        let name = entry.context("read /boot entry")?.file_name();
        let name = name.to_string_lossy();
        if let Some(version) = name.strip_prefix("vmlinuz-") {
            if Path::new("/lib/modules").join(version).is_dir() {
                found.push(version.to_string());
            }
        }
    }
    found.sort();
    let version = found
        .pop()
        .context("no /boot/vmlinuz-V with /lib/modules/V (install linux-image-amd64)")?;
    Ok((PathBuf::from(format!("/boot/vmlinuz-{version}")), version))
}

/// The uncompressed module, or None when it is built into the kernel.
fn module_bytes(version: &str, module: &str) -> Result<Option<Vec<u8>>> {
    let root = Path::new("/lib/modules").join(version);
    if let Some(path) = find_module_file(&root.join("kernel"), module)? {
        return read_module(&path).map(Some);
    }
    let builtin = std::fs::read_to_string(root.join("modules.builtin")).unwrap_or_default();
    let builtin_name = format!("/{module}.ko");
    if builtin.lines().any(|l| l.ends_with(&builtin_name)) {
        return Ok(None);
    }
    bail!("kernel module {module} not found under {}", root.display())
}

fn find_module_file(dir: &Path, module: &str) -> Result<Option<PathBuf>> {
    let names = ["ko", "ko.xz", "ko.zst", "ko.gz"].map(|ext| format!("{module}.{ext}"));
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry.with_context(|| format!("read entry of {}", dir.display()))?;
        let path = entry.path();
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if let Some(found) = find_module_file(&path, module)? {
                return Ok(Some(found));
            }
        } else if names
            .iter()
            .any(|n| entry.file_name().to_string_lossy() == n.as_str())
        {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Reads a module, decompressing `.xz`/`.zst`/`.gz` on the host (busybox insmod cannot).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return std::fs::read(path).with_context(|| format!("read {name}"));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("run {tool} -dc {name}"))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The guest's `/init`: mounts, loads modules, waits for a disk, runs `/test.sh`, powers off.
fn init_script() -> String {
    let modules = MODULES.join(" ");
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do
  [ -e /lib/modules/$m.ko ] || continue
  insmod /lib/modules/$m.ko || echo "FERRY-GUEST insmod-failed=$m"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt {DISK_WAIT_TENTHS} ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || echo "FERRY-GUEST no-disk"
echo "FERRY-GUEST script-start"
cd /tmp
sh /test.sh
echo "FERRY-GUEST script-exit=$?"
sync
poweroff -f
"#
    )
}

/// A minimal writer of the newc ("070701") cpio format that Linux's initramfs unpacker reads.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 0, 0, &[]);
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, 0, 0, data);
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, 0, 0, target.as_bytes());
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, major, minor, &[]);
    }

    /// Appends the trailer and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, 0, &[]);
        self.out
    }

    fn entry(&mut self, name: &str, mode: u32, rdev_major: u32, rdev_minor: u32, data: &[u8]) {
        self.next_ino += 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev_major,
            rdev_minor,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad4();
        self.out.extend_from_slice(data);
        self.pad4();
    }

    fn pad4(&mut self) {
        while self.out.len() & 3 != 0 {
            self.out.push(0);
        }
    }
}
