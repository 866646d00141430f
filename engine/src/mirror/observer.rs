//! The mirror's write observer and the workers that write mirrored guest writes to the target.
//!
//! In `background` mode a guest write only marks its chunks dirty. In `active` mode every
//! guest write also reaches the target before the guest sees it complete:
//! - a write of data to a local file or block device target is a *leg* of the guest's
//!   request ([`Observed::Leg`]): the volume's queue writes the guest's buffers to the target
//!   on its own ring beside the source write, and reports back in `leg_done`;
//! - everything else (writes to an NBD target, discards, write-zeroes, flushes) is copied
//!   and queued, with the guest's [`ObserverTicket`], for a mirror worker, which writes it
//!   to the target and then releases the guest.
//!
//! The guest's write never fails for the target's sake: the source write is what the guest
//! depends on, and a target that fails only fails the job (tickets complete with
//! `ok = true`, a failed leg fails the job). The workers' queue is bounded by the guest
//! itself: it holds at most one entry per guest request in flight.
//!
//! Either way, a write observed while the copier is copying its chunk marks the chunk dirty
//! (`dirty_bitmap`), so the copier's older data never has the last word on the target.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::destination::OwnedWrite;
use super::job::JobShared;
use super::options::MirrorMode;
use crate::observer::{LegTarget, Observed, ObserverTicket, WriteEvent, WriteKind, WriteObserver};
use crate::IoFailure;

/// What a mirror worker does to the target for one guest request.
pub(crate) enum MirrorOp {
    Write {
        offset_bytes: u64,
        data: Vec<u8>,
    },
    Zero {
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
    },
    Flush,
}

/// The range of a volume a queued `active` guest write covers: held unsettled in the chunk
/// table until its target write has ended (`ChunkTable::hold`), so that the job file keeps
/// it armed while the target may lag the source.
#[derive(Clone, Copy)]
pub(crate) struct Settle {
    volume_index: usize,
    offset_bytes: u64,
    len_bytes: u64,
}

impl Settle {
    fn done(self, job: &JobShared) {
        if let Ok(mut table) = job.volumes[self.volume_index].table.lock() {
            table.end_write(self.offset_bytes, self.len_bytes);
        }
    }
}

/// A guest request waiting for a mirror worker.
type Queued = (MirrorOp, ObserverTicket, Option<Settle>);

#[derive(Default)]
struct QueueInner {
    ops: VecDeque<Queued>,
    closed: bool,
    /// Workers waiting for ops: a push wakes one only when some wait (a condvar notify is
    /// a system call even with nobody to wake).
    sleepers: usize,
}

/// The most ops a mirror worker takes under one lock; other workers take the rest.
const OPS_PER_TAKE: usize = 16;

/// How long an idle worker waits for ops before it looks for overdue pipelined writes.
const IDLE_WAIT: Duration = Duration::from_millis(500);

/// What [`MirrorQueue::take`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Take {
    Taken,
    /// Nothing within the wait.
    Idle,
    Closed,
}

/// Guest writes waiting for a mirror worker. Once closed it takes nothing more, so that no
/// ticket can be left behind by workers that have stopped.
#[derive(Default)]
pub(crate) struct MirrorQueue {
    inner: Mutex<QueueInner>,
    ready: Condvar,
}

