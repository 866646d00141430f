//! One conformance suite for the engine's volume queue, run against every cache mode:
//! round trips, flush, discard and write-zeroes reading back as zeros, range and
//! read-only refusals, short-transfer continuation and many requests in flight.

use std::sync::Arc;
use std::time::Duration;

use ferry_engine::volume::queue::Rejected;
use ferry_engine::{BlockOp, CacheMode, Completion, IoFailure, Volume, VolumeConfig, VolumeQueue};

const VOLUME_BYTES: u64 = 16 << 20;

/// A 4 KiB-aligned heap buffer (O_DIRECT needs aligned memory).
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self { ptr, len }
    }
    fn slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of len bytes, borrowed mutably once.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    fn iovec(&self, offset: usize, len: usize) -> libc::iovec {
        assert!(offset + len <= self.len);
        libc::iovec {
            // SAFETY: offset is inside the allocation (checked above).
            iov_base: unsafe { self.ptr.add(offset) }.cast(),
            iov_len: len,
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
        // SAFETY: allocated above with the same layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    queue: VolumeQueue,
    volume: Arc<Volume>,
}

fn fixture(cache: CacheMode, read_only: bool) -> Fixture {
    fixture_in(std::env::temp_dir(), cache, read_only)
}

/// A volume on a file system of choice (tmpfs has no FALLOC_FL_ZERO_RANGE, ext4 has).
fn fixture_in(parent: std::path::PathBuf, cache: CacheMode, read_only: bool) -> Fixture {
    let dir = tempfile::tempdir_in(parent).expect("tempdir");
    let path = dir.path().join("v.img");
    std::fs::write(&path, vec![0xAAu8; VOLUME_BYTES as usize]).expect("image");
    let volume = Volume::open(VolumeConfig {
        name: "v".into(),
        path,
        read_only,
        cache,
        ..Default::default()
    })
    .expect("open");
    let queue = VolumeQueue::new(volume.clone(), 0, 256, 16).expect("queue");
    Fixture {
        _dir: dir,
        queue,
        volume,
    }
}

/// Submits one op and waits for its completion.
fn run(queue: &mut VolumeQueue, op: BlockOp<'_>) -> Result<u64, IoFailure> {
    // SAFETY: the caller's buffers outlive this call, which waits for the completion.
    match unsafe { queue.submit(op, 1) } {
        Ok(()) => {}
        Err(Rejected::Full | Rejected::Paused) => panic!("rejected"),
    }
    queue.commit().expect("commit");
    let mut out: Vec<Completion> = Vec::new();
    assert!(queue.drain(&mut out, Duration::from_secs(10)));
    assert_eq!(out.len(), 1);
    out[0].result
}

fn modes() -> [CacheMode; 2] {
    [CacheMode::Writeback, CacheMode::None]
}

#[test]
fn write_then_read_round_trips() {
    for mode in modes() {
        let mut f = fixture(mode, false);
        let mut data = AlignedBuf::new(64 << 10);
        for (i, b) in data.slice_mut().iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let iov = [data.iovec(0, 32 << 10), data.iovec(32 << 10, 32 << 10)];
        assert_eq!(
            run(
                &mut f.queue,
                BlockOp::Write {
                    offset_bytes: 1 << 20,
                    iovecs: &iov
                }
            ),
            Ok(64 << 10)
        );
        assert_eq!(run(&mut f.queue, BlockOp::Flush), Ok(0));
        let back = AlignedBuf::new(64 << 10);
        let iov = [back.iovec(0, 64 << 10)];
        assert_eq!(
            run(
                &mut f.queue,
                BlockOp::Read {
                    offset_bytes: 1 << 20,
                    iovecs: &iov
                }
            ),
            Ok(64 << 10)
        );
        assert_eq!(back.slice(), data.slice(), "mode {mode:?}");
        let stats = f.volume.stats.snapshot();
        assert_eq!(
            (stats.read_ops, stats.write_ops, stats.flush_ops),
            (1, 1, 1)
        );
    }
}

#[test]
fn unaligned_buffers_fall_back_to_buffered_io() {
    let mut f = fixture(CacheMode::None, false);
    let mut data = AlignedBuf::new(8192);
    data.slice_mut().fill(0x5c);
    // 512-byte length at an odd address: O_DIRECT refuses it, the engine retries buffered.
    let iov = [data.iovec(1, 512)];
    assert_eq!(
        run(
            &mut f.queue,
            BlockOp::Write {
                offset_bytes: 4096,
                iovecs: &iov
            }
        ),
        Ok(512)
    );
    let back = AlignedBuf::new(4096);
    let iov = [back.iovec(0, 4096)];
    assert_eq!(
        run(
            &mut f.queue,
            BlockOp::Read {
                offset_bytes: 4096,
                iovecs: &iov
            }
        ),
        Ok(4096)
    );
    assert!(back.slice()[..512].iter().all(|&b| b == 0x5c));
    assert!(back.slice()[512..].iter().all(|&b| b == 0xAA));
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let mut places = vec![
        (std::env::temp_dir(), CacheMode::Writeback),
        (std::env::temp_dir(), CacheMode::None),
    ];
    if std::path::Path::new("/dev/shm").is_dir() {
        places.push(("/dev/shm".into(), CacheMode::Writeback));
    }
    for (parent, mode) in places {
        let mut f = fixture_in(parent, mode, false);
        let ops = [
            BlockOp::Discard {
                offset_bytes: 0,
                len_bytes: 1 << 20,
            },
            BlockOp::WriteZeroes {
                offset_bytes: 2 << 20,
                len_bytes: 1 << 20,
                unmap: false,
            },
            BlockOp::WriteZeroes {
                offset_bytes: 4 << 20,
                len_bytes: 4096,
                unmap: true,
            },
        ];
        for op in ops {
            let (offset, len) = match op {
                BlockOp::Discard {
                    offset_bytes,
                    len_bytes,
                }
                | BlockOp::WriteZeroes {
                    offset_bytes,
                    len_bytes,
                    ..
                } => (offset_bytes, len_bytes),
                _ => unreachable!(),
            };
            assert_eq!(run(&mut f.queue, op), Ok(len));
            let back = AlignedBuf::new(len as usize);
            let iov = [back.iovec(0, len as usize)];
            assert_eq!(
                run(
                    &mut f.queue,
                    BlockOp::Read {
                        offset_bytes: offset,
                        iovecs: &iov
                    }
                ),
                Ok(len)
            );
            assert!(back.slice().iter().all(|&b| b == 0), "{op:?} in {mode:?}");
        }
        // Bytes next to the zeroed ranges are untouched.
        let back = AlignedBuf::new(4096);
        let iov = [back.iovec(0, 4096)];
        run(
            &mut f.queue,
            BlockOp::Read {
                offset_bytes: 1 << 20,
                iovecs: &iov,
            },
        )
        .expect("read");
        assert!(back.slice().iter().all(|&b| b == 0xAA));
    }
}

#[test]
fn out_of_range_requests_fail() {
    let mut f = fixture(CacheMode::Writeback, false);
    let buf = AlignedBuf::new(8192);
    let iov = [buf.iovec(0, 8192)];
    let end = VOLUME_BYTES - 4096;
    assert_eq!(
        run(
            &mut f.queue,
            BlockOp::Read {
                offset_bytes: end,
                iovecs: &iov
            }
        ),
        Err(IoFailure::OutOfRange)
    );
    assert_eq!(
        run(
            &mut f.queue,
            BlockOp::Write {
                offset_bytes: u64::MAX - 10,
                iovecs: &iov
            }
        ),
        Err(IoFailure::OutOfRange)
    );
    assert_eq!(
        run(
            &mut f.queue,
            BlockOp::Discard {
                offset_bytes: end,
                len_bytes: 8192
            }
        ),
        Err(IoFailure::OutOfRange)
    );
}

#[test]
fn read_only_volumes_refuse_changes() {
    let mut f = fixture(CacheMode::Writeback, true);
    let buf = AlignedBuf::new(4096);
    let iov = [buf.iovec(0, 4096)];
    assert_eq!(
        run(
            &mut f.queue,
            BlockOp::Write {
                offset_bytes: 0,
                iovecs: &iov
            }
        ),
        Err(IoFailure::ReadOnly)
    );
    assert_eq!(
        run(
            &mut f.queue,
            BlockOp::Discard {
                offset_bytes: 0,
                len_bytes: 4096
            }
        ),
        Err(IoFailure::ReadOnly)
    );
    assert_eq!(
        run(
            &mut f.queue,
            BlockOp::Read {
                offset_bytes: 0,
                iovecs: &iov
            }
        ),
        Ok(4096)
    );
    assert_eq!(run(&mut f.queue, BlockOp::Flush), Ok(0));
}

#[test]
fn many_requests_in_flight_complete_with_their_tags() {
    for mode in modes() {
        let mut f = fixture(mode, false);
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
            unsafe { f.queue.submit(op, i as u64) }.expect("submit");
        }
        f.queue.commit().expect("commit");
        let mut out = Vec::new();
        assert!(f.queue.drain(&mut out, Duration::from_secs(20)));
        let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..requests as u64).collect::<Vec<_>>());
        assert!(out.iter().all(|c| c.result == Ok(4096)));
        let back = AlignedBuf::new(4096);
        let iov = [back.iovec(0, 4096)];
        run(
            &mut f.queue,
            BlockOp::Read {
                offset_bytes: 77 * 8192,
                iovecs: &iov,
            },
        )
        .expect("read");
        assert!(back.slice().iter().all(|&b| b == 77));
    }
}

