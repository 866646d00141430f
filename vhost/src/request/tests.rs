//! Unit tests of request parsing: hand-built descriptor chains, well-formed and hostile, as
//! one table of cases, and random chains.

use super::test_chains::{
    desc, header, memory, parse_chain, raw, standard, Chain, Mem, DATA_AT, HEADER_AT, MEM_BYTES,
    STATUS_AT, TABLE_AT,
};
use super::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};

/// What a parse gave, in a form cases can state in full.
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok(Fields),
    Failed {
        error: ParseError,
        status_addr: GuestAddress,
    },
    Dropped(ParseError),
}

/// The fields of a parsed request.
#[derive(Debug, PartialEq)]
struct Fields {
    request_type: RequestType,
    sector: u64,
    data_bytes: u64,
    iovec_lens: Vec<usize>,
    data_segments: Vec<(GuestAddress, u32)>,
    status_addr: GuestAddress,
}

fn outcome(parsed: Parsed, request: &Request) -> Outcome {
    match parsed {
        Parsed::Ok => Outcome::Ok(Fields {
            request_type: request.request_type,
            sector: request.sector,
            data_bytes: request.data_bytes,
            iovec_lens: request.iovecs.iter().map(|iov| iov.iov_len).collect(),
            data_segments: request.data_segments.clone(),
            status_addr: request.status_addr,
        }),
        Parsed::Failed { error, status_addr } => Outcome::Failed { error, status_addr },
        Parsed::Dropped(error) => Outcome::Dropped(error),
    }
}

/// Refused with an error status at the chain's status byte (`STATUS_AT` in every case).
fn failed(error: ParseError) -> Outcome {
    Outcome::Failed {
        error,
        status_addr: GuestAddress(STATUS_AT),
    }
}

/// A parsed request whose data is one segment of `len` bytes at `at`, in one iovec.
fn one_segment(request_type: RequestType, sector: u64, at: u64, len: u32) -> Fields {
    Fields {
        request_type,
        sector,
        data_bytes: u64::from(len),
        iovec_lens: vec![len as usize],
        data_segments: vec![(GuestAddress(at), len)],
        status_addr: GuestAddress(STATUS_AT),
    }
}

struct Case {
    name: &'static str,
    /// The header's request type and sector.
    header: (u32, u64),
    chain: Chain,
    queue_size: u16,
    /// Guest memory the chain needs besides the header (an indirect table).
    setup: Option<fn(&Mem)>,
    expect: Outcome,
}

impl Case {
    fn new(name: &'static str, header: (u32, u64), chain: Chain, expect: Outcome) -> Self {
        Self {
            name,
            header,
            chain,
            queue_size: 16,
            setup: None,
            expect,
        }
    }

    fn queue_size(self, queue_size: u16) -> Self {
        Self { queue_size, ..self }
    }
}

