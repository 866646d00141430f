//! Descriptor chains built in guest memory for the request tests: a memory layout, request
//! headers, descriptors, and a parse of the chain they make.

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{parse, Parsed, Request};

pub type Mem = GuestMemoryMmap<()>;

pub const MEM_BYTES: usize = 0x40_0000;
pub const HEADER_AT: u64 = 0x10_0000;
pub const DATA_AT: u64 = 0x20_0000;
pub const STATUS_AT: u64 = 0x30_0000;
/// Where an indirect descriptor table goes.
pub const TABLE_AT: u64 = 0x38_0000;

pub fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("guest memory")
}

/// Writes a request header at `HEADER_AT`.
pub fn header(mem: &Mem, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HEADER_AT))
        .expect("header");
}

/// A descriptor to be linked to the next one by the mock queue.
pub fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
    let flags = if writable {
        VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// A descriptor with its own flags and link, laid out as given.
pub fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// How a chain's descriptors are laid out on the queue.
pub enum Chain {
    /// Linked in order by the mock queue.
    Linked(Vec<RawDescriptor>),
    /// Each with its own flags and link (broken and looping chains).
    AsGiven(Vec<RawDescriptor>),
}

/// The chain header, data descriptor (if any) and status byte, the layout drivers use.
pub fn standard(data: Option<(u32, bool)>) -> Chain {
    let mut descs = vec![desc(HEADER_AT, 16, false)];
    descs.extend(data.map(|(len, writable)| desc(DATA_AT, len, writable)));
    descs.push(desc(STATUS_AT, 1, true));
    Chain::Linked(descs)
}

/// Builds `chain` on a queue of `queue_size` and parses it.
pub fn parse_chain(mem: &Mem, chain: &Chain, queue_size: u16) -> (Parsed, Request) {
    let vq = MockSplitQueue::new(mem, queue_size);
    let chain = match chain {
        Chain::Linked(descs) => vq.build_desc_chain(descs),
        Chain::AsGiven(descs) => vq.build_multiple_desc_chains(descs),
    }
    .expect("chain");
    let mut request = Request::with_capacity();
    let parsed = parse(chain, mem, &mut request);
    (parsed, request)
}
