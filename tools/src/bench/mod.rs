//! `ferry bench`: a load generator that is a real vhost-user-blk client (through libblkio), so it
//! measures ferry and any other vhost-user-blk backend alike; with `--nbd URI` it is an NBD
//! client instead (one pipelined connection per queue), measuring ferry's NBD server and any
//! other (qemu-nbd, qemu-storage-daemon) alike.

mod device;
mod histogram;
mod nbd_connection;
mod nbd_workload;
mod report;
mod workload;

use anyhow::{bail, Context};
use histogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use report::{BenchReport, CpuUse, LatencyUs};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};
use workload::{
    LiveCounters, Pattern, QueueJob, QueueResult, PHASE_MEASURE, PHASE_RAMP, PHASE_STOP,
};

/// How often the progress line is refreshed.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Options of `ferry bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The vhost-user socket of the backend to measure.
    #[arg(long, required_unless_present = "nbd")]
    pub socket: Option<std::path::PathBuf>,
    /// Measure an NBD export instead: nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH,
    /// or nbds:// / nbds+unix:// for TLS (with --tls-creds). Each queue is one connection.
    #[arg(long, value_name = "URI", conflicts_with_all = ["socket", "queue_size"])]
    pub nbd: Option<String>,
    /// TLS credentials for an nbds:// target (ca-cert.pem, client-cert.pem, client-key.pem).
    #[arg(long, value_name = "DIR", requires = "nbd")]
    pub tls_creds: Option<std::path::PathBuf>,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    pub rw: Pattern,
    /// Percentage of reads for --rw randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmix_read: u8,
    /// Request size (suffixes K, M, G: powers of 1024); a multiple of 512.
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    pub bs: u64,
    /// Requests kept in flight per queue.
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    /// Number of virtqueues, or of NBD connections (one client thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    /// Measurement time in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Warm-up time in seconds before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub ramp: f64,
    /// Busy-poll completions (do_io with min_completions 0 in a loop).
    #[arg(long, conflicts_with = "wait")]
    pub poll: bool,
    /// Block on the completion fd, like a guest with interrupts (the default).
    #[arg(long)]
    pub wait: bool,
    /// Bytes of the device to touch, from offset 0 (default: the whole device).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Virtqueue ring size (default: 3 * qd rounded up to a power of two, 256..=1024).
    #[arg(long)]
    pub queue_size: Option<u32>,
    /// Print one JSON object instead of the human summary; no progress display.
    #[arg(long)]
    pub json: bool,
}

use ferry_engine::units::parse_size;

/// Process-wide CPU time so far (user, system), from getrusage.
fn cpu_times() -> (Duration, Duration) {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a full `rusage` into the pointer it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return (Duration::ZERO, Duration::ZERO);
    }
    // SAFETY: zero-initialised and, on success, filled by the kernel.
    let u = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    (tv(u.ru_utime), tv(u.ru_stime))
}

/// Checks the options against each other before connecting.
fn validate(args: &BenchArgs) -> anyhow::Result<()> {
    let sector_remainder = args.bs % 512; // rust-version 1.85 predates is_multiple_of
    if args.bs == 0 || sector_remainder != 0 {
        bail!("--bs {} is not a positive multiple of 512", args.bs);
    }
    if args.qd == 0 || args.queues == 0 {
        bail!("--qd and --queues must be at least 1");
    }
    let secs_ok = args.secs.is_finite() && args.secs > 0.0;
    let ramp_ok = args.ramp.is_finite() && args.ramp >= 0.0;
    if !secs_ok || !ramp_ok {
        bail!("--secs must be a positive number and --ramp a non-negative one");
    }
    Ok(())
}

/// The bytes of the device to touch.
fn region_bytes(args: &BenchArgs, capacity_bytes: u64) -> anyhow::Result<u64> {
    let size = args.size.unwrap_or(capacity_bytes).min(capacity_bytes);
    if size < args.bs {
        bail!(
            "the region ({size} bytes; device {capacity_bytes}) is smaller than --bs {}",
            args.bs
        );
    }
    Ok(size)
}

/// The live progress line (hidden with --json or when stderr is not a terminal).
fn progress_bar(json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar
}