/// The chains of well-formed requests.
fn well_formed() -> Vec<Case> {
    use RequestType::*;
    let limit = || {
        let mut descs = vec![desc(HEADER_AT, 16, false)];
        descs.extend((0..SEG_MAX).map(|_| desc(DATA_AT, SIZE_MAX, false)));
        descs.push(desc(STATUS_AT, 1, true));
        Chain::Linked(descs)
    };
    vec![
        Case::new(
            "a read",
            (VIRTIO_BLK_T_IN, 7),
            standard(Some((4096, true))),
            Outcome::Ok(one_segment(Read, 7, DATA_AT, 4096)),
        ),
        Case::new(
            "a write in two segments",
            (VIRTIO_BLK_T_OUT, 100),
            Chain::Linked(vec![
                desc(HEADER_AT, 16, false),
                desc(DATA_AT, 512, false),
                desc(DATA_AT + 0x1000, 1024, false),
                desc(STATUS_AT, 1, true),
            ]),
            Outcome::Ok(Fields {
                request_type: Write,
                sector: 100,
                data_bytes: 1536,
                iovec_lens: vec![512, 1024],
                data_segments: vec![
                    (GuestAddress(DATA_AT), 512),
                    (GuestAddress(DATA_AT + 0x1000), 1024),
                ],
                status_addr: GuestAddress(STATUS_AT),
            }),
        ),
        Case::new(
            "the status byte sharing a descriptor with data",
            (VIRTIO_BLK_T_IN, 0),
            Chain::Linked(vec![desc(HEADER_AT, 16, false), desc(DATA_AT, 513, true)]),
            Outcome::Ok(Fields {
                status_addr: GuestAddress(DATA_AT + 512),
                ..one_segment(Read, 0, DATA_AT, 512)
            }),
        ),
        Case::new(
            "an unknown type, flagged unsupported",
            (0xdead, 7),
            standard(Some((512, false))),
            Outcome::Ok(one_segment(Unsupported(0xdead), 7, DATA_AT, 512)),
        ),
        // virtio 1.x lets the driver frame the request as it likes: 4 + 8 + 4 header bytes,
        // the last descriptor also carrying the start of the data.
        Case::new(
            "a header spread over three descriptors",
            (VIRTIO_BLK_T_OUT, 9),
            Chain::Linked(vec![
                desc(HEADER_AT, 4, false),
                desc(HEADER_AT + 4, 8, false),
                desc(HEADER_AT + 12, 4 + 512, false),
                desc(STATUS_AT, 1, true),
            ]),
            Outcome::Ok(one_segment(Write, 9, HEADER_AT + 16, 512)),
        ),
        Case {
            setup: Some(|mem| {
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
                    let at = GuestAddress(TABLE_AT + 16 * i as u64);
                    mem.write_obj(RawDescriptor::from(*e), at).expect("table");
                }
            }),
            ..Case::new(
                "an indirect table",
                (VIRTIO_BLK_T_IN, 3),
                Chain::Linked(vec![raw(TABLE_AT, 48, VRING_DESC_F_INDIRECT, 0)]),
                Outcome::Ok(one_segment(Read, 3, DATA_AT, 4096)),
            )
        },
        // Overlapping descriptors may add up to `seg_max` x `size_max`, not more.
        Case::new(
            "exactly the data limit",
            (VIRTIO_BLK_T_OUT, 0),
            limit(),
            Outcome::Ok(Fields {
                request_type: Write,
                sector: 0,
                data_bytes: REQUEST_BYTES_MAX,
                iovec_lens: vec![SIZE_MAX as usize; SEG_MAX as usize],
                data_segments: vec![(GuestAddress(DATA_AT), SIZE_MAX); SEG_MAX as usize],
                status_addr: GuestAddress(STATUS_AT),
            }),
        )
        .queue_size(256),
    ]
}

/// The chains refused with an error status.
fn refused() -> Vec<Case> {
    use ParseError::*;
    let too_large = || {
        // 40 MiB of data from 1 MiB of guest memory.
        let mut descs = vec![desc(HEADER_AT, 16, false)];
        descs.extend((0..40).map(|_| desc(DATA_AT, 1 << 20, false)));
        descs.push(desc(STATUS_AT, 1, true));
        Chain::Linked(descs)
    };
    let too_long = || {
        let mut descs = vec![desc(HEADER_AT, 16, false)];
        descs.extend((0..DESCRIPTORS_MAX as u64).map(|i| desc(DATA_AT + i * 512, 512, false)));
        descs.push(desc(STATUS_AT, 1, true));
        Chain::Linked(descs)
    };
    let header_and = |data: RawDescriptor| {
        Chain::Linked(vec![
            desc(HEADER_AT, 8, false),
            data,
            desc(STATUS_AT, 1, true),
        ])
    };
    vec![
        Case::new(
            "a short header",
            (VIRTIO_BLK_T_IN, 0),
            Chain::Linked(vec![desc(HEADER_AT, 8, false), desc(STATUS_AT, 1, true)]),
            failed(BadHeader),
        ),
        Case::new(
            "a header continued in a writable descriptor",
            (VIRTIO_BLK_T_IN, 0),
            header_and(desc(DATA_AT, 512, true)),
            failed(BadHeader),
        ),
        Case::new(
            "a writable header",
            (VIRTIO_BLK_T_IN, 0),
            Chain::Linked(vec![desc(HEADER_AT, 16, true), desc(STATUS_AT, 1, true)]),
            failed(BadHeader),
        ),
        Case::new(
            "a read into device-readable data",
            (VIRTIO_BLK_T_IN, 7),
            standard(Some((4096, false))),
            failed(WrongDirection),
        ),
        Case::new(
            "a write from device-writable data",
            (VIRTIO_BLK_T_OUT, 7),
            standard(Some((4096, true))),
            failed(WrongDirection),
        ),
        Case::new(
            "data outside memory",
            (VIRTIO_BLK_T_IN, 0),
            Chain::Linked(vec![
                desc(HEADER_AT, 16, false),
                desc(MEM_BYTES as u64 - 512, 4096, true),
                desc(STATUS_AT, 1, true),
            ]),
            failed(OutsideMemory),
        ),
        Case::new(
            "device-readable data after device-writable data",
            (VIRTIO_BLK_T_IN, 0),
            Chain::Linked(vec![
                desc(HEADER_AT, 16, false),
                desc(DATA_AT, 512, true),
                desc(DATA_AT + 512, 512, false),
                desc(STATUS_AT, 1, true),
            ]),
            failed(ReadableAfterWritable),
        ),
        Case::new(
            "more data than the limit",
            (VIRTIO_BLK_T_OUT, 0),
            too_large(),
            failed(TooLarge),
        )
        .queue_size(64),
        // The error goes to the chain's real status byte, past the limit.
        Case::new(
            "more descriptors than the limit",
            (VIRTIO_BLK_T_OUT, 0),
            too_long(),
            failed(TooLong),
        )
        .queue_size(512),
    ]
}

