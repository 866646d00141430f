//! A replication group's bounded lag and bitmap resync between two hosts
//! (`docs/replication.md`): `ferry serve` daemons A (primary) and B (DR site), each in its own
//! network namespace, over mutual TLS, with libblkio clients writing sequence-stamped blocks
//! on A. A partition (`ip link set down`) with `--max-lag 2s`: the group degrades to its
//! bitmap, the writer sees no error, and after the link is back the group resyncs and
//! streams again, the replicas equal to the primary, the resync's bytes within 1.1x of the
//! changed data after rounding to the bitmap's chunks. A link slower than the writes
//! (`tc ... tbf`, 8 Mbit/s): with `--on-lag degrade` the lag stays within the bound or the
//! group degrades; with `--on-lag throttle` the writes slow down and the group never
//! degrades. A sync group whose link is cut degrades to the same bitmap state after its
//! `--sync-timeout`, resyncs and is in sync again.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use support::blkio_client::{BlkioClient, BlkioOpts};
use support::two_hosts::{path_str, HostOptions, TwoHosts};

const BLOCK_BYTES: usize = 4096;
/// The pattern writes in the first 2 MiB of each volume.
const PATTERN_BLOCKS: u64 = 512;
/// The primary's dirty bitmap granularity (`DIRTY_CHUNK_BYTES`).
const CHUNK_BYTES: u64 = 4 << 10;
const TIMEOUT: Duration = Duration::from_secs(120);

/// A sequence-stamped 4 KiB block: write `seq` of the workload.
fn stamped(seq: u64) -> Vec<u8> {
    let mut data = vec![(seq % 251) as u8 + 1; BLOCK_BYTES];
    data[..8].copy_from_slice(&seq.to_le_bytes());
    data
}

/// Where write `seq` goes: (volume 0 or 1, byte offset).
fn place(seq: u64) -> (usize, u64) {
    let block = (seq * 13) % PATTERN_BLOCKS;
    (usize::from(seq % 2 == 1), block * BLOCK_BYTES as u64)
}

/// The writer: libblkio clients on vm1 and vm2 of host A, and the bitmap chunks its writes
/// touched since `touched` was last cleared.
struct Writer {
    clients: [BlkioClient; 2],
    next_seq: u64,
    touched: BTreeSet<(usize, u64)>,
}

impl Writer {
    fn connect(hosts: &TwoHosts) -> Result<Self> {
        let opts = BlkioOpts {
            buf_bytes: 1 << 20,
            ..BlkioOpts::default()
        };
        Ok(Self {
            clients: [
                BlkioClient::connect(&hosts.path("a.sock"), &opts)?,
                BlkioClient::connect(&hosts.path("a2.sock"), &opts)?,
            ],
            next_seq: 1,
            touched: BTreeSet::new(),
        })
    }

    /// The next `count` writes of the pattern, one at a time (every error fails the test:
    /// the guest must never see one), a flush every 50.
    fn write(&mut self, count: u64) -> Result<()> {
        for _ in 0..count {
            let seq = self.next_seq;
            let (volume, offset) = place(seq);
            self.clients[volume]
                .write_all(offset, &stamped(seq), BLOCK_BYTES)
                .with_context(|| format!("write {seq}"))?;
            if seq.is_multiple_of(50) {
                self.clients[volume].flush()?;
            }
            self.touched.insert((volume, offset / CHUNK_BYTES));
            self.next_seq += 1;
        }
        Ok(())
    }

    /// `blocks` consecutive stamped blocks on one volume at once (in flight together), at a
    /// place that moves through the pattern's area: a writer faster than a slow link.
    fn write_burst(&mut self, blocks: u64) -> Result<()> {
        let first = self.next_seq;
        let volume = usize::from(first % 2 == 1);
        let start = (first * 13 % (PATTERN_BLOCKS - blocks)) * BLOCK_BYTES as u64;
        let mut data = Vec::with_capacity(blocks as usize * BLOCK_BYTES);
        for seq in first..first + blocks {
            data.extend_from_slice(&stamped(seq));
        }
        self.clients[volume]
            .write_all(start, &data, BLOCK_BYTES)
            .with_context(|| format!("burst from write {first}"))?;
        let end = start + data.len() as u64;
        for chunk in start / CHUNK_BYTES..end.div_ceil(CHUNK_BYTES) {
            self.touched.insert((volume, chunk));
        }
        self.next_seq += blocks;
        Ok(())
    }

