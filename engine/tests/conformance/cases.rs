//! The cases: what every volume must do, whatever is under it. Each takes a fresh
//! [`Fixture`] of [`VOLUME_BYTES`] full of [`FILL_BYTE`] and drives its queue; the backend's
//! own post-check runs after it.

use std::time::Duration;

use ferry_engine::testing::run_op as run;
use ferry_engine::volume::queue::Rejected;
use ferry_engine::{BlockOp, IoFailure, VolumeQueue};
use ferry_test_support::Rng;

use crate::aligned::AlignedBuf;
use crate::fixture::{Fixture, FILL_BYTE, VOLUME_BYTES};
use ferry_test_support::compare_bytes;

/// Bound on a batch of requests in flight: only a hang reaches it.
const BATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// A write in two iovecs reads back in one; one flush; the volume counts each once.
pub fn write_then_read_round_trips(f: &mut Fixture) {
    let mut data = AlignedBuf::new(64 << 10);
    Rng::new(1).fill(data.slice_mut());
    let iov = [data.iovec(0, 32 << 10), data.iovec(32 << 10, 32 << 10)];
    let write = BlockOp::Write {
        offset_bytes: 1 << 20,
        iovecs: &iov,
    };
    assert_eq!(run(f.queue(), write), Ok(64 << 10));
    assert_eq!(run(f.queue(), BlockOp::Flush), Ok(0));
    let back = AlignedBuf::new(64 << 10);
    let iov = [back.iovec(0, 64 << 10)];
    let read = BlockOp::Read {
        offset_bytes: 1 << 20,
        iovecs: &iov,
    };
    assert_eq!(run(f.queue(), read), Ok(64 << 10));
    assert!(back.slice() == data.slice(), "the write did not read back");
    let stats = f.volume().stats.snapshot();
    assert_eq!(
        (stats.read_ops, stats.write_ops, stats.flush_ops),
        (1, 1, 1)
    );
}

/// A buffer at an odd address: `O_DIRECT` refuses it and the engine retries it buffered;
/// every other backend takes it as it is.
pub fn unaligned_buffers_round_trip(f: &mut Fixture) {
    let mut data = AlignedBuf::new(8192);
    data.slice_mut().fill(0x5c);
    let iov = [data.iovec(1, 512)];
    let write = BlockOp::Write {
        offset_bytes: 4096,
        iovecs: &iov,
    };
    assert_eq!(run(f.queue(), write), Ok(512));
    let back = AlignedBuf::new(4096);
    let iov = [back.iovec(0, 4096)];
    let read = BlockOp::Read {
        offset_bytes: 4096,
        iovecs: &iov,
    };
    assert_eq!(run(f.queue(), read), Ok(4096));
    assert!(back.slice()[..512].iter().all(|&b| b == 0x5c));
    assert!(back.slice()[512..].iter().all(|&b| b == FILL_BYTE));
}

/// A discard, a write-zeroes and a write-zeroes that may unmap each read back as zeros, and
/// the bytes beside them keep their data.
pub fn discard_and_write_zeroes_read_back_as_zeros(f: &mut Fixture) {
    let ranges = [(0, 1 << 20), (2 << 20, 1 << 20), (4 << 20, 4096)];
    let ops = [
        BlockOp::Discard {
            offset_bytes: ranges[0].0,
            len_bytes: ranges[0].1,
        },
        BlockOp::WriteZeroes {
            offset_bytes: ranges[1].0,
            len_bytes: ranges[1].1,
            unmap: false,
        },
        BlockOp::WriteZeroes {
            offset_bytes: ranges[2].0,
            len_bytes: ranges[2].1,
            unmap: true,
        },
    ];
    for (op, (offset, len)) in ops.into_iter().zip(ranges) {
        assert_eq!(run(f.queue(), op), Ok(len));
        let back = AlignedBuf::new(len as usize);
        let iov = [back.iovec(0, len as usize)];
        let read = BlockOp::Read {
            offset_bytes: offset,
            iovecs: &iov,
        };
        assert_eq!(run(f.queue(), read), Ok(len));
        assert!(back.slice().iter().all(|&b| b == 0), "{op:?} left data");
    }
    let back = AlignedBuf::new(4096);
    let iov = [back.iovec(0, 4096)];
    let beside = BlockOp::Read {
        offset_bytes: 1 << 20,
        iovecs: &iov,
    };
    assert_eq!(run(f.queue(), beside), Ok(4096));
    assert!(back.slice().iter().all(|&b| b == FILL_BYTE));
}

