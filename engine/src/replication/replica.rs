//! The replica images of a group at the DR site and how a record changes them, through the
//! mirror's file destination (positioned writes, `fallocate` with its fallbacks, block
//! devices too). No guest reaches a replica while it is one; the images are synced as a whole
//! before the applied checkpoint moves.

use std::path::PathBuf;

use super::frame::{Record, RecordOp};
use crate::mirror::destination::file::FileDestination;
use crate::mirror::{Destination, DestinationError};

/// One replica: its image and the size every record is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSpec {
    pub path: PathBuf,
    pub size_bytes: u64,
}

/// Why a replica could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Destination(#[from] DestinationError),
    #[error("replica {path} is {found} bytes, the group says {expected}")]
    WrongSize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
}

/// The open replica images of a group, in the group's volume order.
pub struct ReplicaImages {
    images: Vec<(ReplicaSpec, FileDestination)>,
}

impl ReplicaImages {
    /// Opens the replicas, creating missing images at their size (sparse).
    pub fn open(specs: &[ReplicaSpec]) -> Result<ReplicaImages, ReplicaError> {
        let mut images = Vec::with_capacity(specs.len());
        for spec in specs {
            let image = FileDestination::open(&spec.path, spec.size_bytes)?;
            if image.size_bytes() != spec.size_bytes {
                return Err(ReplicaError::WrongSize {
                    path: spec.path.clone(),
                    found: image.size_bytes(),
                    expected: spec.size_bytes,
                });
            }
            images.push((spec.clone(), image));
        }
        Ok(ReplicaImages { images })
    }

    pub fn specs(&self) -> impl Iterator<Item = &ReplicaSpec> {
        self.images.iter().map(|(s, _)| s)
    }

    /// Why `record` cannot apply to this group, or `None` if it can.
    pub fn refusal(&self, record: &Record) -> Option<&'static str> {
        let Some((spec, _)) = self.images.get(record.volume_index as usize) else {
            return Some("no volume with this index in the group");
        };
        let (offset, len) = match &record.op {
            RecordOp::Write { offset_bytes, data } => (*offset_bytes, data.len() as u64),
            RecordOp::Discard {
                offset_bytes,
                len_bytes,
            }
            | RecordOp::WriteZeroes {
                offset_bytes,
                len_bytes,
                ..
            } => (*offset_bytes, *len_bytes),
            RecordOp::Flush
            | RecordOp::Mark { .. }
            | RecordOp::ResyncBegin
            | RecordOp::ResyncEnd => return None,
        };
        match offset.checked_add(len) {
            Some(end) if end <= spec.size_bytes => None,
            _ => Some("range beyond the end of the replica (a volume of another size?)"),
        }
    }

    /// Applies one record (checked with [`refusal`](Self::refusal)) to its replica.
    pub fn apply(&self, record: &Record) -> Result<(), DestinationError> {
        let Some((_, image)) = self.images.get(record.volume_index as usize) else {
            return Ok(());
        };
        match &record.op {
            RecordOp::Write { offset_bytes, data } => image.write_at(*offset_bytes, data),
            // A discarded range of a ferry volume reads back as zeros.
            RecordOp::Discard {
                offset_bytes,
                len_bytes,
            } => image.write_zeroes(*offset_bytes, *len_bytes, true),
            RecordOp::WriteZeroes {
                offset_bytes,
                len_bytes,
                unmap,
            } => image.write_zeroes(*offset_bytes, *len_bytes, *unmap),
            RecordOp::Flush
            | RecordOp::Mark { .. }
            | RecordOp::ResyncBegin
            | RecordOp::ResyncEnd => Ok(()),
        }
    }

    /// Makes everything applied so far durable.
    pub fn sync(&self) -> Result<(), DestinationError> {
        self.images.iter().try_for_each(|(_, image)| image.flush())
    }
}
