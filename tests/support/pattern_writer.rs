//! A libblkio client thread that writes random data at random offsets of a vhost-user-blk
//! device with many requests in flight, and keeps the content the disk must end up with.
//!
//! Each batch holds `inflight` non-overlapping writes (overlapping writes in flight at once
//! have no defined order, so the expected content would be ambiguous); the model is updated
//! with every write that completed with success. Writes can be aimed at a moving window
//! (`aim_at`), e.g. at the chunks a migration is copying right now.

use super::blkio_client::{BlkioClient, BlkioOpts, Op};
use anyhow::{bail, ensure, Context as _, Result};
use ferry_test_support::{wait_until, Rng};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Writes are aligned to this and are a multiple of it.
pub const BLOCK_BYTES: u64 = 4096;

/// How the writer writes.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Seed of the offsets, lengths and data.
    pub seed: u64,
    /// Writes per batch, all in flight at once.
    pub inflight: usize,
    /// The longest write (a multiple of `BLOCK_BYTES`).
    pub write_bytes_max: u64,
    /// Sleep between batches (zero: write as fast as the backend allows).
    pub pace: Duration,
    /// Writes land in `[window_start, window_start + window_bytes)`; `None`: anywhere.
    pub window_bytes: Option<u64>,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            inflight: 32,
            write_bytes_max: 64 << 10,
            pace: Duration::ZERO,
            window_bytes: None,
        }
    }
}

/// What the writer did.
#[derive(Debug)]
pub struct WriterReport {
    /// The content the disk must hold.
    pub model: Vec<u8>,
    pub ok_writes: u64,
    pub failed_writes: u64,
    /// The first few failures.
    pub errors: Vec<String>,
}

impl WriterReport {
    /// Fails when any write failed.
    pub fn ensure_no_error(&self) -> Result<()> {
        ensure!(
            self.failed_writes == 0,
            "{} client writes failed (of {}): {:?}",
            self.failed_writes,
            self.failed_writes + self.ok_writes,
            self.errors
        );
        Ok(())
    }
}

/// A running writer; stop it with [`PatternWriter::stop`].
pub struct PatternWriter {
    stop: Arc<AtomicBool>,
    batches: Arc<AtomicU64>,
    window_start: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<WriterReport>>>,
}

impl PatternWriter {
    /// Connects to `socket` in a new thread and writes until stopped; `initial` is the disk's
    /// content now. Returns once the first batch has completed.
    pub fn spawn(socket: &Path, initial: Vec<u8>, config: WriterConfig) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let batches = Arc::new(AtomicU64::new(0));
        let window_start = Arc::new(AtomicU64::new(0));
        let shared = (stop.clone(), batches.clone(), window_start.clone());
        let socket: PathBuf = socket.to_path_buf();
        let handle = std::thread::Builder::new()
            .name("pattern-writer".into())
            .spawn(move || run(&socket, initial, &config, &shared.0, &shared.1, &shared.2))
            .context("spawn writer thread")?;
        let mut writer = Self {
            stop,
            batches,
            window_start,
            handle: Some(handle),
        };
        if let Err(e) = writer.wait_batches(1, Duration::from_secs(30)) {
            writer.stop.store(true, Ordering::Release);
            return match writer.join() {
                Err(thread_err) => Err(thread_err.context(e)),
                Ok(_) => Err(e),
            };
        }
        Ok(writer)
    }

    /// Batches completed so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Acquire)
    }

    /// Waits until `n` batches have completed in total.
    pub fn wait_batches(&self, n: u64, timeout: Duration) -> Result<()> {
        wait_until(&format!("{n} writer batches"), timeout, || {
            let ended = self.handle.as_ref().is_none_or(JoinHandle::is_finished);
            ensure!(
                self.batches() >= n || !ended,
                "the writer thread ended after {} batches",
                self.batches()
            );
            Ok(self.batches() >= n)
        })
        .with_context(|| format!("the writer did {} batches", self.batches()))
    }

    /// Waits for `n` more batches than now.
    pub fn wait_more(&self, n: u64, timeout: Duration) -> Result<()> {
        self.wait_batches(self.batches() + n, timeout)
    }

    /// Moves the write window (with `window_bytes` set) to start at `offset_bytes`.
    pub fn aim_at(&self, offset_bytes: u64) {
        self.window_start.store(offset_bytes, Ordering::Release);
    }

    /// Stops after the current batch and returns the report.
    pub fn stop(mut self) -> Result<WriterReport> {
        self.stop.store(true, Ordering::Release);
        self.join()
    }

    fn join(&mut self) -> Result<WriterReport> {
        let handle = self.handle.take().context("writer already stopped")?;
        match handle.join() {
            Ok(report) => report,
            Err(_) => bail!("the writer thread panicked"),
        }
    }
}

