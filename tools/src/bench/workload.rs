//! One queue's load loop: keeps `qd` requests in flight on a libblkio queue and times each one.

use super::histogram::Histogram;
use blkio::{Blkioq, Completion, ReqFlags};
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Phase of a run, shared by the main thread (which advances it) and the queue threads.
pub const PHASE_RAMP: u8 = 0;
/// Completions are counted and timed.
pub const PHASE_MEASURE: u8 = 1;
/// Queue threads stop submitting, drain what is in flight and return.
pub const PHASE_STOP: u8 = 2;

/// How long a queue may go without any completion before the run is declared stalled.
pub const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);

/// The access pattern of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random reads and writes, mixed by `--rwmix-read`.
    Randrw,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
}

impl Pattern {
    fn is_random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Randrw
        )
    }
}

/// What one queue thread does: everything it needs, copied into the thread.
#[derive(Clone, Copy, Debug)]
pub struct QueueJob {
    pub pattern: Pattern,
    /// Percentage of reads for `randrw`.
    pub rwmix_read_percent: u8,
    pub block_bytes: u64,
    pub queue_depth: usize,
    /// First block (in units of `block_bytes`) of the region this queue touches.
    pub first_block: u64,
    /// Number of blocks in the device region (random offsets are drawn from the whole region).
    pub region_blocks: u64,
    /// Busy-poll completions (`true`) or block on the completion fd (`false`).
    pub poll: bool,
    /// Start of this queue's `queue_depth * block_bytes` bytes of mapped buffer memory.
    pub buffer_addr: usize,
    pub seed: u64,
}

/// Live counters of one queue thread (every completion, ramp included), read by the progress display.
#[derive(Default)]
#[repr(align(64))]
pub struct LiveCounters {
    pub ops: AtomicU64,
}

/// What one queue thread measured during the measurement phase.
pub struct QueueResult {
    pub latency_ns: Histogram,
    pub read_ops: u64,
    pub write_ops: u64,
}

/// A failure of a queue thread.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("queue {queue}: no completion within {} s: backend stalled or gone", COMPLETION_TIMEOUT.as_secs())]
    Stalled { queue: usize },
    #[error("queue {queue}: waiting for completions failed: {source}")]
    DoIo { queue: usize, source: blkio::Error },
    #[error("queue {queue}: {op} of {len_bytes} bytes at offset {offset_bytes} failed: {message} (errno {errno})")]
    Request {
        queue: usize,
        op: &'static str,
        offset_bytes: u64,
        len_bytes: u64,
        errno: i32,
        message: String,
    },
}

/// A small, fast pseudo-random generator (xorshift64*); quality is ample for offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Per-slot bookkeeping of an in-flight request.
#[derive(Clone, Copy)]
struct Slot {
    started: Instant,
    offset_bytes: u64,
    is_write: bool,
}

/// The state of one queue thread's loop.
struct Runner<'a> {
    queue: Blkioq,
    job: QueueJob,
    index: usize,
    rng: Rng,
    next_seq_block: u64,
    slots: Vec<Slot>,
    in_flight: usize,
    counters: &'a LiveCounters,
}

