//! What the device does with one well-formed request: hand one engine operation over, or
//! answer the guest at once with a status and a used length.
//!
//! The checks that need more than the chain's shape sit here: whole logical blocks
//! (virtio-blk `blk_size`), sector arithmetic that must not overflow, the discard and
//! write-zeroes segment (virtio 1.2, 5.2.6.2), and `GET_ID`, answered here by copying the
//! serial into the guest's buffer. Nothing here knows queues, threads or io_uring: the
//! engine appears only as the [`BlockOp`] handed over.

use ferry_engine::{BlockOp, SECTOR_SIZE};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{
    read_discard_segment, Request, RequestType, ID_BYTES, REQUEST_BYTES_MAX,
    WRITE_ZEROES_FLAG_UNMAP,
};
use crate::config::{self, DISCARD_SECTORS_MAX};

/// A read's used length (its data and the status byte) fits the used ring's `u32`.
const _: () = assert!(REQUEST_BYTES_MAX < u32::MAX as u64);

/// The status byte the device writes at the end of a request (virtio 1.2, 5.2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = VIRTIO_BLK_S_OK as u8,
    IoErr = VIRTIO_BLK_S_IOERR as u8,
    Unsupp = VIRTIO_BLK_S_UNSUPP as u8,
}

/// The one thing to do with a request.
#[derive(Debug, Clone, Copy)]
pub enum RequestAction<'r> {
    /// Hand `op` to the engine; the guest is answered when it completes.
    Submit {
        op: BlockOp<'r>,
        /// The used length if `op` succeeds: the bytes the device wrote into the guest's
        /// buffers (a read's data) and the status byte. A failed operation's is 1.
        used_len_ok: u32,
    },
    /// Answer at once: `status` into the status byte, `used_len` bytes (the status byte
    /// included) on the used ring.
    Answer { status: Status, used_len: u32 },
}

/// The volume as requests see it (the engine's `Volume` is one; tests use a plain struct).
pub trait VolumeView {
    fn read_only(&self) -> bool;
    /// The guest-visible size. Asked only by the requests that need it (an empty discard),
    /// because reading it may take a lock.
    fn size_bytes(&self) -> u64;
}

impl VolumeView for ferry_engine::Volume {
    fn read_only(&self) -> bool {
        ferry_engine::Volume::read_only(self)
    }

    fn size_bytes(&self) -> u64 {
        ferry_engine::Volume::size_bytes(self)
    }
}

/// What a request's action depends on besides the request and guest memory.
pub struct Device<'a, V: ?Sized> {
    /// The `GET_ID` serial.
    pub serial: &'a [u8; ID_BYTES],
    /// The guest's logical block: data and zeroed ranges must be whole blocks.
    pub logical_block_bytes: u32,
    pub volume: &'a V,
}

impl Request {
    /// What to do with this request, which [`super::parse`] filled in (`Parsed::Ok`).
    /// `GET_ID` is answered here: the serial goes into the guest's buffer.
    pub fn action<M, V>(&self, mem: &M, device: &Device<'_, V>) -> RequestAction<'_>
    where
        M: GuestMemory + Bytes<GuestAddress>,
        V: VolumeView + ?Sized,
    {
        match self.request_type {
            RequestType::Read | RequestType::Write => data_action(self, device.logical_block_bytes),
            RequestType::Flush => RequestAction::Submit {
                op: BlockOp::Flush,
                used_len_ok: 1,
            },
            RequestType::GetId => get_id(self, mem, device.serial),
            RequestType::Discard | RequestType::WriteZeroes => zeroing_action(self, mem, device),
            RequestType::Unsupported(_) => answer(Status::Unsupp),
        }
    }
}

/// Answers with `status` and the status byte as the only byte written.
fn answer(status: Status) -> RequestAction<'static> {
    RequestAction::Answer {
        status,
        used_len: 1,
    }
}

/// A read or a write: whole logical blocks at a sector that fits in bytes.
fn data_action(request: &Request, logical_block_bytes: u32) -> RequestAction<'_> {
    let Some(offset_bytes) = request.sector.checked_mul(SECTOR_SIZE) else {
        return answer(Status::IoErr);
    };
    if !config::is_block_aligned(offset_bytes, request.data_bytes, logical_block_bytes) {
        return answer(Status::IoErr);
    }
    let iovecs = &request.iovecs;
    if request.request_type == RequestType::Read {
        RequestAction::Submit {
            op: BlockOp::Read {
                offset_bytes,
                iovecs,
            },
            // At most `REQUEST_BYTES_MAX` (checked at parse), below `u32::MAX`.
            used_len_ok: request.data_bytes as u32 + 1,
        }
    } else {
        RequestAction::Submit {
            op: BlockOp::Write {
                offset_bytes,
                iovecs,
            },
            used_len_ok: 1,
        }
    }
}

/// `GET_ID`: as much of the serial as the guest's buffers hold (virtio 1.2, 5.2.6.1: the
/// string is not NUL-terminated when it fills all 20 bytes).
fn get_id<M>(request: &Request, mem: &M, serial: &[u8; ID_BYTES]) -> RequestAction<'static>
where
    M: GuestMemory + Bytes<GuestAddress>,
{
    let mut written = 0usize;
    for &(addr, len) in &request.data_segments {
        let n = (len as usize).min(ID_BYTES - written);
        if n == 0 {
            break;
        }
        if mem
            .write_slice(&serial[written..written + n], addr)
            .is_err()
        {
            return answer(Status::IoErr);
        }
        written += n;
    }
    RequestAction::Answer {
        status: Status::Ok,
        // At most `ID_BYTES` and the status byte.
        used_len: written as u32 + 1,
    }
}

/// A discard or a write-zeroes: its one segment, its flags, whole logical blocks.
fn zeroing_action<'r, M, V>(
    request: &'r Request,
    mem: &M,
    device: &Device<'_, V>,
) -> RequestAction<'r>
where
    M: GuestMemory + Bytes<GuestAddress>,
    V: VolumeView + ?Sized,
{
    // Not offered on a read-only volume (`config::device_features`).
    if device.volume.read_only() {
        return answer(Status::Unsupp);
    }
    let Some(segment) = read_discard_segment(request, mem) else {
        return answer(Status::IoErr);
    };
    let discard = request.request_type == RequestType::Discard;
    let allowed_flags = if discard { 0 } else { WRITE_ZEROES_FLAG_UNMAP };
    if segment.flags & !allowed_flags != 0 {
        return answer(Status::Unsupp);
    }
    if segment.num_sectors > DISCARD_SECTORS_MAX {
        return answer(Status::IoErr);
    }
    let Some(offset_bytes) = segment.sector.checked_mul(SECTOR_SIZE) else {
        return answer(Status::IoErr);
    };
    if segment.num_sectors == 0 {
        // Nothing to do, but the sector must still be on the volume.
        let in_range = offset_bytes <= device.volume.size_bytes();
        return answer(if in_range { Status::Ok } else { Status::IoErr });
    }
    let len_bytes = u64::from(segment.num_sectors) * SECTOR_SIZE;
    if !config::is_block_aligned(offset_bytes, len_bytes, device.logical_block_bytes) {
        return answer(Status::IoErr);
    }
    let op = if discard {
        BlockOp::Discard {
            offset_bytes,
            len_bytes,
        }
    } else {
        BlockOp::WriteZeroes {
            offset_bytes,
            len_bytes,
            unmap: segment.flags & WRITE_ZEROES_FLAG_UNMAP != 0,
        }
    };
    RequestAction::Submit { op, used_len_ok: 1 }
}

#[cfg(test)]
mod tests;
