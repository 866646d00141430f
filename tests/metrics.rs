//! `ferry serve --metrics-listen`: a scrape taken while a libblkio client's requests are in
//! flight passes `promtool check metrics` and counts what the client did, per volume and
//! operation; the journal's records are there; Prometheus's own request (Accept:
//! OpenMetrics) gets the OpenMetrics text.

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::blkio_client::{BlkioClient, BlkioOpts, Op};
use support::daemon::{Daemon, START_TIMEOUT};
use support::ferry;
use support::wait::{wait_until, HANG_TIMEOUT};

/// `GET /metrics`: the status line, the headers and the body.
fn scrape(port: u16, accept: Option<&str>) -> Result<(String, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).context("connect")?;
    stream.set_read_timeout(Some(HANG_TIMEOUT))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\n{accept}\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").context("no header end")?;
    Ok((head.to_string(), body.to_string()))
}

/// The value of the sample line `name{labels}`.
fn sample(body: &str, series: &str) -> Result<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .with_context(|| format!("no {series} in:\n{body}"))?
        .trim()
        .parse()
        .context("not a number")
}

#[test]
fn a_scrape_during_io_passes_promtool_and_counts_the_requests() -> Result<()> {
    if !support::require(
        "promtool (Debian package prometheus)",
        support::require::command_available("promtool"),
    ) {
        return Ok(());
    }
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let socket = d.join("vm1.sock");
    let mut command = Command::new(support::ferry_bin());
    command
        .arg("serve")
        .args(ferry::vol(d, "vm1", "vm1.img", "vm1.sock", ",size=16M"))
        .args([
            "--journal",
            &format!("dir={}", ferry::path_str(d, "journal")),
        ])
        .args(["--metrics-listen", "127.0.0.1:0"]);
    let mut daemon = Daemon::spawn_listening("ferry-serve", command, &socket)?;
    let mut port = None;
    wait_until("the metrics line", START_TIMEOUT, || {
        port = ferry::announced_port(&daemon.log(), "ferry: metrics on http://");
        Ok(port.is_some())
    })?;
    let port = port.context("no port")?;

    let mut client = BlkioClient::connect(&socket, &BlkioOpts::default())?;
    client.buf_mut()[..65536].copy_from_slice(&support::pattern(1, 65536));
    client.write_all(0, &support::pattern(1, 1 << 20), 65536)?;
    // Requests in flight while the scrape is taken.
    let batch: Vec<Op> = (0..16)
        .map(|i| Op::Write {
            offset_bytes: (1 << 20) + i * 65536,
            len_bytes: 65536,
            buf_offset: 0,
            fua: false,
        })
        .collect();
    client.submit_batches(std::slice::from_ref(&batch))?;
    let (head, body) = scrape(port, None)?;
    let results = client.reap_batches(&[batch.len()], HANG_TIMEOUT)?;
    ensure!(
        results.iter().flatten().all(|r| *r == Some(0)),
        "writes failed: {results:?}"
    );
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    ensure!(head.contains("text/plain; version=0.0.4"), "{head}");

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run promtool")?;
    promtool
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(body.as_bytes())?;
    let checked = promtool.wait_with_output()?;
    ensure!(
        checked.status.success(),
        "promtool check metrics: {}\n{}{}\n{body}",
        checked.status,
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // The 16 writes of 64 KiB before the scrape are counted (those in flight may be).
    let writes = sample(
        &body,
        r#"ferry_volume_requests_total{volume="vm1",op="write"}"#,
    )?;
    let bytes = sample(
        &body,
        r#"ferry_volume_request_bytes_total{volume="vm1",op="write"}"#,
    )?;
    ensure!((16.0..=32.0).contains(&writes), "writes {writes}");
    ensure!(bytes >= f64::from(1 << 20), "bytes {bytes}");
    ensure!(sample(&body, r#"ferry_volume_frontend_connected{volume="vm1"}"#)? == 1.0);
    let in_flight = sample(&body, r#"ferry_volume_requests_in_flight{volume="vm1"}"#)?;
    ensure!((0.0..=16.0).contains(&in_flight), "in flight {in_flight}");
    for kind in [
        "read",
        "write",
        "flush",
        "discard",
        "write_zeroes",
        "refused",
    ] {
        let series = format!(r#"ferry_volume_errors_total{{volume="vm1",kind="{kind}"}}"#);
        ensure!(sample(&body, &series)? == 0.0, "{series}");
    }
    ensure!(sample(&body, "ferry_journal_records_total")? >= 16.0);

    // A later scrape in OpenMetrics counts every write.
    let (head, open) = scrape(port, Some("application/openmetrics-text; version=1.0.0"))?;
    ensure!(head.contains("application/openmetrics-text"), "{head}");
    ensure!(open.ends_with("# EOF\n"), "{open}");
    let writes = sample(
        &open,
        r#"ferry_volume_requests_total{volume="vm1",op="write"}"#,
    )?;
    ensure!(writes == 32.0, "writes {writes}");
    drop(client);
    let status = daemon.terminate(Duration::from_secs(30))?;
    ensure!(status.success(), "ferry exited {status}");
    Ok(())
}
