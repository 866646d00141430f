//! A bitmap resync: once a degraded group's link works and every record it still held is
//! acknowledged, the group numbers records again and sends the ranges its dirty bitmaps mark,
//! each read from the volume and numbered under the sequencer's lock (as a chunk of the
//! initial copy is), so a write completed before has its data in the read and a write
//! completing after has a higher number and overwrites it at the DR site. The bits of a
//! range are cleared when it is numbered; the group is degraded again (the link lost, the
//! lag past its bound) with the unsent bits still set, and the next resync sends them.
//!
//! While a resync runs the replicas are no prefix of the write order: a range the bitmap
//! marks reaches the DR site with its newest content, without the writes between. Records
//! of kinds `ResyncBegin` and `ResyncEnd` around the resync's records tell the DR site so.

use std::time::Duration;

use super::{mark_range, number, GroupSequencer, State, DIRTY_CHUNK_BYTES};
use crate::replication::frame::RecordOp;

/// A resync's state and what resyncs have done since the group started.
#[derive(Debug, Default)]
pub(super) struct Resync {
    pub running: bool,
    /// Where the running resync looks next: (volume, chunk).
    cursor: (usize, u64),
    /// The `ResyncEnd` record of the last resync.
    pub end_seq: Option<u64>,
    pub count: u64,
    pub bytes_sent: u64,
    pub changed_bytes: u64,
}

/// One step of a resync.
#[derive(Debug, PartialEq, Eq)]
pub enum ResyncStep {
    /// A run was numbered; more may follow.
    Sent { volume_index: u32, bytes: u64 },
    /// Nothing is marked any more: the group streams again.
    Done,
    /// The group degraded again or stopped.
    Interrupted,
}

impl GroupSequencer {
    /// Waits until a degraded group can resync (no initial copy running, the DR site
    /// answering, every held record acknowledged), then begins it: the group numbers guest
    /// writes again. False once the group stopped.
    pub fn wait_resync(&self) -> bool {
        let mut state = self.lock();
        loop {
            if state.stopped {
                return false;
            }
            if state.degraded_reason.is_some()
                && !state.paused
                && !state.copying
                && !state.link_lost
                && state.held.is_empty()
            {
                let marked = dirty_chunks(&state) * DIRTY_CHUNK_BYTES;
                log::info!(
                    "replication resyncing {marked} bytes marked changed while degraded ({})",
                    state.degraded_reason.as_deref().unwrap_or_default()
                );
                state.degraded_reason = None;
                // The DR site learns where the replicas stop being a prefix (a promotion
                // refuses the points up to the end record).
                number(&mut state, 0, RecordOp::ResyncBegin, None);
                // A sync group does not hold writes behind the resync's records: it is
                // catching up until the DR site has the resync's end.
                if state.sync {
                    state.copy_end_seq = None;
                }
                state.resync.running = true;
                state.resync.cursor = (0, 0);
                state.resync.count += 1;
                state.resync.changed_bytes += marked;
                drop(state);
                self.changed.notify_all();
                return true;
            }
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Numbers the next marked run (at most `run_bytes_max`) of the running resync, its data
    /// read by `read(volume_index, offset, len)` under the lock; waits for room in the
    /// queue's window first. At the end the group streams again (a sync group holds writes
    /// again once the DR site acknowledges the resync's last record).
    pub fn resync_step(
        &self,
        run_bytes_max: u64,
        read: impl FnOnce(u32, u64, usize) -> std::io::Result<Vec<u8>>,
    ) -> std::io::Result<ResyncStep> {
        let mut state = self.lock();
        loop {
            if state.stopped || !state.resync.running {
                return Ok(ResyncStep::Interrupted);
            }
            if self.has_room(&state, run_bytes_max as usize) {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let Some((volume, first, chunks)) = next_run(&mut state, run_bytes_max) else {
            state.resync.running = false;
            number(&mut state, 0, RecordOp::ResyncEnd, None);
            state.resync.end_seq = Some(state.next_seq - 1);
            if state.sync {
                // Held writes wait again once the DR site has everything up to here.
                state.copy_end_seq = Some(state.next_seq - 1);
                state.sync_degraded_reason = None;
            }
            log::info!("replication resync done: streaming again");
            drop(state);
            self.changed.notify_all();
            return Ok(ResyncStep::Done);
        };
        let size = self.volume_sizes[volume];
        let offset = first * DIRTY_CHUNK_BYTES;
        let len = (chunks * DIRTY_CHUNK_BYTES).min(size.saturating_sub(offset));
        if len == 0 {
            // Bits past the volume's end (its last bitmap word) mark nothing to send.
            clear_run(&mut state, volume, first, chunks);
            return Ok(ResyncStep::Sent {
                volume_index: volume as u32,
                bytes: 0,
            });
        }
        let data = read(volume as u32, offset, len as usize)?;
        clear_run(&mut state, volume, first, chunks);
        state.resync.bytes_sent += data.len() as u64;
        let volume_index = volume as u32;
        number(
            &mut state,
            volume_index,
            RecordOp::Write {
                offset_bytes: offset,
                data,
            },
            None,
        );
        drop(state);
        self.changed.notify_all();
        Ok(ResyncStep::Sent {
            volume_index,
            bytes: len,
        })
    }

    /// Marks `offset..offset + len` of a volume changed (the part of an initial copy a
    /// degradation interrupted).
    pub fn mark_changed(&self, volume_index: u32, offset_bytes: u64, len_bytes: u64) {
        mark_range(&mut self.lock(), volume_index, offset_bytes, len_bytes);
    }
}

pub(super) fn dirty_chunks(state: &State) -> u64 {
    state
        .dirty
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

fn is_set(bits: &[u64], chunk: u64) -> bool {
    bits.get((chunk / 64) as usize)
        .is_some_and(|w| w & (1 << (chunk % 64)) != 0)
}

/// The next marked run from the cursor: (volume, first chunk, chunks), at most
/// `run_bytes_max` (at least one chunk).
fn next_run(state: &mut State, run_bytes_max: u64) -> Option<(usize, u64, u64)> {
    let run_chunks_max = (run_bytes_max / DIRTY_CHUNK_BYTES).max(1);
    let (mut volume, mut chunk) = state.resync.cursor;
    while let Some(bits) = state.dirty.get(volume) {
        let chunks_total = bits.len() as u64 * 64;
        while chunk < chunks_total {
            let word = bits[(chunk / 64) as usize] >> (chunk % 64);
            if word == 0 {
                chunk = (chunk / 64 + 1) * 64;
                continue;
            }
            let first = chunk + u64::from(word.trailing_zeros());
            let mut end = first + 1;
            while end - first < run_chunks_max && is_set(bits, end) {
                end += 1;
            }
            state.resync.cursor = (volume, end);
            return Some((volume, first, end - first));
        }
        volume += 1;
        chunk = 0;
    }
    // Nothing is marked behind the cursor: a resync runs only while the group numbers
    // writes, and one interrupted starts again from the beginning.
    state.resync.cursor = (volume, 0);
    None
}

fn clear_run(state: &mut State, volume: usize, first: u64, chunks: u64) {
    if let Some(bits) = state.dirty.get_mut(volume) {
        for chunk in first..first + chunks {
            if let Some(word) = bits.get_mut((chunk / 64) as usize) {
                *word &= !(1 << (chunk % 64));
            }
        }
    }
}