/// Requests that end past the volume, or whose end overflows, fail without touching it.
pub fn out_of_range_requests_fail(f: &mut Fixture) {
    let buf = AlignedBuf::new(8192);
    let iov = [buf.iovec(0, 8192)];
    let end = VOLUME_BYTES - 4096;
    let read = BlockOp::Read {
        offset_bytes: end,
        iovecs: &iov,
    };
    assert_eq!(run(f.queue(), read), Err(IoFailure::OutOfRange));
    let write = BlockOp::Write {
        offset_bytes: u64::MAX - 10,
        iovecs: &iov,
    };
    assert_eq!(run(f.queue(), write), Err(IoFailure::OutOfRange));
    let discard = BlockOp::Discard {
        offset_bytes: end,
        len_bytes: 8192,
    };
    assert_eq!(run(f.queue(), discard), Err(IoFailure::OutOfRange));
    let zeroes = BlockOp::WriteZeroes {
        offset_bytes: VOLUME_BYTES,
        len_bytes: 512,
        unmap: false,
    };
    assert_eq!(run(f.queue(), zeroes), Err(IoFailure::OutOfRange));
}

/// A read-only volume (opened so, or on a read-only export) refuses writes, discards and
/// write-zeroes, and serves reads and flushes.
pub fn read_only_volumes_refuse_changes(f: &mut Fixture) {
    assert!(f.volume().read_only());
    let buf = AlignedBuf::new(4096);
    let iov = [buf.iovec(0, 4096)];
    let write = BlockOp::Write {
        offset_bytes: 0,
        iovecs: &iov,
    };
    assert_eq!(run(f.queue(), write), Err(IoFailure::ReadOnly));
    let discard = BlockOp::Discard {
        offset_bytes: 0,
        len_bytes: 4096,
    };
    assert_eq!(run(f.queue(), discard), Err(IoFailure::ReadOnly));
    let zeroes = BlockOp::WriteZeroes {
        offset_bytes: 0,
        len_bytes: 4096,
        unmap: true,
    };
    assert_eq!(run(f.queue(), zeroes), Err(IoFailure::ReadOnly));
    let read = BlockOp::Read {
        offset_bytes: 0,
        iovecs: &iov,
    };
    assert_eq!(run(f.queue(), read), Ok(4096));
    assert!(buf.slice().iter().all(|&b| b == FILL_BYTE));
    assert_eq!(run(f.queue(), BlockOp::Flush), Ok(0));
}

/// 200 writes in flight at once each complete once, with their own tag, and land where
/// they were sent.
pub fn many_requests_in_flight_complete_with_their_tags(f: &mut Fixture) {
    let requests = 200usize;
    let mut data = AlignedBuf::new(requests * 4096);
    for i in 0..requests {
        data.slice_mut()[i * 4096..(i + 1) * 4096].fill(i as u8);
    }
    let iovs: Vec<[libc::iovec; 1]> = (0..requests)
        .map(|i| [data.iovec(i * 4096, 4096)])
        .collect();
    for (i, iov) in iovs.iter().enumerate() {
        let op = BlockOp::Write {
            offset_bytes: (i as u64) * 8192,
            iovecs: iov,
        };
        // SAFETY: `data` outlives the drain below.
        unsafe { f.queue().submit(op, i as u64) }.expect("submit");
    }
    f.queue().commit().expect("commit");
    let mut out = Vec::new();
    assert!(f.queue().drain(&mut out, BATCH_TIMEOUT));
    let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..requests as u64).collect::<Vec<_>>());
    assert!(out.iter().all(|c| c.result == Ok(4096)), "{out:?}");
    let back = AlignedBuf::new(4096);
    let iov = [back.iovec(0, 4096)];
    let read = BlockOp::Read {
        offset_bytes: 77 * 8192,
        iovecs: &iov,
    };
    assert_eq!(run(f.queue(), read), Ok(4096));
    assert!(back.slice().iter().all(|&b| b == 77));
}

/// A queue of two slots refuses a third request; a paused volume refuses new ones until
/// the pause ends.
pub fn a_full_queue_rejects_and_a_pause_holds(f: &mut Fixture) {
    let mut queue = VolumeQueue::new(f.volume().clone(), 1, 2, 4).expect("queue");
    // SAFETY: flushes carry no buffers.
    unsafe {
        queue.submit(BlockOp::Flush, 1).expect("first");
        queue.submit(BlockOp::Flush, 2).expect("second");
        assert_eq!(queue.submit(BlockOp::Flush, 3), Err(Rejected::Full));
    }
    queue.commit().expect("commit");
    let mut out = Vec::new();
    assert!(queue.drain(&mut out, BATCH_TIMEOUT));
    assert!(out.iter().all(|c| c.result == Ok(0)), "{out:?}");
    let guard = f
        .volume()
        .pause(Duration::from_secs(10))
        .expect("an idle volume pauses");
    // SAFETY: a flush carries no buffers.
    let held = unsafe { queue.submit(BlockOp::Flush, 4) };
    assert_eq!(held, Err(Rejected::Paused));
    drop(guard);
    // SAFETY: a flush carries no buffers.
    assert_eq!(unsafe { queue.submit(BlockOp::Flush, 5) }, Ok(()));
    queue.commit().expect("commit");
    assert!(queue.drain(&mut out, BATCH_TIMEOUT));
}

