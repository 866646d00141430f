//! What a served volume holds for itself alone (its name, its vhost-user socket, its range
//! of an image), and the check that two volumes, or a volume and the control socket, do not
//! hold the same thing. Used on the command line's volumes before anything is created, and
//! on every volume added while the daemon runs.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::volume_spec::VolumeSpec;

/// A volume's exclusive holdings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub name: String,
    pub socket: PathBuf,
    pub image: ImageRange,
}

/// The bytes of an image a volume is served from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRange {
    /// The image's path (or an NBD export's URI).
    pub path: PathBuf,
    /// Which file the path is, when it exists: two paths to one file (a hard link, a
    /// symlink, another node of the same block device) are one image.
    pub identity: Option<FileIdentity>,
    pub start_bytes: u64,
    /// One past the last byte; `u64::MAX` when the volume runs to the image's end.
    pub end_bytes: u64,
    /// Volumes that only read may share bytes: none of them can change what another sees.
    pub read_only: bool,
}

/// Which file a path names, as the kernel identifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileIdentity {
    /// A block device, by its device number (every node of it is the same disk).
    BlockDevice { rdev: u64 },
    /// Any other file, by the device its file system is on and its inode.
    File { dev: u64, ino: u64 },
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        if meta.file_type().is_block_device() {
            Self::BlockDevice { rdev: meta.rdev() }
        } else {
            Self::File {
                dev: meta.dev(),
                ino: meta.ino(),
            }
        }
    }

    /// The identity of the file at `path`, if there is one (not for a missing image that
    /// `size=` will create, nor an NBD URI).
    pub fn of_path(path: &Path) -> Option<Self> {
        std::fs::metadata(path).ok().map(|meta| Self::of(&meta))
    }
}

impl Claims {
    pub fn of_spec(spec: &VolumeSpec) -> Self {
        let engine = &spec.engine;
        Self {
            name: engine.name.clone(),
            socket: spec.socket.clone(),
            image: ImageRange {
                path: engine.path.clone(),
                identity: FileIdentity::of_path(&engine.path),
                start_bytes: engine.offset_bytes,
                end_bytes: engine
                    .length_bytes
                    .map_or(u64::MAX, |len| engine.offset_bytes.saturating_add(len)),
                read_only: engine.read_only,
            },
        }
    }

    /// Why `self` and `other` cannot both be served, if they cannot.
    pub fn conflict(&self, other: &Self) -> Option<String> {
        if self.name == other.name {
            return Some(format!("two volumes are named {}", self.name));
        }
        if same_path(&self.socket, &other.socket) {
            return Some(format!(
                "volumes {} and {} use the same socket {}",
                self.name,
                other.name,
                self.socket.display()
            ));
        }
        let (a, b) = (&self.image, &other.image);
        if a.same_file(b) && a.overlaps(b) && !(a.read_only && b.read_only) {
            return Some(format!(
                "volumes {} and {} use the same image {} on overlapping bytes ({} and {}); \
                 give them disjoint offset=/length= or make both read-only",
                self.name,
                other.name,
                a.path.display(),
                a.describe_range(),
                b.describe_range()
            ));
        }
        None
    }

    /// Why this volume cannot be served beside a control socket at `control`, if it cannot.
    pub fn conflict_with_control(&self, control: &Path) -> Option<String> {
        same_path(&self.socket, control).then(|| {
            format!(
                "volume {} and --control use the same socket {}",
                self.name,
                control.display()
            )
        })
    }
}

impl ImageRange {
    fn same_file(&self, other: &Self) -> bool {
        match (self.identity, other.identity) {
            (Some(a), Some(b)) => a == b,
            _ => same_path(&self.path, &other.path),
        }
    }

    fn overlaps(&self, other: &Self) -> bool {
        self.start_bytes < other.end_bytes && other.start_bytes < self.end_bytes
    }

    fn describe_range(&self) -> String {
        if self.end_bytes == u64::MAX {
            format!("{}..the end", self.start_bytes)
        } else {
            format!("{}..{}", self.start_bytes, self.end_bytes)
        }
    }
}

/// True when both paths name the same file. A path that does not exist yet (a socket not
/// bound, an image `size=` will create) is compared by its directory's canonical path and
/// its file name, so that `d/x` and `d/sub/../x` are one path before either exists.
pub fn same_path(a: &Path, b: &Path) -> bool {
    canonical(a) == canonical(b)
}

