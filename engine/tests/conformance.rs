//! One conformance suite for the engine's volume queue, run against every backing: files
//! in both cache modes, and NBD exports of a real `qemu-nbd` (unix socket) and
//! `qemu-storage-daemon` (loopback TCP), whole and as a slice at an offset: round trips,
//! flush, discard and write-zeroes reading back as zeros, range and read-only refusals,
//! short-transfer continuation and many requests in flight.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::testing::run_op as run;
use ferry_engine::volume::queue::Rejected;
use ferry_engine::{BlockOp, CacheMode, IoFailure, Volume, VolumeConfig, VolumeQueue};
use ferry_test_support::nbd::{NbdAddr, NbdServer, QemuNbdOpts};
use ferry_test_support::Rng;

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
    queue: VolumeQueue,
    volume: Arc<Volume>,
    /// The NBD server of an NBD backing (killed on drop, after the queue).
    _server: Option<NbdServer>,
    /// The image an NBD server exports.
    image: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

/// What a fixture's volume lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    File(CacheMode),
    /// `qemu-nbd` on a unix socket, the whole export.
    QemuNbd,
    /// `qemu-storage-daemon` on loopback TCP; the volume is a slice at 1 MiB of a larger export.
    QsdSlice,
}

/// Every backing the suite runs against.
fn backends() -> [Backend; 4] {
    [
        Backend::File(CacheMode::Writeback),
        Backend::File(CacheMode::None),
        Backend::QemuNbd,
        Backend::QsdSlice,
    ]
}

fn fixture(cache: CacheMode, read_only: bool) -> Fixture {
    fixture_in(std::env::temp_dir(), cache, read_only)
}

/// Where the slice of a `QsdSlice` volume starts in its export.
const SLICE_OFFSET_BYTES: u64 = 1 << 20;

/// A volume of `VOLUME_BYTES` full of 0xAA on `backend`.
fn fixture_on(backend: Backend, read_only: bool) -> Fixture {
    let (server, path, offset, image) = match backend {
        Backend::File(cache) => return fixture(cache, read_only),
        Backend::QemuNbd => {
            let dir = tempfile::tempdir().expect("tempdir");
            let image = fill_image(dir.path(), VOLUME_BYTES);
            let socket = dir.path().join("nbd.sock");
            let opts = QemuNbdOpts {
                read_only,
                ..QemuNbdOpts::default()
            };
            let server = NbdServer::qemu_nbd_with(&image, "e", &NbdAddr::Unix(socket), opts)
                .expect("qemu-nbd");
            (server, dir, 0, image)
        }
        Backend::QsdSlice => {
            let dir = tempfile::tempdir().expect("tempdir");
            let image = fill_image(dir.path(), VOLUME_BYTES + 2 * SLICE_OFFSET_BYTES);
            let addr = NbdAddr::free_tcp().expect("free port");
            let server = NbdServer::qsd(&image, "e", &addr).expect("qemu-storage-daemon");
            (server, dir, SLICE_OFFSET_BYTES, image)
        }
    };
    let volume = Volume::open(VolumeConfig {
        name: "v".into(),
        path: PathBuf::from(server.uri()),
        read_only: read_only && backend != Backend::QemuNbd,
        offset_bytes: offset,
        length_bytes: (offset > 0).then_some(VOLUME_BYTES),
        ..Default::default()
    })
    .expect("open NBD volume");
    assert!(volume.backing().nbd().is_some());
    assert_eq!(volume.size_bytes(), VOLUME_BYTES);
    let queue = VolumeQueue::new(volume.clone(), 0, 256, 16).expect("queue");
    Fixture {
        queue,
        volume,
        _server: Some(server),
        image: Some(image),
        _dir: path,
    }
}

fn fill_image(dir: &Path, len: u64) -> PathBuf {
    let image = dir.join("e.img");
    std::fs::write(&image, vec![0xAAu8; len as usize]).expect("image");
    image
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
        queue,
        volume,
        _server: None,
        image: None,
        _dir: dir,
    }
}

