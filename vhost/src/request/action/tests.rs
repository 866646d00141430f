//! Unit tests of a request's action: one table of parsed requests, each with the device it
//! meets and the action it must get.

use super::super::test_chains::{header, memory, parse_chain, standard, Mem, DATA_AT};
use super::super::Parsed;
use super::*;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress};

const SERIAL: &[u8; ID_BYTES] = b"ferry-serial-0123456";
const VOLUME_BYTES: u64 = 1 << 20;

/// A volume as plain facts.
struct TestVolume {
    read_only: bool,
}

impl VolumeView for TestVolume {
    fn read_only(&self) -> bool {
        self.read_only
    }

    fn size_bytes(&self) -> u64 {
        VOLUME_BYTES
    }
}

/// An action in a form cases can state in full.
#[derive(Debug, PartialEq)]
enum Want {
    Read {
        offset_bytes: u64,
        used_len_ok: u32,
    },
    Write {
        offset_bytes: u64,
    },
    Flush,
    Discard {
        offset_bytes: u64,
        len_bytes: u64,
    },
    WriteZeroes {
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
    },
    Answer(Status, u32),
}

/// The action as a `Want`; a read's or write's iovecs must be the request's own.
fn want(action: RequestAction<'_>, request: &Request) -> Want {
    let own = |iovecs: &[libc::iovec]| std::ptr::eq(iovecs, &*request.iovecs);
    match action {
        RequestAction::Answer { status, used_len } => Want::Answer(status, used_len),
        RequestAction::Submit { op, used_len_ok } => match op {
            BlockOp::Read {
                offset_bytes,
                iovecs,
            } if own(iovecs) => Want::Read {
                offset_bytes,
                used_len_ok,
            },
            BlockOp::Write {
                offset_bytes,
                iovecs,
            } if own(iovecs) && used_len_ok == 1 => Want::Write { offset_bytes },
            BlockOp::Flush if used_len_ok == 1 => Want::Flush,
            BlockOp::Discard {
                offset_bytes,
                len_bytes,
            } if used_len_ok == 1 => Want::Discard {
                offset_bytes,
                len_bytes,
            },
            BlockOp::WriteZeroes {
                offset_bytes,
                len_bytes,
                unmap,
            } if used_len_ok == 1 => Want::WriteZeroes {
                offset_bytes,
                len_bytes,
                unmap,
            },
            other => panic!("{other:?} with used length {used_len_ok}"),
        },
    }
}

struct Case {
    name: &'static str,
    /// The header's request type and sector.
    header: (u32, u64),
    /// The data descriptor's length and direction (none: header and status only).
    data: Option<(u32, bool)>,
    /// The discard / write-zeroes segment at the data: sector, sectors, flags.
    segment: Option<(u64, u32, u32)>,
    logical_block_bytes: u32,
    read_only: bool,
    expect: Want,
}

impl Case {
    fn new(
        name: &'static str,
        header: (u32, u64),
        data: Option<(u32, bool)>,
        expect: Want,
    ) -> Self {
        Self {
            name,
            header,
            data,
            segment: None,
            logical_block_bytes: 512,
            read_only: false,
            expect,
        }
    }

    /// A discard or write-zeroes with the one segment `(sector, sectors, flags)`.
    fn zeroing(
        name: &'static str,
        request_type: u32,
        segment: (u64, u32, u32),
        expect: Want,
    ) -> Self {
        Self {
            segment: Some(segment),
            ..Self::new(name, (request_type, 0), Some((16, false)), expect)
        }
    }

    fn blocks(self, logical_block_bytes: u32) -> Self {
        Self {
            logical_block_bytes,
            ..self
        }
    }

    fn read_only(self) -> Self {
        Self {
            read_only: true,
            ..self
        }
    }
}

fn answer(status: Status) -> Want {
    Want::Answer(status, 1)
}

/// Reads, writes, flushes, `GET_ID` and requests answered for their type.
fn data_cases() -> Vec<Case> {
    use Status::*;
    vec![
        Case::new(
            "a read",
            (VIRTIO_BLK_T_IN, 8),
            Some((4096, true)),
            Want::Read {
                offset_bytes: 4096,
                used_len_ok: 4097,
            },
        ),
        Case::new(
            "a write",
            (VIRTIO_BLK_T_OUT, 8),
            Some((4096, false)),
            Want::Write { offset_bytes: 4096 },
        ),
        Case::new("a flush", (VIRTIO_BLK_T_FLUSH, 0), None, Want::Flush),
        Case::new(
            "a sector whose byte offset overflows",
            (VIRTIO_BLK_T_IN, u64::MAX / 256),
            Some((4096, true)),
            answer(IoErr),
        ),
        Case::new(
            "a read of less than a logical block",
            (VIRTIO_BLK_T_IN, 8),
            Some((512, true)),
            answer(IoErr),
        )
        .blocks(4096),
        Case::new(
            "a write not at a logical block",
            (VIRTIO_BLK_T_OUT, 1),
            Some((4096, false)),
            answer(IoErr),
        )
        .blocks(4096),
        Case::new(
            "a read of whole logical blocks",
            (VIRTIO_BLK_T_IN, 8),
            Some((8192, true)),
            Want::Read {
                offset_bytes: 4096,
                used_len_ok: 8193,
            },
        )
        .blocks(4096),
        Case::new(
            "GET_ID into 20 bytes",
            (VIRTIO_BLK_T_GET_ID, 0),
            Some((20, true)),
            Want::Answer(Ok, 21),
        ),
        Case::new(
            "GET_ID into 8 bytes",
            (VIRTIO_BLK_T_GET_ID, 0),
            Some((8, true)),
            Want::Answer(Ok, 9),
        ),
        Case::new(
            "GET_ID into 512 bytes",
            (VIRTIO_BLK_T_GET_ID, 0),
            Some((512, true)),
            Want::Answer(Ok, 21),
        ),
        Case::new(
            "an unknown type",
            (0xdead, 0),
            Some((512, false)),
            answer(Unsupp),
        ),
    ]
}

