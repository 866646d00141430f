//! The operator's controls of a running group: pause (the group degrades to its bitmap and
//! does not resync until it is resumed) and resume, and the speed limit of what the group
//! reads from its volumes itself (the initial copy and the resyncs; the caller paces them).

use super::{complete, degrade_locked, GroupSequencer};

impl GroupSequencer {
    /// Pauses the group: it stops numbering records and marks changes in its bitmap, as a
    /// degraded group does (the records numbered before are still shipped), and does not
    /// resync until [`resume`](Self::resume).
    pub fn pause(&self) {
        let mut state = self.lock();
        state.paused = true;
        let mut tickets = Vec::new();
        degrade_locked(&mut state, "paused by the operator".into(), &mut tickets);
        drop(state);
        complete(tickets);
        self.changed.notify_all();
    }

    /// Resumes a paused group: it resyncs once the DR site has every record it still holds.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Limits the initial copy and the resyncs to `bytes_per_s` (None: no limit).
    pub fn set_copy_speed(&self, bytes_per_s: Option<u64>) {
        self.lock().copy_speed_bytes_per_s = bytes_per_s.filter(|&s| s > 0);
    }

    pub fn copy_speed(&self) -> Option<u64> {
        self.lock().copy_speed_bytes_per_s
    }
}
