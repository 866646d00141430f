//! `ferry serve` with a volume on an NBD export (`path=nbd://…` / `nbd+unix://…`): a libblkio
//! client's writes land on the export's image byte for byte; when the NBD server dies the
//! client gets I/O errors while the daemon stays up, and once the server is back the volume
//! serves again. A missing server is a one-line error and a non-zero exit.

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use std::time::{Duration, Instant};
use support::blkio_client::{BlkioClient, BlkioOpts, Op};
use support::ferry_cli::{ferry, FerryServe};
use support::nbd::{NbdAddr, NbdServer};
use support::pattern_writer::compare_image;

const MIB: u64 = 1 << 20;

fn round_trip(client: &mut BlkioClient, offset: u64, seed: u64) -> Result<Vec<u8>> {
    let data = support::pattern(seed, 2 * MIB as usize);
    client.write_all(offset, &data, 64 << 10)?;
    client.flush()?;
    let back = client.read_all(offset, data.len(), 128 << 10)?;
    ensure!(back == data, "read back differs from what was written");
    Ok(data)
}

#[test]
fn serves_an_nbd_export_and_survives_the_server_restarting() -> Result<()> {
    let dir = support::scratch_dir()?;
    let image = dir.path().join("export.img");
    std::fs::write(&image, vec![0x11u8; 16 * MIB as usize])?;
    let addr = NbdAddr::free_tcp()?;
    let mut server = NbdServer::qemu_nbd(&image, "exp", &addr)?;
    let socket = dir.path().join("n.sock");
    let spec = format!(
        "name=n,path={},socket={},queues=2",
        server.uri(),
        socket.display()
    );
    let mut serve = FerryServe::start(&[spec], &dir.path().join("ctl.sock"))?;
    let info = serve.volume_info("n")?;
    ensure!(
        info["path"] == server.uri() && info["backing"] == "nbd" && info["size"] == 16 * MIB,
        "{info}"
    );
    let opts = BlkioOpts {
        buf_bytes: 4 << 20,
        ..BlkioOpts::default()
    };
    let mut client = BlkioClient::connect(&socket, &opts)?;
    ensure!(client.capacity_bytes() == 16 * MIB);
    let data = round_trip(&mut client, 3 * MIB, 7)?;
    compare_image(&image, 3 * MIB, &data)?;

    server.daemon.kill();
    let ops: Vec<Op> = (0..8)
        .map(|i| Op::Write {
            offset_bytes: i * 65536,
            len_bytes: 65536,
            buf_offset: 0,
            fua: false,
        })
        .collect();
    let results = client.run_batches_within(&[ops], Duration::from_secs(20))?;
    ensure!(
        results[0].iter().all(|r| r.is_some()),
        "requests hang after the NBD server died: {results:?}"
    );
    ensure!(
        results[0].iter().any(|r| r.is_some_and(|ret| ret < 0)),
        "no request failed with the NBD server gone: {results:?}"
    );
    ensure!(
        serve.daemon.is_running(),
        "ferry serve died with the NBD server"
    );

    let _server = NbdServer::qemu_nbd(&image, "exp", &addr)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let data = loop {
        match round_trip(&mut client, 9 * MIB, 8) {
            Ok(data) => break data,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet served again: {e:#}");
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => return Err(e.context("the volume does not serve after the server is back")),
        }
    };
    compare_image(&image, 9 * MIB, &data)?;
    Ok(())
}

#[test]
fn a_missing_nbd_server_is_a_one_line_error() -> Result<()> {
    let dir = support::scratch_dir()?;
    let port = support::nbd::free_port()?;
    let socket = dir.path().join("n.sock");
    for path in [
        format!("nbd://127.0.0.1:{port}/exp"),
        format!(
            "nbd+unix:///exp?socket={}",
            dir.path().join("none").display()
        ),
    ] {
        let spec = format!("name=n,path={path},socket={}", socket.display());
        let out = ferry(&["serve", "--volume", &spec])?;
        ensure!(
            !out.status.success(),
            "ferry serve started without a server"
        );
        let stderr = out.stderr.trim();
        ensure!(
            stderr.lines().count() == 1 && stderr.contains("cannot connect"),
            "{stderr:?}"
        );
        ensure!(!socket.exists(), "the volume socket was created");
    }
    Ok(())
}

#[test]
fn serves_a_slice_of_an_nbd_export_over_a_unix_socket() -> Result<()> {
    let dir = support::scratch_dir()?;
    let image = dir.path().join("export.img");
    std::fs::write(&image, vec![0x22u8; 8 * MIB as usize])?;
    let server = NbdServer::qsd(&image, "exp", &NbdAddr::Unix(dir.path().join("nbd.sock")))?;
    let socket = dir.path().join("n.sock");
    let spec = format!(
        "name=n,path={},offset={},length={},socket={}",
        server.uri(),
        2 * MIB,
        4 * MIB,
        socket.display()
    );
    let _serve = FerryServe::start(&[spec], &dir.path().join("ctl.sock"))?;
    let opts = BlkioOpts {
        buf_bytes: 4 << 20,
        ..BlkioOpts::default()
    };
    let mut client = BlkioClient::connect(&socket, &opts)?;
    ensure!(client.capacity_bytes() == 4 * MIB);
    let data = round_trip(&mut client, 2 * MIB, 9)?;
    compare_image(&image, 4 * MIB, &data)?;
    let outside = std::fs::read(&image).context("read export image")?;
    ensure!(outside[..4 * MIB as usize].iter().all(|&b| b == 0x22));
    ensure!(outside[6 * MIB as usize..].iter().all(|&b| b == 0x22));
    Ok(())
}
