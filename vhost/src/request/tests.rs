//! Unit tests of request parsing: hand-built descriptor chains, well-formed and hostile.

use super::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const MEM_BYTES: usize = 0x40_0000;
const HEADER_AT: u64 = 0x10_0000;
const DATA_AT: u64 = 0x20_0000;
const STATUS_AT: u64 = 0x30_0000;

fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("guest memory")
}

fn header(mem: &Mem, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HEADER_AT))
        .expect("header");
}

fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
    let flags = if writable {
        VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// Builds a chain from `descs` (linked in order) on a queue of `queue_size` and parses it.
fn parse_chain(mem: &Mem, descs: &[RawDescriptor], queue_size: u16) -> (Parsed, Request) {
    let vq = MockSplitQueue::new(mem, queue_size);
    let chain = vq.build_desc_chain(descs).expect("chain");
    let mut request = Request::with_capacity();
    let parsed = parse(chain, mem, &mut request);
    (parsed, request)
}

fn standard(mem: &Mem, request_type: u32, data_len: u32, data_writable: bool) -> (Parsed, Request) {
    header(mem, request_type, 7);
    parse_chain(
        mem,
        &[
            desc(HEADER_AT, 16, false),
            desc(DATA_AT, data_len, data_writable),
            desc(STATUS_AT, 1, true),
        ],
        16,
    )
}

#[test]
fn parses_a_read() {
    let mem = memory();
    let (parsed, request) = standard(&mem, VIRTIO_BLK_T_IN, 4096, true);
    assert_eq!(parsed, Parsed::Ok);
    assert_eq!(request.request_type, RequestType::Read);
    assert_eq!(request.sector, 7);
    assert_eq!(request.data_bytes, 4096);
    assert_eq!(request.iovecs.len(), 1);
    assert_eq!(request.iovecs[0].iov_len, 4096);
    assert_eq!(request.status_addr, GuestAddress(STATUS_AT));
}

#[test]
fn parses_a_write_with_several_segments() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_OUT, 100);
    let (parsed, request) = parse_chain(
        &mem,
        &[
            desc(HEADER_AT, 16, false),
            desc(DATA_AT, 512, false),
            desc(DATA_AT + 0x1000, 1024, false),
            desc(STATUS_AT, 1, true),
        ],
        16,
    );
    assert_eq!(parsed, Parsed::Ok);
    assert_eq!(request.request_type, RequestType::Write);
    assert_eq!(request.data_bytes, 1536);
    assert_eq!(request.iovecs.len(), 2);
}

#[test]
fn accepts_status_sharing_a_descriptor_with_data() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let (parsed, request) = parse_chain(
        &mem,
        &[desc(HEADER_AT, 16, false), desc(DATA_AT, 513, true)],
        16,
    );
    assert_eq!(parsed, Parsed::Ok);
    assert_eq!(request.data_bytes, 512);
    assert_eq!(request.status_addr, GuestAddress(DATA_AT + 512));
}

#[test]
fn flags_unknown_types_as_unsupported() {
    let mem = memory();
    let (parsed, request) = standard(&mem, 0xdead, 512, false);
    assert_eq!(parsed, Parsed::Ok);
    assert_eq!(request.request_type, RequestType::Unsupported(0xdead));
}

#[test]
fn refuses_a_short_header() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let (parsed, _) = parse_chain(
        &mem,
        &[desc(HEADER_AT, 8, false), desc(STATUS_AT, 1, true)],
        16,
    );
    assert!(matches!(
        parsed,
        Parsed::Failed {
            error: ParseError::BadHeader,
            ..
        }
    ));
}

/// A header spread over three descriptors (4 + 8 + 4 bytes, the last one also carrying the
/// start of the data): virtio 1.x lets the driver frame the request as it likes.
#[test]
fn parses_a_header_spread_over_descriptors() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_OUT, 9);
    let (parsed, request) = parse_chain(
        &mem,
        &[
            desc(HEADER_AT, 4, false),
            desc(HEADER_AT + 4, 8, false),
            desc(HEADER_AT + 12, 4 + 512, false),
            desc(STATUS_AT, 1, true),
        ],
        16,
    );
    assert_eq!(parsed, Parsed::Ok);
    assert_eq!(request.request_type, RequestType::Write);
    assert_eq!(request.sector, 9);
    assert_eq!(request.data_bytes, 512);
    assert_eq!(
        request.data_segments,
        vec![(GuestAddress(HEADER_AT + 16), 512)]
    );
}