/// Rounds of writes at random offsets and sizes (512 B to 1 MiB, in up to 4 iovecs), 64 in
/// flight at once and never overlapping, then the whole volume read back in another order
/// and compared with a model.
pub fn random_round_trips_with_many_in_flight(f: &mut Fixture) {
    const ROUNDS: u64 = 4;
    const IN_FLIGHT: usize = 64;
    let mut model = vec![FILL_BYTE; VOLUME_BYTES as usize];
    let mut rng = Rng::new(99);
    for _ in 0..ROUNDS {
        let ranges = disjoint_ranges(&mut rng, IN_FLIGHT);
        let total: usize = ranges.iter().map(|r| r.1).sum();
        let mut data = AlignedBuf::new(total);
        rng.fill(data.slice_mut());
        let iovs = split_into_iovecs(&data, &ranges);
        let mut at = 0;
        for (i, &(offset, len)) in ranges.iter().enumerate() {
            let op = BlockOp::Write {
                offset_bytes: offset,
                iovecs: &iovs[i],
            };
            // SAFETY: `data` outlives the drain below.
            unsafe { f.queue().submit(op, i as u64) }.expect("submit");
            model[offset as usize..offset as usize + len]
                .copy_from_slice(&data.slice()[at..at + len]);
            at += len;
        }
        f.queue().commit().expect("commit");
        let mut out = Vec::new();
        assert!(f.queue().drain(&mut out, BATCH_TIMEOUT));
        assert_eq!(out.len(), ranges.len());
        assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
    }
    let back = read_back_in_reverse(f);
    if let Err(e) = compare_bytes("the volume", back.slice(), &model) {
        panic!("{e:#}");
    }
}

/// `count` ranges of 512 B to 1 MiB in the volume, none overlapping another.
fn disjoint_ranges(rng: &mut Rng, count: usize) -> Vec<(u64, usize)> {
    let mut ranges: Vec<(u64, usize)> = Vec::new();
    while ranges.len() < count {
        let len = 512 * (1 + rng.below(2048)) as usize;
        let offset = 512 * rng.below((VOLUME_BYTES - len as u64) / 512 + 1);
        if ranges
            .iter()
            .all(|&(o, l)| offset + len as u64 <= o || o + l as u64 <= offset)
        {
            ranges.push((offset, len));
        }
    }
    ranges
}

/// One to four iovecs per range, over consecutive parts of `data`.
fn split_into_iovecs(data: &AlignedBuf, ranges: &[(u64, usize)]) -> Vec<Vec<libc::iovec>> {
    let mut at = 0;
    let mut iovs = Vec::new();
    for &(_, len) in ranges {
        let parts = 1 + len / 512 % 4;
        let mut v = Vec::new();
        let mut done = 0;
        for p in 0..parts {
            let n = if p + 1 == parts {
                len - done
            } else {
                (len / parts) & !511
            };
            v.push(data.iovec(at + done, n));
            done += n;
        }
        iovs.push(v);
        at += len;
    }
    iovs
}

/// The whole volume, read in 64 requests in flight at once, submitted last piece first.
fn read_back_in_reverse(f: &mut Fixture) -> AlignedBuf {
    let back = AlignedBuf::new(VOLUME_BYTES as usize);
    let pieces = 64usize;
    let piece = VOLUME_BYTES as usize / pieces;
    let iovs: Vec<[libc::iovec; 1]> = (0..pieces)
        .map(|i| [back.iovec(i * piece, piece)])
        .collect();
    for i in (0..pieces).rev() {
        let op = BlockOp::Read {
            offset_bytes: (i * piece) as u64,
            iovecs: &iovs[i],
        };
        // SAFETY: `back` outlives the drain below.
        unsafe { f.queue().submit(op, i as u64) }.expect("submit");
    }
    f.queue().commit().expect("commit");
    let mut out = Vec::new();
    assert!(f.queue().drain(&mut out, BATCH_TIMEOUT));
    assert!(out.iter().all(|c| c.result == Ok(piece as u64)), "{out:?}");
    back
}