impl MirrorQueue {
    /// Queues an op; hands the ticket (and the range to settle) back when the queue is
    /// closed.
    fn push(&self, item: Queued) -> Result<(), (ObserverTicket, Option<Settle>)> {
        let Ok(mut inner) = self.inner.lock() else {
            return Err((item.1, item.2));
        };
        if inner.closed {
            return Err((item.1, item.2));
        }
        inner.ops.push_back(item);
        if inner.sleepers > 0 {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Moves up to [`OPS_PER_TAKE`] ops into `out` (empty), waiting for one at most `wait`.
    /// With `spread`, takes only a fair share when other workers wait and wakes one for the
    /// rest.
    fn take(&self, out: &mut Vec<Queued>, spread: bool, wait: Duration) -> Take {
        let Ok(mut inner) = self.inner.lock() else {
            return Take::Closed;
        };
        loop {
            if !inner.ops.is_empty() {
                // Over a remote target whose writes each wait on a worker (`spread`), a fair
                // share when other workers wait, so that the queued writes wait their round
                // trips at once, not one after another on one worker; the rest goes to a
                // woken worker. Otherwise one worker takes many (fewer locks and wake-ups).
                let n = ops_to_take(inner.ops.len(), inner.sleepers, spread);
                out.extend(inner.ops.drain(..n));
                if spread && !inner.ops.is_empty() && inner.sleepers > 0 {
                    self.ready.notify_one();
                }
                return Take::Taken;
            }
            if inner.closed {
                return Take::Closed;
            }
            inner.sleepers += 1;
            let woken = self.ready.wait_timeout(inner, wait);
            let Ok((woken, timeout)) = woken else {
                return Take::Closed;
            };
            inner = woken;
            inner.sleepers -= 1;
            if timeout.timed_out() && inner.ops.is_empty() && !inner.closed {
                return Take::Idle;
            }
        }
    }

    pub(crate) fn close(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.closed = true;
        }
        self.ready.notify_all();
    }
}

/// How many of `queued` ops a worker takes when `sleepers` other workers wait.
fn ops_to_take(queued: usize, sleepers: usize, spread: bool) -> usize {
    let share = if spread {
        queued.div_ceil(1 + sleepers)
    } else {
        queued
    };
    share.min(OPS_PER_TAKE)
}

/// The observer attached to one volume of a job.
pub(crate) struct MirrorObserver {
    pub job: Arc<JobShared>,
    pub volume_index: usize,
}

impl WriteObserver for MirrorObserver {
    fn observe(&self, event: &WriteEvent<'_>, ticket: ObserverTicket) -> Observed {
        let job = &self.job;
        if !job.mirroring() {
            return Observed::Done(ticket);
        }
        let vm = &job.volumes[self.volume_index];
        let active = job.options.mode == MirrorMode::Active;
        let settle = (active && event.kind != WriteKind::Flush).then_some(Settle {
            volume_index: self.volume_index,
            offset_bytes: event.offset_bytes,
            len_bytes: event.len_bytes,
        });
        if event.kind != WriteKind::Flush {
            let (newly, to_arm) = match vm.table.lock() {
                Ok(mut table) => {
                    let newly = table.begin_write(event.offset_bytes, event.len_bytes, !active);
                    if active {
                        table.hold(event.offset_bytes, event.len_bytes);
                    }
                    let chunks = table.chunks_of(event.offset_bytes, event.len_bytes);
                    let armed = job.persist.is_none() || table.is_armed(&chunks);
                    (newly, (!armed).then_some(chunks))
                }
                Err(_) => (0, None),
            };
            job.counters.add_dirtied(newly);
            if let Some(chunks) = to_arm {
                // Before the source write starts: see `persist`.
                super::persist::job_file::arm(job, self.volume_index, chunks);
            }
        }
        if !active {
            return Observed::Done(ticket);
        }
        let target_offset = vm.placement.offset_bytes + event.offset_bytes;
        if event.kind == WriteKind::Write {
            if let Some(file) = job.target.local_file() {
                if !job.begin_target_write() {
                    // The job has ended: the source write is all the guest needs.
                    if let Some(s) = settle {
                        s.done(job);
                    }
                    return Observed::Done(ticket);
                }
                let target = LegTarget {
                    fd: file.fd,
                    offset_bytes: target_offset,
                    memory_backed: file.memory_backed,
                };
                return Observed::Leg(ticket, target);
            }
        }
        let op = match event.kind {
            WriteKind::Write => {
                let mut data = Vec::with_capacity(event.len_bytes as usize);
                event.copy_data_into(&mut data);
                MirrorOp::Write {
                    offset_bytes: target_offset,
                    data,
                }
            }
            // ferry's volumes read discarded ranges as zeros, so the target must too.
            WriteKind::Discard => MirrorOp::Zero {
                offset_bytes: target_offset,
                len_bytes: event.len_bytes,
                unmap: true,
            },
            WriteKind::WriteZeroes { unmap } => MirrorOp::Zero {
                offset_bytes: target_offset,
                len_bytes: event.len_bytes,
                unmap,
            },
            WriteKind::Flush => MirrorOp::Flush,
        };
        match job.queue.push((op, ticket, settle)) {
            Ok(()) => Observed::Held,
            Err((ticket, settle)) => {
                if let Some(s) = settle {
                    s.done(job);
                }
                Observed::Done(ticket)
            }
        }
    }

    /// The leg's target write is over (counted by `begin_target_write` in `observe`); a
    /// failed one fails the job, as a failed mirror worker write does.
    fn leg_done(&self, event: &WriteEvent<'_>, failure: Option<IoFailure>) {
        let job = &self.job;
        match failure {
            None => job.counters.add_mirrored(event.len_bytes),
            Some(failure) => job.fail(format!(
                "mirroring a guest write of volume {} at offset {} ({} bytes): {failure}",
                event.volume, event.offset_bytes, event.len_bytes
            )),
        }
        if let Ok(mut table) = job.volumes[self.volume_index].table.lock() {
            table.end_write(event.offset_bytes, event.len_bytes);
        }
        job.end_target_write();
    }