/// A header that continues into a device-writable descriptor is refused.
#[test]
fn refuses_a_header_continued_in_a_writable_descriptor() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let (parsed, _) = parse_chain(
        &mem,
        &[
            desc(HEADER_AT, 8, false),
            desc(DATA_AT, 512, true),
            desc(STATUS_AT, 1, true),
        ],
        16,
    );
    assert!(matches!(
        parsed,
        Parsed::Failed {
            error: ParseError::BadHeader,
            ..
        }
    ));
}

#[test]
fn refuses_a_writable_header() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let (parsed, _) = parse_chain(
        &mem,
        &[desc(HEADER_AT, 16, true), desc(STATUS_AT, 1, true)],
        16,
    );
    assert!(matches!(
        parsed,
        Parsed::Failed {
            error: ParseError::BadHeader,
            ..
        }
    ));
}

#[test]
fn drops_a_chain_without_a_writable_status() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let (parsed, _) = parse_chain(
        &mem,
        &[desc(HEADER_AT, 16, false), desc(DATA_AT, 512, false)],
        16,
    );
    assert_eq!(parsed, Parsed::Dropped(ParseError::NoStatus));
}

#[test]
fn drops_a_status_outside_memory() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let outside = MEM_BYTES as u64 + 0x1000;
    let (parsed, _) = parse_chain(
        &mem,
        &[desc(HEADER_AT, 16, false), desc(outside, 1, true)],
        16,
    );
    assert_eq!(parsed, Parsed::Dropped(ParseError::OutsideMemory));
}

#[test]
fn refuses_data_in_the_wrong_direction() {
    let mem = memory();
    let (parsed, _) = standard(&mem, VIRTIO_BLK_T_IN, 4096, false);
    assert!(matches!(
        parsed,
        Parsed::Failed {
            error: ParseError::WrongDirection,
            ..
        }
    ));
    let (parsed, _) = standard(&mem, VIRTIO_BLK_T_OUT, 4096, true);
    assert!(matches!(
        parsed,
        Parsed::Failed {
            error: ParseError::WrongDirection,
            ..
        }
    ));
}

#[test]
fn refuses_data_outside_memory() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let (parsed, _) = parse_chain(
        &mem,
        &[
            desc(HEADER_AT, 16, false),
            desc(MEM_BYTES as u64 - 512, 4096, true),
            desc(STATUS_AT, 1, true),
        ],
        16,
    );
    assert!(matches!(
        parsed,
        Parsed::Failed {
            error: ParseError::OutsideMemory,
            ..
        }
    ));
}

#[test]
fn refuses_readable_after_writable() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let (parsed, _) = parse_chain(
        &mem,
        &[
            desc(HEADER_AT, 16, false),
            desc(DATA_AT, 512, true),
            desc(DATA_AT + 512, 512, false),
            desc(STATUS_AT, 1, true),
        ],
        16,
    );
    assert!(matches!(
        parsed,
        Parsed::Failed {
            error: ParseError::ReadableAfterWritable,
            ..
        }
    ));
}

#[test]
fn a_looping_chain_ends() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&mem, 16);
    // Descriptor 1 points back to descriptor 0: the chain never ends by itself.
    let looping = [
        RawDescriptor::from(SplitDescriptor::new(
            HEADER_AT,
            16,
            VRING_DESC_F_NEXT as u16,
            1,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            STATUS_AT,
            1,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            0,
        )),
    ];
    let chain = vq.build_multiple_desc_chains(&looping).expect("chain");
    let mut request = Request::with_capacity();
    let parsed = parse(chain, &mem, &mut request);
    assert_eq!(parsed, Parsed::Dropped(ParseError::Broken));
}

/// A link to a descriptor past the queue's end: the chain's iterator just stops there, and
/// the descriptor it stopped at (a data buffer) must not be taken for the status byte.
#[test]
fn drops_a_chain_with_a_link_out_of_range() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&mem, 16);
    let broken = [
        RawDescriptor::from(SplitDescriptor::new(
            HEADER_AT,
            16,
            VRING_DESC_F_NEXT as u16,
            1,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            DATA_AT,
            513,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            99,
        )),
    ];
    let chain = vq.build_multiple_desc_chains(&broken).expect("chain");
    let mut request = Request::with_capacity();
    let parsed = parse(chain, &mem, &mut request);
    assert_eq!(parsed, Parsed::Dropped(ParseError::Broken));
}

