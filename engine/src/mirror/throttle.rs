//! The copier's speed limit: a shared schedule of when the next copied byte may be written.
//!
//! A copier books the bytes of its next copy before it reads or writes anything
//! ([`Throttle::reserve`]), waits for their turn, copies, and gives back what it did not use
//! ([`Throttle::refund`]): a run shorter than booked, or none left to take. Booking first is
//! what makes the limit hold from the first byte whatever the number of copiers: copiers
//! that paid after each copy each sent their first chunk at once. The bound it gives: from
//! the moment the schedule starts (the job's start, or a new limit), the bytes let through by
//! time `t` are at most `limit × t` plus one booking, since each booking starts where the
//! schedule stood and the schedule only ever moves back by bytes never sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one sleep lasts at most, so that a stop or a new limit is noticed quickly.
const SLEEP_SLICE: Duration = Duration::from_millis(20);
/// Credit that an idle copier may build up (so a limit holds on average, not in bursts).
const BURST: Duration = Duration::from_millis(100);

/// The schedule: when the next booked byte may go, and which limit it belongs to.
#[derive(Debug)]
struct Schedule {
    next_free: Instant,
    /// Counts the schedule's restarts (a new limit), so that a refund booked under an older
    /// limit is dropped rather than taken off the new schedule.
    generation: u64,
}

/// Limits the copier to `bytes_per_s` (0 = unlimited); the limit may change at any time.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_s: AtomicU64,
    schedule: Mutex<Schedule>,
}

/// Bytes booked on the schedule by [`Throttle::reserve`]: hand it back to
/// [`Throttle::refund`] with the bytes actually copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a reservation's unused bytes go back with Throttle::refund"]
pub struct Reservation {
    bytes: u64,
    /// The limit the bytes were booked at; 0 when nothing was booked.
    rate: u64,
    generation: u64,
}

impl Reservation {
    /// The bytes booked: the most the copy that follows may copy.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Throttle {
    pub fn new(bytes_per_s: u64) -> Self {
        Self {
            bytes_per_s: AtomicU64::new(bytes_per_s),
            schedule: Mutex::new(Schedule {
                next_free: Instant::now(),
                generation: 0,
            }),
        }
    }

    pub fn bytes_per_s(&self) -> u64 {
        self.bytes_per_s.load(Ordering::Relaxed)
    }

    /// Sets a new limit (0 = unlimited) and restarts the schedule from now: bookings waiting
    /// under the old limit book again under the new one.
    pub fn set(&self, bytes_per_s: u64) {
        self.bytes_per_s.store(bytes_per_s, Ordering::Relaxed);
        if let Ok(mut schedule) = self.schedule.lock() {
            schedule.next_free = Instant::now();
            schedule.generation += 1;
        }
    }

    /// Books `bytes` and waits until they may be copied; returns early when `skip()` turns
    /// true (the job stops, or a cutover lifts the limit). A limit changed during the wait
    /// books again under the new limit.
    pub fn reserve(&self, bytes: u64, skip: impl Fn() -> bool) -> Reservation {
        loop {
            let rate = self.bytes_per_s();
            let Some((start, reservation)) = self.book(bytes, rate, Instant::now()) else {
                return Reservation {
                    bytes,
                    rate: 0,
                    generation: 0,
                };
            };
            match self.wait_until(start, rate, &skip) {
                Wait::Reached | Wait::Skipped => return reservation,
                Wait::LimitChanged => continue,
            }
        }
    }

    /// Gives back the part of `reservation` that the copy did not use (`used_bytes` of it
    /// were copied), so that the next booking may start that much earlier.
    pub fn refund(&self, reservation: Reservation, used_bytes: u64) {
        let unused = reservation.bytes.saturating_sub(used_bytes);
        if reservation.rate == 0 || unused == 0 {
            return;
        }
        let Ok(mut schedule) = self.schedule.lock() else {
            return;
        };
        if schedule.generation != reservation.generation {
            return; // the schedule restarted since: nothing of this booking is on it
        }
        let back = duration_of(unused, reservation.rate);
        if let Some(earlier) = schedule.next_free.checked_sub(back) {
            schedule.next_free = earlier;
        }
    }

