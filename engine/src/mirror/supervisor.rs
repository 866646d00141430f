//! The job's supervisor thread: measures rates, declares the job ready, warns when it
//! does not converge, and cuts over by itself when `auto_cutover` is set.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::job::{JobShared, Rates};
use super::status::MigrationState;

/// How often the supervisor looks at the job.
const TICK: Duration = Duration::from_millis(20);
/// Rates are measured over windows of this length.
const RATE_WINDOW: Duration = Duration::from_millis(500);

pub(crate) fn run(job: Arc<JobShared>) {
    let mut window_start = Instant::now();
    let mut copied_then = job.counters.copied_bytes.load(Ordering::Relaxed);
    let mut dirtied_then = job.counters.dirtied_bytes.load(Ordering::Relaxed);
    let ready_bytes = job.options.ready_pending_bytes();
    while !job.stopped() {
        std::thread::sleep(TICK);
        let pending = job.pending_bytes();
        if window_start.elapsed() >= RATE_WINDOW {
            let secs = window_start.elapsed().as_secs_f64();
            let copied = job.counters.copied_bytes.load(Ordering::Relaxed);
            let dirtied = job.counters.dirtied_bytes.load(Ordering::Relaxed);
            let rates = Rates {
                copy_bytes_per_s: ((copied - copied_then) as f64 / secs) as u64,
                dirty_bytes_per_s: ((dirtied - dirtied_then) as f64 / secs) as u64,
                converging: pending <= ready_bytes || dirtied - dirtied_then < copied - copied_then,
            };
            update_rates(&job, rates);
            (window_start, copied_then, dirtied_then) = (Instant::now(), copied, dirtied);
        }
        if pending <= ready_bytes && job.transition(MigrationState::Copying, MigrationState::Ready)
        {
            log::info!("migration job {} is ready for cutover", job.id);
        }
        if job.options.auto_cutover && job.state() == MigrationState::Ready {
            if let Err(e) = super::cutover::run(&job, super::cutover::Ending::Switch) {
                log::warn!("migration job {}: automatic cutover failed: {e}", job.id);
            }
        }
    }
}

fn update_rates(job: &JobShared, rates: Rates) {
    if let Ok(mut r) = job.rates.lock() {
        if r.converging && !rates.converging {
            log::warn!(
                "migration job {} is not converging: guests dirty {} B/s, the copier copies {} B/s",
                job.id,
                rates.dirty_bytes_per_s,
                rates.copy_bytes_per_s
            );
        }
        *r = rates;
    }
}