impl Runner<'_> {
    /// Picks the next request (offset, direction) and enqueues it in `slot`.
    fn submit(&mut self, slot: usize, now: Instant) {
        let job = self.job;
        let block = if job.pattern.is_random() {
            self.rng.next() % job.region_blocks
        } else {
            let b = (job.first_block + self.next_seq_block) % job.region_blocks;
            self.next_seq_block += 1;
            b
        };
        let is_write = match job.pattern {
            Pattern::Randread | Pattern::Read => false,
            Pattern::Randwrite | Pattern::Write => true,
            Pattern::Randrw => self.rng.next() % 100 >= u64::from(job.rwmix_read_percent),
        };
        let offset_bytes = block * job.block_bytes;
        let buf = (job.buffer_addr + slot * job.block_bytes as usize) as *mut u8;
        let len = job.block_bytes as usize;
        if is_write {
            self.queue
                .write(offset_bytes, buf, len, slot, ReqFlags::empty());
        } else {
            self.queue
                .read(offset_bytes, buf, len, slot, ReqFlags::empty());
        }
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Slot {
                started: now,
                offset_bytes,
                is_write,
            };
        }
        self.in_flight += 1;
    }

    /// Waits for (or polls) completions; returns how many of `out` are filled.
    fn reap(
        &mut self,
        out: &mut [MaybeUninit<Completion>],
        min: usize,
    ) -> Result<usize, WorkloadError> {
        let mut timeout = COMPLETION_TIMEOUT;
        // With min 0 do_io never waits: skip the timeout bookkeeping on the polling fast path.
        let timeout = if min == 0 { None } else { Some(&mut timeout) };
        self.queue.do_io(out, min, timeout, None).map_err(|source| {
            if source.errno() == blkio::Errno::TIME {
                WorkloadError::Stalled { queue: self.index }
            } else {
                WorkloadError::DoIo {
                    queue: self.index,
                    source,
                }
            }
        })
    }

    /// Checks one completion; returns its slot.
    fn check(&self, c: &Completion) -> Result<usize, WorkloadError> {
        if c.ret == 0 {
            return Ok(c.user_data);
        }
        let slot = self.slots.get(c.user_data).copied();
        let message = if c.error_msg.is_null() {
            String::from("no message")
        } else {
            // SAFETY: libblkio sets error_msg to null or to a static NUL-terminated string.
            unsafe { CStr::from_ptr(c.error_msg) }
                .to_string_lossy()
                .into_owned()
        };
        Err(WorkloadError::Request {
            queue: self.index,
            op: if slot.is_some_and(|s| s.is_write) {
                "write"
            } else {
                "read"
            },
            offset_bytes: slot.map_or(0, |s| s.offset_bytes),
            len_bytes: self.job.block_bytes,
            errno: -c.ret,
            message,
        })
    }
}

/// Runs one queue until `phase` becomes [`PHASE_STOP`], then drains it.
pub fn run_queue(
    queue: Blkioq,
    job: QueueJob,
    index: usize,
    phase: &AtomicU8,
    counters: &LiveCounters,
) -> Result<QueueResult, WorkloadError> {
    let now = Instant::now();
    let slot = Slot {
        started: now,
        offset_bytes: 0,
        is_write: false,
    };
    let mut r = Runner {
        queue,
        job,
        index,
        rng: Rng(job.seed | 1),
        next_seq_block: 0,
        slots: vec![slot; job.queue_depth],
        in_flight: 0,
        counters,
    };
    let mut out: Vec<MaybeUninit<Completion>> = (0..job.queue_depth)
        .map(|_| MaybeUninit::uninit())
        .collect();
    let mut result = QueueResult {
        latency_ns: Histogram::new(),
        read_ops: 0,
        write_ops: 0,
    };
    for s in 0..job.queue_depth {
        r.submit(s, now);
    }
    let min = if job.poll { 0 } else { 1 };
    loop {
        let current = phase.load(Ordering::Acquire);
        if current == PHASE_STOP {
            break;
        }
        let n = r.reap(&mut out, min)?;
        let now = Instant::now();
        for c in out.iter().take(n) {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            let s = r.check(c)?;
            r.in_flight -= 1;
            if current == PHASE_MEASURE {
                if let Some(slot) = r.slots.get(s) {
                    let ns = now.saturating_duration_since(slot.started).as_nanos();
                    result
                        .latency_ns
                        .record(u64::try_from(ns).unwrap_or(u64::MAX));
                    if slot.is_write {
                        result.write_ops += 1;
                    } else {
                        result.read_ops += 1;
                    }
                }
            }
            r.submit(s, now);
        }
        if n > 0 {
            r.counters.ops.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    drain(&mut r, &mut out)?;
    Ok(result)
}

/// Reaps every request still in flight so the backend is idle when the run ends.
fn drain(r: &mut Runner<'_>, out: &mut [MaybeUninit<Completion>]) -> Result<(), WorkloadError> {
    while r.in_flight > 0 {
        let n = r.reap(out, 1)?;
        for c in out.iter().take(n) {
            // SAFETY: do_io initialised the first `n` completions.
            r.check(unsafe { c.assume_init_ref() })?;
        }
        r.in_flight = r.in_flight.saturating_sub(n);
    }
    Ok(())
}
