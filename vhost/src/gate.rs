//! A served volume's gate: whether its device may take guest requests, for as long as the
//! volume is served (across frontends), and what a move to another host needs to know of
//! the device (that it stopped, or that its frontend gave a migration up).
//!
//! Two uses, one mechanism:
//! - The *incoming* volume of a move from another host is served closed: a frontend may
//!   connect and read the configuration, but its requests wait until the source has handed
//!   the volume over ([`DeviceGate::open`]). A device whose first request finds the gate
//!   closed waits up to [`DeviceGate::wait_max`] for it and is otherwise refused (its
//!   frontend disconnected), so a guest never runs on a disk that is not complete.
//! - The *source* of such a move arms [`DeviceGate::close_on_stop`]: the moment its device
//!   stops (every ring stopped with `GET_VRING_BASE` while the frontend logs dirty pages,
//!   the switchover of QEMU's VM migration; or its frontend disconnecting), the gate closes
//!   before the stop is answered, so that no request can be taken after the last one the
//!   hand-off accounts for. The hand-off reopens it only when the move failed.
//!
//! The open check is one atomic load on every kick; everything else takes the lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vhost_user_backend::ShutdownHandle;

/// How a device stopped, for [`DeviceGate::device_stopped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// Every ring stopped (`GET_VRING_BASE`) while the frontend logged dirty pages: the
    /// frontend is completing a migration of the VM.
    RingsStoppedWhileLogging,
    /// The frontend disconnected (after its requests in flight drained).
    FrontendGone,
}

/// What the gate has seen; read by whoever watches the move ([`DeviceGate::events`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateEvents {
    /// The armed stop happened: the gate closed itself then.
    pub closed_by_stop: Option<StopCause>,
    /// Times the frontend turned dirty logging off again without stopping the device (a
    /// migration of the VM cancelled or failed before its switchover).
    pub logging_abandoned: u64,
}

#[derive(Default)]
struct GateState {
    /// Why the gate is closed, while it is.
    closed_because: Option<String>,
    close_on_stop: bool,
    events: GateEvents,
    /// The frontend attached now, to refuse when its wait for the gate runs out.
    frontend: Option<ShutdownHandle>,
    /// The volume is no longer served: a device waiting for the gate is refused at once.
    shut: bool,
}

/// A volume's gate, shared by its serving loop, its devices and the daemon.
pub struct DeviceGate {
    /// Mirrors `state.closed_because.is_none()` for the check on every kick.
    open: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
    wait_max: Duration,
}

impl DeviceGate {
    /// An open gate; a device that finds it closed later waits up to `wait_max`.
    pub fn new_open(wait_max: Duration) -> Self {
        Self {
            open: AtomicBool::new(true),
            state: Mutex::default(),
            changed: Condvar::new(),
            wait_max,
        }
    }

