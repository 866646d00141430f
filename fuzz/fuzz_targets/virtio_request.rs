//! Fuzz target: a guest's descriptor chain, however malformed (links out of range, loops,
//! indirect tables, overlapping or out-of-memory buffers, any header), must parse to a
//! request or an error, never panic, and every host address it yields must lie inside guest
//! memory.
//!
//! Input: byte 0 picks the queue size (2..=256), byte 1 the number of descriptors (1..=16),
//! then 16 bytes of request header, 16 bytes per descriptor (address, length, flags, next;
//! addresses reduced to twice the guest memory so that some fall outside it), and the rest
//! is written as an indirect table.
#![no_main]

use std::sync::OnceLock;

use ferry_vhost::request::{
    parse, read_discard_segment, Parsed, Request, RequestType, REQUEST_BYTES_MAX,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const MEM_BYTES: u64 = 0x40_0000;
const HEADER_AT: u64 = 0x10_0000;
const TABLE_AT: u64 = 0x38_0000;
const TABLE_BYTES_MAX: usize = 16 * 64;

fn memory() -> &'static Mem {
    static MEM: OnceLock<Mem> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)])
            .expect("guest memory for the fuzz target")
    })
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 2 + 16 + 16 {
        return;
    }
    let mem = memory();
    let queue_size = 1u16 << (1 + data[0] % 8);
    let count = (1 + data[1] as usize % 16).min(queue_size as usize);
    let header = &data[2..18];
    let mut descs = Vec::new();
    let mut rest = &data[18..];
    while descs.len() < count && rest.len() >= 16 {
        let d = &rest[..16];
        let addr = le_u64(d) % (2 * MEM_BYTES);
        let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes([d[12], d[13]]);
        let next = u16::from_le_bytes([d[14], d[15]]);
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            addr, len, flags, next,
        )));
        rest = &rest[16..];
    }
    if descs.is_empty() {
        return;
    }
    mem.write_slice(header, GuestAddress(HEADER_AT))
        .expect("header inside guest memory");
    let table = &rest[..rest.len().min(TABLE_BYTES_MAX)];
    mem.write_slice(table, GuestAddress(TABLE_AT))
        .expect("table inside guest memory");

    let vq = MockSplitQueue::new(mem, queue_size);
    let Ok(chain) = vq.build_multiple_desc_chains(&descs) else {
        return;
    };
    let mut request = Request::with_capacity();
    if parse(chain, mem, &mut request) != Parsed::Ok {
        return;
    }
    assert!(
        request.data_bytes <= REQUEST_BYTES_MAX,
        "{} data bytes",
        request.data_bytes
    );
    let base = mem
        .get_host_address(GuestAddress(0))
        .expect("host address of guest memory") as usize;
    for iov in &request.iovecs {
        let start = iov.iov_base as usize;
        assert!(
            start >= base && start + iov.iov_len <= base + MEM_BYTES as usize,
            "iovec {start:#x}+{} outside guest memory {base:#x}+{MEM_BYTES}",
            iov.iov_len
        );
    }
    if request.request_type == RequestType::Discard {
        let _ = read_discard_segment(&request, mem);
    }
});
