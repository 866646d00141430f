//! Parsing one virtio-blk request from a descriptor chain (virtio 1.2, section 5.2.6).
//!
//! The guest controls every byte we read here, so parsing never trusts it: the header
//! must be device-readable and whole, the status byte device-writable, every data
//! descriptor must point into guest memory with the direction the request type needs,
//! and the number of segments is bounded. A chain we cannot parse yields a
//! [`ParseError`]; when its status byte is usable the caller still answers the guest
//! with `VIRTIO_BLK_S_IOERR`.
//!
//! Layout: a 16-byte header `{type: le32, reserved: le32, sector: le64}`, data
//! descriptors, and a final writable byte for the status. We accept the header sharing
//! its descriptor with data and the status sharing its descriptor with data
//! (`VIRTIO_F_ANY_LAYOUT` is implied by virtio 1.x).

use std::ops::Deref;

use ferry_engine::IovecArray;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

pub mod action;

pub use action::{RequestAction, Status};

/// The most iovecs one request may turn into (data descriptors, split at memory-region
/// boundaries). A longer chain is refused.
pub const IOVECS_MAX: usize = 256;
/// The most descriptors one chain may have (header, data, status).
pub const DESCRIPTORS_MAX: usize = IOVECS_MAX + 2;
/// `seg_max` advertised to the guest: data descriptors per request.
pub const SEG_MAX: u32 = 126;
const _: () = assert!(SEG_MAX as usize + 2 <= DESCRIPTORS_MAX);
/// `size_max` advertised to the guest: bytes per data descriptor.
pub const SIZE_MAX: u32 = 256 * 1024;
/// The most data bytes one request may carry (`seg_max` x `size_max`, 31.5 MiB). A larger
/// request is refused: observers copy every write (the journal's records hold at most
/// 64 MiB, the mirror sends at most 32 MiB per NBD request), and overlapping descriptors
/// would otherwise let a guest with little memory make them copy gigabytes.
pub const REQUEST_BYTES_MAX: u64 = SEG_MAX as u64 * SIZE_MAX as u64;

const HEADER_BYTES: u32 = 16;
/// Bytes of one discard / write-zeroes segment `{sector: le64, num_sectors: le32, flags: le32}`.
pub const DISCARD_SEGMENT_BYTES: u64 = 16;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Length of the device id string (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;

/// What the guest asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// A type ferry does not implement: answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

impl RequestType {
    fn from_le(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => Self::Read,
            VIRTIO_BLK_T_OUT => Self::Write,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }

    /// True when the data descriptors are written by the device.
    fn data_is_device_writable(self) -> bool {
        matches!(self, Self::Read | Self::GetId)
    }
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("descriptor chain is empty or unreadable")]
    Empty,
    #[error("descriptor chain has more than {DESCRIPTORS_MAX} descriptors")]
    TooLong,
    #[error("the chain does not start with 16 device-readable header bytes")]
    BadHeader,
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    #[error("a data descriptor has the wrong direction for the request type")]
    WrongDirection,
    #[error("a descriptor points outside guest memory")]
    OutsideMemory,
    #[error("data takes more than {IOVECS_MAX} memory segments")]
    TooManySegments,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("data larger than {REQUEST_BYTES_MAX} bytes")]
    TooLarge,
    #[error("descriptor chain ends in a broken link (next out of range, a loop or a bad indirect table)")]
    Broken,
}

/// A parsed request. `iovecs` hold host addresses of the guest's data buffers, handed to the
/// engine as they are (no bounce copy). They stay valid while the guest memory snapshot the
/// request was parsed against is held: by the queue worker while it submits the request, then
/// by the request's in-flight slot until its completion is reaped. Each parse clears them
/// first, so addresses of an earlier request are never handed out again.
#[derive(Debug)]
pub struct Request {
    pub head_index: u16,
    pub request_type: RequestType,
    pub sector: u64,
    pub iovecs: IovecArray,
    /// Guest address of the first data byte, for small copies (GET_ID, discard segments).
    pub data_segments: Vec<(GuestAddress, u32)>,
    pub data_bytes: u64,
    pub status_addr: GuestAddress,
}

