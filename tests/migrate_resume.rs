//! Migrations that survive a restart of the daemon (`docs/migration.md`, *Migrations that
//! survive a restart*), end to end: `ferry serve` serves a volume, a libblkio client writes
//! during the whole test, a speed-limited migration to a file (`background`, and `active`
//! for a crash) is stopped at about half copied by SIGKILL (a crash) or SIGTERM (a clean
//! shutdown), the daemon is started again
//! on the same images, reports the interrupted job, and `ferry migrate resume` finishes it.
//! The resume must copy no more than what was left, plus what the clients dirtied, plus
//! (after a crash) one interval's copies and writes; and the target must end equal to the
//! source. A damaged job file is reported in one line and never resumed.

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use nix::sys::signal::Signal;
use serde_json::Value;
use support::ferry_cli::FerryServe;
use support::pattern_writer::{PatternWriter, WriterConfig};

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 32 * MIB;
/// The job's tracking granularity (the default).
const CHUNK_BYTES: u64 = 64 << 10;
const SPEED: &str = "4M";
const SPEED_BYTES_PER_S: u64 = 4 * MIB;
const PERSIST_INTERVAL_MS: u64 = 500;
/// A migration's copies in flight at most: copy threads (4) times the copy size (1 MiB).
const COPIES_IN_FLIGHT_BYTES: u64 = 4 * MIB;
const WAIT: Duration = Duration::from_secs(60);

/// The writers: one small write at a time, paced, so that a background job converges.
fn writer_config(seed: u64) -> WriterConfig {
    WriterConfig {
        seed,
        inflight: 1,
        write_bytes_max: 16 << 10,
        pace: Duration::from_millis(50),
        window_bytes: None,
    }
}

/// The most bytes of chunks one batch of the writers can dirty: a write of at most 16 KiB
/// aligned to 4 KiB touches at most two 64 KiB chunks.
const DIRTY_BYTES_PER_BATCH_MAX: u64 = 2 * CHUNK_BYTES;

struct Fixture {
    dir: tempfile::TempDir,
    specs: Vec<String>,
}