#[test]
fn a_full_queue_rejects_and_a_pause_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.img");
    let volume = Volume::open(VolumeConfig {
        name: "v".into(),
        path,
        size_bytes: Some(1 << 20),
        ..Default::default()
    })
    .expect("open");
    let mut queue = VolumeQueue::new(volume.clone(), 0, 2, 4).expect("queue");
    // SAFETY: flushes carry no buffers.
    unsafe {
        queue.submit(BlockOp::Flush, 1).expect("first");
        queue.submit(BlockOp::Flush, 2).expect("second");
        assert_eq!(queue.submit(BlockOp::Flush, 3), Err(Rejected::Full));
    }
    queue.commit().expect("commit");
    let mut out = Vec::new();
    assert!(queue.drain(&mut out, Duration::from_secs(5)));
    let guard = volume
        .pause(Duration::from_secs(1))
        .expect("idle volume pauses");
    // SAFETY: a flush carries no buffers.
    let held = unsafe { queue.submit(BlockOp::Flush, 4) };
    assert_eq!(held, Err(Rejected::Paused));
    drop(guard);
    // SAFETY: a flush carries no buffers.
    assert_eq!(unsafe { queue.submit(BlockOp::Flush, 5) }, Ok(()));
    queue.commit().expect("commit");
    assert!(queue.drain(&mut out, Duration::from_secs(5)));
}
