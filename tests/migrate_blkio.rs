//! End-to-end tests of live migration through the real daemon and real clients: `ferry serve`
//! serves volumes over vhost-user-blk, a libblkio client writes random data at random offsets
//! with many requests in flight during the whole migration, and the operator drives the job
//! with the `ferry migrate` command line. Afterwards the target must hold exactly what the
//! client wrote and the client must have seen no error. Targets: files, `qemu-nbd` on
//! loopback TCP (plain and over TLS) and `qemu-storage-daemon --nbd-server` on a unix socket.

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use ferry_test_support::pki::{Pki, Subject};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::blkio_client::{BlkioClient, BlkioOpts};
use support::ferry_cli::{ferry, FerryServe};
use support::nbd::{BlockLimits, NbdAddr, NbdRequest, NbdServer, QemuNbdOpts};
use support::pattern_writer::{PatternWriter, WriterConfig};
use support::{compare_bytes, compare_image};

const MIB: u64 = 1 << 20;
/// Bound on waiting for the client to make progress.
const WRITER_WAIT: Duration = Duration::from_secs(30);

/// How a test image starts out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// Pattern data in every even MiB, holes in between.
    HalfHoles,
    /// Pattern data everywhere.
    Dense,
}

/// A temporary directory with source images and a `ferry serve` serving them.
struct Fixture {
    dir: tempfile::TempDir,
    serve: FerryServe,
    names: Vec<String>,
    initial: Vec<Vec<u8>>,
}

impl Fixture {
    fn new(volumes: &[(&str, u64)], fill: Fill) -> Result<Self> {
        Self::with_settings(volumes, fill, "")
    }

    /// As [`Fixture::new`], with `extra` appended to every volume's spec.
    fn with_settings(volumes: &[(&str, u64)], fill: Fill, extra: &str) -> Result<Self> {
        Self::with_options(volumes, fill, extra, &[])
    }

