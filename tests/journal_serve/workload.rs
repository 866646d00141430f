//! The guest side of the journal tests: a libblkio client on its own thread (so two volumes
//! are written at the same time), phases of non-overlapping requests spread over both
//! queues (writes, discards, write-zeroes, flushes), and an in-memory model of each volume.

use crate::support;
use anyhow::{anyhow, ensure, Context as _, Result};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;
use support::blkio_client::{BlkioClient, BlkioOpts, Op};

/// Request sizes of a phase: one sector to 128 KiB, most not multiples of 4 KiB.
const SIZES: [usize; 9] = [512, 1536, 4096, 4608, 8192, 12800, 65536, 66048, 131_072];

/// Per-op results of one phase: `None` when the request never completed.
pub type Results = Vec<Vec<Option<i32>>>;

/// One batch of requests for a client: the data to put in the buffer region first, and
/// one list of requests per queue, all submitted at once.
pub struct Phase {
    pub stage: Vec<u8>,
    pub per_queue: Vec<Vec<Op>>,
}

impl Phase {
    /// Non-overlapping requests from a seeded random start (wrapping at the end): `count`
    /// extents alternating between `queues` queues; every 13th a discard, every 13th
    /// (shifted) a write-zeroes; one flush in the middle of queue 0 and at the end of the
    /// last queue.
    pub fn random(seed: u64, image_bytes: u64, count: usize, queues: usize) -> Self {
        let mut rng = support::Rng::new(seed);
        let mut next = move || rng.next();
        let max_len = *SIZES.iter().max().unwrap_or(&0) as u64;
        let mut cursor = (next() % (image_bytes / 512)) * 512;
        let mut span = 0u64;
        let mut per_queue: Vec<Vec<Op>> = vec![Vec::new(); queues];
        let mut stage_len = 0usize;
        for i in 0..count {
            let len = SIZES[(next() % SIZES.len() as u64) as usize];
            let gap = 512 * (next() % 8);
            // Keep the whole phase inside one lap of the image, so nothing overlaps.
            if span + len as u64 + gap + max_len > image_bytes {
                break;
            }
            if cursor + len as u64 > image_bytes {
                span += image_bytes - cursor;
                cursor = 0;
            }
            let op = match i % 13 {
                5 => Op::Discard {
                    offset_bytes: cursor,
                    len_bytes: len as u64,
                },
                9 => Op::WriteZeroes {
                    offset_bytes: cursor,
                    len_bytes: len as u64,
                    no_unmap: i % 2 == 0,
                },
                _ => {
                    let op = Op::Write {
                        offset_bytes: cursor,
                        len_bytes: len,
                        buf_offset: stage_len,
                        fua: i % 7 == 3,
                    };
                    stage_len += len;
                    op
                }
            };
            per_queue[i % queues].push(op);
            if i == count / 2 {
                per_queue[0].push(Op::Flush);
            }
            cursor += len as u64 + gap;
            span += len as u64 + gap;
        }
        if let Some(last) = per_queue.last_mut() {
            last.push(Op::Flush);
        }
        Self {
            stage: support::pattern(seed ^ 0xDA7A, stage_len),
            per_queue,
        }
    }

    /// Plain writes of `block` bytes to consecutive slots from `first_slot`, round-robin over
    /// the queues, data from `seed` (the stage holds `distinct` blocks, reused in turn).
    pub fn sequential(
        seed: u64,
        first_slot: usize,
        count: usize,
        block: usize,
        distinct: usize,
        queues: usize,
    ) -> Self {
        let mut per_queue: Vec<Vec<Op>> = vec![Vec::new(); queues];
        for i in 0..count {
            per_queue[i % queues].push(Op::Write {
                offset_bytes: ((first_slot + i) * block) as u64,
                len_bytes: block,
                buf_offset: (i % distinct) * block,
                fua: false,
            });
        }
        Self {
            stage: support::pattern(seed, distinct * block),
            per_queue,
        }
    }

    pub fn ops(&self) -> usize {
        self.per_queue.iter().map(Vec::len).sum()
    }
}

/// What a volume should hold.
#[derive(Clone)]
pub struct Model {
    pub bytes: Vec<u8>,
}

impl Model {
    pub fn from_file(path: &Path) -> Result<Self> {
        Ok(Self {
            bytes: std::fs::read(path).with_context(|| format!("read {}", path.display()))?,
        })
    }

    /// Applies op `op` of a phase (its data taken from the phase's stage).
    pub fn apply(&mut self, phase: &Phase, op: &Op) {
        match *op {
            Op::Write {
                offset_bytes,
                len_bytes,
                buf_offset,
                ..
            } => {
                let at = offset_bytes as usize;
                self.bytes[at..at + len_bytes]
                    .copy_from_slice(&phase.stage[buf_offset..buf_offset + len_bytes]);
            }
            Op::Discard {
                offset_bytes,
                len_bytes,
            }
            | Op::WriteZeroes {
                offset_bytes,
                len_bytes,
                ..
            } => {
                let at = offset_bytes as usize;
                self.bytes[at..at + len_bytes as usize].fill(0);
            }
            Op::Read { .. } | Op::Flush => {}
        }
    }

