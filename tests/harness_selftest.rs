//! Validates the test harness (`tests/support`) against the reference backends: a QEMU guest and
//! libblkio on qemu-storage-daemon's vhost-user-blk export, and qemu-nbd / qsd NBD servers.

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use std::process::Command;
use support::blkio_client::{BlkioClient, BlkioOpts, Op};
use support::guest::{Guest, GuestOpts};
use support::nbd::{NbdAddr, NbdServer};
use support::vhost_user::{Qsd, QsdOpts};

const IMAGE_BYTES: u64 = 64 << 20;

/// The guest writes 4 MiB of a pattern at 1 MiB with dd, checks md5sum in the guest, and the
/// host finds the same bytes in the image.
#[test]
fn guest_dd_on_qsd() -> Result<()> {
    let dir = support::scratch_dir()?;
    let image = support::create_image(&dir.path().join("disk.img"), IMAGE_BYTES)?;
    let socket = dir.path().join("vhost.sock");
    let _qsd = Qsd::start(&QsdOpts::new(&image, &socket))?;
    let script = r#"
set -e
echo "RESULT size_sectors=$(cat /sys/block/vda/size)"
seq 1 700000 | head -c 4194304 > /tmp/p
dd if=/tmp/p of=/dev/vda bs=64k seek=16 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
echo "RESULT md5_written=$(md5sum < /tmp/p | cut -d' ' -f1)"
echo "RESULT md5_read=$(dd if=/dev/vda bs=64k skip=16 count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
"#;
    let out = Guest::run_script(&socket, script, &GuestOpts::default())?;
    out.ensure_success()?;
    ensure!(
        out.result("size_sectors")? == (IMAGE_BYTES / 512).to_string(),
        "capacity"
    );
    let written = out.result("md5_written")?;
    ensure!(
        written == out.result("md5_read")?,
        "guest read back other data\n{}",
        out.tail()
    );
    let bytes = std::fs::read(&image).context("read image")?;
    let host_md5 = md5_of(&bytes[1 << 20..5 << 20])?;
    ensure!(
        host_md5 == written,
        "image holds other bytes than the guest wrote"
    );
    ensure!(
        bytes[..1 << 20].iter().all(|&b| b == 0),
        "bytes before the write changed"
    );
    eprintln!("guest run took {:?}", out.elapsed);
    Ok(())
}

/// The guest blocks on a console line from the host (the interactive channel of RunningGuest);
/// with 2 vCPUs and num-queues=2 the guest driver uses 2 queues.
#[test]
fn guest_waits_for_host_line() -> Result<()> {
    let dir = support::scratch_dir()?;
    let image = support::create_image(&dir.path().join("disk.img"), IMAGE_BYTES)?;
    let socket = dir.path().join("vhost.sock");
    let _qsd = Qsd::start(&QsdOpts {
        num_queues: Some(2),
        ..QsdOpts::new(&image, &socket)
    })?;
    let script = r#"
echo "RESULT phase=waiting"
read -r word < /dev/console
echo "RESULT got=$word queues=$(ls /sys/block/vda/mq | wc -l)"
"#;
    let opts = GuestOpts {
        num_queues: Some(2),
        cpus: 2,
        ..GuestOpts::default()
    };
    let mut guest = Guest::spawn(&socket, script, &opts)?;
    guest.wait_for("RESULT phase=waiting", opts.timeout)?;
    guest.send_line("hello-from-host")?;
    let out = guest.wait(opts.timeout)?;
    out.ensure_success()?;
    ensure!(
        out.result("got")? == "hello-from-host",
        "line not received\n{}",
        out.tail()
    );
    ensure!(
        out.result("queues")? == "2",
        "expected 2 blk-mq queues\n{}",
        out.tail()
    );
    Ok(())
}

/// libblkio with many requests in flight on two queues: pattern writes, read-back, flush,
/// write-zeroes and discard against qsd; the image is checked on the host too.
#[test]
fn blkio_round_trip_on_qsd() -> Result<()> {
    let dir = support::scratch_dir()?;
    let image = support::create_image(&dir.path().join("disk.img"), IMAGE_BYTES)?;
    let socket = dir.path().join("vhost.sock");
    let _qsd = Qsd::start(&QsdOpts {
        num_queues: Some(2),
        ..QsdOpts::new(&image, &socket)
    })?;
    let opts = BlkioOpts {
        num_queues: 2,
        queue_size: Some(64),
        buf_bytes: 8 << 20,
        ..BlkioOpts::default()
    };
    let mut client = BlkioClient::connect(&socket, &opts)?;
    ensure!(
        client.capacity_bytes() == IMAGE_BYTES,
        "capacity {}",
        client.capacity_bytes()
    );

    // 256 x 4 KiB writes per queue, far more than a 64-slot ring holds (3 slots per request).
    const REQS: usize = 256;
    const BLOCK: usize = 4096;
    let data = support::pattern(7, 2 * REQS * BLOCK);
    client.buf_mut()[..data.len()].copy_from_slice(&data);
    let batch = |q: usize| -> Vec<Op> {
        (0..REQS)
            .map(|i| {
                let off = (q * REQS + i) * BLOCK;
                Op::Write {
                    offset_bytes: off as u64,
                    len_bytes: BLOCK,
                    buf_offset: off,
                    fua: i % 17 == 0,
                }
            })
            .collect()
    };
    let results = client.run_batches(&[batch(0), batch(1)])?;
    ensure!(
        results.iter().flatten().all(|&r| r == 0),
        "a write failed: {results:?}"
    );
    client.flush()?;

    let back = client.read_all(0, data.len(), 16 << 10)?;
    ensure!(back == data, "read-back differs");
    client.run_batch_ok(
        1,
        &[
            Op::WriteZeroes {
                offset_bytes: 0,
                len_bytes: 64 << 10,
                no_unmap: false,
            },
            Op::Discard {
                offset_bytes: 1 << 20,
                len_bytes: 64 << 10,
            },
            Op::Flush,
        ],
    )?;
    let zeroed = client.read_all(0, 64 << 10, 4096)?;
    ensure!(zeroed.iter().all(|&b| b == 0), "write-zeroes left data");

    let host = std::fs::read(&image).context("read image")?;
    ensure!(
        host[64 << 10..data.len()] == data[64 << 10..],
        "image differs from what was written"
    );
    Ok(())
}