/// Overlapping descriptors: 40 MiB of data from 1 MiB of guest memory. Refused with an
/// error status; exactly `seg_max` x `size_max` is accepted.
#[test]
fn refuses_a_request_larger_than_the_limit() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let mut descs = vec![desc(HEADER_AT, 16, false)];
    descs.extend((0..40).map(|_| desc(DATA_AT, 1 << 20, false)));
    descs.push(desc(STATUS_AT, 1, true));
    let (parsed, _) = parse_chain(&mem, &descs, 64);
    assert_eq!(
        parsed,
        Parsed::Failed {
            error: ParseError::TooLarge,
            status_addr: GuestAddress(STATUS_AT),
        }
    );

    let mut descs = vec![desc(HEADER_AT, 16, false)];
    descs.extend((0..SEG_MAX).map(|_| desc(DATA_AT, SIZE_MAX, false)));
    descs.push(desc(STATUS_AT, 1, true));
    let (parsed, request) = parse_chain(&mem, &descs, 256);
    assert_eq!(parsed, Parsed::Ok);
    assert_eq!(request.data_bytes, REQUEST_BYTES_MAX);
}

#[test]
fn refuses_a_chain_longer_than_the_limit() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let mut descs = vec![desc(HEADER_AT, 16, false)];
    for i in 0..(DESCRIPTORS_MAX as u64) {
        descs.push(desc(DATA_AT + i * 512, 512, false));
    }
    descs.push(desc(STATUS_AT, 1, true));
    let (parsed, _) = parse_chain(&mem, &descs, 512);
    // The error goes to the chain's real status byte, past the limit.
    assert_eq!(
        parsed,
        Parsed::Failed {
            error: ParseError::TooLong,
            status_addr: GuestAddress(STATUS_AT),
        }
    );
}

#[test]
fn follows_an_indirect_table() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 3);
    let table = GuestAddress(0x38_0000);
    let entries = [
        SplitDescriptor::new(HEADER_AT, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(
            DATA_AT,
            4096,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            2,
        ),
        SplitDescriptor::new(STATUS_AT, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        mem.write_obj(RawDescriptor::from(*e), table.unchecked_add(16 * i as u64))
            .expect("table");
    }
    let top = RawDescriptor::from(SplitDescriptor::new(
        table.0,
        48,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ));
    let (parsed, request) = parse_chain(&mem, &[top], 16);
    assert_eq!(parsed, Parsed::Ok);
    assert_eq!(request.sector, 3);
    assert_eq!(request.data_bytes, 4096);
}

#[test]
fn reads_a_discard_segment() {
    let mem = memory();
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&64u64.to_le_bytes());
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    seg[12..16].copy_from_slice(&1u32.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(DATA_AT))
        .expect("segment");
    let (parsed, request) = standard(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 16, false);
    assert_eq!(parsed, Parsed::Ok);
    let segment = read_discard_segment(&request, &mem).expect("segment");
    assert_eq!(
        segment,
        DiscardSegment {
            sector: 64,
            num_sectors: 8,
            flags: 1
        }
    );
    let (_, short) = standard(&mem, VIRTIO_BLK_T_DISCARD, 8, false);
    assert_eq!(read_discard_segment(&short, &mem), None);
}

/// Random chains must never panic the parser (a cheap, deterministic fuzz).
#[test]
fn random_chains_never_panic() {
    let mem = memory();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..2000 {
        let count = (next() % 6) as usize + 1;
        let descs: Vec<RawDescriptor> = (0..count)
            .map(|_| {
                let addr = next() % (MEM_BYTES as u64 * 2);
                let len = (next() % 9000) as u32;
                desc(addr, len, next() % 2 == 0)
            })
            .collect();
        let mut h = [0u8; 16];
        h[0..8].copy_from_slice(&next().to_le_bytes());
        h[8..16].copy_from_slice(&next().to_le_bytes());
        mem.write_slice(&h, GuestAddress(HEADER_AT))
            .expect("header");
        let _ = parse_chain(&mem, &descs, 16);
    }
}