    /// Applies every op of `phase` (all known to have succeeded).
    pub fn apply_all(&mut self, phase: &Phase) {
        for op in phase.per_queue.iter().flatten() {
            self.apply(phase, op);
        }
    }

    /// Applies every op of `phase` that succeeded; fails if any op failed outright.
    pub fn apply_completed(&mut self, phase: &Phase, results: &Results) -> Result<usize> {
        let mut done = 0;
        for (q, ops) in phase.per_queue.iter().enumerate() {
            for (i, op) in ops.iter().enumerate() {
                match results[q][i] {
                    Some(0) => {
                        self.apply(phase, op);
                        done += 1;
                    }
                    Some(ret) => anyhow::bail!("queue {q} request {i} ({op:?}) failed: {ret}"),
                    None => {}
                }
            }
        }
        Ok(done)
    }

    /// Fails unless `path` holds exactly the model's bytes.
    pub fn check_file(&self, path: &Path, what: &str) -> Result<()> {
        let file = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        same_bytes(&file, &self.bytes, what)
    }
}

/// Fails with the first differing byte.
pub fn same_bytes(got: &[u8], want: &[u8], what: &str) -> Result<()> {
    ensure!(
        got.len() == want.len(),
        "{what}: {} bytes, expected {}",
        got.len(),
        want.len()
    );
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        anyhow::bail!(
            "{what}: differs at byte {at} (sector {}): {:#04x}, expected {:#04x}",
            at / 512,
            got[at],
            want[at]
        );
    }
    Ok(())
}

enum Job {
    Run { phase: Phase, timeout: Duration },
}

/// A libblkio client living on its own thread.
pub struct Worker {
    jobs: Option<Sender<Job>>,
    results: Receiver<Result<(Phase, Results)>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Connects to `socket` with `queues` queues and a buffer region of `buf_bytes`.
    pub fn connect(socket: &Path, queues: u16, buf_bytes: usize) -> Result<Self> {
        let (jobs_tx, jobs_rx) = channel::<Job>();
        let (res_tx, res_rx) = channel();
        let (ready_tx, ready_rx) = channel();
        let socket: PathBuf = socket.to_path_buf();
        let opts = BlkioOpts {
            num_queues: queues,
            queue_size: Some(256),
            buf_bytes,
            ..BlkioOpts::default()
        };
        let thread = std::thread::Builder::new()
            .name("blkio-worker".into())
            .spawn(move || {
                let mut client = match BlkioClient::connect(&socket, &opts) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(c.num_queues()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(Job::Run { phase, timeout }) = jobs_rx.recv() {
                    let r = (|| {
                        ensure!(phase.stage.len() <= client.buf().len(), "stage too large");
                        client.buf_mut()[..phase.stage.len()].copy_from_slice(&phase.stage);
                        client.run_batches_within(&phase.per_queue, timeout)
                    })();
                    if res_tx.send(r.map(|r| (phase, r))).is_err() {
                        return;
                    }
                }
            })
            .context("spawn client thread")?;
        let queues_started = ready_rx
            .recv()
            .map_err(|_| anyhow!("client thread died"))??;
        ensure!(
            queues_started == usize::from(queues),
            "client started {queues_started} queues"
        );
        Ok(Self {
            jobs: Some(jobs_tx),
            results: res_rx,
            thread: Some(thread),
        })
    }

    /// Starts `phase` (returns at once).
    pub fn start(&self, phase: Phase, timeout: Duration) -> Result<()> {
        self.jobs
            .as_ref()
            .context("worker closed")?
            .send(Job::Run { phase, timeout })
            .map_err(|_| anyhow!("client thread is gone"))
    }

    /// Waits for the phase started last.
    pub fn finish(&self) -> Result<(Phase, Results)> {
        self.results
            .recv()
            .map_err(|_| anyhow!("client thread is gone"))?
    }

    /// Runs `phase`, requiring every request to succeed; returns the phase for the model.
    pub fn run_ok(&self, phase: Phase) -> Result<Phase> {
        self.start(phase, support::blkio_client::BATCH_TIMEOUT)?;
        let (phase, results) = self.finish()?;
        for (q, r) in results.iter().enumerate() {
            for (i, ret) in r.iter().enumerate() {
                ensure!(
                    *ret == Some(0),
                    "queue {q} request {i} ({:?}): {ret:?}",
                    phase.per_queue[q][i]
                );
            }
        }
        Ok(phase)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
