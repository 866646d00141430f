//! The engine's integration-test harness: a guest that writes continuously through a
//! `VolumeQueue` while a migration runs. Everything that does not need the engine (seeded
//! data, images, NBD servers) comes from `ferry-test-support`.

#![allow(dead_code)]

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_engine::volume::queue::{wait_readable, Rejected};
use ferry_engine::{BlockOp, Completion, Volume, VolumeConfig, VolumeQueue};
use ferry_test_support::{wait_until, Rng};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

pub fn open_volume(name: &str, path: &Path) -> Result<Arc<Volume>, ferry_engine::EngineError> {
    Volume::open(VolumeConfig {
        name: name.into(),
        path: path.to_path_buf(),
        ..Default::default()
    })
}

/// Where and how a [`Guest`] writes.
#[derive(Clone)]
pub struct GuestConfig {
    /// Bytes of the volume to write into.
    pub region: Range<u64>,
    /// Writes are 1..=blocks_max blocks of 4 KiB, block aligned.
    pub blocks_max: u64,
    pub inflight: usize,
    pub seed: u64,
    /// One request in this many is a write-zeroes or a discard (0: never).
    pub zero_every: u64,
    /// Requests per second at most (0: as fast as the volume goes).
    pub requests_per_s_max: u64,
}

impl GuestConfig {
    pub fn whole(len: u64, seed: u64) -> Self {
        Self {
            region: 0..len,
            blocks_max: 16,
            inflight: 16,
            seed,
            zero_every: 13,
            requests_per_s_max: 0,
        }
    }

    pub fn paced(mut self, requests_per_s: u64) -> Self {
        self.requests_per_s_max = requests_per_s;
        self
    }
}

/// What a guest did.
pub struct GuestReport {
    pub model: Vec<u8>,
    pub ok: u64,
    pub failed: u64,
}

/// A writer thread that plays guest: random writes, write-zeroes and discards with many in
/// flight, never two overlapping at once, and a model of what the disk must hold.
pub struct Guest {
    stop: Arc<AtomicBool>,
    pub completed: Arc<AtomicU64>,
    handle: JoinHandle<Result<GuestReport, String>>,
}

const BLOCK: u64 = 4096;

struct Inflight {
    range: Range<u64>,
    zero: bool,
}

impl Guest {
    pub fn spawn(volume: Arc<Volume>, model: Vec<u8>, config: GuestConfig) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), completed.clone());
        let handle = std::thread::spawn(move || guest_loop(volume, model, config, &s, &c));
        Self {
            stop,
            completed,
            handle,
        }
    }

    /// Waits until at least `n` requests completed (to be sure the guest is busy); false
    /// when that takes longer than `timeout` (the guest or the volume hangs).
    pub fn wait_completed(&self, n: u64, timeout: Duration) -> bool {
        let done = || Ok(self.completed.load(Ordering::Relaxed) >= n);
        wait_until("guest requests", timeout, done).is_ok()
    }

    /// Requests completed so far.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    pub fn stop(self) -> Result<GuestReport, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| "guest thread panicked".to_string())?
    }
}

fn guest_loop(
    volume: Arc<Volume>,
    mut model: Vec<u8>,
    config: GuestConfig,
    stop: &AtomicBool,
    completed: &AtomicU64,
) -> Result<GuestReport, String> {
    let mut queue =
        VolumeQueue::new(volume, 0, config.inflight as u32, 1).map_err(|e| e.to_string())?;
    let mut buffers: Vec<Vec<u8>> = (0..config.inflight)
        .map(|_| vec![0u8; (config.blocks_max * BLOCK) as usize])
        .collect();
    let mut slots: Vec<Option<Inflight>> = (0..config.inflight).map(|_| None).collect();
    let mut rng = Rng::new(config.seed);
    let mut done: Vec<Completion> = Vec::new();
    let (mut ok, mut failed, mut serial) = (0u64, 0u64, 0u64);
    let blocks = (config.region.end - config.region.start) / BLOCK;
    let started = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let mut paused = false;
        while !stopping && !paused {
            let Some(slot) = slots.iter().position(Option::is_none) else {
                break;
            };
            let rate = config.requests_per_s_max;
            if rate > 0 && serial >= (started.elapsed().as_secs_f64() * rate as f64) as u64 {
                break;
            }
            let n = 1 + rng.below(config.blocks_max.min(blocks));
            let start = config.region.start + rng.below(blocks - n + 1) * BLOCK;
            let range = start..start + n * BLOCK;
            if slots
                .iter()
                .flatten()
                .any(|f| f.range.start < range.end && range.start < f.range.end)
            {
                break; // overlaps a request in flight: try again next round
            }
            serial += 1;
            let zero = config.zero_every > 0 && serial % config.zero_every == 0;
            let buf = &mut buffers[slot];
            let iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: (n * BLOCK) as usize,
            }];
            let op = if zero && serial % 2 == 0 {
                BlockOp::Discard {
                    offset_bytes: start,
                    len_bytes: n * BLOCK,
                }
            } else if zero {
                BlockOp::WriteZeroes {
                    offset_bytes: start,
                    len_bytes: n * BLOCK,
                    unmap: false,
                }
            } else {
                for (i, b) in buf[..(n * BLOCK) as usize].iter_mut().enumerate() {
                    *b = (serial.wrapping_mul(131) as usize + i * 7 + (i >> 9)) as u8 | 1;
                }
                BlockOp::Write {
                    offset_bytes: start,
                    iovecs: &iov,
                }
            };
            // SAFETY: the buffer of slot `slot` is neither touched nor freed until the
            // completion with tag `slot` has been reaped below.
            match unsafe { queue.submit(op, slot as u64) } {
                Ok(()) => slots[slot] = Some(Inflight { range, zero }),
                Err(Rejected::Paused) => paused = true,
                Err(Rejected::Full) => break,
            }
        }
        queue.commit().map_err(|e| e.to_string())?;
        if stopping && queue.inflight() == 0 {
            break;
        }
        if queue.inflight() == 0 {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        wait_readable(queue.notify_fd(), 5);
        queue.clear_notification();
        queue.reap(&mut done);
        for c in done.drain(..) {
            let slot = c.tag as usize;
            let Some(f) = slots[slot].take() else {
                continue;
            };
            completed.fetch_add(1, Ordering::Relaxed);
            if c.result.is_err() {
                failed += 1;
                continue;
            }
            ok += 1;
            let dst = &mut model[f.range.start as usize..f.range.end as usize];
            if f.zero {
                dst.fill(0);
            } else {
                dst.copy_from_slice(&buffers[slot][..dst.len()]);
            }
        }
    }
    Ok(GuestReport { model, ok, failed })
}