    /// The changed data after rounding to the bitmap's chunks, since `touched` was cleared.
    fn touched_bytes(&self) -> u64 {
        self.touched.len() as u64 * CHUNK_BYTES
    }
}

/// Two hosts with vm1 and vm2 on A, replicated to B as group `g` with `extra` arguments,
/// its initial copy applied.
fn replicated(extra: &[&str]) -> Result<Option<(TwoHosts, Writer)>> {
    let options = HostOptions {
        second_volume: true,
        ..HostOptions::default()
    };
    let Some(hosts) = TwoHosts::start(options)? else {
        return Ok(None);
    };
    let mut writer = Writer::connect(&hosts)?;
    writer.write(100)?;
    std::fs::create_dir(hosts.path("dr")).context("dr directory")?;
    let dr = path_str(&hosts.path("dr"))?.to_string();
    let control_a = path_str(&hosts.path("a.ctl"))?.to_string();
    let url = hosts.url_b();
    let mut args = vec![
        "replicate",
        "start",
        "--control",
        &control_a,
        "--volume",
        "vm1",
        "--volume",
        "vm2",
        "--to",
        &url,
        "--group",
        "g",
        "--path-prefix",
        &dr,
        "--socket-prefix",
        &dr,
    ];
    args.extend_from_slice(extra);
    let start = support::two_hosts::ferry_in(Some(hosts.host_a()), &args)?;
    ensure!(start.status.success(), "replicate start: {}", start.stderr);
    wait_streaming(&hosts)?;
    Ok(Some((hosts, writer)))
}