    /// As [`Fixture::with_settings`], with more options of `ferry serve`.
    fn with_options(
        volumes: &[(&str, u64)],
        fill: Fill,
        extra: &str,
        options: &[&str],
    ) -> Result<Self> {
        let dir = support::scratch_dir()?;
        let mut specs = Vec::new();
        let mut initial = Vec::new();
        for (i, &(name, len)) in volumes.iter().enumerate() {
            let image = dir.path().join(format!("{name}.img"));
            initial.push(make_image(&image, len, fill, 100 + i as u64)?);
            specs.push(format!(
                "name={name},path={},socket={}{extra}",
                image.display(),
                dir.path().join(format!("{name}.sock")).display()
            ));
        }
        let serve = FerryServe::start_with(&specs, &dir.path().join("ctl.sock"), options)?;
        Ok(Self {
            dir,
            serve,
            names: volumes.iter().map(|(n, _)| n.to_string()).collect(),
            initial,
        })
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn image(&self, i: usize) -> PathBuf {
        self.path(&format!("{}.img", self.names[i]))
    }

    fn socket(&self, i: usize) -> PathBuf {
        self.path(&format!("{}.sock", self.names[i]))
    }

    /// Starts a writer on volume `i`.
    fn writer(&self, i: usize, config: WriterConfig) -> Result<PatternWriter> {
        let writer = PatternWriter::spawn(&self.socket(i), self.initial[i].clone(), config)?;
        writer.wait_more(5, WRITER_WAIT)?;
        Ok(writer)
    }
}

/// A `qemu-storage-daemon` export `disk` of a new 16 MiB garbage image `nbd.img` in the
/// fixture's directory, over blkdebug with `align_bytes` and a 1 MiB `max-transfer`.
fn qsd_target(fx: &Fixture, align_bytes: u64) -> Result<(PathBuf, NbdServer)> {
    let image = fx.path("nbd.img");
    garbage_image(&image, 16 * MIB)?;
    let limits = BlockLimits {
        align_bytes,
        max_transfer_bytes: MIB,
    };
    let server =
        NbdServer::qsd_block_limits(&image, "disk", &NbdAddr::Unix(fx.path("nbd.sock")), limits)?;
    Ok((image, server))
}

/// Waits for job `id` to be ready under `writer`'s writes, cuts over, lets the writer go on
/// writing (to the target alone now), stops it and checks that `target` holds all it wrote.
fn cutover_under_writes(fx: &Fixture, id: u64, writer: PatternWriter, target: &Path) -> Result<()> {
    fx.serve.wait_ready(id)?;
    writer.wait_more(10, WRITER_WAIT)?;
    let report = fx.serve.cutover(id)?;
    ensure!(report["switched"] == true, "cutover report {report}");
    writer.wait_more(10, WRITER_WAIT)?;
    let client = writer.stop()?;
    client.ensure_no_error()?;
    compare_image(target, 0, &client.model)
}

/// Creates a `len` byte image filled as `fill` says; returns its content.
fn make_image(path: &Path, len: u64, fill: Fill, seed: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    file.set_len(len).context("size image")?;
    let mut content = vec![0u8; len as usize];
    let step = if fill == Fill::Dense { MIB } else { 2 * MIB };
    let data = support::pattern(seed, MIB as usize);
    for start in (0..len).step_by(step as usize) {
        let end = (start + MIB).min(len);
        let piece = &data[..(end - start) as usize];
        file.write_all_at(piece, start).context("fill image")?;
        content[start as usize..end as usize].copy_from_slice(piece);
    }
    file.sync_all().context("sync image")?;
    Ok(content)
}

/// An existing image of `len` bytes full of 0xee, which a copy must overwrite.
fn garbage_image(path: &Path, len: u64) -> Result<()> {
    std::fs::write(path, vec![0xeeu8; len as usize])
        .with_context(|| format!("write {}", path.display()))
}

fn text(path: &Path) -> Result<&str> {
    path.to_str().context("path is not UTF-8")
}

/// Migrates a 16 MiB volume to a new file under client writes, cuts over while the client
/// keeps writing, and lets it write on (now to the target).
fn file_migration(mode: &str, writer: WriterConfig, max_speed: &str) -> Result<()> {
    let fx = Fixture::new(&[("vda", 16 * MIB)], Fill::HalfHoles)?;
    let writer = fx.writer(0, writer)?;
    let target = fx.path("dst.img");
    let id = fx.serve.start_migration(&[
        "--volume",
        "vda",
        "--target",
        text(&target)?,
        "--mode",
        mode,
        "--max-speed",
        max_speed,
    ])?;
    let ready = fx.serve.wait_ready(id)?;
    writer.wait_more(10, WRITER_WAIT)?; // ready, still mirroring a busy client
    let report = fx.serve.cutover(id)?;
    ensure!(report["switched"] == true, "cutover report {report}");
    ensure!(
        fx.serve.volume_path("vda")? == target,
        "query-volumes does not show the target"
    );
    writer.wait_more(20, WRITER_WAIT)?; // these writes go to the target only
    let client = writer.stop()?;
    client.ensure_no_error()?;
    compare_image(&target, 0, &client.model)?;
    ensure!(
        std::fs::read(fx.image(0))? != client.model,
        "the source has the writes made after cutover"
    );
    let status = fx.serve.job_status(id)?;
    ensure!(status["state"] == "completed", "{status}");
    ensure!(status["cutover_pause_us"].is_u64(), "{status}");
    eprintln!(
        "{mode}: {} client writes; ready at {ready}; cutover {report}",
        client.ok_writes
    );
    Ok(())
}

#[test]
fn active_file_target() -> Result<()> {
    let writer = WriterConfig {
        seed: 11,
        ..WriterConfig::default()
    };
    file_migration("active", writer, "8M")
}

#[test]
fn background_file_target() -> Result<()> {
    // A background mirror converges only while the client dirties (in 64 KiB chunks) less
    // than the copier copies: an unlimited copier and a paced client.
    let writer = WriterConfig {
        seed: 12,
        inflight: 4,
        pace: Duration::from_millis(20),
        ..WriterConfig::default()
    };
    file_migration("background", writer, "32M")
}

/// Migrates to an NBD export under client writes and cuts over while the client keeps
/// writing: the volume switches to the export (`switched: true`, `query-volumes` shows the
/// URI), the client writes on through it, the export's image ends up equal to everything the
/// client wrote and the source stays as it was at cutover.
fn nbd_migration(server: impl FnOnce(&Path) -> Result<NbdServer>, mode: &str) -> Result<()> {
    nbd_migration_with(server, mode, None)
}

/// [`nbd_migration`], started with `--target-tls-creds DIR` when `tls_creds` is given: then the
/// volume is served from the export over TLS after the cutover.
fn nbd_migration_with(
    server: impl FnOnce(&Path) -> Result<NbdServer>,
    mode: &str,
    tls_creds: Option<&Path>,
) -> Result<()> {
    // Credentials given with the migration, not at start: Landlock must let ferry read them.
    let pki_dir = tls_creds
        .and_then(Path::parent)
        .map(|d| d.display().to_string());
    let options: Vec<&str> = match &pki_dir {
        Some(dir) => vec!["--allow-path", dir],
        None => Vec::new(),
    };
    let mut fx = Fixture::with_options(&[("vda", 16 * MIB)], Fill::HalfHoles, "", &options)?;
    let image = fx.path("nbd.img");
    garbage_image(&image, 16 * MIB)?;
    let server = server(&image)?;
    // A background mirror converges only while the client dirties less than the copier
    // copies: a paced client and a faster copier (as in `background_file_target`).
    let (writer, max_speed) = if mode == "background" {
        let config = WriterConfig {
            seed: 22,
            inflight: 4,
            pace: Duration::from_millis(20),
            ..WriterConfig::default()
        };
        (config, "32M")
    } else {
        let config = WriterConfig {
            seed: 21,
            ..WriterConfig::default()
        };
        (config, "8M")
    };
    let writer = fx.writer(0, writer)?;
    let uri = server.uri();
    let mut args = vec![
        "--volume",
        "vda",
        "--target",
        &uri,
        "--mode",
        mode,
        "--max-speed",
        max_speed,
    ];
    let tls_dir = tls_creds.map(|d| d.display().to_string());
    if let Some(dir) = &tls_dir {
        args.extend(["--target-tls-creds", dir]);
    }
    let id = fx.serve.start_migration(&args)?;
    fx.serve.wait_ready(id)?;
    writer.wait_more(10, WRITER_WAIT)?;
    let report = fx.serve.cutover(id)?;
    ensure!(report["switched"] == true, "NBD cutover report {report}");
    let source_at_cutover = std::fs::read(fx.image(0))?;
    ensure!(
        fx.serve.job_status(id)?["state"] == "completed",
        "job not completed"
    );
    let info = fx.serve.volume_info("vda")?;
    ensure!(info["path"] == uri && info["backing"] == "nbd", "{info}");
    ensure!(info["backing-tls"] == tls_creds.is_some(), "{info}");
    writer.wait_more(20, WRITER_WAIT)?; // these writes go to the export only
    let client = writer.stop()?;
    client.ensure_no_error()?;
    compare_image(&image, 0, &client.model)?;
    ensure!(
        std::fs::read(fx.image(0))? == source_at_cutover,
        "the source changed after cutover"
    );
    ensure!(
        source_at_cutover != client.model,
        "the client wrote nothing after cutover"
    );
    // SIGTERM with the volume on the export: the main thread's final flush opens a
    // connection of its own (with a reader thread), and the daemon must exit 0.
    let exit = fx.serve.daemon.terminate(WRITER_WAIT)?;
    ensure!(
        exit.success(),
        "ferry exited {exit} after a cutover to NBD:\n{}",
        fx.serve.daemon.log()
    );
    drop(server);
    eprintln!("{uri}: {} client writes, {report}", client.ok_writes);
    Ok(())
}

/// An NBD target that fails every request (nbdkit's error filter) during an `active`
/// migration: the job fails, the client's writes all succeed, the daemon goes on (the
/// failure is met on the target connection's reply reader, whose seccomp filter allows no
/// file paths) and the job's file is removed.
#[test]
fn a_failing_nbd_target_fails_the_job_not_the_daemon() -> Result<()> {
    if !support::require("nbdkit", support::require::command_available("nbdkit")) {
        return Ok(());
    }
    let mut fx = Fixture::new(&[("vda", 16 * MIB)], Fill::Dense)?;
    let target = fx.path("nbd.img");
    support::create_image(&target, 16 * MIB)?;
    let trigger = fx.path("fail-now");
    let file = format!("file={}", target.display());
    let error_file = format!("error-file={}", trigger.display());
    let server = NbdServer::nbdkit(
        "disk",
        &NbdAddr::free_tcp()?,
        &[
            "--filter=error",
            "file",
            &file,
            "error=EIO",
            "error-rate=100%",
            &error_file,
        ],
    )?;
    let writer = fx.writer(
        0,
        WriterConfig {
            seed: 24,
            ..WriterConfig::default()
        },
    )?;
    let uri = server.uri();
    let id = fx.serve.start_migration(&[
        "--volume",
        "vda",
        "--target",
        &uri,
        "--mode",
        "active",
        "--max-speed",
        "1M",
    ])?;
    std::fs::write(&trigger, b"")?;
    let status = fx.serve.wait_state(id, |s| s != "copying")?;
    ensure!(status["state"] == "failed", "{status}");
    writer.wait_more(10, WRITER_WAIT)?;
    let client = writer.stop()?;
    client.ensure_no_error()?;
    compare_image(&fx.image(0), 0, &client.model)?;
    let job_file = fx.path("vda.img.ferry-migration");
    support::wait::wait_until("the failed job's file removed", WRITER_WAIT, || {
        Ok(!job_file.exists())
    })?;
    ensure!(
        fx.serve.daemon.is_running(),
        "ferry died:\n{}",
        fx.serve.daemon.log()
    );
    eprintln!("failed as expected: {}", status["error"]);
    Ok(())
}

#[test]
fn nbd_target_qemu_nbd_tcp() -> Result<()> {
    nbd_migration(
        |img| NbdServer::qemu_nbd(img, "disk", &NbdAddr::free_tcp()?),
        "active",
    )
}

/// `ferry migrate start --target nbds://… --target-tls-creds DIR` onto a `qemu-nbd` that
/// requires
/// TLS (certificates made by the test): the job completes and cuts over, and the client
/// writes on through the volume's TLS connections to the export.
#[test]
fn nbd_target_over_tls() -> Result<()> {
    let pki = Pki::new("ferry test CA")?;
    let creds = pki.credentials("both", &Subject::named("localhost"))?;
    let server_creds = creds.clone();
    nbd_migration_with(
        |img| {
            let opts = QemuNbdOpts {
                tls_creds: Some(server_creds),
                ..QemuNbdOpts::default()
            };
            NbdServer::qemu_nbd_with(img, "disk", &NbdAddr::free_tcp()?, opts)
        },
        "active",
        Some(&creds),
    )
}

/// The credentials of a TLS target: `nbds://` without any is refused in one line, and so are
/// a directory without the client pair and credentials for a file; without
/// `--target-tls-creds`
/// the daemon's own
/// `ferry serve --tls-creds` are used, and the job completes over TLS.
#[test]
fn tls_credentials_of_an_nbd_target() -> Result<()> {
    let dir = support::scratch_dir()?;
    let pki = Pki::new("ferry test CA")?;
    let creds = pki.credentials("both", &Subject::named("localhost"))?;
    let target = dir.path().join("nbd.img");
    garbage_image(&target, 16 * MIB)?;
    let opts = QemuNbdOpts {
        tls_creds: Some(creds.clone()),
        ..QemuNbdOpts::default()
    };
    let server = NbdServer::qemu_nbd_with(&target, "disk", &NbdAddr::free_tcp()?, opts)?;
    let uri = server.uri();
    // Credentials given with the migration, not at start: Landlock must let ferry read them.
    let pki_dir = pki
        .ca_cert()
        .parent()
        .context("CA without a directory")?
        .display()
        .to_string();
    let fx = Fixture::with_options(
        &[("vda", 16 * MIB)],
        Fill::Dense,
        "",
        &["--allow-path", &pki_dir],
    )?;
    let start = |extra: &[&str]| {
        let mut args = vec!["--volume", "vda", "--target", &uri];
        args.extend_from_slice(extra);
        fx.serve.migrate("start", &args)
    };
    start(&[])?.expect_error("TLS is required (nbds://) but no TLS credentials were given")?;
    let server_only = pki.server_credentials("server-only", &Subject::named("localhost"))?;
    start(&["--target-tls-creds", text(&server_only)?])?
        .expect_error("client-cert.pem is missing")?;
    fx.serve
        .migrate(
            "start",
            &[
                "--volume",
                "vda",
                "--target",
                text(&dir.path().join("file.img"))?,
                "--target-tls-creds",
                text(&creds)?,
            ],
        )?
        .expect_error("tls-creds is for an NBD target")?;

    let image = dir.path().join("vdb.img");
    let data = make_image(&image, 16 * MIB, Fill::HalfHoles, 7)?;
    let spec = format!(
        "name=vdb,path={},socket={}",
        image.display(),
        dir.path().join("vdb.sock").display()
    );
    let serve = FerryServe::start_with(
        &[spec],
        &dir.path().join("ctl.sock"),
        &["--tls-creds", text(&creds)?],
    )?;
    let id = serve.start_migration(&["--volume", "vdb", "--target", &uri, "--auto-cutover"])?;
    let status = serve.wait_state(id, |s| matches!(s, "completed" | "failed" | "cancelled"))?;
    ensure!(status["state"] == "completed", "{status}");
    ensure!(serve.volume_info("vdb")?["backing-tls"] == true);
    compare_image(&target, 0, &data)?;
    Ok(())
}

#[test]
fn nbd_target_qsd_unix() -> Result<()> {
    let dir = support::scratch_dir()?;
    let socket = dir.path().join("nbd.sock");
    nbd_migration(
        |img| NbdServer::qsd(img, "disk", &NbdAddr::Unix(socket.clone())),
        "active",
    )
}

#[test]
fn nbd_target_qemu_nbd_unix_background() -> Result<()> {
    let dir = support::scratch_dir()?;
    let socket = dir.path().join("nbd.sock");
    nbd_migration(
        |img| NbdServer::qemu_nbd(img, "disk", &NbdAddr::Unix(socket.clone())),
        "background",
    )
}

/// A target whose export advertises a maximum payload of 1 MiB and a minimum block of 512
/// bytes (qemu-storage-daemon over blkdebug `max-transfer=1M,align=512`): a client writing up
/// to 4 MiB at a time during the copy (mirrored to the target) and after cutover (served from
/// the export). Every request reaching the server is aligned to 512 bytes and carries at most
/// 1 MiB, the export ends up with everything the client wrote, and the job's status shows
/// the negotiated sizes.
#[test]
fn nbd_target_with_a_1m_maximum_payload() -> Result<()> {
    let fx = Fixture::new(&[("vda", 16 * MIB)], Fill::Dense)?;
    let (image, server) = qsd_target(&fx, 512)?;
    let writer = fx.writer(
        0,
        WriterConfig {
            seed: 81,
            inflight: 4,
            write_bytes_max: 4 * MIB,
            ..WriterConfig::default()
        },
    )?;
    let uri = server.uri();
    let id =
        fx.serve
            .start_migration(&["--volume", "vda", "--target", &uri, "--max-speed", "16M"])?;
    let sizes = &fx.serve.job_status(id)?["target_block_sizes"];
    ensure!(
        sizes["block_bytes_min"] == 512
            && sizes["payload_bytes_max"] == MIB
            && sizes["advertised"] == true,
        "status shows target_block_sizes {sizes}"
    );
    cutover_under_writes(&fx, id, writer, &image)?;
    let whole = server.check_requests(512, MIB)?;
    ensure!(
        whole > 16,
        "only {whole} requests of 1 MiB: nothing was split"
    );
    Ok(())
}

/// A target whose export has a minimum block size of 4 KiB (blkdebug `align=4096`) cannot
/// take the guest's 512-byte writes: `migrate start` fails with a one-line error naming both
/// sizes, the export gets no request, and the client writing all along sees nothing of it.
#[test]
fn nbd_target_with_4k_blocks_is_refused() -> Result<()> {
    let fx = Fixture::new(&[("vda", 16 * MIB)], Fill::HalfHoles)?;
    let (image, server) = qsd_target(&fx, 4096)?;
    let writer = fx.writer(
        0,
        WriterConfig {
            seed: 82,
            ..WriterConfig::default()
        },
    )?;
    let uri = server.uri();
    fx.serve
        .migrate("start", &["--volume", "vda", "--target", &uri])?
        .expect_error(&format!(
            "{uri}: the export's minimum block size is 4096 bytes; ferry's volumes take \
             512-byte requests"
        ))?;
    writer.wait_more(10, WRITER_WAIT)?;
    let client = writer.stop()?;
    client.ensure_no_error()?;
    compare_image(&fx.image(0), 0, &client.model)?;
    let requests = server.requests()?;
    ensure!(
        requests.iter().all(|r| r.cmd == NbdRequest::DISC),
        "requests reached the refused export: {requests:?}"
    );
    ensure!(
        std::fs::read(&image)?.iter().all(|&b| b == 0xee),
        "the refused export was written"
    );
    Ok(())
}

/// The same export as the target of a volume with 4 KiB logical blocks
/// (`logical-block-size=4K`): the guest's writes are whole 4 KiB blocks and so is everything
/// the job sends, so the migration runs: every request reaching the server is aligned to 4 KiB,
/// the cutover switches the volume onto the export (opened with the volume's block size), and
/// the export ends up with everything the client wrote.
#[test]
fn nbd_target_with_4k_blocks_takes_a_volume_of_4k_blocks() -> Result<()> {
    let fx = Fixture::with_settings(
        &[("vda", 16 * MIB)],
        Fill::HalfHoles,
        ",logical-block-size=4K",
    )?;
    let (image, server) = qsd_target(&fx, 4096)?;
    let writer = fx.writer(
        0,
        WriterConfig {
            seed: 83,
            inflight: 4,
            ..WriterConfig::default()
        },
    )?;
    let uri = server.uri();
    let id = fx
        .serve
        .start_migration(&["--volume", "vda", "--target", &uri])?;
    let sizes = &fx.serve.job_status(id)?["target_block_sizes"];
    ensure!(
        sizes["block_bytes_min"] == 4096,
        "target_block_sizes {sizes}"
    );
    cutover_under_writes(&fx, id, writer, &image)?;
    server.check_requests(4096, MIB)?;
    Ok(())
}

/// Two volumes (the first not a whole number of MiB) merged onto one file under client
/// writes; then `ferry serve` restarted on the merged image with `offset=`/`length=` from
/// the layout file serves each volume's data.
#[test]
fn merge_two_volumes_then_serve_slices() -> Result<()> {
    let (len_a, len_b) = (12 * MIB + MIB / 2, 8 * MIB);
    let fx = Fixture::new(&[("vda", len_a), ("vdb", len_b)], Fill::HalfHoles)?;
    let config = |seed| WriterConfig {
        seed,
        inflight: 16,
        ..WriterConfig::default()
    };
    let (wa, wb) = (fx.writer(0, config(31))?, fx.writer(1, config(32))?);
    let target = fx.path("merged.img");
    let id = fx.serve.start_migration(&[
        "--volume",
        "vda",
        "--volume",
        "vdb",
        "--target",
        text(&target)?,
        "--max-speed",
        "16M",
    ])?;
    fx.serve.wait_ready(id)?;
    let report = fx.serve.cutover(id)?;
    ensure!(report["switched"] == true, "{report}");
    let (info_a, info_b) = (fx.serve.volume_info("vda")?, fx.serve.volume_info("vdb")?);
    ensure!(
        info_a["offset"] == 0 && info_b["offset"] == 13 * MIB,
        "{info_a} {info_b}"
    );
    wa.wait_more(10, WRITER_WAIT)?;
    wb.wait_more(10, WRITER_WAIT)?;
    let (ra, rb) = (wa.stop()?, wb.stop()?);
    ra.ensure_no_error()?;
    rb.ensure_no_error()?;
    compare_image(&target, 0, &ra.model)?;
    compare_image(&target, 13 * MIB, &rb.model)?;

    let layout: Value = serde_json::from_slice(&std::fs::read(fx.path("merged.img.layout.json"))?)
        .context("layout file is not JSON")?;
    ensure!(layout["magic"] == "ferry-layout", "{layout}");
    let mut fx = fx;
    fx.serve.daemon.terminate(Duration::from_secs(30))?;
    let mut specs = Vec::new();
    for v in layout["volumes"].as_array().context("layout volumes")? {
        let name = v["name"].as_str().context("layout name")?;
        specs.push(format!(
            "name={name},path={},offset={},length={},socket={}",
            target.display(),
            v["offset_bytes"],
            v["length_bytes"],
            fx.socket(if name == "vda" { 0 } else { 1 }).display()
        ));
    }
    ensure!(specs.len() == 2, "{layout}");
    let _serve = FerryServe::start(&specs, &fx.path("ctl2.sock"))?;
    for (i, model) in [(0, &ra.model), (1, &rb.model)] {
        let opts = BlkioOpts {
            buf_bytes: 16 << 20,
            ..BlkioOpts::default()
        };
        let mut client = BlkioClient::connect(&fx.socket(i), &opts)?;
        ensure!(
            client.capacity_bytes() == model.len() as u64,
            "volume {i} capacity {}",
            client.capacity_bytes()
        );
        let back = client.read_all(0, model.len(), 256 << 10)?;
        compare_bytes(&format!("volume {i} served from its slice"), &back, model)?;
    }
    // A write at the end of vda stays inside its slice (vdb's data is untouched).
    let mut client = BlkioClient::connect(&fx.socket(0), &BlkioOpts::default())?;
    client.write_all(len_a - 4096, &[0x5a; 4096], 4096)?;
    client.flush()?;
    compare_image(&target, len_a - 4096, &[0x5a; 4096])?;
    compare_image(&target, 13 * MIB, &rb.model)?;
    Ok(())
}

/// Two volumes merged onto one NBD export (qemu-storage-daemon, which takes any number of
/// connections) under client writes: after cutover each volume lives on its slice of the
/// export; then `ferry serve` restarted with `path=URI,offset=,length=` serves the slices.
#[test]
fn merge_two_volumes_onto_one_nbd_export() -> Result<()> {
    let (len_a, len_b) = (12 * MIB + MIB / 2, 8 * MIB);
    let fx = Fixture::new(&[("vda", len_a), ("vdb", len_b)], Fill::HalfHoles)?;
    let image = fx.path("merged-nbd.img");
    garbage_image(&image, 24 * MIB)?;
    let server = NbdServer::qsd(&image, "merged", &NbdAddr::Unix(fx.path("nbd.sock")))?;
    let config = |seed| WriterConfig {
        seed,
        inflight: 16,
        ..WriterConfig::default()
    };
    let (wa, wb) = (fx.writer(0, config(51))?, fx.writer(1, config(52))?);
    let uri = server.uri();
    let id = fx.serve.start_migration(&[
        "--volume",
        "vda",
        "--volume",
        "vdb",
        "--target",
        &uri,
        "--max-speed",
        "16M",
    ])?;
    fx.serve.wait_ready(id)?;
    let report = fx.serve.cutover(id)?;
    ensure!(report["switched"] == true, "{report}");
    let (src_a, src_b) = (std::fs::read(fx.image(0))?, std::fs::read(fx.image(1))?);
    let (info_a, info_b) = (fx.serve.volume_info("vda")?, fx.serve.volume_info("vdb")?);
    ensure!(
        info_a["offset"] == 0 && info_b["offset"] == 13 * MIB && info_b["path"] == uri,
        "{info_a} {info_b}"
    );
    wa.wait_more(10, WRITER_WAIT)?;
    wb.wait_more(10, WRITER_WAIT)?;
    let (ra, rb) = (wa.stop()?, wb.stop()?);
    ra.ensure_no_error()?;
    rb.ensure_no_error()?;
    compare_image(&image, 0, &ra.model)?;
    compare_image(&image, 13 * MIB, &rb.model)?;
    compare_image(&image, len_a, &vec![0xee; (13 * MIB - len_a) as usize])?;
    ensure!(std::fs::read(fx.image(0))? == src_a && std::fs::read(fx.image(1))? == src_b);

    let mut fx = fx;
    fx.serve.daemon.terminate(Duration::from_secs(30))?;
    let specs = [
        format!(
            "name=vda,path={uri},offset=0,length={len_a},socket={}",
            fx.socket(0).display()
        ),
        format!(
            "name=vdb,path={uri},offset={},length={len_b},socket={}",
            13 * MIB,
            fx.socket(1).display()
        ),
    ];
    let _serve = FerryServe::start(&specs, &fx.path("ctl2.sock"))?;
    for (i, model) in [(0, &ra.model), (1, &rb.model)] {
        let opts = BlkioOpts {
            buf_bytes: 16 << 20,
            ..BlkioOpts::default()
        };
        let mut client = BlkioClient::connect(&fx.socket(i), &opts)?;
        ensure!(client.capacity_bytes() == model.len() as u64);
        let back = client.read_all(0, model.len(), 256 << 10)?;
        compare_bytes(
            &format!("volume {i} served from its NBD slice"),
            &back,
            model,
        )?;
    }
    Ok(())
}

/// A slow copier and client writes aimed at the chunks being copied (each copier thread
/// holds its 1 MiB run for 300 ms between reading and writing it): the target must still
/// end up with the newest data.
fn race(mode: &str) -> Result<()> {
    let fx = Fixture::new(&[("vda", 16 * MIB)], Fill::Dense)?;
    let writer = fx.writer(
        0,
        WriterConfig {
            seed: 41,
            inflight: 8,
            write_bytes_max: 16 << 10,
            window_bytes: Some(4 * MIB),
            pace: Duration::from_millis(5),
        },
    )?;
    let target = fx.path("dst.img");
    let id = fx.serve.start_migration(&[
        "--volume",
        "vda",
        "--target",
        text(&target)?,
        "--mode",
        mode,
        "--max-speed",
        "1M",
        "--copy-hold-ms",
        "300",
    ])?;
    let planned = fx.serve.job_status(id)?["total_bytes"]
        .as_u64()
        .context("total_bytes")?;
    // Until a client write lands on a chunk already copied, which is then copied again.
    let mut last = Value::Null;
    let raced = support::wait::wait_until("a client write racing a copy", WRITER_WAIT, || {
        last = fx.serve.job_status(id)?;
        // The copier walks up from 0; runs in [copied, copied + 4 MiB) are in its hands.
        writer.aim_at(last["copied_bytes"].as_u64().unwrap_or(0));
        Ok(last["total_bytes"].as_u64() > Some(planned) || last["state"] != "copying")
    });
    raced.with_context(|| format!("job status: {last}"))?;
    ensure!(
        last["state"] == "copying",
        "the copy ended before a client write raced it: {last}"
    );
    fx.serve
        .migrate(
            "set-speed",
            &["--job", &id.to_string(), "--copy-hold-ms", "0", "0"],
        )?
        .ok()?;
    fx.serve.wait_ready(id)?;
    let redirtied = fx.serve.job_status(id)?["total_bytes"]
        .as_u64()
        .context("total_bytes")?
        - planned;
    fx.serve.cutover(id)?;
    writer.wait_more(10, WRITER_WAIT)?;
    let client = writer.stop()?;
    client.ensure_no_error()?;
    ensure!(
        redirtied > 0,
        "no client write raced a copy; the test proves nothing"
    );
    compare_image(&target, 0, &client.model)?;
    eprintln!(
        "{mode}: {redirtied} bytes re-dirtied by racing writes, {} client writes",
        client.ok_writes
    );
    Ok(())
}

#[test]
fn race_active_writes_on_chunks_being_copied() -> Result<()> {
    race("active")
}

#[test]
fn race_background_writes_on_chunks_being_copied() -> Result<()> {
    race("background")
}

/// The NBD server dies mid-copy: the client's writes keep succeeding, the job fails with a
/// reason, and the volume stays on its source, which holds everything the client wrote.
#[test]
fn fault_nbd_server_killed_mid_copy() -> Result<()> {
    let fx = Fixture::new(&[("vda", 16 * MIB)], Fill::HalfHoles)?;
    let image = fx.path("nbd.img");
    garbage_image(&image, 16 * MIB)?;
    let mut server = NbdServer::qemu_nbd(&image, "disk", &NbdAddr::free_tcp()?)?;
    let writer = fx.writer(
        0,
        WriterConfig {
            seed: 51,
            ..WriterConfig::default()
        },
    )?;
    let id = fx.serve.start_migration(&[
        "--volume",
        "vda",
        "--target",
        &server.uri(),
        "--max-speed",
        "512K",
    ])?;
    writer.wait_more(10, WRITER_WAIT)?; // mirrored to the live server
    server.daemon.kill();
    let status = fx.serve.wait_state(id, |s| s != "copying")?;
    ensure!(status["state"] == "failed", "{status}");
    let reason = status["error"].as_str().unwrap_or("");
    ensure!(!reason.is_empty(), "no reason: {status}");
    writer.wait_more(20, WRITER_WAIT)?; // the client goes on
    let human = fx.serve.migrate("status", &[])?.ok()?;
    ensure!(
        human.stdout.contains("failed") && human.stdout.contains(reason),
        "status does not say why: {}",
        human.stdout
    );
    let client = writer.stop()?;
    client.ensure_no_error()?;
    ensure!(fx.serve.volume_path("vda")? == fx.image(0), "volume moved");
    compare_image(&fx.image(0), 0, &client.model)?;
    eprintln!("failed as expected: {reason}");
    Ok(())
}

/// Cancel mid-copy: the volume stays on its source, which holds exactly the client's data,
/// and the job copies nothing more.
#[test]
fn cancel_keeps_the_source() -> Result<()> {
    let fx = Fixture::new(&[("vda", 16 * MIB)], Fill::HalfHoles)?;
    let writer = fx.writer(
        0,
        WriterConfig {
            seed: 61,
            ..WriterConfig::default()
        },
    )?;
    let target = fx.path("dst.img");
    let id = fx.serve.start_migration(&[
        "--volume",
        "vda",
        "--target",
        text(&target)?,
        "--max-speed",
        "2M",
    ])?;
    writer.wait_more(10, WRITER_WAIT)?;
    let before = fx.serve.job_status(id)?;
    ensure!(
        before["state"] == "copying" && before["copied_bytes"].as_u64() > Some(0),
        "not mid-copy: {before}"
    );
    let out = fx
        .serve
        .migrate("cancel", &["--job", &id.to_string()])?
        .ok()?;
    ensure!(out.stdout.contains("cancelled"), "{}", out.stdout);
    let status = fx.serve.job_status(id)?;
    ensure!(status["state"] == "cancelled", "{status}");
    // The client goes on writing, which a job still copying would follow.
    writer.wait_more(20, WRITER_WAIT)?;
    let later = fx.serve.job_status(id)?;
    ensure!(
        later["copied_bytes"] == status["copied_bytes"],
        "the job copied on after cancel: {status} -> {later}"
    );
    let client = writer.stop()?;
    client.ensure_no_error()?;
    ensure!(fx.serve.volume_path("vda")? == fx.image(0), "volume moved");
    compare_image(&fx.image(0), 0, &client.model)?;
    Ok(())
}

/// A migration to a `qemu-nbd` that serves one client, cancelled and started again: the
/// ended job must have let go of its connection (it kept it until the daemon exited, so the
/// retry failed at the server's connection limit).
#[test]
fn a_cancelled_nbd_job_releases_its_connection() -> Result<()> {
    let fx = Fixture::new(&[("vda", 16 * MIB)], Fill::HalfHoles)?;
    let image = fx.path("nbd.img");
    garbage_image(&image, 16 * MIB)?;
    let server = NbdServer::qemu_nbd_clients(&image, "e", &NbdAddr::Unix(fx.path("nbd.sock")), 1)?;
    let uri = server.uri();
    let start = || {
        fx.serve
            .start_migration(&["--volume", "vda", "--target", &uri, "--max-speed", "1M"])
    };
    for attempt in 0..3 {
        let id = start().with_context(|| format!("attempt {attempt}"))?;
        let status = fx.serve.job_status(id)?;
        ensure!(status["state"] == "copying", "attempt {attempt}: {status}");
        fx.serve
            .migrate("cancel", &["--job", &id.to_string()])?
            .ok()?;
        ensure!(fx.serve.job_status(id)?["state"] == "cancelled");
    }
    drop(server);
    Ok(())
}

/// Bad requests through the CLI: each is a one-line error and a non-zero exit, and the
/// client writing all along sees nothing of it.
#[test]
fn bad_input_is_refused_client_unaffected() -> Result<()> {
    let fx = Fixture::new(&[("vda", 16 * MIB)], Fill::HalfHoles)?;
    let writer = fx.writer(
        0,
        WriterConfig {
            seed: 71,
            ..WriterConfig::default()
        },
    )?;
    let small = fx.path("small.img");
    support::create_image(&small, MIB)?;
    let source = fx.image(0);
    let dst = fx.path("dst.img");
    let start = |volume: &str, target: &Path| -> Result<_> {
        fx.serve.migrate(
            "start",
            &[
                "--volume",
                volume,
                "--target",
                text(target)?,
                "--max-speed",
                "1M",
            ],
        )
    };
    start("nope", &dst)?.expect_error("unknown volume \"nope\"")?;
    start("vda", &source)?.expect_error("is the image of volume")?;
    start("vda", &small)?.expect_error("are needed")?;
    ensure!(
        std::fs::metadata(&small)?.len() == MIB,
        "a too small target was resized"
    );
    fx.serve
        .migrate(
            "start",
            &["--volume", "vda", "--target", text(&dst)?, "--mode", "fast"],
        )?
        .expect_error("expected active or background")?;
    fx.serve
        .migrate("cutover", &[])?
        .expect_error("no migration job is running")?;
    let id = fx.serve.start_migration(&[
        "--volume",
        "vda",
        "--target",
        text(&dst)?,
        "--max-speed",
        "1M",
    ])?;
    start("vda", &fx.path("other.img"))?.expect_error("already migrating")?;
    fx.serve
        .migrate("cutover", &["--job", &id.to_string()])?
        .expect_error("not ready")?;
    fx.serve
        .migrate("cutover", &["--job", "999"])?
        .expect_error("unknown migration job 999")?;
    writer.wait_more(10, WRITER_WAIT)?;
    fx.serve
        .migrate("cancel", &["--job", &id.to_string()])?
        .ok()?;
    fx.serve
        .migrate("cancel", &["--job", &id.to_string()])?
        .expect_error("already ended")?;
    writer.wait_more(10, WRITER_WAIT)?;
    let client = writer.stop()?;
    client.ensure_no_error()?;
    ensure!(fx.serve.volume_path("vda")? == source, "volume moved");
    compare_image(&source, 0, &client.model)?;
    Ok(())
}

/// `ferry migrate status --watch` (for a person, and with `--json`) follows a job started
/// with `--auto-cutover` and ends when the job completes.
#[test]
fn status_watch_ends_with_auto_cutover() -> Result<()> {
    let fx = Fixture::new(&[("vda", 32 * MIB)], Fill::HalfHoles)?;
    // A paced client: see `active_converges_under_speed_limit` for a hot one.
    let writer = fx.writer(
        0,
        WriterConfig {
            seed: 81,
            inflight: 4,
            pace: Duration::from_millis(20),
            ..WriterConfig::default()
        },
    )?;
    let target = fx.path("dst.img");
    let id = fx.serve.start_migration(&[
        "--volume",
        "vda",
        "--target",
        text(&target)?,
        "--max-speed",
        "8M",
        "--auto-cutover",
    ])?;
    let control = text(&fx.serve.control)?.to_string();
    let watch = |json: bool, out: &Path| -> Result<std::process::Child> {
        let mut cmd = Command::new(support::ferry_bin());
        cmd.args(["migrate", "status", "--watch", "--control", &control]);
        if json {
            cmd.arg("--json");
        }
        let file = std::fs::File::create(out)?;
        cmd.stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .context("spawn ferry migrate status --watch")
    };
    let (human_out, json_out) = (fx.path("watch.txt"), fx.path("watch.json"));
    let children = [watch(false, &human_out)?, watch(true, &json_out)?];
    for mut child in children {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                anyhow::bail!(
                    "status --watch did not end with the job: {}\n{}",
                    fx.serve.job_status(id)?,
                    fx.serve.daemon.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        ensure!(status.success(), "status --watch exited {status}");
    }
    let human = std::fs::read_to_string(&human_out)?;
    let last = human.lines().last().unwrap_or("");
    ensure!(
        last.contains(&format!("job {id} completed")) && last.contains("cutover pause"),
        "watch output: {human:?}"
    );
    let lines: Vec<Value> = std::fs::read_to_string(&json_out)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("a --watch --json line is not JSON")?;
    let final_status = lines.last().context("no JSON lines")?;
    ensure!(
        final_status["state"] == "completed" && final_status["switched"] == true,
        "{final_status}"
    );
    ensure!(
        lines.len() >= 2,
        "the watch saw only the end: {lines:?} (the copy should take ~2 s)"
    );
    let status_list = ferry(&["migrate", "status", "--control", &control, "--json"])?
        .ok()?
        .json()?;
    ensure!(status_list.is_array(), "{status_list}");
    writer.wait_more(10, WRITER_WAIT)?;
    let client = writer.stop()?;
    client.ensure_no_error()?;
    compare_image(&target, 0, &client.model)?;
    eprintln!("watch printed: {last}");
    Ok(())
}

/// An `active` job under a speed limit and a client writing at random all over the disk
/// must still become ready: the CLI promises that active mode always converges. (It once
/// did not: the copier paid the speed limit while holding a run, so runs stayed "copying"
/// for seconds and every client write into them re-dirtied them.)
#[test]
fn active_converges_under_speed_limit() -> Result<()> {
    let fx = Fixture::new(&[("vda", 16 * MIB)], Fill::HalfHoles)?;
    let writer = fx.writer(
        0,
        WriterConfig {
            seed: 91,
            ..WriterConfig::default()
        },
    )?;
    let target = fx.path("dst.img");
    let id = fx.serve.start_migration(&[
        "--volume",
        "vda",
        "--target",
        text(&target)?,
        "--max-speed",
        "4M",
    ])?;
    // 8 MiB of data at 4 MiB/s: a few seconds, plus what the client re-dirties.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = fx.serve.job_status(id)?;
    while status["state"] == "copying" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        status = fx.serve.job_status(id)?;
    }
    let client = writer.stop()?;
    client.ensure_no_error()?;
    ensure!(status["state"] == "ready", "never ready: {status}");
    Ok(())
}