impl Request {
    /// An empty request whose buffers can be reused for parsing many chains.
    pub fn with_capacity() -> Self {
        Self {
            head_index: 0,
            request_type: RequestType::Flush,
            sector: 0,
            iovecs: IovecArray::with_capacity(IOVECS_MAX),
            data_segments: Vec::with_capacity(DESCRIPTORS_MAX),
            data_bytes: 0,
            status_addr: GuestAddress(0),
        }
    }
}

/// The outcome of parsing a chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// `request` was filled in.
    Ok,
    /// The chain is malformed but its status byte is usable: answer IOERR there.
    Failed {
        error: ParseError,
        status_addr: GuestAddress,
    },
    /// The chain is malformed and has no usable status byte: return it with length 0.
    Dropped(ParseError),
}

/// One descriptor, as read from the chain.
#[derive(Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

impl Segment {
    const EMPTY: Self = Self {
        addr: GuestAddress(0),
        len: 0,
        writable: false,
    };

    fn of(desc: &SplitDescriptor) -> Self {
        Self {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        }
    }
}

/// Parses `chain` into `request` (reusing its buffers).
pub fn parse<M, Mem>(chain: DescriptorChain<M>, mem: &Mem, request: &mut Request) -> Parsed
where
    M: Deref<Target = Mem>,
    Mem: GuestMemoryBackend + GuestMemory,
{
    request.head_index = chain.head_index();
    request.iovecs.clear();
    request.data_segments.clear();
    request.data_bytes = 0;
    let mut segments = [Segment::EMPTY; DESCRIPTORS_MAX];
    let count = match read_chain(chain, &mut segments) {
        Ok(count) => count,
        Err(outcome) => return outcome,
    };
    let segments = &mut segments[..count];
    let status_addr = match status_byte(segments, mem) {
        Ok(status_addr) => status_addr,
        Err(error) => return Parsed::Dropped(error),
    };
    request.status_addr = status_addr;
    let fail = |error| Parsed::Failed { error, status_addr };
    // The status byte is not data.
    if let Some(last) = segments.last_mut() {
        last.len -= 1;
    }
    let data_from = match read_header(segments, mem, request) {
        Ok(data_from) => data_from,
        Err(error) => return fail(error),
    };
    if let Err(error) = collect_data(&segments[data_from..], mem, request) {
        return fail(error);
    }
    Parsed::Ok
}

/// Reads the chain's descriptors into `segments` and returns how many there are; a chain
/// that is empty, ends in a broken link or is too long gets its outcome instead.
fn read_chain<M, Mem>(
    mut chain: DescriptorChain<M>,
    segments: &mut [Segment; DESCRIPTORS_MAX],
) -> Result<usize, Parsed>
where
    M: Deref<Target = Mem>,
    Mem: GuestMemoryBackend + GuestMemory,
{
    let mut count = 0usize;
    // The chain's iterator stops without an error at a broken link; the last descriptor
    // seen then still points to a next one, and the chain's real end (its status byte) is
    // unknown.
    let mut last_has_next = false;
    while let Some(desc) = chain.next() {
        last_has_next = desc.has_next();
        let segment = Segment::of(&desc);
        if count == DESCRIPTORS_MAX {
            // Too long: find the real end for the status byte, then refuse.
            let (last, has_next) = chain.by_ref().fold((segment, desc.has_next()), |_, d| {
                (Segment::of(&d), d.has_next())
            });
            if has_next {
                return Err(Parsed::Dropped(ParseError::Broken));
            }
            return Err(status_or_drop(&[last], ParseError::TooLong));
        }
        segments[count] = segment;
        count += 1;
    }
    if count == 0 {
        return Err(Parsed::Dropped(ParseError::Empty));
    }
    if last_has_next {
        return Err(Parsed::Dropped(ParseError::Broken));
    }
    Ok(count)
}

/// The status byte: the last byte of the last descriptor, which must be device-writable
/// and inside guest memory.
fn status_byte<Mem>(segments: &[Segment], mem: &Mem) -> Result<GuestAddress, ParseError>
where
    Mem: GuestMemoryBackend,
{
    let Some(last) = segments.last() else {
        return Err(ParseError::Empty);
    };
    if !last.writable || last.len == 0 {
        return Err(ParseError::NoStatus);
    }
    let Some(status_addr) = last.addr.checked_add(u64::from(last.len) - 1) else {
        return Err(ParseError::NoStatus);
    };
    if !GuestMemoryBackend::check_range(mem, status_addr, 1) {
        return Err(ParseError::OutsideMemory);
    }
    Ok(status_addr)
}

