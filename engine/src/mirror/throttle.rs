//! The copier's speed limit: a shared schedule of when the next copied byte may be written.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one sleep lasts at most, so that a stop or a new limit is noticed quickly.
const SLEEP_SLICE: Duration = Duration::from_millis(20);
/// Credit that an idle copier may build up (so a limit holds on average, not in bursts).
const BURST: Duration = Duration::from_millis(100);

/// Limits the copier to `bytes_per_s` (0 = unlimited); the limit may change at any time.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_s: AtomicU64,
    next_free: Mutex<Instant>,
}

impl Throttle {
    pub fn new(bytes_per_s: u64) -> Self {
        Self {
            bytes_per_s: AtomicU64::new(bytes_per_s),
            next_free: Mutex::new(Instant::now()),
        }
    }

    pub fn bytes_per_s(&self) -> u64 {
        self.bytes_per_s.load(Ordering::Relaxed)
    }

    /// Sets a new limit (0 = unlimited), effective for the next copy.
    pub fn set(&self, bytes_per_s: u64) {
        self.bytes_per_s.store(bytes_per_s, Ordering::Relaxed);
        if let Ok(mut next) = self.next_free.lock() {
            *next = Instant::now();
        }
    }

    /// Waits until `bytes` may be written; returns early when `skip()` turns true.
    pub fn wait(&self, bytes: u64, skip: impl Fn() -> bool) {
        let rate = self.bytes_per_s();
        let Some(start) = self.book(bytes, rate, Instant::now()) else {
            return;
        };
        loop {
            let now = Instant::now();
            if now >= start || skip() || self.bytes_per_s() != rate {
                return;
            }
            std::thread::sleep((start - now).min(SLEEP_SLICE));
        }
    }

    /// Books `bytes` at `rate` on the schedule, asked at `now`: returns when they may be
    /// written, `None` when nothing limits them (no limit, or a poisoned schedule).
    fn book(&self, bytes: u64, rate: u64, now: Instant) -> Option<Instant> {
        if rate == 0 {
            return None;
        }
        let mut next = self.next_free.lock().ok()?;
        let start = (*next).max(now.checked_sub(BURST).unwrap_or(now));
        *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        Some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Copies follow one another at the rate, from the moment asked less the burst credit an
    /// idle copier has built up, and never more credit than that.
    #[test]
    fn the_schedule_spaces_copies_at_the_rate() {
        let t = Throttle::new(MIB);
        let asked = Instant::now() + Duration::from_secs(10);
        let starts: Vec<Instant> = (0..4).filter_map(|_| t.book(MIB / 8, MIB, asked)).collect();
        let eighth = Duration::from_millis(125);
        let first = asked - BURST;
        assert_eq!(
            starts,
            [
                first,
                first + eighth,
                first + 2 * eighth,
                first + 3 * eighth
            ]
        );
        let idle = asked + Duration::from_secs(60);
        assert_eq!(t.book(MIB, MIB, idle), Some(idle - BURST));
    }

    #[test]
    fn no_limit_books_nothing() {
        let t = Throttle::new(0);
        assert_eq!(t.book(1 << 30, t.bytes_per_s(), Instant::now()), None);
        t.set(MIB);
        assert!(t.book(1 << 30, t.bytes_per_s(), Instant::now()).is_some());
        t.set(0);
        t.wait(1 << 30, || {
            unreachable!("nothing to wait for without a limit")
        });
    }

    /// A copy booked far ahead (a whole GiB at 1 byte/s) is waited for only until skipped.
    #[test]
    fn a_skip_ends_the_wait() {
        let t = Throttle::new(1);
        t.wait(1 << 30, || false);
        t.wait(1, || true);
    }
}
