//! A thin test client over libblkio (`blkio` crate, driver `virtio-blk-vhost-user`): connects to
//! a vhost-user-blk socket and runs batches of requests with many in flight per queue.
//!
//! All I/O buffers live in one memory region shared with the backend (`buf`/`buf_mut`); requests
//! name a byte range of it. libblkio uses 3 ring slots per request and keeps requests that do not
//! fit in the ring in its own backlog, so a batch may be larger than the ring.

use anyhow::{bail, ensure, Context as _, Result};
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

/// Bound on waiting for one batch to complete.
pub const BATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Completions fetched per `do_io` call.
const COMPLETIONS_PER_CALL: usize = 64;

/// One request of a batch. Buffers are byte ranges of the client's memory region.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Read {
        offset_bytes: u64,
        len_bytes: usize,
        buf_offset: usize,
    },
    Write {
        offset_bytes: u64,
        len_bytes: usize,
        buf_offset: usize,
        fua: bool,
    },
    Flush,
    Discard {
        offset_bytes: u64,
        len_bytes: u64,
    },
    WriteZeroes {
        offset_bytes: u64,
        len_bytes: u64,
        no_unmap: bool,
    },
}

/// Connection options.
#[derive(Clone, Debug)]
pub struct BlkioOpts {
    /// Number of request queues to start.
    pub num_queues: u16,
    /// Ring size per queue (power of two; None: libblkio's default of 256).
    pub queue_size: Option<u16>,
    /// Size of the shared buffer region.
    pub buf_bytes: usize,
    /// Open the device read-only (libblkio refuses to start a read-only device otherwise).
    pub read_only: bool,
}

impl Default for BlkioOpts {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: None,
            buf_bytes: 4 << 20,
            read_only: false,
        }
    }
}

/// A started libblkio instance with its queues and one mapped buffer region.
pub struct BlkioClient {
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    capacity_bytes: u64,
    // Dropped last: the queues and region belong to it.
    blkio: Blkio,
}

fn blk<T>(step: &str, r: blkio::Result<T>) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("libblkio {step}: {} (errno {})", e.message(), e.errno()))
}

impl BlkioClient {
    /// Connects to `socket`, starts `opts.num_queues` queues and maps a buffer region.
    pub fn connect(socket: &Path, opts: &BlkioOpts) -> Result<Self> {
        let path = socket.to_str().context("socket path is not UTF-8")?;
        let mut blkio = blk("new", Blkio::new("virtio-blk-vhost-user"))?;
        blk("set path", blkio.set_str("path", path))?;
        if opts.read_only {
            blk("set read-only", blkio.set_bool("read-only", true))?;
        }
        blk("connect", blkio.connect())?;
        blk(
            "set num-queues",
            blkio.set_i32("num-queues", i32::from(opts.num_queues)),
        )?;
        if let Some(size) = opts.queue_size {
            blk(
                "set queue-size",
                blkio.set_i32("queue-size", i32::from(size)),
            )?;
        }
        let capacity_bytes = blk("get capacity", blkio.get_u64("capacity"))?;
        let outcome = blk("start", blkio.start())?;
        let align = blk(
            "get mem-region-alignment",
            blkio.get_u64("mem-region-alignment"),
        )?;
        let align = usize::try_from(align.max(4096)).context("alignment")?;
        let len = opts.buf_bytes.div_ceil(align) * align;
        let region = blk("alloc_mem_region", blkio.alloc_mem_region(len))?;
        blk("map_mem_region", blkio.map_mem_region(&region))?;
        Ok(Self {
            queues: outcome.queues,
            region,
            capacity_bytes,
            blkio,
        })
    }

    /// The device size the backend reported.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Reads a libblkio property (e.g. "max-segments", "max-queue-size").
    pub fn property_u64(&self, name: &str) -> Result<u64> {
        blk(name, self.blkio.get_u64(name))
    }

    /// Reads a libblkio integer property (e.g. "request-alignment").
    pub fn property_i32(&self, name: &str) -> Result<i32> {
        blk(name, self.blkio.get_i32(name))
    }

    /// The shared buffer region.
    pub fn buf(&self) -> &[u8] {
        // SAFETY: the region is a live mmap of `len` bytes owned by `self.blkio`; requests that
        // write to it are only in flight inside `run_*`, which take `&mut self`.
        unsafe { std::slice::from_raw_parts(self.region.addr as *const u8, self.region.len) }
    }