/// Sleeps for `length`, refreshing the progress line with the current rate.
/// Returns early when a queue thread has failed (the phase became [`PHASE_STOP`]).
fn show_progress(
    bar: &ProgressBar,
    label: &str,
    length: Duration,
    counters: &[LiveCounters],
    bs: u64,
    phase: &AtomicU8,
) {
    let start = Instant::now();
    let total = || {
        counters
            .iter()
            .map(|c| c.ops.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let (mut last_ops, mut last_t) = (total(), start);
    while start.elapsed() < length && phase.load(Ordering::Acquire) != PHASE_STOP {
        std::thread::sleep(PROGRESS_INTERVAL.min(length.saturating_sub(start.elapsed())));
        let (ops, now) = (total(), Instant::now());
        let dt = now.duration_since(last_t).as_secs_f64().max(1e-9);
        let iops = (ops - last_ops) as f64 / dt;
        bar.set_message(format!(
            "{label} {:>5.1}/{:.1}s  {:>10.0} IOPS  {:>9.1} MiB/s",
            start.elapsed().as_secs_f64(),
            length.as_secs_f64(),
            iops,
            iops * bs as f64 / 1048576.0
        ));
        bar.tick();
        (last_ops, last_t) = (ops, now);
    }
}

/// Runs the benchmark and prints the report.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    validate(&args)?;
    let (measured, queue_size, size_bytes) = match &args.nbd {
        Some(uri) => measure_nbd(&args, uri)?,
        None => measure_vhost_user(&args)?,
    };
    let report = build_report(&args, &measured, queue_size, size_bytes);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.human());
    }
    Ok(())
}

/// Measures a vhost-user-blk backend through libblkio.
fn measure_vhost_user(args: &BenchArgs) -> anyhow::Result<(Measured, u32, u64)> {
    let socket = args
        .socket
        .as_deref()
        .context("--socket or --nbd is required")?;
    let queue_size = args
        .queue_size
        .unwrap_or_else(|| device::queue_size_for(args.qd, device::QUEUE_SIZE_DEFAULT_MAX));
    if queue_size < ring_slots_needed(args.qd) && !args.json {
        eprintln!("note: queue-size {queue_size} holds fewer than qd={} requests; libblkio backlogs the rest", args.qd);
    }
    let buffer_bytes = usize::try_from(args.bs)? * args.qd * args.queues;
    let cfg = device::DeviceConfig {
        socket,
        queues: args.queues,
        poll: args.poll,
        queue_size,
        buffer_bytes,
    };
    let dev = device::open(&cfg)?;
    let size_bytes = region_bytes(args, dev.capacity_bytes)?;
    // `_blkio` keeps the device connected until the queue threads are done.
    let device::Device {
        blkio: _blkio,
        queues,
        region,
        ..
    } = dev;
    let jobs: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(index, queue)| (queue, queue_job(args, &region, index, size_bytes)))
        .collect();
    let measured = measure(args, jobs, |(queue, job), index, phase, counters| {
        workload::run_queue(queue, job, index, phase, counters).map_err(anyhow::Error::from)
    })?;
    Ok((measured, queue_size, size_bytes))
}

/// Measures an NBD export: one pipelined connection per queue.
fn measure_nbd(args: &BenchArgs, uri: &str) -> anyhow::Result<(Measured, u32, u64)> {
    let target = nbd_connection::Target::parse(uri)?;
    let mut streams = Vec::new();
    for _ in 0..args.queues {
        streams.push(nbd_connection::connect(&target, args.tls_creds.as_deref())?);
    }
    let capacity = streams.first().map_or(0, |s| s.size_bytes);
    let block_min = streams.first().map_or(1, |s| u64::from(s.block_bytes_min));
    if !args.bs.is_multiple_of(block_min) {
        bail!(
            "--bs {} is not a multiple of the export's block size {block_min}",
            args.bs
        );
    }
    let size_bytes = region_bytes(args, capacity)?;
    let region_blocks = size_bytes / args.bs;
    let jobs: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(index, stream)| {
            let job = nbd_workload::NbdJob {
                pattern: args.rw,
                rwmix_read_percent: args.rwmix_read,
                block_bytes: args.bs,
                queue_depth: args.qd,
                first_block: region_blocks / args.queues as u64 * index as u64,
                region_blocks,
                poll: args.poll,
                seed: queue_seed(index),
            };
            (stream, job)
        })
        .collect();
    let measured = measure(args, jobs, |(stream, job), _, phase, counters| {
        nbd_workload::run_connection(stream, job, phase, counters)
    })?;
    Ok((measured, 0, size_bytes))
}

/// Ring slots `qd` requests need at once.
fn ring_slots_needed(qd: usize) -> u32 {
    u32::try_from(qd * device::DESCRIPTORS_PER_REQUEST).unwrap_or(u32::MAX)
}

