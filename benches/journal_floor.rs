//! Criterion benchmarks of what any journaled 4 KiB write costs on the machine it runs on,
//! whatever the journal's own code does: the floor under the journal's 4K ratio
//! (`benches/journal-notes.md`, *The copy stays on the queue thread*; the latest figures are
//! in `docs/BENCHMARKS.md`).
//!
//! A journal keeps a second copy of every write, so each journaled write needs at least:
//! - `copy_4k_cold`: its 4 KiB copied into memory that is not in the CPU's caches (a medium
//!   is written once, front to back; here a 256 MiB buffer, faulted in beforehand, cycled);
//! - `crc32c_4k`: the payload's CRC32C;
//! - `map_formatted_page`: one page of the medium mapped into the daemon (the page-table
//!   entry for a tmpfs page that already exists, as on a formatted spare; what the prefault
//!   thread does per page with `MADV_POPULATE_WRITE`);
//! - `fresh_tmpfs_page`: where the medium grows instead, one tmpfs page allocated as well (a
//!   hole of a sparse file faulted in).
//!
//! `pwrite_4k_existing` is the reference: the image write every write makes with or without
//! the journal (4 KiB `pwrite` into a tmpfs file's existing pages). Run: `cargo bench -p ferry
//! --bench journal_floor`. Files live on /dev/shm and are removed afterwards.

use std::fs::File;
use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_engine::journal::checksum::crc32c;

const PAGE: usize = 4096;
/// Larger than a CPU's caches, so each copy lands in memory not cached.
const COLD_BYTES: usize = 256 << 20;
/// Pages faulted in per system call: 1 MiB, the prefault thread's step.
const POPULATE_STEP_PAGES: usize = 256;
/// The tmpfs file mapped page by page (formatted once, mapped afresh per measurement).
const FILE_BYTES: usize = 256 << 20;

/// A tmpfs file removed when dropped.
struct ShmFile {
    path: PathBuf,
    file: File,
}

impl ShmFile {
    fn create(name: &str, bytes: usize, formatted: bool) -> Self {
        let path = PathBuf::from(format!(
            "/dev/shm/ferry-floor-{}-{name}",
            std::process::id()
        ));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create a file on /dev/shm");
        file.set_len(bytes as u64).expect("size the file");
        if formatted {
            let zeros = vec![0u8; 1 << 20];
            for at in (0..bytes).step_by(zeros.len()) {
                file.write_all_at(&zeros, at as u64)
                    .expect("format the file");
            }
        }
        Self { path, file }
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A shared mapping of a whole file, unmapped when dropped.
struct Mapping {
    base: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(file: &File, len: usize) -> Self {
        // SAFETY: a fresh shared mapping of an open descriptor, at an address the kernel
        // chooses; checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap");
        Self {
            base: base.cast(),
            len,
        }
    }

    /// Faults in `count` pages from page `first` for writing, as the journal's prefault
    /// thread does.
    fn populate(&self, first: usize, count: usize) {
        assert!((first + count) * PAGE <= self.len);
        // SAFETY: the pages lie inside the mapping; MADV_POPULATE_WRITE only faults them in.
        let rc = unsafe {
            libc::madvise(
                self.base.add(first * PAGE).cast(),
                count * PAGE,
                libc::MADV_POPULATE_WRITE,
            )
        };
        assert_eq!(rc, 0, "MADV_POPULATE_WRITE");
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

/// Times `iters` pages faulted in over fresh mappings of `file`, `POPULATE_STEP_PAGES` per
/// system call as the prefault thread does (a new mapping whenever the pages of one run out,
/// its set-up and tear-down not timed).
fn time_populate(file: &ShmFile, iters: u64) -> Duration {
    let pages = FILE_BYTES / PAGE;
    let mut left = iters as usize;
    let mut total = Duration::ZERO;
    while left > 0 {
        let n = left.min(pages);
        let mapping = Mapping::new(&file.file, FILE_BYTES);
        let start = Instant::now();
        for first in (0..n).step_by(POPULATE_STEP_PAGES) {
            mapping.populate(first, POPULATE_STEP_PAGES.min(n - first));
        }
        total += start.elapsed();
        left -= n;
    }
    total
}

fn floor(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal_floor");
    g.throughput(Throughput::Bytes(PAGE as u64));

    let source = vec![0x5Au8; PAGE];
    let mut cold = vec![1u8; COLD_BYTES];
    g.bench_function("copy_4k_cold", |b| {
        let mut at = 0;
        b.iter(|| {
            cold[at..at + PAGE].copy_from_slice(black_box(&source));
            at = (at + PAGE) % COLD_BYTES;
        });
    });
    drop(cold);

    g.bench_function("crc32c_4k", |b| b.iter(|| crc32c(black_box(&source))));

    let formatted = ShmFile::create("formatted", FILE_BYTES, true);
    g.bench_function("map_formatted_page", |b| {
        b.iter_custom(|iters| time_populate(&formatted, iters));
    });

    g.bench_function("fresh_tmpfs_page", |b| {
        b.iter_custom(|iters| {
            let mut left = iters as usize;
            let mut total = Duration::ZERO;
            while left > 0 {
                // A new sparse file each round: every page faulted in is a hole.
                let sparse = ShmFile::create("sparse", FILE_BYTES, false);
                let n = left.min(FILE_BYTES / PAGE);
                total += time_populate(&sparse, n as u64);
                left -= n;
            }
            total
        });
    });

    g.bench_function("pwrite_4k_existing", |b| {
        let mut at = 0;
        b.iter(|| {
            formatted
                .file
                .write_all_at(black_box(&source), at as u64)
                .expect("pwrite");
            at = (at + PAGE) % FILE_BYTES;
        });
    });
    g.finish();
}

criterion_group!(benches, floor);
criterion_main!(benches);
