//! Criterion benchmarks of the request path, piece by piece: parsing a virtio-blk chain,
//! the engine's submit/complete loop against a tmpfs file, and the two together.
//!
//! Each path with guest memory as ferry maps it (`LogBitmap` regions, no log installed:
//! what every request pays for dirty-logging support) and, for the full path, with a
//! page bitmap that records (vm-memory's `AtomicBitmap`, standing in for an installed
//! migration log) plus the read's pages marked at completion.
//!
//! Run: `cargo bench -p ferry --bench request_path`. Images go to /dev/shm so that the
//! numbers measure ferry's code and the kernel's io_uring path, not a disk.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ferry_engine::{BlockOp, Volume, VolumeConfig, VolumeQueue};
use ferry_vhost::dirty_log::{mark_written, LogBitmap};
use ferry_vhost::request::{parse, Parsed, Request};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::NewBitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const HEADER_AT: u64 = 0x10_0000;
const DATA_AT: u64 = 0x20_0000;
const STATUS_AT: u64 = 0x30_0000;
const IMAGE_BYTES: u64 = 64 << 20;

fn guest_memory<B: NewBitmap>() -> GuestMemoryMmap<B> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("guest memory");
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    header[8..16].copy_from_slice(&8u64.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HEADER_AT))
        .expect("header");
    mem
}

fn read_chain_descriptors() -> [RawDescriptor; 3] {
    let write = VRING_DESC_F_WRITE as u16;
    [
        RawDescriptor::from(SplitDescriptor::new(HEADER_AT, 16, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(DATA_AT, 4096, write, 0)),
        RawDescriptor::from(SplitDescriptor::new(STATUS_AT, 1, write, 0)),
    ]
}

fn shm_volume() -> (tempfile::TempDir, Arc<Volume>) {
    let parent = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::tempdir_in(parent).expect("tempdir");
    let path = dir.path().join("bench.img");
    std::fs::write(&path, vec![1u8; IMAGE_BYTES as usize]).expect("image");
    let volume = Volume::open(VolumeConfig {
        name: "bench".into(),
        path,
        ..Default::default()
    })
    .expect("volume");
    (dir, volume)
}

fn bench_parse(c: &mut Criterion) {
    bench_parse_with::<()>(c, "parse_4k_read_chain");
    bench_parse_with::<LogBitmap>(c, "parse_4k_read_chain_logbitmap");
    // What ferry's LogBitmap wraps, used directly: shows what the wrapper saves.
    bench_parse_with::<BitmapMmapRegion>(c, "parse_4k_read_chain_bitmapmmapregion");
}

fn bench_parse_with<B: NewBitmap>(c: &mut Criterion, name: &str) {
    let mem = guest_memory::<B>();
    let descs = read_chain_descriptors();
    let mut request = Request::with_capacity();
    let vq = MockSplitQueue::new(&mem, 256);
    c.bench_function(name, |b| {
        b.iter_batched(
            || {
                // Rewind the avail index so that every batch builds chain 0 again.
                mem.write_obj(0u16, vq.avail_addr().unchecked_add(2))
                    .expect("avail");
                vq.build_desc_chain(&descs).expect("chain")
            },
            |chain| {
                let parsed = parse(chain, &mem, &mut request);
                assert_eq!(parsed, Parsed::Ok);
                black_box(request.data_bytes)
            },
            BatchSize::SmallInput,
        )
    });
}

fn bench_engine(c: &mut Criterion) {
    let (_dir, volume) = shm_volume();
    let mut queue = VolumeQueue::new(volume, 0, 256, 16).expect("queue");
    let mut buffer = vec![0u8; 32 * 4096];
    let mut completions = Vec::with_capacity(64);
    let mut offset = 0u64;
    c.bench_function("engine_4k_read_qd1", |b| {
        b.iter(|| {
            let iov = [libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: 4096,
            }];
            offset = (offset + 4096 * 17) % IMAGE_BYTES;
            // SAFETY: `buffer` outlives the drain that waits for this request.
            unsafe {
                queue.submit(
                    BlockOp::Read {
                        offset_bytes: offset,
                        iovecs: &iov,
                    },
                    1,
                )
            }
            .expect("submit");
            queue.commit().expect("commit");
            completions.clear();
            assert!(queue.drain(&mut completions, Duration::from_secs(5)));
            black_box(completions.len())
        })
    });
    c.bench_function("engine_4k_read_batch32", |b| {
        b.iter(|| {
            for i in 0..32usize {
                let iov = [libc::iovec {
                    // SAFETY: each request gets its own 4 KiB inside `buffer`.
                    iov_base: unsafe { buffer.as_mut_ptr().add(i * 4096) }.cast(),
                    iov_len: 4096,
                }];
                offset = (offset + 4096 * 17) % IMAGE_BYTES;
                // SAFETY: `buffer` outlives the drain below.
                unsafe {
                    queue.submit(
                        BlockOp::Read {
                            offset_bytes: offset,
                            iovecs: &iov,
                        },
                        i as u64,
                    )
                }
                .expect("submit");
            }
            queue.commit().expect("commit");
            completions.clear();
            assert!(queue.drain(&mut completions, Duration::from_secs(5)));
            black_box(completions.len())
        })
    });
}

fn bench_request_path(c: &mut Criterion) {
    let (_dir, volume) = shm_volume();
    let mut queue = VolumeQueue::new(volume, 0, 256, 16).expect("queue");
    bench_request_path_with::<()>(
        c,
        &mut queue,
        "request_path_4k_read_parse_submit_complete",
        false,
    );
    bench_request_path_with::<LogBitmap>(
        c,
        &mut queue,
        "request_path_4k_read_parse_submit_complete_logbitmap",
        false,
    );
    bench_request_path_with::<AtomicBitmap>(
        c,
        &mut queue,
        "request_path_4k_read_parse_submit_complete_logging",
        true,
    );
}

fn bench_request_path_with<B: NewBitmap>(
    c: &mut Criterion,
    queue: &mut VolumeQueue,
    name: &str,
    logging: bool,
) {
    let mem = guest_memory::<B>();
    let descs = read_chain_descriptors();
    let mut request = Request::with_capacity();
    let mut completions = Vec::with_capacity(4);
    let vq = MockSplitQueue::new(&mem, 256);
    c.bench_function(name, |b| {
        b.iter_batched(
            || {
                // Rewind the avail index so that every batch builds chain 0 again.
                mem.write_obj(0u16, vq.avail_addr().unchecked_add(2))
                    .expect("avail");
                vq.build_desc_chain(&descs).expect("chain")
            },
            |chain| {
                assert_eq!(parse(chain, &mem, &mut request), Parsed::Ok);
                let op = BlockOp::Read {
                    offset_bytes: request.sector * 512,
                    iovecs: &request.iovecs,
                };
                // SAFETY: the iovecs point into `mem`, alive until the drain below.
                unsafe { queue.submit(op, 1) }.expect("submit");
                queue.commit().expect("commit");
                completions.clear();
                assert!(queue.drain(&mut completions, Duration::from_secs(5)));
                if logging {
                    mark_written(&mem, &request.data_segments);
                }
                mem.write_obj(0u8, request.status_addr).expect("status");
                black_box(completions.len())
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench_parse, bench_engine, bench_request_path);
criterion_main!(benches);