/// The job of queue `index`.
fn queue_job(
    args: &BenchArgs,
    region: &blkio::MemoryRegion,
    index: usize,
    size_bytes: u64,
) -> QueueJob {
    let region_blocks = size_bytes / args.bs;
    let per_queue_bytes = args.bs as usize * args.qd;
    QueueJob {
        pattern: args.rw,
        rwmix_read_percent: args.rwmix_read,
        block_bytes: args.bs,
        queue_depth: args.qd,
        first_block: region_blocks / args.queues as u64 * index as u64,
        region_blocks,
        poll: args.poll,
        buffer_addr: region.addr + index * per_queue_bytes,
        seed: queue_seed(index),
    }
}

/// The random seed of queue `index` (the same for every backend measured).
fn queue_seed(index: usize) -> u64 {
    0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1)
}

/// What the measurement phase produced.
struct Measured {
    elapsed: Duration,
    cpu_user: Duration,
    cpu_sys: Duration,
    merged: QueueResult,
}

/// Spawns one thread per job (`run` drives one queue or connection), ramps, measures,
/// stops and gathers the results.
fn measure<J: Send>(
    args: &BenchArgs,
    jobs: Vec<J>,
    run: impl Fn(J, usize, &AtomicU8, &LiveCounters) -> anyhow::Result<QueueResult> + Sync,
) -> anyhow::Result<Measured> {
    let phase = AtomicU8::new(PHASE_RAMP);
    let counters: Vec<LiveCounters> = (0..jobs.len()).map(|_| LiveCounters::default()).collect();
    let bar = progress_bar(args.json);
    let (elapsed, cpu, results) = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (index, job) in jobs.into_iter().enumerate() {
            let (phase, counters, run) = (&phase, &counters[index], &run);
            handles.push(scope.spawn(move || {
                let result = run(job, index, phase, counters);
                if result.is_err() {
                    phase.store(PHASE_STOP, Ordering::Release);
                }
                result
            }));
        }
        let secs = |s: f64| Duration::from_secs_f64(s);
        show_progress(&bar, "ramp   ", secs(args.ramp), &counters, args.bs, &phase);
        let (t0, cpu0) = (Instant::now(), cpu_times());
        let started = phase.compare_exchange(
            PHASE_RAMP,
            PHASE_MEASURE,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if started.is_ok() {
            show_progress(&bar, "measure", secs(args.secs), &counters, args.bs, &phase);
        }
        phase.store(PHASE_STOP, Ordering::Release);
        let (elapsed, cpu1) = (t0.elapsed(), cpu_times());
        let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        (
            elapsed,
            (cpu1.0.saturating_sub(cpu0.0), cpu1.1.saturating_sub(cpu0.1)),
            results,
        )
    });
    bar.finish_and_clear();
    let mut merged = QueueResult {
        latency_ns: Histogram::new(),
        read_ops: 0,
        write_ops: 0,
    };
    for r in results {
        let r = match r {
            Ok(r) => r.context("queue thread failed")?,
            Err(_) => bail!("a queue thread panicked"),
        };
        merged.latency_ns.merge(&r.latency_ns);
        merged.read_ops += r.read_ops;
        merged.write_ops += r.write_ops;
    }
    Ok(Measured {
        elapsed,
        cpu_user: cpu.0,
        cpu_sys: cpu.1,
        merged,
    })
}

/// The report of a finished run.
fn build_report(args: &BenchArgs, m: &Measured, queue_size: u32, size_bytes: u64) -> BenchReport {
    let ops = m.merged.latency_ns.count();
    let (iops, mib_per_sec) = BenchReport::throughput(ops, args.bs, m.elapsed);
    let wall = m.elapsed.as_secs_f64().max(1e-9);
    BenchReport {
        socket: match (&args.nbd, &args.socket) {
            (Some(uri), _) => uri.clone(),
            (None, Some(socket)) => socket.display().to_string(),
            (None, None) => String::new(),
        },
        rw: args.rw,
        bs_bytes: args.bs,
        qd: args.qd,
        queues: args.queues,
        mode: if args.poll { "poll" } else { "wait" },
        queue_size,
        size_bytes,
        ramp_secs: args.ramp,
        secs: wall,
        ops,
        read_ops: m.merged.read_ops,
        write_ops: m.merged.write_ops,
        iops,
        mib_per_sec,
        latency_us: LatencyUs::from_histogram(&m.merged.latency_ns),
        cpu: CpuUse {
            user_secs: m.cpu_user.as_secs_f64(),
            sys_secs: m.cpu_sys.as_secs_f64(),
            percent_of_one_core: (m.cpu_user + m.cpu_sys).as_secs_f64() / wall * 100.0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("128k"), Ok(128 * 1024));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
    }
}
