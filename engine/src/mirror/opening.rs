//! Opening a job's target and checking it against its sources: big enough, not one of
//! them, and the request size every write to it is a multiple of.

use std::path::PathBuf;
use std::sync::Arc;

use super::destination::file::FileDestination;
use super::destination::nbd::NbdDestination;
use super::destination::{Destination, DestinationSpec};
use super::layout::Layout;
use super::options::MigrationOptions;
use super::MigrationError;
use crate::volume::Volume;

pub(crate) fn check_volume_list(volumes: &[Arc<Volume>]) -> Result<(), MigrationError> {
    if volumes.is_empty() {
        return Err(MigrationError::NoVolumes);
    }
    for (i, v) in volumes.iter().enumerate() {
        if volumes[..i].iter().any(|w| w.name() == v.name()) {
            return Err(MigrationError::DuplicateVolume(v.name().to_string()));
        }
    }
    Ok(())
}

/// Opens the target and checks it against the sources: big enough, and none of them.
pub(crate) fn open_target(
    spec: &DestinationSpec,
    layout: &Layout,
    volumes: &[Arc<Volume>],
    options: &MigrationOptions,
) -> Result<(Arc<dyn Destination>, Option<PathBuf>), MigrationError> {
    let needed_bytes = layout.total_bytes;
    let (target, path): (Arc<dyn Destination>, Option<PathBuf>) = match spec {
        DestinationSpec::File(path) => {
            let file = FileDestination::open(path, needed_bytes)?;
            check_not_source(&file, volumes)?;
            (Arc::new(file), Some(path.clone()))
        }
        DestinationSpec::Nbd(uri) => {
            let request_block_bytes = job_request_block_bytes(volumes, options);
            let nbd = NbdDestination::connect(
                uri,
                options.nbd_request_timeout,
                request_block_bytes,
                options.nbd_tls.clone(),
            )?;
            (Arc::new(nbd), None)
        }
    };
    if target.size_bytes() < needed_bytes {
        return Err(MigrationError::DestinationTooSmall {
            target: target.describe(),
            size_bytes: target.size_bytes(),
            needed_bytes,
        });
    }
    Ok((target, path))
}

/// What every request a job sends its target is whole multiples of: the smallest logical
/// block of its volumes (mirrored guest writes and discards), which also divides its copy
/// granularity (a power of two of at least 4 KiB) and the layout's 1 MiB placements.
fn job_request_block_bytes(volumes: &[Arc<Volume>], options: &MigrationOptions) -> u64 {
    volumes
        .iter()
        .map(|v| v.config().request_block_bytes())
        .min()
        .unwrap_or(crate::SECTOR_SIZE)
        .min(options.granularity_bytes)
}

fn check_not_source(
    target: &FileDestination,
    volumes: &[Arc<Volume>],
) -> Result<(), MigrationError> {
    use std::os::unix::fs::MetadataExt;
    let (dev, ino, rdev) = target.identity();
    for v in volumes {
        let backing = v.backing();
        let Some(image) = backing.file() else {
            continue; // a volume on NBD is not a local file
        };
        let meta = image
            .file
            .metadata()
            .map_err(|source| MigrationError::Source {
                volume: v.name().to_string(),
                source,
            })?;
        let same_file = meta.dev() == dev && meta.ino() == ino;
        let same_device = image.is_block_device && target.is_block_device() && meta.rdev() == rdev;
        if same_file || same_device {
            return Err(MigrationError::DestinationIsSource {
                target: target.describe(),
                volume: v.name().to_string(),
            });
        }
    }
    Ok(())
}