/// The chains returned without a status byte.
fn dropped() -> Vec<Case> {
    use ParseError::*;
    vec![
        Case::new(
            "no device-writable status byte",
            (VIRTIO_BLK_T_OUT, 0),
            Chain::Linked(vec![desc(HEADER_AT, 16, false), desc(DATA_AT, 512, false)]),
            Outcome::Dropped(NoStatus),
        ),
        Case::new(
            "a status byte outside memory",
            (VIRTIO_BLK_T_IN, 0),
            Chain::Linked(vec![
                desc(HEADER_AT, 16, false),
                desc(MEM_BYTES as u64 + 0x1000, 1, true),
            ]),
            Outcome::Dropped(OutsideMemory),
        ),
        // Descriptor 1 links back to descriptor 0: the chain never ends by itself.
        Case::new(
            "a looping chain",
            (VIRTIO_BLK_T_IN, 0),
            Chain::AsGiven(vec![
                raw(HEADER_AT, 16, VRING_DESC_F_NEXT, 1),
                raw(STATUS_AT, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 0),
            ]),
            Outcome::Dropped(Broken),
        ),
        // The chain's iterator just stops at a link past the queue's end, and the descriptor
        // it stopped at (a data buffer) must not be taken for the status byte.
        Case::new(
            "a link out of range",
            (VIRTIO_BLK_T_IN, 0),
            Chain::AsGiven(vec![
                raw(HEADER_AT, 16, VRING_DESC_F_NEXT, 1),
                raw(DATA_AT, 513, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 99),
            ]),
            Outcome::Dropped(Broken),
        ),
    ]
}

#[test]
fn every_chain_parses_as_its_case_says() {
    let cases: Vec<Case> = [well_formed(), refused(), dropped()]
        .into_iter()
        .flatten()
        .collect();
    let mut wrong = Vec::new();
    for case in &cases {
        let mem = memory();
        header(&mem, case.header.0, case.header.1);
        if let Some(setup) = case.setup {
            setup(&mem);
        }
        let (parsed, request) = parse_chain(&mem, &case.chain, case.queue_size);
        let got = outcome(parsed, &request);
        if got != case.expect {
            wrong.push(format!(
                "{}: expected {:?}, got {got:?}",
                case.name, case.expect
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
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
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 7);
    let (parsed, request) = parse_chain(&mem, &standard(Some((16, false))), 16);
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
    header(&mem, VIRTIO_BLK_T_DISCARD, 7);
    let (_, short) = parse_chain(&mem, &standard(Some((8, false))), 16);
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
        let _ = parse_chain(&mem, &Chain::Linked(descs), 16);
    }
}