/// `ferry replicate status --json` of group `g` on A.
fn status(hosts: &TwoHosts) -> Result<Value> {
    let control_a = path_str(&hosts.path("a.ctl"))?.to_string();
    let out = support::two_hosts::ferry_in(
        Some(hosts.host_a()),
        &[
            "replicate",
            "status",
            "--control",
            &control_a,
            "--group",
            "g",
            "--json",
        ],
    )?;
    ensure!(out.status.success(), "status: {}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout)?;
    Ok(v[0].clone())
}

/// Waits until the group streams and every record numbered is applied at the DR site.
fn wait_streaming(hosts: &TwoHosts) -> Result<Value> {
    let done = support::wait::wait_until("the group streaming, all applied", TIMEOUT, || {
        let s = status(hosts)?;
        Ok(s["state"] == "replicating"
            && s["numbered-seq"].as_u64() > Some(0)
            && s["applied-seq"] == s["numbered-seq"])
    });
    if let Err(e) = done {
        bail!("{e:#}: primary {}", status(hosts)?);
    }
    status(hosts)
}

/// `replicate-status` of group `g` on B (its unix socket, not over the link).
fn dr_status(hosts: &TwoHosts) -> Result<Value> {
    let v = hosts.local_b("replicate-status")?;
    Ok(match v {
        Value::Array(groups) => groups.into_iter().next().unwrap_or_default(),
        one => one,
    })
}

/// After a drain, the replica images equal the primary's, whole.
fn replicas_equal_primary(hosts: &TwoHosts) -> Result<()> {
    for (image, replica) in [("a.img", "dr/vm1.img"), ("a2.img", "dr/vm2.img")] {
        let primary = std::fs::read(hosts.path(image))?;
        let copy = std::fs::read(hosts.path(replica))?;
        support::compare_bytes(replica, &copy, &primary)?;
    }
    Ok(())
}

/// Resync bytes against the changed data (`changed_bytes`, rounded to the bitmap's 4 KiB
/// chunks): at most 1.1x.
fn check_resync_bytes(s: &Value, changed_bytes: u64) -> Result<()> {
    let sent = s["resync-bytes"].as_u64().unwrap_or(0);
    let marked = s["resync-changed-bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "resync: {} resyncs, {sent} bytes sent, {marked} bytes marked, {changed_bytes} bytes changed (in 4 KiB chunks)",
        s["resyncs"]
    );
    ensure!(s["resyncs"].as_u64() >= Some(1), "no resync: {s}");
    ensure!(sent > 0, "the resync sent nothing: {s}");
    ensure!(
        sent as f64 <= 1.1 * changed_bytes as f64,
        "the resync sent {sent} bytes for {changed_bytes} bytes changed"
    );
    Ok(())
}

/// A partition while the writer writes: with `--max-lag 2s` the group degrades (the writer
/// sees no error and does not stall), the bitmap marks what changes; with the link back it
/// resyncs, streams again, and after a drain the replicas equal the primary.
#[test]
fn a_partitioned_group_degrades_then_resyncs_to_equal_the_primary() -> Result<()> {
    let Some((hosts, mut writer)) = replicated(&["--max-lag", "2s"])? else {
        return Ok(());
    };
    writer.touched.clear();
    hosts.host_a().set_link(false)?;
    let cut = Instant::now();
    let mut slowest = Duration::ZERO;
    loop {
        let started = Instant::now();
        writer.write(20)?;
        slowest = slowest.max(started.elapsed());
        let s = status(&hosts)?;
        if s["state"] == "degraded" {
            let reason = s["degraded-reason"].as_str().unwrap_or_default();
            ensure!(reason.contains("--max-lag"), "reason: {s}");
            break;
        }
        ensure!(cut.elapsed() < TIMEOUT, "never degraded: {s}");
    }
    eprintln!(
        "degraded {:.1} s after the cut; the slowest 20 writes took {:.0} ms",
        cut.elapsed().as_secs_f64(),
        slowest.as_secs_f64() * 1e3
    );
    writer.write(400)?;
    let s = status(&hosts)?;
    ensure!(s["state"] == "degraded", "{s}");
    ensure!(s["dirty-bytes"].as_u64() > Some(0), "nothing marked: {s}");
    hosts.host_a().set_link(true)?;
    // Writes during the resync are numbered records again.
    writer.write(200)?;
    let s = wait_streaming(&hosts)?;
    check_resync_bytes(&s, writer.touched_bytes())?;
    let dr = dr_status(&hosts)?;
    ensure!(
        dr["state"] == "replicating" && dr["resync-since-seq"].is_null(),
        "the DR site still sees a resync: {dr}"
    );
    replicas_equal_primary(&hosts)
}

/// Writes bursts of 64 blocks in flight for `seconds`, sampling the group after each;
/// returns the largest lag seen while it streamed (seconds, bytes), whether it degraded, the
/// samples and the slowest burst.
fn under_slow_link(
    hosts: &TwoHosts,
    writer: &mut Writer,
    seconds: u64,
) -> Result<(f64, u64, bool, Vec<Value>, Duration)> {
    let mut lag_s = 0.0f64;
    let mut lag_bytes = 0u64;
    let mut degraded = false;
    let mut samples = Vec::new();
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        let burst = Instant::now();
        writer.write_burst(64)?;
        slowest = slowest.max(burst.elapsed());
        let s = status(hosts)?;
        degraded |= s["state"] == "degraded";
        if s["state"] != "degraded" && s["state"] != "resyncing" {
            lag_s = lag_s.max(s["lag-seconds"].as_f64().unwrap_or(0.0));
            lag_bytes = lag_bytes.max(s["lag-bytes"].as_u64().unwrap_or(0));
        }
        samples.push(s);
    }
    Ok((lag_s, lag_bytes, degraded, samples, slowest))
}

