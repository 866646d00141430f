//! The background copier: plans which chunks hold data, then copies dirty chunks to the target.
//!
//! `copy_threads` worker threads each copy one run of up to `copy_chunk_bytes` at a time
//! (so at most `copy_threads` copies are in flight): look at the next run of a volume's
//! [`ChunkTable`], book its bytes on the speed limit and wait for their turn, then take a
//! run of at most that size, read it from the source with `pread` (or its NBD export),
//! write it to the target, and give back on the limit what the run did not use. Booking
//! before copying keeps the limit from the first byte: a copier that paid after its copy
//! sent its first chunk unpaid, so a limited job with many copiers copied that many chunks
//! at once. Plain threads rather than io_uring: the target may be an NBD socket, the work
//! is a few large sequential transfers, and a blocking worker keeps the per-chunk rules
//! easy to follow.
//!
//! A guest write into a chunk while it is being copied re-dirties the chunk (see
//! `dirty_bitmap`), so the time a run is held must stay short or a busy guest keeps the
//! job from converging: the speed limit is paid before a run is taken, never while holding
//! one. `MigrationOptions::copy_hold` widens the window on purpose, for tests of the race.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use super::dirty_bitmap::ChunkTable;
use super::job::JobShared;
use crate::volume::Backing;

/// How long an idle worker sleeps before it looks for dirty chunks again.
const IDLE_POLL: Duration = Duration::from_millis(2);

/// Marks the chunks that must be copied: the source's allocated ranges when the target
/// reads as zeros elsewhere, else everything. Returns the bytes marked.
pub fn plan(
    table: &mut ChunkTable,
    source: &Backing,
    target_known_zero: bool,
) -> std::io::Result<u64> {
    let len = source.len_bytes;
    let Some(image) = source
        .file()
        .filter(|f| target_known_zero && !f.is_block_device)
    else {
        return Ok(table.mark_dirty(0, len));
    };
    let file = &image.file;
    let base = source.base_offset_bytes;
    let end = base + len;
    let mut marked = 0;
    let mut pos = base;
    while pos < end {
        let Some(data) = seek(file, pos, Whence::SeekData)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(file, data, Whence::SeekHole)?.unwrap_or(end).min(end);
        marked += table.mark_dirty(data - base, hole - data);
        pos = hole;
    }
    Ok(marked)
}

