//! Scratch directories and disk images for tests, and the comparison of an image with the
//! bytes it must hold (naming the first difference).

use crate::rng::Rng;
use anyhow::{bail, ensure, Context as _, Result};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

/// Differences are reported by block of this size (and byte offset).
const REPORT_BLOCK_BYTES: u64 = 4096;
/// Data and holes alternate in stretches of this size in [`image_with_holes`].
const HOLE_STRIDE_BYTES: u64 = 1 << 20;

/// A fresh temporary directory in `/tmp` for sockets and images: a short path, because a
/// unix socket's path must fit in 108 bytes.
pub fn scratch_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("ferry-test-")
        .tempdir_in("/tmp")
        .context("create scratch dir in /tmp")
}

/// A fresh temporary directory on the tmpfs at `/dev/shm`, for files that must live in
/// memory (mapped journal media, images a benchmark should not wait on a disk for).
pub fn memory_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("ferry-test-")
        .tempdir_in("/dev/shm")
        .context("create a directory on the tmpfs at /dev/shm")
}

/// Creates a sparse raw image of `len_bytes` at `path` (all zeroes).
pub fn create_image(path: &Path, len_bytes: u64) -> Result<PathBuf> {
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(len_bytes)
        .with_context(|| format!("truncate {} to {len_bytes}", path.display()))?;
    Ok(path.to_path_buf())
}

/// Creates an image of `len_bytes` whose every other MiB starts with half a MiB of the
/// random data of `seed`, holes elsewhere; returns its content.
pub fn image_with_holes(path: &Path, len_bytes: u64, seed: u64) -> Result<Vec<u8>> {
    create_image(path, len_bytes)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut model = vec![0u8; usize::try_from(len_bytes)?];
    let mut rng = Rng::new(seed);
    for start in (0..len_bytes).step_by(2 * HOLE_STRIDE_BYTES as usize) {
        let len = (len_bytes - start).min(HOLE_STRIDE_BYTES) / 2;
        let data = &mut model[start as usize..(start + len) as usize];
        rng.fill(data);
        file.write_all_at(data, start)
            .with_context(|| format!("write {len} bytes at {start} of {}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("sync {}", path.display()))?;
    Ok(model)
}

/// Reads `len` bytes at `offset_bytes` of the file at `path`.
pub fn read_range(path: &Path, offset_bytes: u64, len: usize) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset_bytes)
        .with_context(|| format!("read {len} bytes at {offset_bytes} of {}", path.display()))?;
    Ok(buf)
}

/// Fails unless `path` holds `expected` at `offset_bytes`, naming the first differing byte.
pub fn compare_image(path: &Path, offset_bytes: u64, expected: &[u8]) -> Result<()> {
    let actual = read_range(path, offset_bytes, expected.len())?;
    compare_bytes(&path.display().to_string(), &actual, expected)
}

/// Fails unless `actual == expected`, naming the first differing byte and the differing bytes.
pub fn compare_bytes(what: &str, actual: &[u8], expected: &[u8]) -> Result<()> {
    ensure!(
        actual.len() == expected.len(),
        "{what}: {} bytes, expected {}",
        actual.len(),
        expected.len()
    );
    // Slice equality is one memcmp; the byte-by-byte search for the report runs only when
    // it fails (it is slow in debug builds over whole images).
    if actual == expected {
        return Ok(());
    }
    if let Some(first) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        let differing = actual.iter().zip(expected).filter(|(a, e)| a != e).count();
        bail!(
            "{what}: {differing} bytes differ from what was written, the first at offset {first} \
             (block {} of {REPORT_BLOCK_BYTES} bytes): got {:02x?}, expected {:02x?}",
            first as u64 / REPORT_BLOCK_BYTES,
            &actual[first..(first + 8).min(actual.len())],
            &expected[first..(first + 8).min(expected.len())]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_with_holes_holds_its_model() -> Result<()> {
        let dir = scratch_dir()?;
        let path = dir.path().join("i.img");
        let model = image_with_holes(&path, 5 * HOLE_STRIDE_BYTES + 4096, 3)?;
        compare_image(&path, 0, &model)?;
        let half = HOLE_STRIDE_BYTES as usize / 2;
        assert!(model[..half].iter().any(|&b| b != 0));
        assert!(model[half..2 * half * 2].iter().all(|&b| b == 0));
        assert!(model[4 * half..5 * half].iter().any(|&b| b != 0));
        Ok(())
    }

    #[test]
    fn a_difference_is_named() {
        let err = compare_bytes("x", &[1, 2, 3], &[1, 9, 3]).err();
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            text.contains("1 bytes differ") && text.contains("offset 1"),
            "{text}"
        );
        assert!(compare_bytes("x", &[1], &[1, 2]).is_err());
    }
}
