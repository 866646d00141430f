//! The adaptive busy-poll window of a worker thread (a vhost-user queue worker, an NBD
//! server connection), after QEMU's `poll-max-ns` algorithm.
//!
//! Waking a thread that sleeps in `epoll_wait` or `poll` takes a scheduler wake-up and a context
//! switch, which can cost more than serving a small request. So after its last piece of
//! work a worker may spin for a while before sleeping. How long adapts: when the next request
//! arrived soon after the worker went to sleep (it would have been caught by spinning), the
//! window grows; when a whole window passed with no work, it shrinks. A workload with
//! gaps longer than the maximum never pays for spinning; a QD1 stream gets its latency
//! without wake-ups (`benches/perf-notes.md`, *The adaptive busy-poll window*).

use std::time::{Duration, Instant};

/// The smallest non-zero window.
const WINDOW_MIN: Duration = Duration::from_micros(4);

#[derive(Debug, Clone)]
pub struct PollWindow {
    max: Duration,
    current: Duration,
    /// When the worker last went to sleep.
    slept_at: Option<Instant>,
}

impl PollWindow {
    /// A window that never exceeds `max` (zero disables polling).
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            current: Duration::ZERO,
            slept_at: None,
        }
    }

    /// How long to spin after the last work, now.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The worker was woken from sleep: grow the window if the sleep was short enough
    /// that spinning would have caught the event.
    pub fn on_wake(&mut self, now: Instant) {
        let Some(slept_at) = self.slept_at.take() else {
            return;
        };
        if self.max.is_zero() {
            return;
        }
        let slept = now.saturating_duration_since(slept_at);
        if slept < self.max && self.current < self.max {
            self.current = (self.current * 2).clamp(WINDOW_MIN, self.max);
        }
    }

    /// A whole window passed without work: shrink it.
    pub fn on_window_expired(&mut self) {
        self.current /= 2;
        if self.current < WINDOW_MIN {
            self.current = Duration::ZERO;
        }
    }

    /// The worker goes to sleep now.
    pub fn on_sleep(&mut self, now: Instant) {
        self.slept_at = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_sleeps_grow_the_window_up_to_the_maximum() {
        let mut w = PollWindow::new(Duration::from_micros(32));
        let t = Instant::now();
        for _ in 0..10 {
            w.on_sleep(t);
            w.on_wake(t + Duration::from_micros(10));
        }
        assert_eq!(w.current(), Duration::from_micros(32));
    }

    #[test]
    fn long_sleeps_do_not_grow_and_idle_windows_shrink_to_zero() {
        let mut w = PollWindow::new(Duration::from_micros(32));
        let t = Instant::now();
        w.on_sleep(t);
        w.on_wake(t + Duration::from_millis(5));
        assert_eq!(w.current(), Duration::ZERO);
        w.on_sleep(t);
        w.on_wake(t + Duration::from_micros(5));
        assert_eq!(w.current(), WINDOW_MIN);
        w.on_window_expired();
        assert_eq!(w.current(), Duration::ZERO);
    }

    #[test]
    fn zero_maximum_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        let t = Instant::now();
        w.on_sleep(t);
        w.on_wake(t);
        assert_eq!(w.current(), Duration::ZERO);
    }
}