/// `lseek(file, offset, whence)`; `None` for `ENXIO` (no data past `offset`). A file system
/// without `SEEK_DATA` reports the whole file as data.
fn seek(file: &File, offset: u64, whence: Whence) -> std::io::Result<Option<u64>> {
    match lseek(file.as_raw_fd(), offset as libc::off_t, whence) {
        Ok(r) => Ok(Some(r as u64)),
        Err(Errno::ENXIO) => Ok(None),
        Err(Errno::EINVAL) if matches!(whence, Whence::SeekData) => Ok(Some(offset)),
        Err(Errno::EINVAL) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// True when `len` bytes at `offset` of the source are one hole (read as zeros).
fn is_hole(source: &Backing, offset: u64, len: u64) -> bool {
    let Some(image) = source.file().filter(|f| !f.is_block_device) else {
        return false;
    };
    match seek(&image.file, offset, Whence::SeekData) {
        Ok(None) => true,
        Ok(Some(data)) => data >= offset + len,
        Err(_) => false,
    }
}

/// The unit of zero detection in copied data: a file system block.
const ZERO_BLOCK_BYTES: usize = 4096;

/// Splits `data` into maximal segments of all-zero and of other `block`-sized blocks (the
/// last block may be shorter): `(start, len, all_zero)`.
fn zero_segments(data: &[u8], block: usize) -> Vec<(usize, usize, bool)> {
    let mut segments: Vec<(usize, usize, bool)> = Vec::new();
    for (i, b) in data.chunks(block).enumerate() {
        let zero = b.iter().all(|&x| x == 0);
        match segments.last_mut() {
            Some(last) if last.2 == zero => last.1 += b.len(),
            _ => segments.push((i * block, b.len(), zero)),
        }
    }
    segments
}

/// A copier worker thread.
pub(crate) fn run(job: Arc<JobShared>) {
    let g = job.options.granularity_bytes;
    let chunks_max = job.options.copy_chunk_bytes / g;
    let mut buf = vec![0u8; job.options.copy_chunk_bytes as usize];
    let mut next_volume = 0;
    while !job.stopped() {
        let Some(chunks) = peek_work(&job, next_volume, chunks_max) else {
            std::thread::sleep(IDLE_POLL);
            continue;
        };
        let skip = || job.stopped() || job.unthrottled.load(Ordering::Acquire);
        let booked = job.throttle.reserve(chunks * g, skip);
        // Another copier may have taken the run looked at meanwhile: take one no larger
        // than what was booked, or none.
        let Some((index, run)) = take_work(&job, &mut next_volume, booked.bytes() / g) else {
            job.throttle.refund(booked, 0);
            continue;
        };
        let result = copy_run(&job, index, &run, &mut buf);
        if let Ok(mut table) = job.volumes[index].table.lock() {
            table.finish_run(run, result.is_ok());
        }
        match result {
            Ok(copied_bytes) => job.throttle.refund(booked, copied_bytes),
            Err(reason) => {
                job.throttle.refund(booked, 0);
                job.fail(reason);
            }
        }
    }
}

/// The length in chunks of the run [`take_work`] would take now, if any.
fn peek_work(job: &JobShared, next_volume: usize, chunks_max: u64) -> Option<u64> {
    let n = job.volumes.len();
    (0..n).find_map(|step| {
        let table = job.volumes[(next_volume + step) % n].table.lock().ok()?;
        table.peek_run(chunks_max).map(|run| run.end - run.start)
    })
}

/// Takes a run of at most `chunks_max` chunks from the next volume that has one (round
/// robin).
fn take_work(
    job: &JobShared,
    next_volume: &mut usize,
    chunks_max: u64,
) -> Option<(usize, std::ops::Range<u64>)> {
    if chunks_max == 0 {
        return None;
    }
    let n = job.volumes.len();
    for step in 0..n {
        let index = (*next_volume + step) % n;
        let run = job.volumes[index].table.lock().ok()?.take_run(chunks_max);
        if let Some(run) = run {
            *next_volume = (index + 1) % n;
            return Some((index, run));
        }
    }
    None
}

/// Holds a copy between its read and its write for `copy_hold` (zero unless a test asks),
/// read again on every poll so that a test can release a held copy by lowering it.
fn hold(job: &JobShared) {
    let held_since = std::time::Instant::now();
    while !job.stopped() {
        let hold = Duration::from_micros(job.copy_hold_us.load(Ordering::Acquire));
        let Some(left) = hold
            .checked_sub(held_since.elapsed())
            .filter(|l| !l.is_zero())
        else {
            return;
        };
        std::thread::sleep(Duration::from_millis(1).min(left));
    }
}

/// Copies one run of chunks of volume `index` from the source to the target; returns the
/// bytes copied.
fn copy_run(
    job: &JobShared,
    index: usize,
    run: &std::ops::Range<u64>,
    buf: &mut [u8],
) -> Result<u64, String> {
    let vm = &job.volumes[index];
    let g = job.options.granularity_bytes;
    let start = run.start * g;
    let len = (run.end * g).min(vm.placement.length_bytes) - start;
    let Some(source) = vm.source.lock().ok().and_then(|s| s.clone()) else {
        return Ok(0); // the job has ended
    };
    let file_offset = source.base_offset_bytes + start;
    let target_offset = vm.placement.offset_bytes + start;
    let name = vm.volume.name();
    if is_hole(&source, file_offset, len) {
        hold(job);
        let Some(written) = job.write_target(|| job.target.write_zeroes(target_offset, len, true))
        else {
            return Ok(0); // the job ended while this copy waited
        };
        written.map_err(|e| format!("volume {name}: copying a hole: {e}"))?;
    } else {
        let data = &mut buf[..len as usize];
        source
            .read_exact_at(data, file_offset)
            .map_err(|e| format!("volume {name}: reading the source at {file_offset}: {e}"))?;
        hold(job);
        // Zero blocks go as write-zeroes (a hole on a file target): a chunk holding one 4 KiB
        // guest write stays 4 KiB allocated on the target, not a whole chunk.
        let write = || {
            for (at, n, zero) in zero_segments(data, ZERO_BLOCK_BYTES) {
                let offset = target_offset + at as u64;
                if zero {
                    job.target.write_zeroes(offset, n as u64, true)?;
                } else {
                    job.target.write_at(offset, &data[at..at + n])?;
                }
            }
            Ok::<(), super::destination::DestinationError>(())
        };
        let Some(written) = job.write_target(write) else {
            return Ok(0); // the job ended while this copy waited
        };
        written.map_err(|e| format!("volume {name}: copying to the target: {e}"))?;
    }
    job.counters.add_copied(len);
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::zero_segments;

    #[test]
    fn zero_blocks_are_split_from_data_blocks() {
        let mut data = vec![0u8; 10 * 4096 + 100];
        data[4096 + 7] = 1; // block 1
        data[2 * 4096] = 2; // block 2
        data[9 * 4096 + 4095] = 3; // block 9
        assert_eq!(
            zero_segments(&data, 4096),
            vec![
                (0, 4096, true),
                (4096, 2 * 4096, false),
                (3 * 4096, 6 * 4096, true),
                (9 * 4096, 4096, false),
                (10 * 4096, 100, true),
            ]
        );
        assert_eq!(zero_segments(&[0u8; 8192], 4096), vec![(0, 8192, true)]);
        assert_eq!(zero_segments(&[5u8; 100], 4096), vec![(0, 100, false)]);
        assert!(zero_segments(&[], 4096).is_empty());
    }
}