    /// Sleeps until `start`, in slices so that a skip or a new limit ends the wait.
    fn wait_until(&self, start: Instant, rate: u64, skip: &impl Fn() -> bool) -> Wait {
        loop {
            let now = Instant::now();
            if now >= start {
                return Wait::Reached;
            }
            if skip() {
                return Wait::Skipped;
            }
            if self.bytes_per_s() != rate {
                return Wait::LimitChanged;
            }
            std::thread::sleep((start - now).min(SLEEP_SLICE));
        }
    }

    /// Books `bytes` at `rate` on the schedule, asked at `now`: returns when they may be
    /// copied, with the reservation; `None` when nothing limits them (no limit, or a
    /// poisoned schedule).
    fn book(&self, bytes: u64, rate: u64, now: Instant) -> Option<(Instant, Reservation)> {
        if rate == 0 {
            return None;
        }
        let mut schedule = self.schedule.lock().ok()?;
        let start = schedule
            .next_free
            .max(now.checked_sub(BURST).unwrap_or(now));
        schedule.next_free = start + duration_of(bytes, rate);
        let reservation = Reservation {
            bytes,
            rate,
            generation: schedule.generation,
        };
        Some((start, reservation))
    }
}

/// How a wait for a booking's turn ended.
enum Wait {
    Reached,
    Skipped,
    LimitChanged,
}

