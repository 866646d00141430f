//! The plain file backend: a raw image, buffered or `cache=none` (`O_DIRECT`), on the build
//! directory's filesystem or on tmpfs. After the case the image holds what the volume reads.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use ferry_engine::{CacheMode, Volume, VolumeConfig};
use ferry_test_support::{images, require_ok};
use tempfile::TempDir;

use crate::fixture::{Access, Beside, Fixture, FixtureIo, FILL_BYTE, VOLUME_BYTES};
use ferry_test_support::compare_bytes;

/// Which filesystem an image lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Cargo's temporary directory for integration tests, under the build directory: the
    /// filesystem a daemon's images usually live on (`/tmp` may be tmpfs).
    BuildDir,
    /// `/dev/shm`: no `FALLOC_FL_ZERO_RANGE`, so write-zeroes falls back to punching holes.
    Tmpfs,
}

/// A fresh directory on `place`; `None` where there is no tmpfs (a skip, or a failure under
/// `FERRY_REQUIRE_ALL`).
pub fn scratch_on(place: Place) -> Result<Option<TempDir>> {
    match place {
        Place::BuildDir => Ok(Some(
            tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                .context("a directory in the build directory")?,
        )),
        Place::Tmpfs => Ok(require_ok("a tmpfs at /dev/shm", images::memory_dir())),
    }
}

/// Writes an image of `len_bytes` full of [`FILL_BYTE`] at `dir/name`.
pub fn filled_image(dir: &Path, name: &str, len_bytes: u64) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, vec![FILL_BYTE; len_bytes as usize])
        .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// Opens the image at `path` as volume `v`.
pub fn open_volume(path: &Path, cache: CacheMode, access: Access) -> Result<Arc<Volume>> {
    let volume = Volume::open(VolumeConfig {
        name: "v".into(),
        path: path.to_path_buf(),
        read_only: access.read_only(),
        cache,
        ..Default::default()
    })
    .with_context(|| format!("open {} as a volume", path.display()))?;
    Ok(volume)
}

/// True when `dir`'s filesystem opens files with `O_DIRECT`.
fn takes_o_direct(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join("o_direct.probe");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)?;
    std::fs::remove_file(probe)
}

/// A volume on a fresh [`FILL_BYTE`] image on `place`, in cache mode `cache`; `None` when a
/// prerequisite is missing (tmpfs, `O_DIRECT` on the filesystem).
pub fn open(place: Place, cache: CacheMode, access: Access) -> Result<Option<Fixture>> {
    let Some(dir) = scratch_on(place)? else {
        return Ok(None);
    };
    if cache == CacheMode::None {
        let what = format!("O_DIRECT on the filesystem of {}", dir.path().display());
        if require_ok(&what, takes_o_direct(dir.path())).is_none() {
            return Ok(None);
        }
    }
    let image = filled_image(dir.path(), "v.img", VOLUME_BYTES)?;
    let volume = open_volume(&image, cache, access)?;
    Ok(Some(Fixture::new(
        FixtureIo::new(volume)?,
        ImageFile { image, _dir: dir },
    )))
}

/// The image file under a volume.
struct ImageFile {
    image: PathBuf,
    _dir: TempDir,
}

impl Beside for ImageFile {
    fn check_after(&mut self, _: &mut FixtureIo, content: &[u8]) -> Result<()> {
        let on_disk = std::fs::read(&self.image).context("read the image")?;
        compare_bytes("the image after the case", &on_disk, content)
    }
}
