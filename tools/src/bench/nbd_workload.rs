//! `ferry bench --nbd`: one connection's load loop. Keeps `qd` requests in flight on one
//! NBD connection (pipelined: a new request goes out as soon as a reply comes back), on a
//! non-blocking socket: requests are written in batches (`writev`, write payloads from one
//! shared buffer), replies read in large chunks, read data dropped as it arrives.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use anyhow::{bail, Context};
use ferry_engine::nbd::protocol::{
    command_name, RequestHeader, SimpleReply, NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE,
    REQUEST_HEADER_BYTES, SIMPLE_REPLY_BYTES,
};

use super::histogram::Histogram;
use super::nbd_connection::NbdStream;
use super::workload::{
    LiveCounters, Pattern, QueueResult, COMPLETION_TIMEOUT, PHASE_MEASURE, PHASE_STOP,
};

/// Bytes read from the socket at once.
const RECV_BUFFER_BYTES: usize = 1 << 20;
/// Requests written by one `writev` at most (a header and a payload each).
const SEND_BATCH: usize = 64;

/// What one connection does.
#[derive(Clone, Copy, Debug)]
pub struct NbdJob {
    pub pattern: Pattern,
    pub rwmix_read_percent: u8,
    pub block_bytes: u64,
    pub queue_depth: usize,
    pub first_block: u64,
    pub region_blocks: u64,
    pub poll: bool,
    pub seed: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    started: Instant,
    header: [u8; REQUEST_HEADER_BYTES],
    is_write: bool,
}

struct Runner<'a> {
    stream: NbdStream,
    job: NbdJob,
    rng: u64,
    next_seq_block: u64,
    slots: Vec<Slot>,
    in_flight: usize,
    /// Requests to send, and the bytes of the first already sent.
    to_send: VecDeque<usize>,
    sent_of_first: usize,
    write_data: Vec<u8>,
    recv: Vec<u8>,
    recv_len: usize,
    /// Bytes of read data still to drop, for the reply being received.
    data_left: usize,
    counters: &'a LiveCounters,
}

impl Runner<'_> {
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Picks the next request and queues it for sending in `slot`.
    fn submit(&mut self, slot: usize, now: Instant) {
        let job = self.job;
        let block = if matches!(job.pattern, Pattern::Read | Pattern::Write) {
            let b = (job.first_block + self.next_seq_block) % job.region_blocks;
            self.next_seq_block += 1;
            b
        } else {
            self.random() % job.region_blocks
        };
        let is_write = match job.pattern {
            Pattern::Randread | Pattern::Read => false,
            Pattern::Randwrite | Pattern::Write => true,
            Pattern::Randrw => self.random() % 100 >= u64::from(job.rwmix_read_percent),
        };
        let header = RequestHeader {
            flags: 0,
            command: if is_write {
                NBD_CMD_WRITE
            } else {
                NBD_CMD_READ
            },
            cookie: slot as u64,
            offset_bytes: block * job.block_bytes,
            len_bytes: job.block_bytes as u32,
        };
        self.slots[slot] = Slot {
            started: now,
            header: header.encode(),
            is_write,
        };
        self.to_send.push_back(slot);
        self.in_flight += 1;
    }

    /// Sends queued requests until none is left or the socket is full.
    fn send(&mut self) -> anyhow::Result<bool> {
        let mut progressed = false;
        while !self.to_send.is_empty() {
            let mut parts = [IoSlice::new(&[]); 2 * SEND_BATCH];
            let (mut count, mut offered, mut skip) = (0, 0, self.sent_of_first);
            for &slot in self.to_send.iter().take(SEND_BATCH) {
                let s = &self.slots[slot];
                let payload: &[u8] = if s.is_write { &self.write_data } else { &[] };
                for part in [&s.header[..], payload] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    parts[count] = IoSlice::new(&part[skip..]);
                    offered += part.len() - skip;
                    skip = 0;
                    count += 1;
                }
            }
            let sent = match self.stream.send(&parts[..count]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("send requests"),
            };
            progressed = true;
            self.advance(sent);
            if sent < offered {
                break;
            }
        }
        self.stream.flush().context("send requests")?;
        Ok(progressed)
    }

    fn advance(&mut self, sent: usize) {
        let mut sent = sent + self.sent_of_first;
        while let Some(&slot) = self.to_send.front() {
            let len = REQUEST_HEADER_BYTES
                + if self.slots[slot].is_write {
                    self.write_data.len()
                } else {
                    0
                };
            if sent < len {
                self.sent_of_first = sent;
                return;
            }
            sent -= len;
            self.to_send.pop_front();
        }
        self.sent_of_first = 0;
    }

    /// Reads replies; returns the slots whose reply is complete into `done`.
    fn receive(&mut self, done: &mut Vec<usize>) -> anyhow::Result<bool> {
        let n = match self.stream.recv(&mut self.recv[self.recv_len..]) {
            Ok(0) => bail!("the server closed the connection"),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e).context("receive replies"),
        };
        self.recv_len += n;
        let mut at = 0;
        loop {
            if self.data_left > 0 {
                let take = self.data_left.min(self.recv_len - at);
                self.data_left -= take;
                at += take;
                if self.data_left > 0 {
                    break;
                }
            }
            if self.recv_len - at < SIMPLE_REPLY_BYTES {
                break;
            }
            let reply = SimpleReply::decode(&self.recv[at..at + SIMPLE_REPLY_BYTES])?;
            at += SIMPLE_REPLY_BYTES;
            let slot = usize::try_from(reply.cookie)
                .ok()
                .filter(|&s| s < self.slots.len())
                .context("a reply to no request")?;
            let s = self.slots[slot];
            if reply.error != 0 {
                let header = RequestHeader::decode(&s.header)?;
                bail!(
                    "{} of {} bytes at offset {} failed: error {}",
                    command_name(header.command),
                    header.len_bytes,
                    header.offset_bytes,
                    reply.error
                );
            }
            if !s.is_write {
                self.data_left = self.job.block_bytes as usize;
            }
            done.push(slot);
        }
        self.recv.copy_within(at..self.recv_len, 0);
        self.recv_len -= at;
        Ok(true)
    }

    /// Sleeps until the socket is readable (or writable, with requests to send).
    fn wait(&self) -> anyhow::Result<()> {
        let mut events = libc::POLLIN;
        if !self.to_send.is_empty() || self.stream.has_pending_output() {
            events |= libc::POLLOUT;
        }
        let mut fd = libc::pollfd {
            fd: self.stream.fd(),
            events,
            revents: 0,
        };
        let timeout_ms = COMPLETION_TIMEOUT.as_millis() as i32;
        // SAFETY: poll(2) on one pollfd on this stack frame.
        let ready = unsafe { libc::poll(&mut fd, 1, timeout_ms) };
        if ready == 0 {
            bail!("no reply within {COMPLETION_TIMEOUT:?}: the server stalled");
        }
        Ok(())
    }
}

