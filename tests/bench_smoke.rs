//! Smoke test of `ferry bench`: measures a real qemu-storage-daemon vhost-user-blk export and
//! checks the JSON report is sane (no timed assertions).

use ferry_test_support::images::memory_dir;
use ferry_test_support::vhost_user::{Qsd, QsdOpts};
use ferry_test_support::{command_available, require, scratch_dir};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Size of the test image.
const IMAGE_BYTES: u64 = 64 << 20;

fn bench_json(
    socket: &Path,
    extra: &[&str],
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    bench_target_json(&["--socket", &socket.display().to_string()], extra)
}

fn bench_target_json(
    target: &[&str],
    extra: &[&str],
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("bench")
        .args(target)
        .args(["--json", "--secs", "1", "--ramp", "0"])
        .args(extra)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ferry bench {extra:?} failed: {stderr}"
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn number(v: &serde_json::Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} missing or not a number in {v}"))
}

fn check_report(v: &serde_json::Value, rw: &str, mode: &str) {
    assert_eq!(v["rw"], rw);
    assert_eq!(v["mode"], mode);
    assert_eq!(number(v, "/size_bytes") as u64, IMAGE_BYTES);
    assert!(number(v, "/ops") > 0.0, "{v}");
    assert!(number(v, "/iops") > 0.0, "{v}");
    assert!(number(v, "/mib_per_sec") > 0.0, "{v}");
    let (min, p50, p99, p999, max) = (
        number(v, "/latency_us/min"),
        number(v, "/latency_us/p50"),
        number(v, "/latency_us/p99"),
        number(v, "/latency_us/p99_9"),
        number(v, "/latency_us/max"),
    );
    assert!(
        min > 0.0 && min <= p50 && p50 <= p99 && p99 <= p999 && p999 <= max,
        "{v}"
    );
    assert!(number(v, "/cpu/percent_of_one_core") >= 0.0, "{v}");
}

#[test]
fn bench_measures_qemu_storage_daemon() -> Result<(), Box<dyn std::error::Error>> {
    if !require(
        "qemu-storage-daemon",
        command_available("qemu-storage-daemon"),
    ) {
        return Ok(());
    }
    // The image in memory where there is a tmpfs: the bench measures the I/O path, not a disk.
    let dir = memory_dir().or_else(|_| scratch_dir())?;
    let image: PathBuf = dir.path().join("disk.img");
    let pattern: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut data = Vec::with_capacity(IMAGE_BYTES as usize);
    while (data.len() as u64) < IMAGE_BYTES {
        data.extend_from_slice(&pattern);
    }
    std::fs::write(&image, &data)?;
    let socket = dir.path().join("vhost.sock");
    let _qsd = Qsd::start(&QsdOpts {
        num_queues: Some(1),
        ..QsdOpts::new(&image, &socket)
    })?;

    let v = bench_json(&socket, &["--rw", "randread", "--qd", "8", "--wait"])?;
    check_report(&v, "randread", "wait");
    assert_eq!(number(&v, "/write_ops"), 0.0);

    let v = bench_json(&socket, &["--rw", "randwrite", "--qd", "128", "--poll"])?;
    check_report(&v, "randwrite", "poll");
    assert_eq!(
        number(&v, "/queue_size"),
        512.0,
        "3 descriptors per request at qd 128"
    );

    let v = bench_json(&socket, &["--rw", "read", "--bs", "128K", "--qd", "2"])?;
    check_report(&v, "read", "wait");
    Ok(())
}

/// `ferry bench --nbd`: pipelined requests on NBD connections to qemu-nbd.
#[test]
fn bench_measures_an_nbd_export() -> Result<(), Box<dyn std::error::Error>> {
    let dir = memory_dir().or_else(|_| scratch_dir())?;
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![7u8; IMAGE_BYTES as usize])?;
    let addr = ferry_test_support::nbd::NbdAddr::Unix(dir.path().join("nbd.sock"));
    let server = ferry_test_support::nbd::NbdServer::qemu_nbd_clients(&image, "e", &addr, 4)?;
    let uri = server.uri();
    let target = ["--nbd", uri.as_str()];
    let v = bench_target_json(&target, &["--rw", "randrw", "--qd", "32"])?;
    check_report(&v, "randrw", "wait");
    assert!(
        number(&v, "/read_ops") > 0.0 && number(&v, "/write_ops") > 0.0,
        "{v}"
    );
    assert_eq!(v["socket"], uri.as_str());
    let v = bench_target_json(
        &target,
        &["--rw", "write", "--bs", "128K", "--queues", "2", "--poll"],
    )?;
    check_report(&v, "write", "poll");
    Ok(())
}