/// Discards and write-zeroes.
fn zeroing_cases() -> Vec<Case> {
    use Status::*;
    const DISCARD: u32 = VIRTIO_BLK_T_DISCARD;
    const ZEROES: u32 = VIRTIO_BLK_T_WRITE_ZEROES;
    let end_sector = VOLUME_BYTES / SECTOR_SIZE;
    vec![
        Case::zeroing(
            "a discard",
            DISCARD,
            (8, 8, 0),
            Want::Discard {
                offset_bytes: 4096,
                len_bytes: 4096,
            },
        ),
        Case::zeroing(
            "a discard asking to unmap",
            DISCARD,
            (8, 8, 1),
            answer(Unsupp),
        ),
        Case::zeroing(
            "a write-zeroes that may unmap",
            ZEROES,
            (8, 8, 1),
            Want::WriteZeroes {
                offset_bytes: 4096,
                len_bytes: 4096,
                unmap: true,
            },
        ),
        Case::zeroing(
            "a write-zeroes that must not unmap",
            ZEROES,
            (8, 8, 0),
            Want::WriteZeroes {
                offset_bytes: 4096,
                len_bytes: 4096,
                unmap: false,
            },
        ),
        Case::zeroing(
            "a write-zeroes with an unknown flag",
            ZEROES,
            (8, 8, 2),
            answer(Unsupp),
        ),
        Case::zeroing(
            "a discard on a read-only volume",
            DISCARD,
            (8, 8, 0),
            answer(Unsupp),
        )
        .read_only(),
        Case {
            data: Some((8, false)),
            ..Case::zeroing(
                "a discard segment cut short",
                DISCARD,
                (8, 8, 0),
                answer(IoErr),
            )
        },
        Case::zeroing(
            "a discard larger than the limit",
            DISCARD,
            (0, DISCARD_SECTORS_MAX + 1, 0),
            answer(IoErr),
        ),
        Case::zeroing(
            "an empty discard at the volume's end",
            DISCARD,
            (end_sector, 0, 0),
            Want::Answer(Ok, 1),
        ),
        Case::zeroing(
            "an empty discard past the volume's end",
            DISCARD,
            (end_sector + 1, 0, 0),
            answer(IoErr),
        ),
        Case::zeroing(
            "a discard whose byte offset overflows",
            DISCARD,
            (u64::MAX, 1, 0),
            answer(IoErr),
        ),
        Case::zeroing(
            "a write-zeroes not in whole logical blocks",
            ZEROES,
            (8, 1, 0),
            answer(IoErr),
        )
        .blocks(4096),
    ]
}

/// Writes the case's header and segment and parses its chain.
fn parsed(mem: &Mem, case: &Case) -> Request {
    header(mem, case.header.0, case.header.1);
    if let Some((sector, sectors, flags)) = case.segment {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&sectors.to_le_bytes());
        raw[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(DATA_AT))
            .expect("segment");
    }
    let (parsed, request) = parse_chain(mem, &standard(case.data), 16);
    assert_eq!(parsed, Parsed::Ok, "{}", case.name);
    request
}

#[test]
fn every_request_gets_the_action_its_case_says() {
    let cases: Vec<Case> = [data_cases(), zeroing_cases()]
        .into_iter()
        .flatten()
        .collect();
    let mut wrong = Vec::new();
    for case in &cases {
        let mem = memory();
        let request = parsed(&mem, case);
        let volume = TestVolume {
            read_only: case.read_only,
        };
        let device = Device {
            serial: SERIAL,
            logical_block_bytes: case.logical_block_bytes,
            volume: &volume,
        };
        let got = want(request.action(&mem, &device), &request);
        if got != case.expect {
            wrong.push(format!(
                "{}: expected {:?}, got {got:?}",
                case.name, case.expect
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `GET_ID` copies as much of the serial as the guest's buffer holds, and nothing past it.
#[test]
fn get_id_copies_the_serial_into_the_guest_buffer() {
    for (len, copied) in [(20u32, 20usize), (8, 8), (64, 20)] {
        let mem = memory();
        mem.write_slice(&[0xee; 64], GuestAddress(DATA_AT))
            .expect("fill");
        let case = Case::new(
            "GET_ID",
            (VIRTIO_BLK_T_GET_ID, 0),
            Some((len, true)),
            Want::Flush,
        );
        let request = parsed(&mem, &case);
        let device = Device {
            serial: SERIAL,
            logical_block_bytes: 512,
            volume: &TestVolume { read_only: true },
        };
        let _ = request.action(&mem, &device);
        let mut buffer = [0u8; 64];
        mem.read_slice(&mut buffer, GuestAddress(DATA_AT))
            .expect("read");
        assert_eq!(&buffer[..copied], &SERIAL[..copied], "buffer of {len}");
        assert!(
            buffer[copied..].iter().all(|&b| b == 0xee),
            "buffer of {len}"
        );
    }
}
