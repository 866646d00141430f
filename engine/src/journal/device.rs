//! Block devices as media. An operator registers a device with `ferry journal format DIR
//! --device PATH`: it is zeroed (like a spare, so the end of data is found the same way)
//! and a symbolic link `DIR/spare-<k>.fjs` to it is created. The writer takes registered
//! devices before anything else, renaming the link to the next medium's name, so the
//! numbered set and every reader stay as they are; such a medium's capacity is the device's
//! size, and sealing leaves the zeroed rest instead of truncating.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::catalog::sync_dir;
use super::commit_ring::write_all_vectored_at;
use super::direct::StagingBuffer;
use super::error::JournalError;
use super::format::BLOCK_BYTES;
use super::spares::spare_file_name;

/// `BLKGETSIZE64`: the device's size in bytes (`_IOR(0x12, 114, size_t)`).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKZEROOUT`: zero a byte range `[start, len]` (`_IO(0x12, 127)`).
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// Bytes zeroed per request while registering (progress granularity).
const ZERO_CHUNK_BYTES: u64 = 64 << 20;
/// The smallest device accepted as a medium.
pub const DEVICE_MIN_BYTES: u64 = 1 << 20;
/// The highest spare number tried when looking for a free name.
const SPARE_NAMES_MAX: u32 = 100_000;

/// The usable size of `file` when it is a block device (its size rounded down to whole
/// blocks), `None` for anything else.
pub fn block_device_bytes(file: &File) -> std::io::Result<Option<u64>> {
    if !file.metadata()?.file_type().is_block_device() {
        return Ok(None);
    }
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live u64;
    // the descriptor is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut bytes as *mut u64) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some(bytes - bytes % BLOCK_BYTES as u64))
}

/// Zeroes `[0, len)` of the device: `BLKZEROOUT` (the device's own write-zeroes where it has
/// one), else aligned direct writes of zeros. `progress(done)` after every chunk.
fn zero_device(file: &File, len: u64, progress: &mut dyn FnMut(u64)) -> std::io::Result<()> {
    let mut staging = StagingBuffer::default();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK_BYTES);
        let range: [u64; 2] = [done, n];
        // SAFETY: BLKZEROOUT reads two u64 (start, length) through the pointer, which points
        // to a live array of two; the descriptor is open for writing.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
        if rc != 0 {
            let zeros = staging.fill(&[&vec![0u8; n as usize]]);
            write_all_vectored_at(file, &[zeros], done)?;
        }
        done += n;
        progress(done);
    }
    file.sync_all()
}

/// What [`register_device`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceRegistration {
    pub device: PathBuf,
    /// The link in the journal directory.
    pub spare: PathBuf,
    pub capacity_bytes: u64,
}

/// Zeroes the block device at `device` and registers it in `dir` as a spare medium. The
/// device is opened exclusively (a mounted or otherwise claimed device is refused).
pub fn register_device(
    dir: &Path,
    device: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<DeviceRegistration, JournalError> {
    let err = |step: &'static str| {
        let path = device.to_path_buf();
        move |source| JournalError::Medium { path, step, source }
    };
    let device = std::fs::canonicalize(device).map_err(err("resolve"))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(&device)
        .map_err(err("open exclusively"))?;
    let capacity_bytes = block_device_bytes(&file)
        .map_err(err("size"))?
        .ok_or_else(|| {
            JournalError::Invalid(format!("{} is not a block device", device.display()))
        })?;
    if capacity_bytes < DEVICE_MIN_BYTES {
        return Err(JournalError::Invalid(format!(
            "{} holds {capacity_bytes} bytes; a medium needs at least {DEVICE_MIN_BYTES}",
            device.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|source| JournalError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    if device_spares(dir)?.iter().any(|(_, d, _)| *d == device) {
        return Err(JournalError::Invalid(format!(
            "{} is already registered in {}",
            device.display(),
            dir.display()
        )));
    }
    zero_device(&file, capacity_bytes, &mut |done| {
        progress(done, capacity_bytes)
    })
    .map_err(err("zero"))?;
    let k = (0..SPARE_NAMES_MAX)
        .find(|k| {
            let name = spare_file_name(*k);
            std::fs::symlink_metadata(dir.join(&name)).is_err()
                && std::fs::symlink_metadata(dir.join(format!("{name}.tmp"))).is_err()
        })
        .ok_or_else(|| JournalError::Invalid("no free spare file name".into()))?;
    let spare = dir.join(spare_file_name(k));
    std::os::unix::fs::symlink(&device, &spare).map_err(err("link into the journal directory"))?;
    sync_dir(dir).map_err(|source| JournalError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(DeviceRegistration {
        device,
        spare,
        capacity_bytes,
    })
}

/// The registered device spares in `dir`: (link, device, usable bytes), by spare number.
pub fn device_spares(dir: &Path) -> Result<Vec<(PathBuf, PathBuf, u64)>, JournalError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(JournalError::Dir {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(k) = name.to_str().and_then(|n| {
            n.strip_prefix("spare-")?
                .strip_suffix(".fjs")?
                .parse::<u32>()
                .ok()
        }) else {
            continue;
        };
        let link = entry.path();
        let is_link = std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink());
        let Ok(target) = std::fs::read_link(&link) else {
            continue;
        };
        let bytes = File::open(&link)
            .ok()
            .and_then(|f| block_device_bytes(&f).ok().flatten());
        if let (true, Some(bytes)) = (is_link, bytes) {
            found.push((k, link, target, bytes));
        }
    }
    found.sort_by_key(|(k, ..)| *k);
    Ok(found.into_iter().map(|(_, l, t, b)| (l, t, b)).collect())
}
