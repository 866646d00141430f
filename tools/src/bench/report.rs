//! The result of a `ferry bench` run: one JSON object (`--json`) or a short human summary.

use super::histogram::Histogram;
use super::workload::Pattern;
use serde::Serialize;
use std::time::Duration;

/// Latency percentiles of completed requests, in microseconds.
#[derive(Debug, Serialize)]
pub struct LatencyUs {
    pub mean: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl LatencyUs {
    /// Percentiles of a histogram of nanoseconds.
    pub fn from_histogram(h: &Histogram) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            mean: h.mean() / 1000.0,
            min: us(h.min()),
            p50: us(h.percentile(50.0)),
            p90: us(h.percentile(90.0)),
            p99: us(h.percentile(99.0)),
            p99_9: us(h.percentile(99.9)),
            max: us(h.max()),
        }
    }
}

/// CPU time the client (this process, every thread) used during the measurement phase.
#[derive(Debug, Serialize)]
pub struct CpuUse {
    pub user_secs: f64,
    pub sys_secs: f64,
    /// (user + sys) / wall time * 100: 100 means one core fully busy.
    pub percent_of_one_core: f64,
}

/// Everything `ferry bench --json` prints.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub socket: String,
    pub rw: Pattern,
    pub bs_bytes: u64,
    pub qd: usize,
    pub queues: usize,
    /// "poll" or "wait".
    pub mode: &'static str,
    pub queue_size: u32,
    pub size_bytes: u64,
    pub ramp_secs: f64,
    pub secs: f64,
    pub ops: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub iops: f64,
    pub mib_per_sec: f64,
    pub latency_us: LatencyUs,
    pub cpu: CpuUse,
}

impl BenchReport {
    /// Fills the throughput figures from the op count and the measured wall time.
    pub fn throughput(ops: u64, bs_bytes: u64, elapsed: Duration) -> (f64, f64) {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let iops = ops as f64 / secs;
        (iops, iops * bs_bytes as f64 / (1024.0 * 1024.0))
    }

    /// A few lines for a person.
    pub fn human(&self) -> String {
        let l = &self.latency_us;
        format!(
            "{rw:?} bs={bs} qd={qd} queues={queues} mode={mode} queue-size={qs} size={size} secs={secs:.1}\n\
             iops: {iops:.0}  bandwidth: {mib:.1} MiB/s  ops: {ops} (read {r}, write {w})\n\
             latency (µs): mean {mean:.1}  min {min:.1}  p50 {p50:.1}  p90 {p90:.1}  p99 {p99:.1}  p99.9 {p999:.1}  max {max:.1}\n\
             client cpu: user {user:.2}s sys {sys:.2}s = {cpu:.0}% of one core",
            rw = self.rw,
            bs = self.bs_bytes,
            qd = self.qd,
            queues = self.queues,
            mode = self.mode,
            qs = self.queue_size,
            size = self.size_bytes,
            secs = self.secs,
            iops = self.iops,
            mib = self.mib_per_sec,
            ops = self.ops,
            r = self.read_ops,
            w = self.write_ops,
            mean = l.mean,
            min = l.min,
            p50 = l.p50,
            p90 = l.p90,
            p99 = l.p99,
            p999 = l.p99_9,
            max = l.max,
            user = self.cpu.user_secs,
            sys = self.cpu.sys_secs,
            cpu = self.cpu.percent_of_one_core,
        )
    }
}