    /// A gate closed for `reason` until [`open`](Self::open).
    pub fn new_closed(reason: &str, wait_max: Duration) -> Self {
        let gate = Self::new_open(wait_max);
        gate.close(reason);
        gate
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long a device whose requests find the gate closed waits before it is refused.
    pub fn wait_max(&self) -> Duration {
        self.wait_max
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Opens the gate: devices waiting for it go on.
    pub fn open(&self) {
        let mut state = self.lock();
        state.closed_because = None;
        state.close_on_stop = false;
        self.open.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// Closes the gate: requests taken from now on wait for it to open.
    pub fn close(&self, reason: &str) {
        let mut state = self.lock();
        state.closed_because = Some(reason.to_string());
        self.open.store(false, Ordering::Release);
    }

    /// Arms (or disarms) closing at the device's next stop, and forgets earlier events.
    pub fn close_on_stop(&self, armed: bool) {
        let mut state = self.lock();
        state.close_on_stop = armed;
        state.events = GateEvents::default();
    }

    /// What the gate has seen since it was last armed.
    pub fn events(&self) -> GateEvents {
        self.lock().events
    }

    /// Waits up to `timeout` for the armed stop; its cause, or `None` on timeout.
    pub fn wait_closed_by_stop(&self, timeout: Duration) -> Option<StopCause> {
        let state = self.lock();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.events.closed_by_stop.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        state.events.closed_by_stop
    }

    /// The device stopped (its requests already drained): closes the gate when armed.
    pub fn device_stopped(&self, cause: StopCause) {
        let mut state = self.lock();
        if !state.close_on_stop {
            return;
        }
        state.close_on_stop = false;
        state.closed_because = Some("the volume was handed over to another host".into());
        state.events.closed_by_stop = Some(cause);
        self.open.store(false, Ordering::Release);
        self.changed.notify_all();
        log::info!("device stopped ({cause:?}): its gate is closed for the hand-off");
    }

    /// The frontend turned dirty logging off without a stop in between.
    pub fn logging_abandoned(&self) {
        let mut state = self.lock();
        state.events.logging_abandoned += 1;
        self.changed.notify_all();
    }

    /// The volume stops being served: a device waiting for the gate gives up now rather
    /// than at the end of its wait, so that the serving loop ends without that delay.
    pub fn shut(&self) {
        let mut state = self.lock();
        state.shut = true;
        self.changed.notify_all();
    }

    pub(crate) fn frontend_attached(&self, frontend: Option<ShutdownHandle>) {
        self.lock().frontend = frontend;
    }

    pub(crate) fn frontend_detached(&self) {
        self.lock().frontend = None;
    }

    /// Called before a device takes requests: true at once when the gate is open; else
    /// waits up to [`wait_max`](Self::wait_max) for it, and on timeout refuses the device
    /// (disconnects its frontend) and returns false.
    pub fn admit(&self) -> bool {
        if self.is_open() {
            return true;
        }
        let deadline = Instant::now() + self.wait_max;
        let mut state = self.lock();
        while state.closed_because.is_some() {
            if state.shut {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let reason = state.closed_because.clone().unwrap_or_default();
                log::error!(
                    "a device started while its volume is closed ({reason}); refused after {:?}",
                    self.wait_max
                );
                if let Some(frontend) = state.frontend.take() {
                    frontend.shutdown();
                }
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_closed_gate_admits_once_opened_and_refuses_after_its_bound() {
        let gate = Arc::new(DeviceGate::new_closed(
            "incoming",
            Duration::from_millis(50),
        ));
        assert!(!gate.admit(), "nobody opens it: refused after the bound");
        let opener = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.open())
        };
        let long = Arc::new(DeviceGate::new_closed("incoming", Duration::from_secs(600)));
        let waiter = {
            let long = long.clone();
            std::thread::spawn(move || long.admit())
        };
        long.open();
        assert!(waiter.join().is_ok_and(|admitted| admitted));
        assert!(opener.join().is_ok());
        assert!(gate.admit());
    }

    #[test]
    fn an_armed_gate_closes_at_the_stop_and_only_then() {
        let gate = DeviceGate::new_open(Duration::from_millis(10));
        gate.device_stopped(StopCause::FrontendGone);
        assert!(gate.is_open(), "not armed: a stop changes nothing");
        gate.close_on_stop(true);
        gate.logging_abandoned();
        assert_eq!(gate.events().logging_abandoned, 1);
        gate.device_stopped(StopCause::RingsStoppedWhileLogging);
        assert!(!gate.is_open());
        assert_eq!(
            gate.wait_closed_by_stop(Duration::ZERO),
            Some(StopCause::RingsStoppedWhileLogging)
        );
        assert!(!gate.admit());
        gate.open();
        assert!(gate.admit());
    }

    #[test]
    fn a_shut_gate_refuses_a_waiting_device_at_once() {
        let gate = Arc::new(DeviceGate::new_closed("incoming", Duration::from_secs(600)));
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.admit())
        };
        gate.shut();
        assert!(waiter.join().is_ok_and(|admitted| !admitted));
    }
}