    /// The shared buffer region, writable.
    pub fn buf_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `buf`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Submits all `ops` on queue `queue` at once and waits for all; returns each op's `ret`
    /// (0 or a negative errno) in submission order.
    pub fn run_batch(&mut self, queue: usize, ops: &[Op]) -> Result<Vec<i32>> {
        let mut per_queue = vec![Vec::new(); self.queues.len()];
        *per_queue.get_mut(queue).context("no such queue")? = ops.to_vec();
        Ok(self.run_batches(&per_queue)?.swap_remove(queue))
    }

    /// Runs one batch per queue concurrently (batch i on queue i); per-op results as `run_batch`.
    pub fn run_batches(&mut self, per_queue: &[Vec<Op>]) -> Result<Vec<Vec<i32>>> {
        let results = self.run_batches_within(per_queue, BATCH_TIMEOUT)?;
        let pending: Vec<usize> = results
            .iter()
            .map(|r| r.iter().filter(|x| x.is_none()).count())
            .collect();
        ensure!(
            pending.iter().all(|&n| n == 0),
            "batch timed out after {BATCH_TIMEOUT:?}; still pending per queue: {pending:?}"
        );
        Ok(results
            .into_iter()
            .map(|r| r.into_iter().map(|x| x.unwrap_or(i32::MIN)).collect())
            .collect())
    }

    /// Like `run_batches`, but gives up after `timeout` instead of failing: requests that did
    /// not complete by then are `None` (e.g. the backend went away mid-batch).
    pub fn run_batches_within(
        &mut self,
        per_queue: &[Vec<Op>],
        timeout: Duration,
    ) -> Result<Vec<Vec<Option<i32>>>> {
        self.submit_batches(per_queue)?;
        let lens: Vec<usize> = per_queue.iter().map(Vec::len).collect();
        self.reap_batches(&lens, timeout)
    }

    /// Submits one batch per queue (batch i on queue i) and returns with all of them in
    /// flight; [`reap_batches`](Self::reap_batches) collects them.
    pub fn submit_batches(&mut self, per_queue: &[Vec<Op>]) -> Result<()> {
        ensure!(
            per_queue.len() <= self.queues.len(),
            "more batches than queues"
        );
        for (q, ops) in per_queue.iter().enumerate() {
            for (i, op) in ops.iter().enumerate() {
                self.submit(q, *op, i)?;
            }
        }
        Ok(())
    }

    /// Collects the completions of the batches submitted last, `lens[i]` requests on queue
    /// i, for up to `timeout`: per-op results as `run_batches_within`.
    pub fn reap_batches(
        &mut self,
        lens: &[usize],
        timeout: Duration,
    ) -> Result<Vec<Vec<Option<i32>>>> {
        let mut results: Vec<Vec<Option<i32>>> = lens.iter().map(|&n| vec![None; n]).collect();
        self.reap_until(&mut results, lens.iter().sum(), timeout)?;
        Ok(results)
    }

    /// Collects completions of the batches submitted last into `results` (`None`: not
    /// completed yet, one list per queue) until `at_least` requests have completed in all,
    /// or `timeout` passed.
    pub fn reap_until(
        &mut self,
        results: &mut [Vec<Option<i32>>],
        at_least: usize,
        timeout: Duration,
    ) -> Result<()> {
        let completed = |r: &[Vec<Option<i32>>]| r.iter().flatten().filter(|x| x.is_some()).count();
        let mut pending: Vec<usize> = results
            .iter()
            .map(|r| r.iter().filter(|x| x.is_none()).count())
            .collect();
        let deadline = Instant::now() + timeout;
        while completed(results) < at_least
            && pending.iter().any(|&n| n > 0)
            && Instant::now() < deadline
        {
            self.reap(results, &mut pending)?;
        }
        Ok(())
    }

    /// Like `run_batch`, failing on the first request with a non-zero result.
    pub fn run_batch_ok(&mut self, queue: usize, ops: &[Op]) -> Result<()> {
        let results = self.run_batch(queue, ops)?;
        for (i, ret) in results.iter().enumerate() {
            ensure!(*ret == 0, "request {i} ({:?}) failed: ret {ret}", ops[i]);
        }
        Ok(())
    }