/// A link slower than the writes (8 Mbit/s) and `--max-lag 1s --max-lag 4M` (degrade): while
/// the group streams its lag stays within the bound (plus one sampling step), or it
/// degrades; the writer never sees an error. The resync begins on the slow link (in batches
/// of 1 MiB, a quarter of the bound), and meanwhile the DR site refuses a promotion without
/// --force. The link cleared, the group streams again and equals the primary.
#[test]
fn async_on_a_slow_link_stays_within_max_lag_or_degrades() -> Result<()> {
    let Some((hosts, mut writer)) = replicated(&["--max-lag", "1s", "--max-lag", "4M"])? else {
        return Ok(());
    };
    writer.touched.clear();
    hosts.host_a().limit_rate(8_000_000)?;
    let (lag_s, lag_bytes, degraded, samples, slowest) = under_slow_link(&hosts, &mut writer, 8)?;
    let last = samples.last().cloned().unwrap_or_default();
    eprintln!(
        "slow link, degrade: {} bursts, the slowest {:.0} ms; largest lag while streaming {lag_s:.2} s, {lag_bytes} bytes; degraded {degraded}; last {last}",
        samples.len(),
        slowest.as_secs_f64() * 1e3
    );
    // One sampling step (a burst and a status call) of slack over the bound.
    ensure!(
        lag_s <= 1.5,
        "the lag reached {lag_s:.2} s while the group streamed"
    );
    // The writer is faster than the link: the lag must have reached the bound.
    ensure!(
        degraded,
        "never degraded under a writer faster than the link: {last}"
    );
    // Still on the slow link, the resync begins once the records held are acknowledged:
    // the DR site knows it and refuses a promotion without --force meanwhile.
    support::wait::wait_until("the DR site resyncing", TIMEOUT, || {
        Ok(dr_status(&hosts)?["state"] == "resyncing")
    })?;
    let dr_control = path_str(&hosts.path("b.ctl"))?.to_string();
    let promote = support::two_hosts::ferry_in(
        None,
        &[
            "replicate",
            "promote",
            "--control",
            &dr_control,
            "--group",
            "g",
        ],
    )?;
    ensure!(
        !promote.status.success() && promote.stderr.contains("inside the resync"),
        "a promotion during the resync: {} {}",
        promote.stdout,
        promote.stderr
    );
    hosts.host_a().clear_rate_limit()?;
    let s = wait_streaming(&hosts)?;
    // The writer may go on through a first resync and degrade the group again, rewriting
    // blocks sent already: against the blocks marked when each resync began, not the
    // blocks the writer changed once.
    let marked = s["resync-changed-bytes"].as_u64().unwrap_or(0);
    check_resync_bytes(&s, marked)?;
    replicas_equal_primary(&hosts)
}

/// The same slow link with `--max-lag 4M --on-lag throttle`: the guest's writes slow down
/// (completions delayed), the group never degrades, the lag stays near the bound, and the
/// writer never sees an error.
#[test]
fn async_on_a_slow_link_throttles_the_writer_without_degrading() -> Result<()> {
    let Some((hosts, mut writer)) = replicated(&["--max-lag", "4M", "--on-lag", "throttle"])?
    else {
        return Ok(());
    };
    hosts.host_a().limit_rate(8_000_000)?;
    let (lag_s, lag_bytes, degraded, samples, slowest) = under_slow_link(&hosts, &mut writer, 8)?;
    let last = samples.last().cloned().unwrap_or_default();
    eprintln!(
        "slow link, throttle: {} bursts of 256 KiB in 8 s, the slowest {:.0} ms; largest lag {lag_s:.2} s, {lag_bytes} bytes; last {last}",
        samples.len(),
        slowest.as_secs_f64() * 1e3
    );
    ensure!(!degraded, "the throttling group degraded: {last}");
    eprintln!(
        "link throughput reported: {} bytes/s (the link: 8 Mbit/s)",
        last["link-bytes-per-s"]
    );
    ensure!(
        last["link-bytes-per-s"].as_f64() > Some(0.0),
        "no link throughput: {last}"
    );
    ensure!(
        last["throttled-writes"].as_u64() > Some(0),
        "nothing was throttled: {last}"
    );
    ensure!(
        lag_bytes <= 8 << 20,
        "the lag reached {lag_bytes} bytes, twice the bound"
    );
    hosts.host_a().clear_rate_limit()?;
    wait_streaming(&hosts)?;
    replicas_equal_primary(&hosts)
}

