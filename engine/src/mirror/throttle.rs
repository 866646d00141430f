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
        if rate == 0 {
            return;
        }
        let start = match self.next_free.lock() {
            Ok(mut next) => {
                let now = Instant::now();
                let start = (*next).max(now.checked_sub(BURST).unwrap_or(now));
                *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
                start
            }
            Err(_) => return,
        };
        loop {
            let now = Instant::now();
            if now >= start || skip() || self.bytes_per_s() != rate {
                return;
            }
            std::thread::sleep((start - now).min(SLEEP_SLICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_the_rate() {
        let t = Throttle::new(1 << 20);
        let begin = Instant::now();
        for _ in 0..4 {
            t.wait(128 << 10, || false);
        }
        // 512 KiB at 1 MiB/s, less the burst credit: at least ~300 ms.
        assert!(
            begin.elapsed() >= Duration::from_millis(250),
            "{:?}",
            begin.elapsed()
        );
        t.set(0);
        let quick = Instant::now();
        t.wait(1 << 30, || false);
        assert!(quick.elapsed() < Duration::from_millis(50));
    }
}
