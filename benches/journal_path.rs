//! Criterion benchmarks of the write journal's own path: encoding records (header + CRC32C
//! of the payload), decoding them back (the scan every offline tool does), and the group
//! commit as the guest sees it: N writes submitted on a volume queue with a sync journal
//! observing the volume, then waiting until all N are complete (= durable on the medium),
//! against the same loop without the journal, and with an async journal (the queue thread's
//! own cost: the copy and its CRC under the journal's lock). Each journal mode runs twice:
//! with records encoded straight into the mapped medium by the queue thread (`mapped`, the
//! default on tmpfs) and through the writer thread's group commits (`group_commit`,
//! `mapped=off`).
//!
//! Run: `cargo bench -p ferry --bench journal_path`. The image and the journal live on
//! /dev/shm, so the numbers measure ferry's code (copy, CRC, batching, the writer thread
//! hand-offs), not a disk's fdatasync.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_engine::journal::format::{encode_record, Op, RecordHeader};
use ferry_engine::journal::scan::scan_medium;
use ferry_engine::journal::{Journal, JournalMode, JournalOptions, MappedAppends};
use ferry_engine::{BlockOp, Volume, VolumeConfig, VolumeQueue};

const IMAGE_BYTES: u64 = 64 << 20;
const WRITE_BYTES: usize = 4096;
/// Writes per measured batch (the group-commit sizes).
const BATCH_SIZES: [usize; 3] = [1, 32, 256];
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Small media, deleted once sealed: GiBs of journal on tmpfs would measure how fast the
/// machine hands out fresh memory (slow on a VM's first touch), not the journal.
const MEDIUM_BYTES: u64 = 64 << 20;

fn header(seq: u64, len: usize) -> RecordHeader {
    RecordHeader {
        op: Op::Write,
        flags: 0,
        seq,
        stream_id: 1,
        log_id: 1,
        timestamp_ns: 1_700_000_000_000_000_000 + seq,
        offset_bytes: seq * 4096,
        len_bytes: len as u64,
        payload_len_bytes: 0,
        payload_crc: 0,
    }
}

fn encoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal_record");
    for len in [512usize, 4096, 65536, 1 << 20] {
        let payload = vec![0xA5u8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("encode", len), &payload, |b, p| {
            let mut out = Vec::with_capacity(len + 128);
            let mut seq = 0;
            b.iter(|| {
                out.clear();
                seq += 1;
                encode_record(&mut out, header(seq, p.len()), black_box(p));
                black_box(out.len())
            })
        });
        // 64 records in a buffer, scanned (every header and payload CRC checked).
        let mut medium = Vec::new();
        for seq in 1..=64 {
            encode_record(&mut medium, header(seq, len), &payload);
        }
        g.throughput(Throughput::Bytes(64 * len as u64));
        g.bench_with_input(BenchmarkId::new("scan_64", len), &medium, |b, m| {
            b.iter(|| {
                let scan = scan_medium(black_box(&m[..])).expect("scan of memory");
                assert_eq!(scan.records.len(), 64);
            })
        });
    }
    g.finish();
}

struct Rig {
    _dir: tempfile::TempDir,
    queue: VolumeQueue,
    buf: Vec<u8>,
    journal: Option<Arc<Journal>>,
}

impl Rig {
    fn new(journal_mode: Option<JournalMode>, mapped: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ferry-jbench-")
            .tempdir_in(Path::new("/dev/shm"))
            .expect("scratch dir on /dev/shm");
        let volume = Volume::open(VolumeConfig {
            name: "vb".into(),
            path: dir.path().join("vb.img"),
            size_bytes: Some(IMAGE_BYTES),
            ..Default::default()
        })
        .expect("open volume");
        let journal = journal_mode.map(|mode| {
            let mut o = JournalOptions::new(dir.path().join("j"));
            o.capacity_bytes = MEDIUM_BYTES;
            o.mode = mode;
            o.mapped = if mapped {
                MappedAppends::On
            } else {
                MappedAppends::Off
            };
            let j = Journal::open(o).expect("open journal");
            volume.add_observer(j.observer());
            j
        });
        let queue = VolumeQueue::new(volume, 0, 256, 4).expect("volume queue");
        Self {
            _dir: dir,
            queue,
            buf: vec![0x5Au8; WRITE_BYTES * 256],
            journal,
        }
    }

    /// Submits `n` 4 KiB writes at distinct offsets and waits until all are complete.
    fn batch(&mut self, n: usize, round: u64) {
        let slots = IMAGE_BYTES / WRITE_BYTES as u64;
        for i in 0..n {
            let iov = [libc::iovec {
                iov_base: self.buf[i * WRITE_BYTES..].as_ptr() as *mut libc::c_void,
                iov_len: WRITE_BYTES,
            }];
            let slot = (round * n as u64 + i as u64) % slots;
            // SAFETY: the buffer lives in `self` and is not touched until `drain` below
            // has seen every request complete.
            unsafe {
                self.queue.submit(
                    BlockOp::Write {
                        offset_bytes: slot * WRITE_BYTES as u64,
                        iovecs: &iov,
                    },
                    i as u64,
                )
            }
            .expect("submit");
        }
        self.queue.commit().expect("commit");
        let mut done = Vec::with_capacity(n);
        assert!(self.queue.drain(&mut done, DRAIN_TIMEOUT), "writes stuck");
        assert_eq!(done.len(), n);
        assert!(done.iter().all(|c| c.result.is_ok()), "a write failed");
    }
}

impl Rig {
    /// Deletes the sealed media (every medium before the one being written).
    fn recycle_media(&self) {
        let Some(current) = self.journal.as_ref().and_then(|j| j.status().medium) else {
            return;
        };
        for index in 0..current {
            let path = self
                ._dir
                .path()
                .join("j")
                .join(ferry_engine::journal::media::medium_file_name(index));
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(j) = &self.journal {
            j.close();
        }
    }
}

fn group_commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal_group_commit");
    g.measurement_time(Duration::from_secs(3));
    // async with group commits: the queue thread's cost alone (the copy and its CRC), the
    // writer trailing behind.
    let configs = [
        ("sync_mapped", Some(JournalMode::Sync), true),
        ("sync_group_commit", Some(JournalMode::Sync), false),
        ("async_mapped", Some(JournalMode::Async), true),
        ("async_group_commit", Some(JournalMode::Async), false),
        ("no_journal", None, false),
    ];
    for (name, journal_mode, mapped) in configs {
        let mut rig = Rig::new(journal_mode, mapped);
        for n in BATCH_SIZES {
            g.throughput(Throughput::Elements(n as u64));
            let mut round = 0;
            g.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    round += 1;
                    rig.batch(n, round);
                    if round % 64 == 0 {
                        rig.recycle_media();
                    }
                })
            });
        }
    }
    // A mark: one record through the writer thread and back (the latency floor).
    let rig = Rig::new(Some(JournalMode::Sync), false);
    if let Some(j) = &rig.journal {
        g.throughput(Throughput::Elements(1));
        g.bench_function("mark", |b| b.iter(|| j.mark("m").expect("mark")));
    }
    g.finish();
}

criterion_group!(benches, encoding, group_commit);
criterion_main!(benches);
