//! A rate limit for the warnings a guest can trigger at will (malformed requests, status
//! bytes outside its memory): a broken or hostile guest sending millions of bad requests
//! must not fill the host's log. Each queue worker keeps one limiter: at most
//! [`WARNINGS_PER_WINDOW`] warnings per [`WINDOW`], and the first warning after a window
//! with suppressed ones says how many were left out.

use std::time::{Duration, Instant};

/// The span over which warnings are counted.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Warnings logged per window; the rest are counted.
pub const WARNINGS_PER_WINDOW: u32 = 10;

/// What to do with a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it, after saying how many were suppressed before it (if any).
    Log { suppressed_before: u64 },
    /// Count it only.
    Suppress,
}

/// Counts one worker's guest-triggered warnings.
#[derive(Debug, Default)]
pub struct GuestWarnings {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl GuestWarnings {
    /// Decides about a warning happening at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let in_window = self
            .window_start
            .is_some_and(|start| now.saturating_duration_since(start) < WINDOW);
        if !in_window {
            self.window_start = Some(now);
            self.logged = 0;
        }
        if self.logged < WARNINGS_PER_WINDOW {
            self.logged += 1;
            Verdict::Log {
                suppressed_before: std::mem::take(&mut self.suppressed),
            }
        } else {
            self.suppressed += 1;
            Verdict::Suppress
        }
    }

    /// Logs `message` (prefixed with the volume's name) unless the limit is reached.
    pub fn warn(&mut self, volume: &str, message: std::fmt::Arguments<'_>) {
        match self.check(Instant::now()) {
            Verdict::Log { suppressed_before } => {
                if suppressed_before > 0 {
                    log::warn!(
                        "volume {volume}: {suppressed_before} more guest-caused warnings were \
                         suppressed (at most {WARNINGS_PER_WINDOW} per {} s)",
                        WINDOW.as_secs()
                    );
                }
                log::warn!("volume {volume}: {message}");
            }
            Verdict::Suppress => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_window_and_counted_once_it_ends() {
        let mut w = GuestWarnings::default();
        let t0 = Instant::now();
        let logged = (0..1000)
            .filter(|i| {
                let now = t0 + Duration::from_millis(*i);
                matches!(w.check(now), Verdict::Log { .. })
            })
            .count();
        assert_eq!(logged, WARNINGS_PER_WINDOW as usize);
        // The next window: logged again, with the count of what was left out.
        assert_eq!(
            w.check(t0 + WINDOW + Duration::from_secs(1)),
            Verdict::Log {
                suppressed_before: 1000 - u64::from(WARNINGS_PER_WINDOW)
            }
        );
        assert_eq!(
            w.check(t0 + WINDOW + Duration::from_secs(2)),
            Verdict::Log {
                suppressed_before: 0
            }
        );
    }

    #[test]
    fn rare_warnings_are_all_logged() {
        let mut w = GuestWarnings::default();
        let t0 = Instant::now();
        for i in 0..100u32 {
            let now = t0 + WINDOW * i;
            assert_eq!(
                w.check(now),
                Verdict::Log {
                    suppressed_before: 0
                }
            );
        }
    }
}