    fn source_done(&self, event: &WriteEvent<'_>) {
        let vm = &self.job.volumes[self.volume_index];
        if let Ok(mut table) = vm.table.lock() {
            table.end_write(event.offset_bytes, event.len_bytes);
        }
    }
}

/// A mirror worker: writes queued guest writes to the target and releases the guest. To a
/// target that pipelines writes (NBD) the worker sends the writes of what it took as one
/// batch and goes on: each guest write is released by its reply, on the connection's
/// reader thread. Other ops wait on the worker, after the batch before them has been sent.
pub(crate) fn run_mirror_worker(job: Arc<JobShared>) {
    let mut ops = Vec::with_capacity(OPS_PER_TAKE);
    let pipelined = job.target.pipelines_writes();
    let spread = job.target.is_remote() && !pipelined;
    let mut batch: Vec<OwnedWrite> = Vec::with_capacity(OPS_PER_TAKE);
    loop {
        match job.queue.take(&mut ops, spread, IDLE_WAIT) {
            Take::Closed => break,
            Take::Idle => {
                job.target.expire_overdue();
                continue;
            }
            Take::Taken => {}
        }
        for (op, ticket, settle) in ops.drain(..) {
            match op {
                MirrorOp::Write { offset_bytes, data } if pipelined => {
                    pipeline_one(&job, &mut batch, offset_bytes, data, (ticket, settle));
                }
                op => {
                    job.target.send_writes(&mut batch);
                    mirror_one(&job, &op);
                    if let Some(s) = settle {
                        s.done(&job);
                    }
                    // Released one by one: over a slow target (NBD) the first of the batch
                    // would otherwise wait for the writes of all the others.
                    ticket.complete(true);
                }
            }
        }
        job.target.send_writes(&mut batch);
        if pipelined {
            job.target.expire_overdue();
        }
    }
}

/// Adds a guest write to the batch to send, counted as a target write until it ends; the
/// guest is released when it has (or at once, when the job has ended).
fn pipeline_one(
    job: &Arc<JobShared>,
    batch: &mut Vec<OwnedWrite>,
    offset_bytes: u64,
    data: Vec<u8>,
    (ticket, settle): (ObserverTicket, Option<Settle>),
) {
    if !job.begin_target_write() {
        if let Some(s) = settle {
            s.done(job);
        }
        ticket.complete(true); // the job has ended: the source write is all the guest needs
        return;
    }
    let (len_bytes, job) = (data.len() as u64, job.clone());
    let done = Box::new(move |result: Result<(), super::DestinationError>| {
        match result {
            Ok(()) => job.counters.add_mirrored(len_bytes),
            Err(e) => job.fail(format!("mirroring a guest write: {e}")),
        }
        if let Some(s) = settle {
            s.done(&job);
        }
        job.end_target_write();
        ticket.complete(true);
    });
    batch.push(OwnedWrite {
        offset_bytes,
        data,
        done,
    });
}

/// Writes one queued guest write to the target; a failure fails the job, not the guest.
fn mirror_one(job: &JobShared, op: &MirrorOp) {
    let outcome = job.write_target(|| match op {
        MirrorOp::Write { offset_bytes, data } => {
            (data.len() as u64, job.target.write_at(*offset_bytes, data))
        }
        MirrorOp::Zero {
            offset_bytes,
            len_bytes,
            unmap,
        } => (
            *len_bytes,
            job.target.write_zeroes(*offset_bytes, *len_bytes, *unmap),
        ),
        MirrorOp::Flush => (0, job.target.flush()),
    });
    match outcome {
        Some((bytes, Ok(()))) => job.counters.add_mirrored(bytes),
        Some((_, Err(e))) => job.fail(format!("mirroring a guest write: {e}")),
        None => {} // the job has ended: the source write is all the guest needs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_targets_spread_queued_writes_over_waiting_workers() {
        // Local target: one worker takes what is queued, up to the cap.
        assert_eq!(ops_to_take(8, 7, false), 8);
        assert_eq!(ops_to_take(40, 0, false), OPS_PER_TAKE);
        // Remote target: eight writes and seven idle workers: one each.
        assert_eq!(ops_to_take(8, 7, true), 1);
        assert_eq!(ops_to_take(8, 1, true), 4);
        assert_eq!(ops_to_take(3, 0, true), 3);
        assert_eq!(ops_to_take(100, 1, true), OPS_PER_TAKE);
    }
}
