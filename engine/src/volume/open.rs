//! Opening and creating volume images: regular files (sparse), block devices, and
//! (slices of) NBD exports.
//!
//! Operator errors are found here, before anything is created or truncated: a missing
//! image without a size, a size that does not match, a slice outside the image.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Backing, BackingKind, CacheMode, FileImage, NbdExport, VolumeConfig};
use crate::nbd::ExportUri;
use crate::EngineError;

/// Opens the image of `config`, creating a sparse file when it is missing and a size was given.
pub fn open_backing(config: &VolumeConfig) -> Result<Backing, EngineError> {
    if let Some(parsed) = super::nbd_export::parse_uri(&config.path) {
        return open_nbd(config, parsed);
    }
    let name = &config.name;
    let path = &config.path;
    let exists = path.symlink_metadata().is_ok();
    if !exists {
        create_sparse(config)?;
    }
    let meta = std::fs::metadata(path).map_err(|source| EngineError::Open {
        volume: name.clone(),
        path: path.clone(),
        source,
    })?;
    let is_block_device = meta.file_type().is_block_device();
    if !is_block_device && !meta.is_file() {
        return Err(EngineError::NotAnImage {
            volume: name.clone(),
            path: path.clone(),
        });
    }
    let direct = config.cache == CacheMode::None;
    let file = open_image(config, path, direct)?;
    let memory_backed = !is_block_device && is_memory_backed(&file);
    let image_len_bytes = image_len(&file).map_err(|source| EngineError::Open {
        volume: name.clone(),
        path: path.clone(),
        source,
    })?;
    let len_bytes = slice_len(config, image_len_bytes)?;
    let buffered = if direct {
        Some(open_image(config, path, false)?)
    } else {
        None
    };
    Ok(Backing {
        path: path.clone(),
        kind: BackingKind::File(FileImage {
            file,
            buffered,
            is_block_device,
            memory_backed,
        }),
        base_offset_bytes: config.offset_bytes,
        len_bytes,
    })
}

/// Opens a volume on (a slice of) an NBD export: connects once to learn its size and flags.
/// Nothing is created: `size=` must match the export (or the slice).
fn open_nbd(
    config: &VolumeConfig,
    parsed: Result<ExportUri, String>,
) -> Result<Backing, EngineError> {
    let nbd_err = |reason: String| EngineError::Nbd {
        volume: config.name.clone(),
        reason,
    };
    let location = parsed
        .map_err(|reason| nbd_err(format!("bad NBD URI {}: {reason}", config.path.display())))?;
    let export = NbdExport::probe(
        &location,
        config.request_block_bytes(),
        config.nbd_tls.clone(),
    )
    .map_err(nbd_err)?;
    let len_bytes = slice_len(config, export.size_bytes())?;
    Ok(Backing {
        path: PathBuf::from(export.uri()),
        kind: BackingKind::Nbd(Arc::new(export)),
        base_offset_bytes: config.offset_bytes,
        len_bytes,
    })
}

/// Checks the slice `offset_bytes..offset_bytes+length_bytes` against the image and the
/// requested size, and returns the volume's length.
fn slice_len(config: &VolumeConfig, image_len_bytes: u64) -> Result<u64, EngineError> {
    let bad = |reason: String| EngineError::BadGeometry {
        volume: config.name.clone(),
        reason,
    };
    if !config.offset_bytes.is_multiple_of(crate::SECTOR_SIZE) {
        return Err(bad(format!(
            "offset={} is not a multiple of {} bytes",
            config.offset_bytes,
            crate::SECTOR_SIZE
        )));
    }
    if config.offset_bytes > image_len_bytes {
        return Err(bad(format!(
            "offset={} lies past the end of {} ({} bytes)",
            config.offset_bytes,
            config.path.display(),
            image_len_bytes
        )));
    }
    let available = image_len_bytes - config.offset_bytes;
    let len_bytes = config.length_bytes.unwrap_or(available);
    if len_bytes > available {
        return Err(bad(format!(
            "offset={} length={} reaches past the end of {} ({} bytes)",
            config.offset_bytes,
            len_bytes,
            config.path.display(),
            image_len_bytes
        )));
    }
    if let Some(requested) = config.size_bytes {
        let actual = if config.length_bytes.is_some() || config.offset_bytes > 0 {
            len_bytes
        } else {
            image_len_bytes
        };
        if actual != requested {
            return Err(EngineError::SizeMismatch {
                volume: config.name.clone(),
                path: config.path.clone(),
                actual_bytes: actual,
                requested_bytes: requested,
            });
        }
    }
    if len_bytes == 0 {
        return Err(bad(format!("{} is empty", config.path.display())));
    }
    if !len_bytes.is_multiple_of(crate::SECTOR_SIZE) {
        return Err(bad(format!(
            "size {} bytes is not a multiple of {} bytes",
            len_bytes,
            crate::SECTOR_SIZE
        )));
    }
    Ok(len_bytes)
}