#[test]
fn write_then_read_round_trips() {
    for mode in backends() {
        let mut f = fixture_on(mode, false);
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
    type Make = Box<dyn Fn() -> Fixture>;
    let mut places: Vec<(String, Make)> = backends()
        .into_iter()
        .map(|b| {
            (
                format!("{b:?}"),
                Box::new(move || fixture_on(b, false)) as Make,
            )
        })
        .collect();
    if std::path::Path::new("/dev/shm").is_dir() {
        places.push((
            "tmpfs".into(),
            Box::new(|| fixture_in("/dev/shm".into(), CacheMode::Writeback, false)),
        ));
    }
    for (mode, make) in places {
        let mut f = make();
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
    for backend in backends() {
        out_of_range_requests_fail_on(backend);
    }
}

fn out_of_range_requests_fail_on(backend: Backend) {
    let mut f = fixture_on(backend, false);
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
    // qemu-nbd serves that one read-only (`-r`): the export makes the volume read-only.
    for backend in [Backend::File(CacheMode::Writeback), Backend::QemuNbd] {
        read_only_volumes_refuse_changes_on(backend);
    }
}

fn read_only_volumes_refuse_changes_on(backend: Backend) {
    let mut f = fixture_on(backend, true);
    assert!(f.volume.read_only());
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
    for mode in backends() {
        let mut f = fixture_on(mode, false);
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

/// Random offsets and sizes (512 B to 1 MiB, in up to 4 iovecs), 64 in flight at once and
/// never overlapping, then read back in another random order and compared with a model.
#[test]
fn random_round_trips_with_many_in_flight() {
    for backend in backends() {
        let mut f = fixture_on(backend, false);
        let mut model = vec![0xAAu8; VOLUME_BYTES as usize];
        let mut rng = Rng::new(99);
        for round in 0..4u64 {
            let mut ranges: Vec<(u64, usize)> = Vec::new();
            while ranges.len() < 64 {
                let len = 512 * (1 + rng.below(2048)) as usize;
                let offset = 512 * rng.below((VOLUME_BYTES - len as u64) / 512 + 1);
                if ranges
                    .iter()
                    .all(|&(o, l)| offset + len as u64 <= o || o + l as u64 <= offset)
                {
                    ranges.push((offset, len));
                }
            }
            let total: usize = ranges.iter().map(|r| r.1).sum();
            let mut data = AlignedBuf::new(total);
            for (i, b) in data.slice_mut().iter_mut().enumerate() {
                *b = (i as u64 * 31 + round * 7 + (i as u64 >> 12)) as u8;
            }
            let mut iovs: Vec<Vec<libc::iovec>> = Vec::new();
            let mut at = 0;
            for &(_, len) in &ranges {
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
            let mut at = 0;
            for (i, &(offset, len)) in ranges.iter().enumerate() {
                let op = BlockOp::Write {
                    offset_bytes: offset,
                    iovecs: &iovs[i],
                };
                // SAFETY: `data` outlives the drain below.
                unsafe { f.queue.submit(op, i as u64) }.expect("submit");
                model[offset as usize..offset as usize + len]
                    .copy_from_slice(&data.slice()[at..at + len]);
                at += len;
            }
            f.queue.commit().expect("commit");
            let mut out = Vec::new();
            assert!(
                f.queue.drain(&mut out, Duration::from_secs(30)),
                "{backend:?}"
            );
            assert_eq!(out.len(), ranges.len());
            assert!(out.iter().all(|c| c.result.is_ok()), "{backend:?}: {out:?}");
        }
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
            unsafe { f.queue.submit(op, i as u64) }.expect("submit");
        }
        f.queue.commit().expect("commit");
        let mut out = Vec::new();
        assert!(f.queue.drain(&mut out, Duration::from_secs(30)));
        assert!(out.iter().all(|c| c.result == Ok(piece as u64)), "{out:?}");
        let diff = back.slice().iter().zip(&model).position(|(a, b)| a != b);
        assert_eq!(diff, None, "{backend:?}: first difference");
        if backend == Backend::QsdSlice {
            // Flushed; the bytes around the slice are untouched, the slice holds the model.
            assert_eq!(run(&mut f.queue, BlockOp::Flush), Ok(0));
            let image = std::fs::read(f.image.as_ref().expect("image")).expect("read image");
            let (start, end) = (
                SLICE_OFFSET_BYTES as usize,
                (SLICE_OFFSET_BYTES + VOLUME_BYTES) as usize,
            );
            assert!(image[..start]
                .iter()
                .chain(&image[end..])
                .all(|&b| b == 0xAA));
            assert!(
                image[start..end] == model[..],
                "the export's slice differs from the model"
            );
        }
    }
}