/// The time `bytes` take at `rate` bytes per second (`rate` > 0).
fn duration_of(bytes: u64, rate: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / rate as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;

    fn start_of(t: &Throttle, bytes: u64, rate: u64, now: Instant) -> Option<Instant> {
        t.book(bytes, rate, now).map(|(start, _)| start)
    }

    /// Copies follow one another at the rate, from the moment asked less the burst credit an
    /// idle copier has built up, and never more credit than that.
    #[test]
    fn the_schedule_spaces_copies_at_the_rate() {
        let t = Throttle::new(MIB);
        let asked = Instant::now() + Duration::from_secs(10);
        let starts: Vec<Instant> = (0..4)
            .filter_map(|_| start_of(&t, MIB / 8, MIB, asked))
            .collect();
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
        assert_eq!(start_of(&t, MIB, MIB, idle), Some(idle - BURST));
    }

    /// What a copy did not use goes back on the schedule; what it used stays booked.
    #[test]
    fn a_refund_gives_back_the_unused_bytes() {
        let t = Throttle::new(MIB);
        let asked = Instant::now() + Duration::from_secs(10);
        let first = asked - BURST;
        let Some((start, booked)) = t.book(MIB, MIB, asked) else {
            panic!("a limit books");
        };
        assert_eq!((start, booked.bytes()), (first, MIB));
        t.refund(booked, MIB / 4);
        let quarter = Duration::from_millis(250);
        assert_eq!(start_of(&t, MIB, MIB, asked), Some(first + quarter));
        // Used in full (or more than booked): nothing comes back.
        let Some((_, booked)) = t.book(MIB, MIB, asked) else {
            panic!("a limit books");
        };
        t.refund(booked, 2 * MIB);
        assert_eq!(
            start_of(&t, MIB, MIB, asked),
            Some(first + quarter + Duration::from_secs(2))
        );
    }

    /// A booking made under an older limit is not refunded onto the new limit's schedule.
    #[test]
    fn a_refund_across_a_new_limit_is_dropped() {
        let t = Throttle::new(MIB);
        let asked = Instant::now() + Duration::from_secs(10);
        let Some((_, old)) = t.book(MIB, MIB, asked) else {
            panic!("a limit books");
        };
        t.set(MIB);
        assert_eq!(start_of(&t, MIB, MIB, asked), Some(asked - BURST));
        t.refund(old, 0);
        assert_eq!(
            start_of(&t, MIB, MIB, asked),
            Some(asked - BURST + Duration::from_secs(1))
        );
    }

    #[test]
    fn no_limit_books_nothing() {
        let t = Throttle::new(0);
        assert_eq!(start_of(&t, 1 << 30, t.bytes_per_s(), Instant::now()), None);
        t.set(MIB);
        assert!(start_of(&t, 1 << 30, t.bytes_per_s(), Instant::now()).is_some());
        t.set(0);
        let r = t.reserve(1 << 30, || {
            unreachable!("nothing to wait for without a limit")
        });
        t.refund(r, 0);
    }

    /// A copy booked far ahead (a whole GiB at 1 byte/s) is waited for only until skipped.
    #[test]
    fn a_skip_ends_the_wait() {
        let t = Throttle::new(1);
        let first = t.reserve(1 << 30, || false);
        let second = t.reserve(1, || true);
        t.refund(first, 1 << 30);
        t.refund(second, 1);
    }

    /// A copier waiting under a low limit books again under a new one instead of waiting
    /// out its old booking.
    #[test]
    fn a_new_limit_rebooks_a_waiting_copy() {
        let t = Arc::new(Throttle::new(1));
        let first = t.reserve(1 << 30, || false);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let waiter = {
            let t = t.clone();
            std::thread::spawn(move || {
                let r = t.reserve(MIB, || false);
                let _ = done_tx.send(r);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(done_rx.try_recv().is_err(), "the copy waits its turn");
        t.set(1 << 40);
        let rebooked = done_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|e| format!("the waiting copy was not let go by the new limit: {e}"));
        assert_eq!(rebooked.map(|r| r.rate), Ok(1 << 40));
        assert!(waiter.join().is_ok());
        t.refund(first, 0);
    }

    /// Runs `threads` copiers that book `chunk` bytes each, again and again, copying all of
    /// every other booking and half of the rest, for `interval` from `t0`; returns the bytes
    /// they copied within `interval` of `t0`.
    fn bytes_copied_within(
        throttle: &Arc<Throttle>,
        t0: Instant,
        threads: usize,
        chunk: u64,
        interval: Duration,
    ) -> u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let copiers: Vec<_> = (0..threads)
            .map(|i| {
                let (throttle, stop) = (throttle.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut within = 0;
                    for n in 0.. {
                        let booked = throttle.reserve(chunk, || stop.load(Ordering::Acquire));
                        if stop.load(Ordering::Acquire) {
                            return within;
                        }
                        let used = if (i + n) % 2 == 0 { chunk } else { chunk / 2 };
                        if t0.elapsed() <= interval {
                            within += used;
                        }
                        throttle.refund(booked, used);
                    }
                    within
                })
            })
            .collect();
        std::thread::sleep(interval + Duration::from_millis(50));
        stop.store(true, Ordering::Release);
        copiers.into_iter().filter_map(|c| c.join().ok()).sum()
    }

    /// However many copiers share a low limit, what they copy in the first interval is the
    /// limit's worth plus at most one chunk: each books before it copies, so no copier's
    /// first chunk goes out unpaid.
    #[test]
    fn many_copiers_hold_the_limit_from_the_first_byte() {
        const CHUNK: u64 = MIB;
        const RATE: u64 = 2 * MIB;
        let interval = Duration::from_millis(500);
        let bound = RATE / 2 + CHUNK;
        for threads in [1, 4, 16] {
            let t0 = Instant::now();
            let throttle = Arc::new(Throttle::new(RATE));
            let copied = bytes_copied_within(&throttle, t0, threads, CHUNK, interval);
            assert!(
                copied <= bound,
                "{threads} copiers copied {copied} bytes in {interval:?} at {RATE} bytes/s"
            );
        }
        // The same from a limit set on a job that ran without one.
        let throttle = Arc::new(Throttle::new(0));
        let t0 = Instant::now();
        throttle.set(RATE);
        let copied = bytes_copied_within(&throttle, t0, 16, CHUNK, interval);
        assert!(copied <= bound, "after a new limit: {copied} bytes");
    }
}