fn create_sparse(config: &VolumeConfig) -> Result<(), EngineError> {
    let Some(size_bytes) = config.size_bytes else {
        return Err(EngineError::ImageMissing {
            volume: config.name.clone(),
            path: config.path.clone(),
        });
    };
    if size_bytes == 0 || size_bytes % crate::SECTOR_SIZE != 0 {
        return Err(EngineError::BadGeometry {
            volume: config.name.clone(),
            reason: format!(
                "size={size_bytes} must be a positive multiple of {} bytes",
                crate::SECTOR_SIZE
            ),
        });
    }
    let total = config
        .offset_bytes
        .checked_add(config.length_bytes.unwrap_or(size_bytes))
        .ok_or_else(|| EngineError::Invalid(format!("volume {}: size overflows", config.name)))?;
    let create_err = |source| EngineError::Create {
        volume: config.name.clone(),
        path: config.path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&config.path)
        .map_err(create_err)?;
    if let Err(e) = file.set_len(total) {
        let _ = std::fs::remove_file(&config.path);
        return Err(create_err(e));
    }
    Ok(())
}

fn open_image(config: &VolumeConfig, path: &Path, direct: bool) -> Result<File, EngineError> {
    let mut options = OpenOptions::new();
    options.read(true).write(!config.read_only);
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    options.custom_flags(flags);
    options.open(path).map_err(|source| EngineError::Open {
        volume: config.name.clone(),
        path: path.to_path_buf(),
        source,
    })
}

/// True for files on tmpfs or ramfs.
pub fn is_memory_backed(file: &File) -> bool {
    use nix::sys::statfs::{fstatfs, FsType, TMPFS_MAGIC};
    // linux/magic.h; the libc crate does not name it.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    fstatfs(file).is_ok_and(|stats| {
        let fs_type = stats.filesystem_type();
        fs_type == TMPFS_MAGIC || fs_type == RAMFS_MAGIC
    })
}

/// The size of a regular file or block device.
pub fn image_len(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    // Seeking to the end works for regular files and block devices alike.
    let mut handle = file;
    let len = handle.seek(SeekFrom::End(0))?;
    handle.seek(SeekFrom::Start(0))?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, size: Option<u64>) -> VolumeConfig {
        VolumeConfig {
            name: "t".into(),
            path: dir.join("t.img"),
            size_bytes: size,
            ..Default::default()
        }
    }

    #[test]
    fn creates_a_sparse_image_with_the_given_size() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let backing = open_backing(&config(dir.path(), Some(1 << 20)))?;
        assert_eq!(backing.len_bytes, 1 << 20);
        assert_eq!(std::fs::metadata(dir.path().join("t.img"))?.len(), 1 << 20);
        Ok(())
    }

    #[test]
    fn refuses_a_missing_image_without_size() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let err = open_backing(&config(dir.path(), None));
        assert!(matches!(err, Err(EngineError::ImageMissing { .. })));
        assert!(!dir.path().join("t.img").exists());
        Ok(())
    }

    #[test]
    fn refuses_a_size_mismatch_without_truncating() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("t.img"), vec![7u8; 4096])?;
        let err = open_backing(&config(dir.path(), Some(8192)));
        assert!(matches!(err, Err(EngineError::SizeMismatch { .. })));
        assert_eq!(std::fs::read(dir.path().join("t.img"))?, vec![7u8; 4096]);
        Ok(())
    }

    #[test]
    fn slices_an_image() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("t.img"), vec![0u8; 8192])?;
        let mut c = config(dir.path(), None);
        c.offset_bytes = 4096;
        let backing = open_backing(&c)?;
        assert_eq!(backing.len_bytes, 4096);
        c.length_bytes = Some(8192);
        assert!(matches!(
            open_backing(&c),
            Err(EngineError::BadGeometry { .. })
        ));
        Ok(())
    }
}
