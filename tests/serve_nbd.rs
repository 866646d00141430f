//! `ferry serve` with a volume on an NBD export (`path=nbd://…` / `nbd+unix://…`): a libblkio
//! client's writes land on the export's image byte for byte; when the NBD server dies the
//! client gets I/O errors while the daemon stays up, and once the server is back the volume
//! serves again. A missing server is a one-line error and a non-zero exit. The export's size
//! constraints (`NBD_INFO_BLOCK_SIZE`) are honoured: requests split at its maximum payload, an
//! export whose minimum block size exceeds a sector is refused, and served with a matching
//! `logical-block-size=` instead. Over TLS (`nbds://`, `tls-creds=` or the daemon's
//! `--tls-creds`, certificates made by the test) the same holds, and every TLS failure at
//! open is one line.

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use ferry_test_support::pki::{Pki, Subject};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::blkio_client::{BlkioClient, BlkioOpts, Op};
use support::compare_image;
use support::ferry_cli::{ferry, FerryServe};
use support::nbd::{BlockLimits, NbdAddr, NbdRequest, NbdServer, QemuNbdOpts, QsdOpts};

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
    let sizes = &info["nbd-block-sizes"];
    ensure!(
        sizes["advertised"] == true
            && sizes["block_bytes_min"] == 1
            && sizes["payload_bytes_max"] == 32 * MIB,
        "qemu-nbd's block sizes in query-volumes: {info}"
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

/// A `qemu-storage-daemon` export `exp` (over blkdebug with `align_bytes` and a 1 MiB
/// `max-transfer`) of a new image in `dir` holding `image_bytes` of `fill`, on a Unix socket.
fn qsd_export(
    dir: &std::path::Path,
    fill: u8,
    image_bytes: u64,
    align_bytes: u64,
) -> Result<(std::path::PathBuf, NbdServer)> {
    let image = dir.join("export.img");
    std::fs::write(&image, vec![fill; image_bytes as usize])?;
    let limits = BlockLimits {
        align_bytes,
        max_transfer_bytes: MIB,
    };
    let addr = NbdAddr::Unix(dir.join("nbd.sock"));
    let server = NbdServer::qsd_block_limits(&image, "exp", &addr, limits)?;
    Ok((image, server))
}

/// A volume on an export whose maximum payload is 1 MiB (qemu-storage-daemon over blkdebug
/// `max-transfer=1M`, minimum block 512): 4 MiB guest reads and writes reach the server as
/// requests of at most 1 MiB, aligned to 512 bytes, and the data lands byte for byte.
#[test]
fn splits_requests_at_the_exports_maximum_payload() -> Result<()> {
    let dir = support::scratch_dir()?;
    let (image, server) = qsd_export(dir.path(), 0x33, 16 * MIB, 512)?;
    let socket = dir.path().join("n.sock");
    let spec = format!("name=n,path={},socket={}", server.uri(), socket.display());
    let serve = FerryServe::start(&[spec], &dir.path().join("ctl.sock"))?;
    let mut client = BlkioClient::connect(&socket, &BlkioOpts::default())?;
    let data = support::pattern(11, 4 * MIB as usize);
    client.write_all(5 * MIB + 512, &data, data.len())?;
    client.flush()?;
    let back = client.read_all(5 * MIB + 512, data.len(), data.len())?;
    ensure!(back == data, "read back differs from what was written");
    compare_image(&image, 5 * MIB + 512, &data)?;
    let whole = server.check_requests(512, MIB)?;
    ensure!(
        whole >= 6,
        "the 4 MiB requests were not split at 1 MiB ({whole} pieces)"
    );
    let log = serve.daemon.log();
    ensure!(
        log.contains(
            "minimum block 512 bytes, preferred block 4096 bytes, maximum payload 1048576"
        ),
        "ferry did not log the negotiated sizes:\n{log}"
    );
    Ok(())
}

/// The same export served with `logical-block-size=4K`: the guest's requests are whole 4 KiB
/// blocks, so every request reaching the server is aligned to its minimum block (QEMU's
/// request trace), and the data lands byte for byte.
#[test]
fn serves_an_export_of_4k_blocks_to_a_guest_of_4k_blocks() -> Result<()> {
    let dir = support::scratch_dir()?;
    let (image, server) = qsd_export(dir.path(), 0x44, 8 * MIB, 4096)?;
    let socket = dir.path().join("n.sock");
    let spec = format!(
        "name=n,path={},socket={},logical-block-size=4K",
        server.uri(),
        socket.display()
    );
    let serve = FerryServe::start(&[spec], &dir.path().join("ctl.sock"))?;
    let mut client = BlkioClient::connect(&socket, &BlkioOpts::default())?;
    ensure!(client.property_i32("request-alignment")? == 4096);
    let data = support::pattern(12, 3 * MIB as usize);
    client.write_all(MIB + 4096, &data, 64 << 10)?;
    client.run_batch_ok(
        0,
        &[Op::WriteZeroes {
            offset_bytes: 6 * MIB,
            len_bytes: 8192,
            no_unmap: true,
        }],
    )?;
    client.flush()?;
    let back = client.read_all(MIB + 4096, data.len(), 1 << 20)?;
    ensure!(back == data, "read back differs from what was written");
    compare_image(&image, MIB + 4096, &data)?;
    compare_image(&image, 6 * MIB, &[0; 8192])?;
    server.check_requests(4096, MIB)?;
    drop(client);
    drop(serve);
    Ok(())
}

/// An export whose minimum block size is 4 KiB cannot take the guest's 512-byte requests:
/// `ferry serve` refuses it with a one-line error naming both sizes, and sends it nothing.
#[test]
fn refuses_an_export_whose_minimum_block_size_exceeds_a_sector() -> Result<()> {
    let dir = support::scratch_dir()?;
    let (_image, server) = qsd_export(dir.path(), 0, 4 * MIB, 4096)?;
    let socket = dir.path().join("n.sock");
    let spec = format!("name=n,path={},socket={}", server.uri(), socket.display());
    let out = ferry(&["serve", "--volume", &spec])?;
    ensure!(!out.status.success(), "ferry serve started on the export");
    let stderr = out.stderr.trim();
    ensure!(
        stderr.lines().count() == 1
            && stderr.contains(&format!(
                "{}: the export's minimum block size is 4096 bytes; ferry's volumes take \
                 512-byte requests (serve it with logical-block-size=4096)",
                server.uri()
            )),
        "{stderr:?}"
    );
    ensure!(!socket.exists(), "the volume socket was created");
    let requests = server.requests()?;
    ensure!(
        requests.iter().all(|r| r.cmd == NbdRequest::DISC),
        "requests reached the refused export: {requests:?}"
    );
    Ok(())
}

/// A test CA and a directory with both pairs for `localhost` and 127.0.0.1 (a server's and
/// a client's credentials at once); the directory lives as long as the CA.
fn credentials(ca_name: &str) -> Result<(Pki, PathBuf)> {
    let pki = Pki::new(ca_name)?;
    let dir = pki.credentials("both", &Subject::named("localhost"))?;
    Ok((pki, dir))
}

/// `qemu-nbd` requiring TLS with the server pair in `credentials`, exporting `image` as `exp`.
fn qemu_nbd_tls(image: &Path, addr: &NbdAddr, credentials: &Path) -> Result<NbdServer> {
    let opts = QemuNbdOpts {
        tls_creds: Some(credentials.to_path_buf()),
        ..QemuNbdOpts::default()
    };
    NbdServer::qemu_nbd_with(image, "exp", addr, opts)
}

/// A volume on an export that requires TLS (certificates made by the test) served to a
/// libblkio client: with its own `tls-creds=` (`qemu-nbd`, TCP), and through the daemon's
/// `--tls-creds` for an `nbds+unix://` path (`qemu-storage-daemon`); the writes land on the
/// export's image byte for byte and `query-volumes` says the connections use TLS.
#[test]
fn serves_an_nbd_export_over_tls() -> Result<()> {
    let dir = support::scratch_dir()?;
    let (_pki, creds) = credentials("ferry test CA")?;
    let image = dir.path().join("export.img");
    std::fs::write(&image, vec![0x11u8; 16 * MIB as usize])?;
    let server = qemu_nbd_tls(&image, &NbdAddr::free_tcp()?, &creds)?;
    let socket = dir.path().join("n.sock");
    let spec = format!(
        "name=n,path={},socket={},queues=2,tls-creds={}",
        server.uri(),
        socket.display(),
        creds.display()
    );
    let serve = FerryServe::start(&[spec], &dir.path().join("ctl.sock"))?;
    let info = serve.volume_info("n")?;
    ensure!(
        info["path"] == server.uri() && info["backing"] == "nbd" && info["backing-tls"] == true,
        "{info}"
    );
    let opts = BlkioOpts {
        buf_bytes: 4 << 20,
        ..BlkioOpts::default()
    };
    let mut client = BlkioClient::connect(&socket, &opts)?;
    let data = round_trip(&mut client, 3 * MIB, 7)?;
    compare_image(&image, 3 * MIB, &data)?;
    drop(client);
    drop(serve);
    drop(server);

    let opts_qsd = QsdOpts {
        tls_creds: Some(creds.clone()),
    };
    let addr = NbdAddr::Unix(dir.path().join("nbd.sock"));
    let server = NbdServer::qsd_with(&image, "exp", &addr, opts_qsd)?;
    let spec = format!("name=n,path={},socket={}", server.uri(), socket.display());
    let tls_creds = creds.to_str().context("credentials path")?;
    let serve = FerryServe::start_with(
        &[spec],
        &dir.path().join("ctl2.sock"),
        &["--tls-creds", tls_creds],
    )?;
    ensure!(serve.volume_info("n")?["backing-tls"] == true);
    let mut client = BlkioClient::connect(&socket, &opts)?;
    let data = round_trip(&mut client, 9 * MIB, 8)?;
    compare_image(&image, 9 * MIB, &data)?;
    Ok(())
}

/// Every way TLS can fail at open is one line and a non-zero exit, and no socket is made:
/// a wrong CA, `nbds://` to a server without TLS, a TLS server reached with `nbd://` and no
/// credentials (the server's reason shown), `nbds://` with no credentials at all.
#[test]
fn tls_failures_at_open_are_one_line_errors() -> Result<()> {
    let dir = support::scratch_dir()?;
    let (_pki, creds) = credentials("ferry test CA")?;
    let (_foreign_pki, foreign) = credentials("another CA")?;
    let image = dir.path().join("export.img");
    std::fs::write(&image, vec![0u8; 4 * MIB as usize])?;
    let tls_server = qemu_nbd_tls(&image, &NbdAddr::free_tcp()?, &creds)?;
    let plain_addr = NbdAddr::free_tcp()?;
    let _plain_server = NbdServer::qemu_nbd(&image, "exp", &plain_addr)?;
    let socket = dir.path().join("n.sock");
    let cases = [
        (
            format!("{},tls-creds={}", tls_server.uri(), foreign.display()),
            "TLS handshake: invalid peer certificate: UnknownIssuer",
        ),
        (
            format!(
                "{},tls-creds={}",
                plain_addr.uri_with_scheme("exp", true),
                creds.display()
            ),
            "the server does not offer TLS: it refused NBD_OPT_STARTTLS",
        ),
        (
            tls_server.plain_uri(),
            "the server requires TLS (connect with nbds:// and TLS credentials): ",
        ),
        (
            tls_server.uri(),
            "TLS is required (nbds://) but no TLS credentials were given",
        ),
    ];
    for (path, needle) in cases {
        let spec = format!("name=n,path={path},socket={}", socket.display());
        let out = ferry(&["serve", "--volume", &spec])?;
        ensure!(!out.status.success(), "ferry serve started on {path}");
        let stderr = out.stderr.trim();
        ensure!(
            stderr.lines().count() == 1 && stderr.contains(needle),
            "{path}: {stderr:?}"
        );
        ensure!(!socket.exists(), "the volume socket was created");
    }
    Ok(())
}