/// A sync group whose link is cut: after `--sync-timeout` it degrades to the bitmap, as an
/// async group does (the writer sees no error); with the link back it resyncs, is in sync
/// again, and after a drain the replicas equal the primary.
#[test]
fn a_sync_group_cut_off_degrades_to_its_bitmap_and_resyncs_into_sync() -> Result<()> {
    let Some((hosts, mut writer)) = replicated(&["--mode", "sync", "--sync-timeout", "2"])? else {
        return Ok(());
    };
    writer.write(50)?;
    ensure!(
        status(&hosts)?["sync-state"] == "in-sync",
        "{}",
        status(&hosts)?
    );
    writer.touched.clear();
    hosts.host_a().set_link(false)?;
    writer.write(200)?;
    let s = status(&hosts)?;
    ensure!(s["state"] == "degraded", "{s}");
    ensure!(s["sync-state"] == "degraded", "{s}");
    ensure!(s["dirty-bytes"].as_u64() > Some(0), "nothing marked: {s}");
    hosts.host_a().set_link(true)?;
    let s = wait_streaming(&hosts)?;
    check_resync_bytes(&s, writer.touched_bytes())?;
    support::wait::wait_until("in sync again", TIMEOUT, || {
        Ok(status(&hosts)?["sync-state"] == "in-sync")
    })?;
    writer.write(50)?;
    wait_streaming(&hosts)?;
    replicas_equal_primary(&hosts)
}

/// `ferry replicate` on A's control socket with `args` after the subcommand's `--control`.
fn replicate_on_a(hosts: &TwoHosts, subcommand: &str, args: &[&str]) -> Result<()> {
    let control_a = path_str(&hosts.path("a.ctl"))?.to_string();
    let mut all = vec!["replicate", subcommand, "--control", &control_a];
    all.extend_from_slice(args);
    let out = support::two_hosts::ferry_in(Some(hosts.host_a()), &all)?;
    ensure!(
        out.status.success(),
        "replicate {subcommand}: {}",
        out.stderr
    );
    Ok(())
}

/// `ferry replicate pause`: the group tracks the writer's changes in its bitmap and does not
/// resync; `set-speed` limits the resync; `resume`: it resyncs, streams again, and after a
/// drain the replicas equal the primary.
#[test]
fn a_paused_group_resyncs_at_its_speed_limit_once_resumed() -> Result<()> {
    let Some((hosts, mut writer)) = replicated(&[])? else {
        return Ok(());
    };
    writer.touched.clear();
    replicate_on_a(&hosts, "pause", &["--group", "g"])?;
    writer.write(300)?;
    std::thread::sleep(Duration::from_secs(1));
    let s = status(&hosts)?;
    ensure!(s["state"] == "paused", "{s}");
    ensure!(s["resyncs"] == 0, "resynced while paused: {s}");
    let marked = s["dirty-bytes"].as_u64().unwrap_or(0);
    ensure!(marked > 0, "nothing marked: {s}");
    replicate_on_a(&hosts, "set-speed", &["--group", "g", "--speed", "2M"])?;
    let resumed = Instant::now();
    replicate_on_a(&hosts, "resume", &["--group", "g"])?;
    let s = wait_streaming(&hosts)?;
    let took = resumed.elapsed().as_secs_f64();
    eprintln!(
        "{marked} bytes marked resynced in {took:.1} s at 2 MiB/s: {}",
        s["copy-speed-bytes-per-s"]
    );
    ensure!(
        s["copy-speed-bytes-per-s"] == 2 << 20,
        "the limit is not reported: {s}"
    );
    // The limit held: the marked bytes take at least their time at 2 MiB/s (less the
    // first step, which goes at once).
    let floor = (marked.saturating_sub(1 << 20)) as f64 / f64::from(2 << 20);
    ensure!(
        took >= floor,
        "{marked} bytes resynced in {took:.1} s, faster than 2 MiB/s"
    );
    check_resync_bytes(&s, writer.touched_bytes())?;
    replicas_equal_primary(&hosts)
}
