//! The observer on each volume of a group replicated from here: it keeps a write's data (and,
//! in a sync group, the guest's completion) from submission until the volume's own I/O of it
//! has finished, then hands the request to the group's sequencer (`primary`) to be numbered.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::frame::RecordOp;
use super::primary::GroupSequencer;
use crate::observer::{Observed, ObserverTicket, WriteEvent, WriteKind, WriteObserver};

/// Writes whose data waits between submission and completion, per volume, at most: past it
/// the group degrades (a guest with more in flight than this is not replicated record by
/// record).
const PENDING_WRITES_MAX: usize = 4096;

/// A request submitted and not completed: a write's data, a sync request's guest completion.
struct Pending {
    data: Option<Vec<u8>>,
    ticket: Option<ObserverTicket>,
}

/// Requests submitted and not completed, by (queue, offset, length, is a write), oldest
/// first.
type PendingWrites = HashMap<(u16, u64, u64, bool), VecDeque<Pending>>;

/// The observer on one volume of a group.
pub struct PrimaryObserver {
    group: Arc<GroupSequencer>,
    volume_index: u32,
    pending: Mutex<PendingWrites>,
}

impl PrimaryObserver {
    pub fn new(group: Arc<GroupSequencer>, volume_index: u32) -> Arc<Self> {
        Arc::new(Self {
            group,
            volume_index,
            pending: Mutex::default(),
        })
    }

    fn pending(&self) -> MutexGuard<'_, PendingWrites> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl WriteObserver for PrimaryObserver {
    fn observe(&self, event: &WriteEvent<'_>, ticket: ObserverTicket) -> Observed {
        // A flush passes: in a sync group every write completed before it is durable at
        // the DR site already.
        if event.kind == WriteKind::Flush {
            self.group.push(self.volume_index, RecordOp::Flush);
            return Observed::Done(ticket);
        }
        let is_write = event.kind == WriteKind::Write;
        let hold = self.group.may_hold();
        let data = is_write.then(|| {
            let mut data = Vec::new();
            event.copy_data_into(&mut data);
            data
        });
        if !is_write && !hold {
            return Observed::Done(ticket);
        }
        let mut pending = self.pending();
        if pending.len() >= PENDING_WRITES_MAX {
            drop(pending);
            self.group
                .degrade(format!("more than {PENDING_WRITES_MAX} writes in flight"));
            return Observed::Done(ticket);
        }
        let (held, back) = if hold {
            (Some(ticket), Observed::Held)
        } else {
            (None, Observed::Done(ticket))
        };
        let key = (
            event.queue_index,
            event.offset_bytes,
            event.len_bytes,
            is_write,
        );
        pending
            .entry(key)
            .or_default()
            .push_back(Pending { data, ticket: held });
        back
    }

    fn source_done(&self, event: &WriteEvent<'_>) {
        if event.kind == WriteKind::Flush {
            return;
        }
        let is_write = event.kind == WriteKind::Write;
        let key = (
            event.queue_index,
            event.offset_bytes,
            event.len_bytes,
            is_write,
        );
        let mut pending = self.pending();
        let entry = pending.get_mut(&key).and_then(VecDeque::pop_front);
        if pending.get(&key).is_some_and(VecDeque::is_empty) {
            pending.remove(&key);
        }
        drop(pending);
        let (data, ticket) = entry.map_or((None, None), |p| (p.data, p.ticket));
        let op = match event.kind {
            WriteKind::Write => {
                match data {
                    Some(data) => RecordOp::Write {
                        offset_bytes: event.offset_bytes,
                        data,
                    },
                    None => {
                        // Seen before this observer was added, or dropped while degraded.
                        self.group
                            .degrade("a write completed whose data was not kept".into());
                        RecordOp::Discard {
                            offset_bytes: event.offset_bytes,
                            len_bytes: event.len_bytes,
                        }
                    }
                }
            }
            WriteKind::Discard => RecordOp::Discard {
                offset_bytes: event.offset_bytes,
                len_bytes: event.len_bytes,
            },
            WriteKind::WriteZeroes { unmap } => RecordOp::WriteZeroes {
                offset_bytes: event.offset_bytes,
                len_bytes: event.len_bytes,
                unmap,
            },
            WriteKind::Flush => return,
        };
        self.group.push_held(self.volume_index, op, ticket);
    }
}