impl Drop for PatternWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The writer thread.
fn run(
    socket: &Path,
    mut model: Vec<u8>,
    config: &WriterConfig,
    stop: &AtomicBool,
    batches: &AtomicU64,
    window_start: &AtomicU64,
) -> Result<WriterReport> {
    let opts = BlkioOpts {
        num_queues: 1,
        queue_size: Some(256),
        buf_bytes: config.inflight * config.write_bytes_max as usize,
        ..BlkioOpts::default()
    };
    let mut client = BlkioClient::connect(socket, &opts)
        .with_context(|| format!("writer: connect to {}", socket.display()))?;
    let capacity = client.capacity_bytes();
    ensure!(
        capacity == model.len() as u64,
        "device has {capacity} bytes, the model {}",
        model.len()
    );
    let mut rng = Rng::new(config.seed);
    let mut report = WriterReport {
        model: Vec::new(),
        ok_writes: 0,
        failed_writes: 0,
        errors: Vec::new(),
    };
    while !stop.load(Ordering::Acquire) {
        let window = match config.window_bytes {
            Some(len) => {
                let start = window_start.load(Ordering::Acquire).min(capacity - len);
                (start / BLOCK_BYTES * BLOCK_BYTES, len)
            }
            None => (0, capacity),
        };
        let ops = plan_batch(&mut rng, config, window);
        let data_len: usize = ops.iter().map(|&(_, len)| len as usize).sum();
        rng.fill(&mut client.buf_mut()[..data_len]);
        let mut requests = Vec::with_capacity(ops.len());
        let mut buf_offset = 0;
        for &(offset_bytes, len) in &ops {
            requests.push(Op::Write {
                offset_bytes,
                len_bytes: len as usize,
                buf_offset,
                fua: false,
            });
            buf_offset += len as usize;
        }
        let results = client.run_batch(0, &requests).context("writer batch")?;
        for (op, ret) in requests.iter().zip(results) {
            let Op::Write {
                offset_bytes,
                len_bytes,
                buf_offset,
                ..
            } = *op
            else {
                continue;
            };
            if ret == 0 {
                let at = offset_bytes as usize;
                model[at..at + len_bytes]
                    .copy_from_slice(&client.buf()[buf_offset..buf_offset + len_bytes]);
                report.ok_writes += 1;
            } else {
                report.failed_writes += 1;
                if report.errors.len() < 8 {
                    report
                        .errors
                        .push(format!("write {len_bytes} at {offset_bytes}: ret {ret}"));
                }
            }
        }
        batches.fetch_add(1, Ordering::AcqRel);
        if !config.pace.is_zero() {
            std::thread::sleep(config.pace);
        }
    }
    report.model = model;
    Ok(report)
}

/// `inflight` non-overlapping (offset, len) writes inside `window` = (start, len).
fn plan_batch(rng: &mut Rng, config: &WriterConfig, window: (u64, u64)) -> Vec<(u64, u64)> {
    let (start, len) = window;
    let blocks = len / BLOCK_BYTES;
    let max_blocks = (config.write_bytes_max / BLOCK_BYTES).clamp(1, blocks.max(1));
    let mut ops: Vec<(u64, u64)> = Vec::with_capacity(config.inflight);
    let mut attempts = 0;
    while ops.len() < config.inflight && attempts < config.inflight * 8 {
        attempts += 1;
        let n = 1 + rng.below(max_blocks);
        let first = rng.below(blocks.saturating_sub(n) + 1);
        let (off, l) = (start + first * BLOCK_BYTES, n * BLOCK_BYTES);
        if ops.iter().all(|&(o, ol)| off + l <= o || o + ol <= off) {
            ops.push((off, l));
        }
    }
    ops
}