fn canonical(path: &Path) -> PathBuf {
    if let Ok(resolved) = path.canonicalize() {
        return resolved;
    }
    let in_directory = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            parent.canonicalize().ok().map(|dir| dir.join(name))
        }
        _ => None,
    };
    in_directory.unwrap_or_else(|| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(name: &str, socket: &str, image: &str, range: (u64, u64), ro: bool) -> Claims {
        Claims {
            name: name.into(),
            socket: socket.into(),
            image: ImageRange {
                path: image.into(),
                identity: None,
                start_bytes: range.0,
                end_bytes: range.1,
                read_only: ro,
            },
        }
    }

    const WHOLE: (u64, u64) = (0, u64::MAX);

    #[test]
    fn names_sockets_and_image_ranges_are_exclusive() {
        let a = claims("a", "/tmp/a.sock", "/tmp/a.img", WHOLE, false);
        let b = claims("b", "/tmp/b.sock", "/tmp/b.img", WHOLE, false);
        assert_eq!(a.conflict(&b), None);
        let same_name = a.conflict(&claims("a", "/tmp/b.sock", "/tmp/b.img", WHOLE, false));
        assert_eq!(same_name.as_deref(), Some("two volumes are named a"));
        let same_socket = a.conflict(&claims("b", "/tmp/a.sock", "/tmp/b.img", WHOLE, false));
        assert!(same_socket.is_some_and(|m| m.contains("same socket")));
        let slice = claims("b", "/tmp/b.sock", "/tmp/a.img", (4096, 8192), false);
        assert!(a.conflict(&slice).is_some_and(|m| m.contains("same image")));
        assert!(a.conflict_with_control(Path::new("/tmp/a.sock")).is_some());
        assert!(a.conflict_with_control(Path::new("/tmp/ctl")).is_none());
    }

    #[test]
    fn paths_not_created_yet_compare_through_their_directory() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("sub"))?;
        let plain = dir.path().join("x.sock");
        assert!(same_path(&plain, &dir.path().join("sub/../x.sock")));
        assert!(!same_path(&plain, &dir.path().join("sub/x.sock")));
        Ok(())
    }

    #[test]
    fn slices_conflict_only_where_they_overlap_and_one_writes() {
        let s1 = claims("s1", "/tmp/s1.sock", "/tmp/disk", (0, 4096), false);
        let s2 = claims("s2", "/tmp/s2.sock", "/tmp/disk", (4096, 8192), false);
        assert_eq!(s1.conflict(&s2), None, "adjacent slices do not overlap");
        let s3 = claims("s3", "/tmp/s3.sock", "/tmp/disk", (4095, 4096), false);
        let message = s1.conflict(&s3).unwrap_or_default();
        assert!(
            message.contains("bytes (0..4096 and 4095..4096)"),
            "{message}"
        );
        let tail = claims("t", "/tmp/t.sock", "/tmp/disk", (6000, u64::MAX), false);
        assert!(s2.conflict(&tail).is_some());
        assert_eq!(s1.conflict(&tail), None);
        let ro =
            |name: &str, range| claims(name, &format!("/tmp/{name}"), "/tmp/disk", range, true);
        assert_eq!(ro("r1", WHOLE).conflict(&ro("r2", WHOLE)), None);
        assert!(
            ro("r1", WHOLE).conflict(&s1).is_some(),
            "one writer is enough"
        );
    }

    #[test]
    fn two_paths_to_one_file_are_one_image() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let image = dir.path().join("disk");
        std::fs::write(&image, [0u8; 512])?;
        let link = dir.path().join("link");
        std::fs::hard_link(&image, &link)?;
        let with_identity = |name: &str, path: &Path| {
            let mut c = claims(name, &format!("/tmp/{name}.sock"), "", WHOLE, false);
            c.image.path = path.to_path_buf();
            c.image.identity = FileIdentity::of_path(path);
            c
        };
        let a = with_identity("a", &image);
        assert!(a.conflict(&with_identity("b", &link)).is_some());
        let other = dir.path().join("other");
        std::fs::write(&other, [0u8; 512])?;
        assert_eq!(a.conflict(&with_identity("c", &other)), None);
        Ok(())
    }
}