impl Fixture {
    fn new() -> Result<Self> {
        let dir = support::scratch_dir()?;
        let image = dir.path().join("vda.img");
        let data = support::pattern(7, VOLUME_BYTES as usize);
        std::fs::write(&image, &data).context("write the source image")?;
        let specs = vec![format!(
            "name=vda,path={},socket={}",
            image.display(),
            dir.path().join("vda.sock").display()
        )];
        Ok(Self { dir, specs })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn serve(&self) -> Result<FerryServe> {
        FerryServe::start(&self.specs, &self.path("ctl.sock"))
    }

    fn job_file(&self) -> PathBuf {
        self.path("vda.img.ferry-migration")
    }

    fn writer(&self, seed: u64) -> Result<PatternWriter> {
        let initial = std::fs::read(self.path("vda.img")).context("read the source")?;
        PatternWriter::spawn(&self.path("vda.sock"), initial, writer_config(seed))
    }
}

/// The one job in `migrate status --json`.
fn only_status(serve: &FerryServe) -> Result<Value> {
    let list = serve.migrate("status", &["--json"])?.ok()?.json()?;
    let list = list.as_array().context("status is not a list")?;
    ensure!(list.len() == 1, "expected one job: {list:?}");
    Ok(list[0].clone())
}

/// Starts the job and waits until about half of the volume is copied; returns the job's
/// status then and the writer's batch count at that moment.
fn start_and_copy_half(
    fx: &Fixture,
    serve: &FerryServe,
    writer: &PatternWriter,
    mode: &str,
) -> Result<(Value, u64)> {
    let target = fx.path("dst.img");
    let interval = PERSIST_INTERVAL_MS.to_string();
    let id = serve.start_migration(&[
        "--volume",
        "vda",
        "--target",
        target.to_str().context("path")?,
        "--mode",
        mode,
        "--max-speed",
        SPEED,
        "--persist-interval-ms",
        &interval,
    ])?;
    let deadline = Instant::now() + WAIT;
    loop {
        let batches = writer.batches();
        let status = serve.job_status(id)?;
        ensure!(status["state"] == "copying", "job left copying: {status}");
        ensure!(status["job_file"].is_string(), "no job file: {status}");
        if status["copied_bytes"].as_u64().unwrap_or(0) >= VOLUME_BYTES / 2 {
            ensure!(
                fx.job_file().exists(),
                "{} is missing",
                fx.job_file().display()
            );
            return Ok((status, batches));
        }
        ensure!(
            Instant::now() < deadline,
            "half not copied in time: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After the restart: the interrupted job is reported (status and log); a second writer
/// writes for a while; the resume's bytes to copy stay within `bound` (given the second
/// writer's batches); the job completes and the target equals the source.
fn resume_and_check(fx: &Fixture, crashed: bool, bound: impl Fn(u64) -> u64) -> Result<()> {
    let serve = fx.serve()?;
    let status = only_status(&serve)?;
    ensure!(status["state"] == "interrupted", "{status}");
    ensure!(status["crashed"] == crashed, "{status}");
    let log = serve.daemon.log();
    let cause = if crashed {
        "interrupted by a crash"
    } else {
        "interrupted by a shutdown"
    };
    ensure!(
        log.contains(cause),
        "no log line about the interrupted job:\n{log}"
    );
    let writer = fx.writer(41)?;
    writer.wait_more(10, WAIT)?;
    let reply = serve
        .migrate("resume", &["--volume", "vda", "--json"])?
        .ok()?
        .json()?;
    let batches = writer.batches() + 1; // one may be under way
    let to_copy = reply["total_bytes"].as_u64().context("no total_bytes")?;
    ensure!(reply["crashed"] == crashed, "{reply}");
    let bound = bound(batches);
    eprintln!(
        "resume after {}: {to_copy} bytes to copy (bound {bound}, volume {VOLUME_BYTES})",
        if crashed { "SIGKILL" } else { "SIGTERM" }
    );
    ensure!(
        to_copy <= bound,
        "the resume copies {to_copy} bytes, more than {bound}"
    );
    ensure!(to_copy < VOLUME_BYTES, "the resume copies the whole volume");
    let id = reply["job"].as_u64().context("no job id")?;
    serve.wait_ready(id)?;
    writer.wait_more(5, WAIT)?;
    let client = writer.stop()?;
    client.ensure_no_error()?;
    let report = serve.cutover(id)?;
    ensure!(report["switched"] == true, "{report}");
    let status = serve.job_status(id)?;
    ensure!(status["state"] == "completed", "{status}");
    eprintln!(
        "resumed job copied {} bytes (total {}), cutover {report}",
        status["copied_bytes"], status["total_bytes"]
    );
    ensure!(!fx.job_file().exists(), "the job file outlived the job");
    support::compare_image(&fx.path("dst.img"), 0, &client.model)?;
    let source = std::fs::read(fx.path("vda.img"))?;
    support::compare_bytes(
        "target vs source",
        &std::fs::read(fx.path("dst.img"))?,
        &source,
    )
}

/// SIGKILL at about half copied under a writing client: after the restart the resume
/// copies what was left, what the clients dirtied, and what one flush interval may hide
/// (copies and writes since the last rewrite of the job file), and no more.
#[test]
fn resume_after_sigkill_copies_only_what_is_left() -> Result<()> {
    sigkill_and_resume("background", 31)
}

/// The same in `active` mode, where a guest write reaches the target before it completes:
/// a write in flight at the kill may be on the source only, and its chunk must be armed.
#[test]
fn resume_of_an_active_job_after_sigkill() -> Result<()> {
    sigkill_and_resume("active", 34)
}

fn sigkill_and_resume(mode: &str, seed: u64) -> Result<()> {
    let fx = Fixture::new()?;
    let mut serve = fx.serve()?;
    let writer = fx.writer(seed)?;
    let (status, batches_then) = start_and_copy_half(&fx, &serve, &writer, mode)?;
    let left_bytes = status["dirty_bytes"].as_u64().context("dirty_bytes")?;
    serve.daemon.kill();
    let first_batches = writer.batches() + 1;
    drop_in_background(writer); // its last writes fail: the daemon is gone
    let interval_s = PERSIST_INTERVAL_MS as f64 / 1000.0;
    // Copies since the last rewrite are copied again: an interval at the speed limit, and
    // the copies in flight. The writes since the status query were counted as batches.
    let interval_copies = (SPEED_BYTES_PER_S as f64 * interval_s) as u64 + COPIES_IN_FLIGHT_BYTES;
    resume_and_check(&fx, true, |second_batches| {
        let dirtied = (first_batches - batches_then + second_batches) * DIRTY_BYTES_PER_BATCH_MAX;
        left_bytes + dirtied + interval_copies
    })
}

/// SIGTERM at about half copied: the daemon writes the job file a last time with guest I/O
/// held, and the resume copies only what was left and what the clients dirtied.
#[test]
fn resume_after_sigterm_copies_only_what_is_left() -> Result<()> {
    let fx = Fixture::new()?;
    let mut serve = fx.serve()?;
    let writer = fx.writer(32)?;
    let (status, batches_then) = start_and_copy_half(&fx, &serve, &writer, "background")?;
    let left_bytes = status["dirty_bytes"].as_u64().context("dirty_bytes")?;
    let exit = serve.daemon.terminate(WAIT)?;
    let first_batches = writer.batches() + 1;
    drop_in_background(writer);
    ensure!(
        exit.success(),
        "ferry serve exited with {exit} on SIGTERM:\n{}",
        serve.daemon.log()
    );
    ensure!(
        serve.daemon.log().contains("left for ferry migrate resume"),
        "no shutdown line:\n{}",
        serve.daemon.log()
    );
    // Copies in flight at the last status are still pending then, so nothing else counts.
    resume_and_check(&fx, false, |second_batches| {
        left_bytes + (first_batches - batches_then + second_batches) * DIRTY_BYTES_PER_BATCH_MAX
    })
}

/// A job file cut short, or with one byte changed, is reported in one log line and by
/// `ferry migrate resume` in one line; nothing is resumed, and `ferry migrate discard`
/// removes the file, after which a new migration may start.
#[test]
fn a_damaged_job_file_is_reported_and_never_resumed() -> Result<()> {
    let fx = Fixture::new()?;
    let mut serve = fx.serve()?;
    let writer = fx.writer(33)?;
    start_and_copy_half(&fx, &serve, &writer, "background")?;
    serve.daemon.signal(Signal::SIGTERM)?;
    serve.daemon.wait_exit(WAIT)?;
    drop_in_background(writer);
    let whole = std::fs::read(fx.job_file())?;
    let mut flipped = whole.clone();
    flipped[whole.len() - 9] ^= 0x10;
    for (what, bytes) in [
        ("truncated", &whole[..whole.len() / 2]),
        ("flipped", &flipped[..]),
    ] {
        std::fs::write(fx.job_file(), bytes)?;
        let mut serve = fx.serve()?;
        let log = serve.daemon.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("interrupted migration cannot be resumed"))
            .collect();
        ensure!(lines.len() == 1, "{what}: expected one error line:\n{log}");
        let statuses = serve.migrate("status", &["--json"])?.ok()?.json()?;
        ensure!(statuses == Value::Array(vec![]), "{what}: {statuses}");
        let out = serve.migrate("resume", &["--volume", "vda"])?;
        let error = out.expect_error("cannot be resumed")?;
        ensure!(
            error.trim().lines().count() == 1,
            "{what}: not one line: {error}"
        );
        ensure!(error.contains("job file"), "{what}: {error}");
        eprintln!("{what}: {}", error.trim());
        serve.daemon.terminate(WAIT)?;
    }
    let serve = fx.serve()?;
    serve.migrate("discard", &["--volume", "vda"])?.ok()?;
    ensure!(!fx.job_file().exists(), "discard left the job file");
    let target = fx.path("dst2.img");
    serve.start_migration(&["--volume", "vda", "--target", path_str(&target)?])?;
    Ok(())
}

/// Lets a writer whose daemon is gone end on its own: its last request, which no one will
/// complete, can keep libblkio waiting for about a minute.
fn drop_in_background(writer: PatternWriter) {
    std::thread::spawn(move || drop(writer));
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("path is not UTF-8")
}