/// Runs one connection until `phase` becomes [`PHASE_STOP`], then drains it and sends
/// `NBD_CMD_DISC`.
pub fn run_connection(
    stream: NbdStream,
    job: NbdJob,
    phase: &AtomicU8,
    counters: &LiveCounters,
) -> anyhow::Result<QueueResult> {
    let now = Instant::now();
    let idle = Slot {
        started: now,
        header: [0; REQUEST_HEADER_BYTES],
        is_write: false,
    };
    let mut r = Runner {
        stream,
        job,
        rng: job.seed | 1,
        next_seq_block: 0,
        slots: vec![idle; job.queue_depth],
        in_flight: 0,
        to_send: VecDeque::with_capacity(job.queue_depth),
        sent_of_first: 0,
        write_data: (0..job.block_bytes).map(|i| (i % 251) as u8 | 1).collect(),
        recv: vec![0; RECV_BUFFER_BYTES],
        recv_len: 0,
        data_left: 0,
        counters,
    };
    let mut result = QueueResult {
        latency_ns: Histogram::new(),
        read_ops: 0,
        write_ops: 0,
    };
    for slot in 0..job.queue_depth {
        r.submit(slot, now);
    }
    let mut done = Vec::with_capacity(job.queue_depth);
    loop {
        let current = phase.load(Ordering::Acquire);
        if current == PHASE_STOP && r.in_flight == 0 {
            break;
        }
        let mut progressed = r.send()?;
        progressed |= r.receive(&mut done)?;
        let now = Instant::now();
        for slot in done.drain(..) {
            r.in_flight -= 1;
            let s = r.slots[slot];
            if current == PHASE_MEASURE {
                let ns = now.saturating_duration_since(s.started).as_nanos();
                result
                    .latency_ns
                    .record(u64::try_from(ns).unwrap_or(u64::MAX));
                if s.is_write {
                    result.write_ops += 1;
                } else {
                    result.read_ops += 1;
                }
            }
            r.counters.ops.fetch_add(1, Ordering::Relaxed);
            if current != PHASE_STOP {
                r.submit(slot, now);
            }
        }
        if !progressed && !job.poll {
            r.wait()?;
        }
    }
    let disc = RequestHeader::DISCONNECT;
    debug_assert_eq!(disc.command, NBD_CMD_DISC);
    let _ = r.stream.send(&[IoSlice::new(&disc.encode())]);
    let _ = r.stream.flush();
    Ok(result)
}
