//! Moving a volume to another host (`docs/migration.md`, "Across hosts"): two `ferry serve`
//! daemons, each in its own network namespace joined by a veth pair, with certificates of
//! a test CA. The destination's side alone (`incoming-*` commands sent by the `ferry`
//! command line as the source's certificate, data written by `qemu-io` over NBD with
//! TLS, libblkio on the incoming socket): a device started before activation waits and
//! then serves the data, the source's export is fenced at activation, a device never
//! activated is refused, a lease not renewed and an abandon leave nothing behind, and
//! refusals are one line. Then the whole move driven by the source: `ferry migrate start
//! --target ferry://…` while a libblkio client writes on the source, the client
//! disconnecting (the device stop), the destination serving every byte; two volumes
//! moving together; the source volume's own NBD export fenced at the hand-off; a
//! cancelled move and its clean retry; a destination refusing the
//! source's certificate; a background copy converging over a link limited with `tc tbf`
//! under steady writes.

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use ferry_test_support::pki::{Pki, Subject};
use serde_json::{json, Value};
use std::time::Duration;
use support::blkio_client::{BlkioClient, BlkioOpts, Op};
use support::pattern_writer::{PatternWriter, WriterConfig};
use support::two_hosts::{ferry_in, path_str, HostOptions, TwoHosts, MIB, NBD_PORT, VOLUME_BYTES};
use support::wait::{wait_until, HANG_TIMEOUT};

fn require_tools() -> bool {
    support::require::require("qemu-io", support::require::command_available("qemu-io"))
}

/// Fails unless `qemu-io` (its write) failed.
fn ensure_refused(what: &str, out: &std::process::Output) -> Result<()> {
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() || text.contains("failed") || text.contains("error"),
        "{what} went through: {text}"
    );
    Ok(())
}

fn read_op(offset_bytes: u64, len_bytes: usize) -> Op {
    Op::Read {
        offset_bytes,
        len_bytes,
        buf_offset: 0,
    }
}