/// Reads the request header, the chain's first 16 bytes, in one descriptor or spread over
/// several (virtio 1.x drivers may frame a request as they like, virtio 1.2 section 2.7.4),
/// and takes it off `segments`; returns the index of the first segment with data left.
fn read_header<Mem>(
    segments: &mut [Segment],
    mem: &Mem,
    request: &mut Request,
) -> Result<usize, ParseError>
where
    Mem: GuestMemory,
{
    let mut header = [0u8; HEADER_BYTES as usize];
    let mut header_bytes = 0usize;
    let mut data_from = 0usize;
    while header_bytes < header.len() {
        let Some(segment) = segments.get_mut(data_from) else {
            return Err(ParseError::BadHeader);
        };
        if segment.writable {
            return Err(ParseError::BadHeader);
        }
        let n = (segment.len as usize).min(header.len() - header_bytes);
        if mem
            .read_slice(&mut header[header_bytes..header_bytes + n], segment.addr)
            .is_err()
        {
            return Err(ParseError::OutsideMemory);
        }
        header_bytes += n;
        // n <= segment.len, so the address stays inside the descriptor just read.
        segment.addr = segment.addr.unchecked_add(n as u64);
        segment.len -= n as u32;
        if segment.len == 0 {
            data_from += 1;
        }
    }
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    request.request_type = RequestType::from_le(request_type);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    request.sector = u64::from_le_bytes(sector_bytes);
    Ok(data_from)
}

/// Checks directions and turns the data descriptors into host iovecs.
fn collect_data<Mem>(
    segments: &[Segment],
    mem: &Mem,
    request: &mut Request,
) -> Result<(), ParseError>
where
    Mem: GuestMemoryBackend + GuestMemory,
{
    let want_writable = request.request_type.data_is_device_writable();
    let check_direction = !matches!(
        request.request_type,
        RequestType::Unsupported(_) | RequestType::Flush
    );
    let mut seen_writable = false;
    for segment in segments {
        if segment.writable {
            seen_writable = true;
        } else if seen_writable {
            return Err(ParseError::ReadableAfterWritable);
        }
        if segment.len == 0 {
            continue;
        }
        if check_direction && segment.writable != want_writable {
            return Err(ParseError::WrongDirection);
        }
        request.data_segments.push((segment.addr, segment.len));
        request.data_bytes += u64::from(segment.len);
        if request.data_bytes > REQUEST_BYTES_MAX {
            return Err(ParseError::TooLarge);
        }
        for slice in GuestMemoryBackend::get_slices(mem, segment.addr, segment.len as usize) {
            let slice = slice.map_err(|_| ParseError::OutsideMemory)?;
            if request.iovecs.len() == IOVECS_MAX {
                return Err(ParseError::TooManySegments);
            }
            request.iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

fn status_or_drop(segments: &[Segment], error: ParseError) -> Parsed {
    match segments.last() {
        Some(last) if last.writable && last.len > 0 => {
            match last.addr.checked_add(u64::from(last.len) - 1) {
                Some(status_addr) => Parsed::Failed { error, status_addr },
                None => Parsed::Dropped(error),
            }
        }
        _ => Parsed::Dropped(error),
    }
}

/// One discard or write-zeroes segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardSegment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

/// Reads the single discard / write-zeroes segment of a request (ferry advertises
/// `max_discard_seg = max_write_zeroes_seg = 1`).
pub fn read_discard_segment<Mem: GuestMemory + Bytes<GuestAddress>>(
    request: &Request,
    mem: &Mem,
) -> Option<DiscardSegment> {
    if request.data_bytes != DISCARD_SEGMENT_BYTES || request.data_segments.len() != 1 {
        return None;
    }
    let mut raw = [0u8; DISCARD_SEGMENT_BYTES as usize];
    mem.read_slice(&mut raw, request.data_segments[0].0).ok()?;
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[0..8]);
    Some(DiscardSegment {
        sector: u64::from_le_bytes(sector),
        num_sectors: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
        flags: u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]),
    })
}

#[cfg(test)]
mod test_chains;
#[cfg(test)]
mod tests;