    fn submit(&mut self, queue: usize, op: Op, tag: usize) -> Result<()> {
        let base = self.region.addr;
        let region_len = self.region.len;
        let in_region =
            |off: usize, len: usize| off.checked_add(len).is_some_and(|e| e <= region_len);
        let q = &mut self.queues[queue];
        match op {
            Op::Read {
                offset_bytes,
                len_bytes,
                buf_offset,
            } => {
                ensure!(
                    in_region(buf_offset, len_bytes),
                    "read buffer outside region"
                );
                q.read(
                    offset_bytes,
                    (base + buf_offset) as *mut u8,
                    len_bytes,
                    tag,
                    ReqFlags::empty(),
                );
            }
            Op::Write {
                offset_bytes,
                len_bytes,
                buf_offset,
                fua,
            } => {
                ensure!(
                    in_region(buf_offset, len_bytes),
                    "write buffer outside region"
                );
                let flags = if fua {
                    ReqFlags::FUA
                } else {
                    ReqFlags::empty()
                };
                q.write(
                    offset_bytes,
                    (base + buf_offset) as *const u8,
                    len_bytes,
                    tag,
                    flags,
                );
            }
            Op::Flush => q.flush(tag, ReqFlags::empty()),
            Op::Discard {
                offset_bytes,
                len_bytes,
            } => {
                q.discard(offset_bytes, len_bytes, tag, ReqFlags::empty());
            }
            Op::WriteZeroes {
                offset_bytes,
                len_bytes,
                no_unmap,
            } => {
                let flags = if no_unmap {
                    ReqFlags::NO_UNMAP
                } else {
                    ReqFlags::empty()
                };
                q.write_zeroes(offset_bytes, len_bytes, tag, flags);
            }
        }
        Ok(())
    }

    /// One pass over the queues with pending requests: wait briefly for completions on each.
    fn reap(&mut self, results: &mut [Vec<Option<i32>>], pending: &mut [usize]) -> Result<()> {
        let mut completions: Vec<MaybeUninit<Completion>> = (0..COMPLETIONS_PER_CALL)
            .map(|_| MaybeUninit::uninit())
            .collect();
        for (q, queue) in self.queues.iter_mut().enumerate().take(pending.len()) {
            if pending[q] == 0 {
                continue;
            }
            let mut timeout = Duration::from_millis(10);
            let n = match queue.do_io(&mut completions, 0, Some(&mut timeout), None) {
                Ok(n) => n,
                Err(e) => bail!(
                    "libblkio do_io on queue {q}: {} ({})",
                    e.message(),
                    e.errno()
                ),
            };
            let n = if n == 0 {
                let mut timeout = Duration::from_millis(10);
                match queue.do_io(&mut completions, 1, Some(&mut timeout), None) {
                    Ok(n) => n,
                    Err(e) if e.errno() == blkio::Errno::TIME => 0,
                    Err(e) => bail!(
                        "libblkio do_io on queue {q}: {} ({})",
                        e.message(),
                        e.errno()
                    ),
                }
            } else {
                n
            };
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_ref() };
                let slot = results[q]
                    .get_mut(c.user_data)
                    .context("completion with unknown tag")?;
                ensure!(
                    slot.is_none(),
                    "request {} on queue {q} completed twice",
                    c.user_data
                );
                *slot = Some(c.ret);
                pending[q] -= 1;
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset_bytes` as `chunk_bytes`-sized requests, all in flight at once on
    /// queue 0 (the data is staged in the buffer region, which must hold it).
    pub fn write_all(&mut self, offset_bytes: u64, data: &[u8], chunk_bytes: usize) -> Result<()> {
        ensure!(
            data.len() <= self.region.len,
            "data larger than the buffer region"
        );
        self.buf_mut()[..data.len()].copy_from_slice(data);
        let ops: Vec<Op> = chunks(data.len(), chunk_bytes)
            .map(|(off, len)| Op::Write {
                offset_bytes: offset_bytes + off as u64,
                len_bytes: len,
                buf_offset: off,
                fua: false,
            })
            .collect();
        self.run_batch_ok(0, &ops)
    }

    /// Reads `len_bytes` at `offset_bytes` as `chunk_bytes`-sized requests in flight at once.
    pub fn read_all(
        &mut self,
        offset_bytes: u64,
        len_bytes: usize,
        chunk_bytes: usize,
    ) -> Result<Vec<u8>> {
        ensure!(
            len_bytes <= self.region.len,
            "read larger than the buffer region"
        );
        self.buf_mut()[..len_bytes].fill(0xEE);
        let ops: Vec<Op> = chunks(len_bytes, chunk_bytes)
            .map(|(off, len)| Op::Read {
                offset_bytes: offset_bytes + off as u64,
                len_bytes: len,
                buf_offset: off,
            })
            .collect();
        self.run_batch_ok(0, &ops)?;
        Ok(self.buf()[..len_bytes].to_vec())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.run_batch_ok(0, &[Op::Flush])
    }
}

/// (offset, len) pieces of `total` bytes, each at most `chunk` long.
fn chunks(total: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..total)
        .step_by(chunk)
        .map(move |off| (off, chunk.min(total - off)))
}