#[test]
fn an_incoming_volume_serves_its_device_only_once_activated_and_fences_its_source() -> Result<()> {
    if !require_tools() {
        return Ok(());
    }
    let Some(hosts) = TwoHosts::start(HostOptions::default())? else {
        return Ok(());
    };
    let prepared = hosts.prepare("vm1")?;
    let address_b = hosts.network.host(1).address;
    assert_eq!(
        prepared["uri"],
        json!(format!("nbds://{address_b}:{NBD_PORT}/vm1"))
    );
    // The source writes over NBD with TLS (its own certificate, which the export allows).
    let out = hosts.qemu_io_b("vm1", "write -P 0x5a 0 1M")?;
    ensure!(
        out.status.success(),
        "qemu-io write: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A device started before activation: its read waits behind the gate.
    let mut client = BlkioClient::connect(&hosts.path("vm1.sock"), &BlkioOpts::default())?;
    client.submit_batches(&[vec![read_op(0, MIB)]])?;
    let early = client.reap_batches(&[1], Duration::from_millis(500))?;
    assert_eq!(early, vec![vec![None]], "served before activation");
    assert_eq!(hosts.incoming_state("vm1")?.as_deref(), Some("incoming"));
    hosts
        .query_b(None, "incoming-activate", &json!({ "name": "vm1" }))?
        .ok()?;
    let mut results = vec![vec![None]];
    client.reap_until(&mut results, 1, HANG_TIMEOUT)?;
    assert_eq!(
        results,
        vec![vec![Some(0)]],
        "the read completes once activated"
    );
    support::compare_bytes("incoming vm1", &client.buf()[..MIB], &vec![0x5a; MIB])?;
    assert_eq!(hosts.incoming_state("vm1")?.as_deref(), Some("active"));
    // The source's export is fenced: its writes no longer land.
    ensure_refused(
        "a write after activation",
        &hosts.qemu_io_b("vm1", "write -P 0x33 0 4k")?,
    )?;
    let data = client.read_all(0, 4096, 4096)?;
    support::compare_bytes("after the fence", &data, &[0x5a; 4096])?;
    // Abandoning an active volume is refused: it serves the VM now.
    hosts
        .query_b(None, "incoming-abandon", &json!({ "name": "vm1" }))?
        .expect_error("is active")?;
    Ok(())
}

#[test]
fn a_device_started_and_never_activated_is_refused_after_its_bound() -> Result<()> {
    let options = HostOptions {
        start_wait_s: 1,
        ..HostOptions::default()
    };
    let Some(hosts) = TwoHosts::start(options)? else {
        return Ok(());
    };
    hosts.prepare("vm1")?;
    let mut client = BlkioClient::connect(&hosts.path("vm1.sock"), &BlkioOpts::default())?;
    client.submit_batches(&[vec![read_op(0, 4096)]])?;
    // The frontend is disconnected after the bound: the volume shows no connection.
    wait_until("the frontend refused", HANG_TIMEOUT, || {
        let volumes = hosts.local_b("query-volumes")?;
        Ok(volumes[0]["connected"] == json!(false) && volumes[0]["connections"] == json!(1))
    })?;
    // The read never succeeds (libblkio may report the lost connection as an error).
    if let Ok(results) = client.reap_batches(&[1], Duration::from_millis(100)) {
        ensure!(
            results[0][0].is_none_or(|r| r != 0),
            "a read was served before activation"
        );
    }
    assert!(hosts.daemon_b.log().contains("refused after"));
    Ok(())
}

#[test]
fn a_lease_not_renewed_an_abandon_and_every_refusal_leave_nothing_behind() -> Result<()> {
    let options = HostOptions {
        lease_s: 1,
        ..HostOptions::default()
    };
    let Some(hosts) = TwoHosts::start(options)? else {
        return Ok(());
    };
    let image = hosts.path("vm1.img");
    let socket = hosts.path("vm1.sock");
    // (Whether the image and socket exist now depends on how soon the 1 s lease runs
    // out: the other tests see them.)
    let prepared = hosts.prepare("vm1")?;
    assert_eq!(prepared["lease-ms"], json!(1000));
    wait_until("the lease to run out", HANG_TIMEOUT, || {
        Ok(hosts.incoming_state("vm1")?.as_deref() == Some("abandoned"))
    })?;
    assert!(!image.exists(), "the image it created is deleted");
    assert!(!socket.exists(), "the socket is removed");
    assert_eq!(hosts.local_b("query-volumes")?, json!([]));
    // A retry starts clean; an explicit abandon removes it too.
    hosts.prepare("vm1")?;
    hosts
        .query_b(None, "incoming-abandon", &json!({ "name": "vm1" }))?
        .ok()?;
    assert!(!image.exists() && !socket.exists());

    // Refusals, each one line, each leaving nothing.
    let data = hosts.path("data.img");
    std::fs::write(&data, b"keep me")?;
    let refused = hosts.query_b(
        None,
        "incoming-prepare",
        &json!({ "name": "x", "size": 1 << 20, "path": data, "socket": hosts.path("x.sock") }),
    )?;
    refused.expect_error("is not an empty file")?;
    assert_eq!(std::fs::read(&data)?, b"keep me");
    let refused = hosts.query_b(
        None,
        "incoming-prepare",
        &json!({ "name": "x", "size": 1 << 20, "path": hosts.path("x.img"),
                 "socket": hosts.path("missing/x.sock") }),
    )?;
    refused.expect_error("does not exist")?;
    assert!(!hosts.path("x.img").exists(), "no image after a failure");
    // A certificate of another CA is refused before any command.
    let other = Pki::new("another CA")?;
    let stranger = other.credentials(
        "stranger",
        &Subject {
            common_name: "ferry-a",
            ..Subject::default()
        },
    )?;
    hosts.pki.trust_in(&stranger)?;
    let refused = hosts.query_b(
        Some(&stranger),
        "incoming-prepare",
        &json!({ "name": "x", "size": 1 << 20, "path": hosts.path("x.img"), "socket": hosts.path("x.sock") }),
    )?;
    let line = refused.expect_error("")?;
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(!hosts.path("x.img").exists());
    assert_eq!(hosts.local_b("query-volumes")?, json!([]));
    Ok(())
}

/// The source's data: a pattern in the first 8 MiB written before the move, and one
/// written during it over the first MiB and at 20 MiB.
fn expected_after_writes() -> Vec<u8> {
    let mut image = vec![0u8; VOLUME_BYTES as usize];
    image[..8 * MIB].copy_from_slice(&support::pattern(1, 8 * MIB));
    image[..MIB].copy_from_slice(&support::pattern(2, MIB));
    image[20 * MIB..21 * MIB].copy_from_slice(&support::pattern(3, MIB));
    image
}

#[test]
fn a_volume_moves_to_another_host_when_its_frontend_stops() -> Result<()> {
    let Some(hosts) = TwoHosts::start(HostOptions::default())? else {
        return Ok(());
    };
    let opts = BlkioOpts {
        buf_bytes: 8 * MIB,
        ..BlkioOpts::default()
    };
    let mut client = BlkioClient::connect(&hosts.path("a.sock"), &opts)?;
    client.write_all(0, &support::pattern(1, 8 * MIB), 256 << 10)?;
    let control_a = hosts.path("a.ctl");
    let target = format!("{}/vm1", hosts.url_b());
    let b_image = hosts.path("b-vm1.img");
    let b_socket = hosts.path("b-vm1.sock");
    let started = ferry_in(
        None,
        &[
            "migrate",
            "start",
            "--control",
            path_str(&control_a)?,
            "--volume",
            "vm1",
            "--target",
            &target,
            "--path",
            path_str(&b_image)?,
            "--socket",
            path_str(&b_socket)?,
            "--json",
        ],
    )?
    .ok()?
    .json()?;
    let job = started["job"].as_u64().context("job id")?;
    // Guest writes during the copy, mirrored to B.
    client.write_all(0, &support::pattern(2, MIB), 64 << 10)?;
    client.write_all(20 * MIB as u64, &support::pattern(3, MIB), 64 << 10)?;
    client.flush()?;
    // Ready, both ends shown: the destination's incoming volume is waiting.
    hosts.wait_ready(job)?;
    wait_until("the destination's state", HANG_TIMEOUT, || {
        Ok(hosts.job_status(job)?["cross-host"]["incoming"]["state"] == "incoming")
    })?;
    let ready = hosts.job_status(job)?;
    assert!(
        ready["total_bytes"].as_u64() < Some(VOLUME_BYTES),
        "holes are not copied: {ready}"
    );
    // The device stops: the frontend disconnects.
    drop(client);
    let done = hosts.wait_handed_off(job)?;
    let volumes_a = support::ferry::query(&hosts.path("a.ctl"), "query-volumes")?;
    assert_eq!(volumes_a[0]["gate-open"], json!(false), "A serves no more");
    assert_eq!(done["handed_off"], json!(true), "{done}");
    assert_eq!(done["cross-host"]["incoming"]["state"], "active", "{done}");
    // The source refuses to serve again: its device waits, then is refused.
    let text = ferry_in(
        None,
        &["migrate", "status", "--control", path_str(&control_a)?],
    )?
    .ok()?
    .stdout;
    assert!(text.contains("handed off"), "{text}");
    // Every byte on B, through its device and in its image; A's image untouched.
    let expected = expected_after_writes();
    let mut reader = BlkioClient::connect(&b_socket, &opts)?;
    for (i, piece) in expected.chunks(8 * MIB).enumerate() {
        let data = reader.read_all((i * 8 * MIB) as u64, piece.len(), MIB)?;
        support::compare_bytes(&format!("B's device, piece {i}"), &data, piece)?;
    }
    drop(reader);
    support::compare_image(&b_image, 0, &expected)?;
    support::compare_image(&hosts.path("a.img"), 0, &expected)?;
    let _ = &hosts.daemon_a;
    Ok(())
}

#[test]
fn the_source_volumes_own_nbd_export_is_fenced_at_the_hand_off() -> Result<()> {
    let options = HostOptions {
        source_nbd: true,
        ..HostOptions::default()
    };
    let Some(hosts) = TwoHosts::start(options)? else {
        return Ok(());
    };
    let mut client = BlkioClient::connect(&hosts.path("a.sock"), &BlkioOpts::default())?;
    client.write_all(0, &support::pattern(41, MIB), 64 << 10)?;
    let job = hosts.migrate_to_b(&[])?;
    hosts.wait_ready(job)?;
    // A write through A's export during the move is mirrored to B like the device's.
    let out = hosts.qemu_io(0, "vm1", "write -P 0x44 2M 1M")?;
    ensure!(
        out.status.success(),
        "qemu-io write on A: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(client);
    hosts.wait_handed_off(job)?;
    // From the hand-off on, A's export takes no write: the volume is B's.
    ensure_refused(
        "a write on the source's export after the hand-off",
        &hosts.qemu_io(0, "vm1", "write -P 0x55 2M 4k")?,
    )?;
    let mut expected = support::pattern(41, MIB);
    expected.resize(2 * MIB, 0);
    expected.extend_from_slice(&[0x44; MIB]);
    support::compare_image(&hosts.path("b-vm1.img"), 0, &expected)?;
    support::compare_image(&hosts.path("a.img"), 0, &expected)?;
    Ok(())
}

#[test]
fn a_destination_that_refuses_the_source_certificate_fails_the_start_in_one_line() -> Result<()> {
    let options = HostOptions {
        authz: "someone-else",
        ..HostOptions::default()
    };
    let Some(hosts) = TwoHosts::start(options)? else {
        return Ok(());
    };
    let mut client = BlkioClient::connect(&hosts.path("a.sock"), &BlkioOpts::default())?;
    client.write_all(0, &support::pattern(7, MIB), 64 << 10)?;
    let image = hosts.path("b-vm1.img");
    let refused = hosts.start_migration(&image, &[])?;
    let line = refused.expect_error("peer ferry://")?;
    assert_eq!(line.lines().count(), 1, "{line}");
    // No job, nothing on B, and the volume serves on.
    let jobs = support::ferry::query(&hosts.path("a.ctl"), "query-migrations")?;
    assert_eq!(jobs, json!([]));
    assert!(!image.exists());
    assert_eq!(hosts.local_b("query-volumes")?, json!([]));
    client.write_all(MIB as u64, &support::pattern(8, MIB), 64 << 10)?;
    let data = client.read_all(0, 2 * MIB, MIB)?;
    support::compare_bytes("vm1", &data[..MIB], &support::pattern(7, MIB))?;
    support::compare_bytes("vm1", &data[MIB..], &support::pattern(8, MIB))?;
    Ok(())
}

#[test]
fn two_volumes_of_one_vm_move_together_and_are_activated_only_when_both_stopped() -> Result<()> {
    let options = HostOptions {
        second_volume: true,
        ..HostOptions::default()
    };
    let Some(hosts) = TwoHosts::start(options)? else {
        return Ok(());
    };
    let mut first = BlkioClient::connect(&hosts.path("a.sock"), &BlkioOpts::default())?;
    let mut second = BlkioClient::connect(&hosts.path("a2.sock"), &BlkioOpts::default())?;
    first.write_all(0, &support::pattern(11, MIB), 64 << 10)?;
    second.write_all(MIB as u64, &support::pattern(12, MIB), 64 << 10)?;
    let control_a = hosts.path("a.ctl");
    let template = hosts.path("b-{name}.img");
    let sockets = hosts.path("b-{name}.sock");
    let started = ferry_in(
        None,
        &[
            "migrate",
            "start",
            "--control",
            path_str(&control_a)?,
            "--volume",
            "vm1",
            "--volume",
            "vm2",
            "--target",
            &hosts.url_b(),
            "--path",
            path_str(&template)?,
            "--socket",
            path_str(&sockets)?,
            "--json",
        ],
    )?
    .ok()?
    .json()?;
    let jobs: Vec<u64> = started["jobs"]
        .as_array()
        .context("the jobs of the move")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(jobs.len(), 2, "{started}");
    for &job in &jobs {
        hosts.wait_ready(job)?;
    }
    // One device stops: nothing is activated while the other still runs.
    drop(first);
    second.write_all(2 * MIB as u64, &support::pattern(13, MIB), 64 << 10)?;
    for name in ["vm1", "vm2"] {
        assert_eq!(hosts.incoming_state(name)?.as_deref(), Some("incoming"));
    }
    drop(second);
    for &job in &jobs {
        hosts.wait_handed_off(job)?;
    }
    for name in ["vm1", "vm2"] {
        assert_eq!(hosts.incoming_state(name)?.as_deref(), Some("active"));
    }
    support::compare_image(&hosts.path("b-vm1.img"), 0, &support::pattern(11, MIB))?;
    support::compare_image(
        &hosts.path("b-vm2.img"),
        MIB as u64,
        &support::pattern(12, MIB),
    )?;
    support::compare_image(
        &hosts.path("b-vm2.img"),
        2 * MIB as u64,
        &support::pattern(13, MIB),
    )?;
    Ok(())
}

#[test]
fn a_cancelled_move_abandons_the_destination_and_a_retry_starts_clean() -> Result<()> {
    let Some(hosts) = TwoHosts::start(HostOptions::default())? else {
        return Ok(());
    };
    let mut client = BlkioClient::connect(&hosts.path("a.sock"), &BlkioOpts::default())?;
    client.write_all(0, &support::pattern(21, MIB), 64 << 10)?;
    let job = hosts.migrate_to_b(&["--max-speed", "64K"])?;
    let control_a = hosts.path("a.ctl");
    let job_arg = job.to_string();
    ferry_in(
        None,
        &[
            "migrate",
            "cancel",
            "--control",
            path_str(&control_a)?,
            "--job",
            &job_arg,
        ],
    )?
    .ok()?;
    wait_until("B to drop the incoming volume", HANG_TIMEOUT, || {
        Ok(hosts.incoming_state("vm1")?.as_deref() == Some("abandoned"))
    })?;
    assert!(!hosts.path("b-vm1.img").exists());
    assert_eq!(hosts.job_status(job)?["state"], "cancelled");
    // The volume serves on, and the move starts again from nothing.
    client.write_all(MIB as u64, &support::pattern(22, MIB), 64 << 10)?;
    let retry = hosts.migrate_to_b(&[])?;
    hosts.wait_ready(retry)?;
    drop(client);
    hosts.wait_handed_off(retry)?;
    support::compare_image(&hosts.path("b-vm1.img"), 0, &support::pattern(21, MIB))?;
    support::compare_image(
        &hosts.path("b-vm1.img"),
        MIB as u64,
        &support::pattern(22, MIB),
    )?;
    Ok(())
}

#[test]
fn a_background_copy_converges_over_a_slow_link_under_steady_writes() -> Result<()> {
    let Some(hosts) = TwoHosts::start(HostOptions::default())? else {
        return Ok(());
    };
    let opts = BlkioOpts {
        buf_bytes: 8 * MIB,
        ..BlkioOpts::default()
    };
    let mut initial = vec![0u8; VOLUME_BYTES as usize];
    let mut client = BlkioClient::connect(&hosts.path("a.sock"), &opts)?;
    for i in 0..2 {
        let data = support::pattern(30 + i, 8 * MIB);
        client.write_all(i * 8 * MIB as u64, &data, MIB)?;
        initial[i as usize * 8 * MIB..(i as usize + 1) * 8 * MIB].copy_from_slice(&data);
    }
    drop(client);
    // A sends at 80 Mbit/s; the writer dirties well under that, at a steady pace.
    hosts.host_a().limit_rate(80_000_000)?;
    let writer = PatternWriter::spawn(
        &hosts.path("a.sock"),
        initial,
        WriterConfig {
            seed: 31,
            inflight: 4,
            write_bytes_max: 64 << 10,
            pace: Duration::from_millis(50),
            window_bytes: None,
        },
    )?;
    let job = hosts.migrate_to_b(&["--mode", "background"])?;
    wait_until("the copy to converge", HANG_TIMEOUT, || {
        let s = hosts.job_status(job)?;
        ensure!(s["state"] == "copying" || s["state"] == "ready", "{s}");
        Ok(s["state"] == "ready")
    })?;
    writer.wait_more(5, HANG_TIMEOUT)?;
    // The writer's disconnect is the device stop.
    let report = writer.stop()?;
    report.ensure_no_error()?;
    hosts.wait_handed_off(job)?;
    support::compare_image(&hosts.path("b-vm1.img"), 0, &report.model)?;
    Ok(())
}
