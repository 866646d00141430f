//! Criterion benchmarks of the migration mirror on the write path: 4 KiB writes through a
//! volume queue while an `active` or `background` migration job mirrors the volume to a file
//! target, against the same writes with no job. All on /dev/shm, so the numbers are ferry's
//! cost (the observer's copy, the mirror queue and threads, the ticket hand-back), not a disk.
//!
//! Run: `cargo bench -p ferry --bench mirror_path`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ferry_engine::mirror::{
    DestinationSpec, MigrationJob, MigrationOptions, MigrationState, MirrorMode,
};
use ferry_engine::{BlockOp, Volume, VolumeConfig, VolumeQueue};

const IMAGE_BYTES: u64 = 64 << 20;
const BATCH: usize = 32;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

fn scratch() -> tempfile::TempDir {
    let parent = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    tempfile::tempdir_in(parent).expect("tempdir")
}

/// Writes BATCH 4 KiB blocks at spread offsets and waits for all of them.
fn write_batch(queue: &mut VolumeQueue, buffer: &[u8], round: &mut u64) {
    for i in 0..BATCH {
        *round += 1;
        let offset_bytes = (*round * 4096 * 7) % IMAGE_BYTES;
        let iov = [libc::iovec {
            iov_base: buffer[i * 4096..].as_ptr() as *mut libc::c_void,
            iov_len: 4096,
        }];
        // SAFETY: `buffer` outlives the drain below, which waits for every request.
        unsafe {
            queue.submit(
                BlockOp::Write {
                    offset_bytes,
                    iovecs: &iov,
                },
                i as u64,
            )
        }
        .expect("submit");
    }
    queue.commit().expect("commit");
    let mut done = Vec::with_capacity(BATCH);
    assert!(queue.drain(&mut done, DRAIN_TIMEOUT));
    assert!(done.iter().all(|c| c.result.is_ok()));
    black_box(done.len());
}

fn mirrored_writes(c: &mut Criterion) {
    let mut group = c.benchmark_group("mirror_4k_write_batch32");
    for mode in [None, Some(MirrorMode::Background), Some(MirrorMode::Active)] {
        let dir = scratch();
        let volume = Volume::open(VolumeConfig {
            name: "bench".into(),
            path: dir.path().join("src.img"),
            size_bytes: Some(IMAGE_BYTES),
            ..Default::default()
        })
        .expect("volume");
        let job = mode.map(|mode| {
            let options = MigrationOptions {
                mode,
                ..Default::default()
            };
            let job = MigrationJob::start(
                vec![volume.clone()],
                DestinationSpec::File(dir.path().join("dst.img")),
                options,
            )
            .expect("migration");
            job.wait_for(|s| s == MigrationState::Ready, Duration::from_secs(30));
            job
        });
        let mut queue = VolumeQueue::new(Arc::clone(&volume), 0, 256, 4).expect("queue");
        let buffer = vec![0x5au8; BATCH * 4096];
        let mut round = 0u64;
        let name = match mode {
            None => "no_migration",
            Some(MirrorMode::Background) => "background",
            Some(MirrorMode::Active) => "active",
        };
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| write_batch(&mut queue, &buffer, &mut round))
        });
        if let Some(job) = job {
            let _ = job.cancel();
        }
    }
    group.finish();
}

criterion_group!(benches, mirrored_writes);
criterion_main!(benches);
