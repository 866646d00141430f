//! The latency a sync replication group adds to a guest write: 4 KiB random
//! writes at queue depth 1 (`ferry bench`) on host A's volume with no replication, then with
//! the volume in a sync group to host B (two `ferry serve` daemons in network namespaces
//! joined by veth, mutual TLS, B's DR log on the tmpfs at /dev/shm so the link is measured,
//! not a disk's flush), in alternating rounds; the link's round trip is the median of one-byte
//! TCP round trips between the namespaces (a python3 echo; the machine has no `ping`). Prints each round and the medians: the added latency (sync minus none, same
//! round) against the round trip, whose target is at most the round trip + 100 µs.
//!
//! Run as root (namespaces): `cargo bench -p ferry --bench replication_sync`;
//! `REPL_SYNC_ROUNDS` (default 5) and `REPL_SYNC_SECS` (default 3) change the run.

#[path = "../tests/support/mod.rs"]
mod support;

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use support::two_hosts::{ferry_in, path_str, HostOptions, TwoHosts};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `ferry bench` QD1 4 KiB random writes on A's vm1: (mean, p50) latency in µs.
fn bench(hosts: &TwoHosts, secs: u64) -> Result<(f64, f64)> {
    let socket = path_str(&hosts.path("a.sock"))?.to_string();
    let secs = secs.to_string();
    let out = ferry_in(
        None,
        &[
            "bench",
            "--socket",
            &socket,
            "--rw",
            "randwrite",
            "--bs",
            "4K",
            "--qd",
            "1",
            "--secs",
            &secs,
            "--ramp",
            "1",
            "--json",
        ],
    )?;
    ensure!(out.status.success(), "ferry bench: {}", out.stderr);
    let v: Value = serde_json::from_str(out.stdout.trim()).context("ferry bench's JSON")?;
    let lat = &v["latency_us"];
    match (lat["mean"].as_f64(), lat["p50"].as_f64()) {
        (Some(mean), Some(p50)) => Ok((mean, p50)),
        _ => bail!("no latency in ferry bench's report: {v}"),
    }
}

fn replicate(hosts: &TwoHosts, args: &[&str]) -> Result<Value> {
    let control = path_str(&hosts.path("a.ctl"))?.to_string();
    let mut all = vec!["replicate", args[0], "--control", &control];
    all.extend_from_slice(&args[1..]);
    let out = ferry_in(Some(hosts.host_a()), &all)?;
    ensure!(
        out.status.success(),
        "replicate {}: {}",
        args[0],
        out.stderr
    );
    Ok(serde_json::from_str(out.stdout.trim()).unwrap_or(Value::Null))
}

/// A TCP echo server in B's namespace, for [`round_trip_us`].
const ECHO_SERVER: &str = "
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7999))
s.listen(1)
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    d = c.recv(64)
    if not d:
        break
    c.sendall(d)
";

/// Its client in A's namespace: the median of 2000 one-byte round trips, in µs.
const ECHO_CLIENT: &str = "
import socket, sys, time
for _ in range(500):
    try:
        c = socket.create_connection((sys.argv[1], 7999))
        break
    except OSError:
        time.sleep(0.01)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(2000):
    t = time.perf_counter_ns()
    c.sendall(b'x')
    c.recv(1)
    times.append(time.perf_counter_ns() - t)
times.sort()
print(times[len(times) // 2] / 1000)
";

/// The link's round trip between the namespaces (TCP, one byte each way), in µs.
fn round_trip_us(hosts: &TwoHosts) -> Result<f64> {
    let b = hosts.network.host(1).address.to_string();
    let mut server = hosts
        .network
        .host(1)
        .command("python3")
        .args(["-c", ECHO_SERVER, &b])
        .spawn()
        .context("python3 echo server")?;
    let out = hosts.host_a().run("python3", &["-c", ECHO_CLIENT, &b]);
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("the echo client printed {text:?}"))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> Result<()> {
    let rounds = env_u64("REPL_SYNC_ROUNDS", 5);
    let secs = env_u64("REPL_SYNC_SECS", 3);
    // B keeps the replicas and its DR log on tmpfs, outside its own directory.
    let dr = support::images::memory_dir()?;
    let options = HostOptions {
        allow_paths_b: vec![dr.path().to_path_buf()],
        ..HostOptions::default()
    };
    let Some(mut hosts) = TwoHosts::start(options)? else {
        bail!("network namespaces are needed (run as root with iproute2)");
    };
    let url = hosts.url_b();
    let rtt = round_trip_us(&hosts)?;
    let (mut added_mean, mut added_p50, mut none_p50, mut sync_p50) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    println!("| round | none mean / p50 (µs) | sync mean / p50 (µs) | added p50 (µs) |");
    println!("|---|---|---|---|");
    for round in 1..=rounds {
        let none = bench(&hosts, secs)?;
        let group = format!("g{round}");
        let prefix = dr.path().join(&group);
        std::fs::create_dir(&prefix)?;
        let prefix = path_str(&prefix)?.to_string();
        replicate(
            &hosts,
            &[
                "start",
                "--volume",
                "vm1",
                "--to",
                &url,
                "--group",
                &group,
                "--path-prefix",
                &prefix,
                "--socket-prefix",
                &prefix,
                "--mode",
                "sync",
                "--sync-timeout",
                "60",
            ],
        )?;
        support::wait::wait_until(
            "the sync group in sync",
            std::time::Duration::from_secs(120),
            || {
                let s = replicate(&hosts, &["status", "--group", &group, "--json"])?;
                ensure!(s[0]["sync-state"] != "degraded", "degraded: {s}");
                Ok(s[0]["sync-state"] == "in-sync")
            },
        )?;
        let sync = bench(&hosts, secs)?;
        let s = replicate(&hosts, &["status", "--group", &group, "--json"])?;
        ensure!(
            s[0]["sync-state"] == "in-sync",
            "not in sync after the run: {s}"
        );
        replicate(&hosts, &["stop", "--group", &group])?;
        // B keeps a group's replicas until it restarts (it persists no membership): the next
        // round's group names vm1 again.
        hosts.kill_b();
        hosts.restart_b()?;
        println!(
            "| {round} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} |",
            none.0,
            none.1,
            sync.0,
            sync.1,
            sync.1 - none.1
        );
        added_mean.push(sync.0 - none.0);
        added_p50.push(sync.1 - none.1);
        none_p50.push(none.1);
        sync_p50.push(sync.1);
    }
    let added = median(&mut added_p50);
    println!(
        "\nmedians over {rounds} rounds: p50 none {:.1} µs, sync {:.1} µs; added p50 {added:.1} µs \
         (mean {:.1} µs); link round trip (TCP p50) {rtt:.1} µs; target added <= rtt + 100 = {:.1} µs: {}",
        median(&mut none_p50),
        median(&mut sync_p50),
        median(&mut added_mean),
        rtt + 100.0,
        if added <= rtt + 100.0 { "met" } else { "not met" }
    );
    Ok(())
}