/// The NBD servers of the harness serve writable exports that qemu-io reaches: qemu-nbd (TCP),
/// qsd's NBD server (unix socket) and nbdkit's file plugin (TCP, then a unix socket).
#[test]
fn nbd_servers_serve_images() -> Result<()> {
    let dir = support::scratch_dir()?;
    let socket = dir.path().join("nbd.sock");
    let servers: [(&str, NbdAddr); 4] = [
        ("qemu-nbd", NbdAddr::free_tcp()?),
        ("qsd", NbdAddr::Unix(socket.clone())),
        ("nbdkit", NbdAddr::free_tcp()?),
        ("nbdkit", NbdAddr::Unix(socket)),
    ];
    for (i, (kind, addr)) in servers.into_iter().enumerate() {
        let image = support::create_image(&dir.path().join(format!("nbd{i}.img")), 8 << 20)?;
        let server = match kind {
            "qemu-nbd" => NbdServer::qemu_nbd(&image, "disk", &addr)?,
            "qsd" => NbdServer::qsd(&image, "disk", &addr)?,
            _ => {
                let file = format!("file={}", image.display());
                NbdServer::nbdkit("disk", &addr, &["file", &file])?
            }
        };
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 4096 8192", &server.uri()])
            .output()
            .context("run qemu-io")?;
        ensure!(
            out.status.success(),
            "qemu-io on {kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        drop(server);
        let bytes = std::fs::read(&image).context("read image")?;
        ensure!(
            bytes[4096..12288].iter().all(|&b| b == 0x5a),
            "NBD write missing ({kind}, server {i})"
        );
    }
    Ok(())
}

fn md5_of(bytes: &[u8]) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("spawn md5sum")?;
    child
        .stdin
        .take()
        .context("md5sum stdin")?
        .write_all(bytes)
        .context("feed md5sum")?;
    let out = child.wait_with_output().context("md5sum output")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// A guest with `reconnect_ms` survives a backend crash: qsd is killed between two writes and
/// restarted on the same socket; the guest's second write and both read-backs succeed.
#[test]
fn guest_survives_backend_restart() -> Result<()> {
    let dir = support::scratch_dir()?;
    let image = support::create_image(&dir.path().join("disk.img"), IMAGE_BYTES)?;
    let socket = dir.path().join("vhost.sock");
    let qsd_opts = QsdOpts::new(&image, &socket);
    let mut qsd = Qsd::start(&qsd_opts)?;
    let script = r#"
seq 1 200000 | head -c 1048576 > /tmp/a
seq 7 200000 | head -c 1048576 > /tmp/b
dd if=/tmp/a of=/dev/vda bs=64k conv=fsync 2>/dev/null || echo "RESULT first_write=failed"
echo "RESULT phase=first-written"
read -r go < /dev/console
dd if=/tmp/b of=/dev/vda bs=64k seek=16 conv=fsync 2>/dev/null || echo "RESULT second_write=failed"
echo 3 > /proc/sys/vm/drop_caches
echo "RESULT a_ok=$(dd if=/dev/vda bs=64k count=16 iflag=direct 2>/dev/null | cmp -s - /tmp/a && echo 1 || echo 0)"
echo "RESULT b_ok=$(dd if=/dev/vda bs=64k skip=16 count=16 iflag=direct 2>/dev/null | cmp -s - /tmp/b && echo 1 || echo 0)"
"#;
    let opts = GuestOpts {
        reconnect_ms: Some(200),
        ..GuestOpts::default()
    };
    let mut guest = Guest::spawn(&socket, script, &opts)?;
    guest.wait_for("RESULT phase=first-written", opts.timeout)?;
    qsd.daemon.kill();
    drop(qsd);
    let _qsd = Qsd::start(&qsd_opts)?;
    guest.send_line("go")?;
    let out = guest.wait(opts.timeout)?;
    out.ensure_success()?;
    ensure!(
        out.result("a_ok")? == "1" && out.result("b_ok")? == "1",
        "data lost\n{}",
        out.tail()
    );
    ensure!(
        !out.results().contains_key("second_write"),
        "write after restart failed\n{}",
        out.tail()
    );
    Ok(())
}
