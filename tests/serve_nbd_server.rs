//! ferry as an NBD server (`ferry serve --nbd-listen`, volumes with `nbd=rw|ro`) against
//! real clients: `qemu-img info/map/convert/compare` (holes reported, only data copied),
//! `qemu-io` reads, writes, discards and write-zeroes with FUA, `nbdinfo` (and `--map`),
//! `nbdcopy` both ways over several connections at once, plain and with TLS (wrong CA,
//! a name not in `--tls-authz`, plaintext against TLS all refused), QEMU attaching the
//! disk (`-blockdev driver=nbd`) for a guest that writes and checks a pattern, and NBD
//! writes in the journal and in a migration cut over while they go on. Hostile clients are
//! in `serve_nbd_server/hostile.rs`.

#[path = "support/mod.rs"]
mod support;

#[path = "serve_nbd_server/hostile.rs"]
mod hostile;
#[path = "serve_nbd_server/rig.rs"]
mod rig;

use anyhow::{ensure, Context as _, Result};
use rig::{allocated_bytes, run, write_at, Ferry, Pki, MIB};
use std::path::Path;
use support::guest::{Guest, GuestOpts};
use support::wait::HANG_TIMEOUT;

const IMAGE_BYTES: u64 = 64 * MIB;

fn text(p: &Path) -> String {
    p.display().to_string()
}

/// A 64 MiB image holding a pattern at 1 MiB (2 MiB of it) and at 40 MiB (1 MiB), holes
/// elsewhere; returns the pattern's bytes.
fn image_with_data(path: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    support::create_image(path, IMAGE_BYTES)?;
    let (a, b) = (support::pattern(1, 2 << 20), support::pattern(2, 1 << 20));
    write_at(path, MIB, &a)?;
    write_at(path, 40 * MIB, &b)?;
    Ok((a, b))
}

fn volume(dir: &Path, name: &str, extra: &str) -> String {
    format!(
        "name={name},path={},socket={}{extra}",
        text(&dir.join(format!("{name}.img"))),
        text(&dir.join(format!("{name}.sock")))
    )
}

#[test]
fn qemu_img_maps_converts_and_compares_copying_only_data() -> Result<()> {
    let dir = support::scratch_dir()?;
    let image = dir.path().join("v.img");
    image_with_data(&image)?;
    let ferry = Ferry::start(dir.path(), &[volume(dir.path(), "v", ",nbd=ro")], &[])?;
    let uri = ferry.uri("v", false);
    let info = run("qemu-img", &["info", "--output=json", &uri])?
        .ok()?
        .json()?;
    ensure!(info["virtual-size"] == IMAGE_BYTES, "{info}");
    let map = run("qemu-img", &["map", "-f", "raw", "--output=json", &uri])?
        .ok()?
        .json()?;
    let data: Vec<(u64, u64)> = map
        .as_array()
        .context("map is no list")?
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| {
            (
                e["start"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    ensure!(
        data == [(MIB, 2 * MIB), (40 * MIB, MIB)],
        "qemu-img map: {map}"
    );
    let copy = dir.path().join("copy.img");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &text(&copy)],
    )?
    .ok()?;
    ensure!(
        std::fs::read(&copy)? == std::fs::read(&image)?,
        "the copy differs"
    );
    let allocated = allocated_bytes(&copy)?;
    ensure!(
        allocated <= 4 * MIB,
        "qemu-img convert wrote {allocated} bytes: the holes were copied as data"
    );
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &text(&copy), &uri],
    )?
    .ok()?;
    let status = ferry.volume_info("v")?["nbd"].clone();
    ensure!(
        status["read-only"] == true && status["tls"] == false && status["fenced"] == false,
        "{status}"
    );
    ensure!(status["uris"][0] == uri.as_str(), "{status}");
    Ok(())
}

#[test]
fn qemu_io_writes_discards_and_zeroes_with_fua() -> Result<()> {
    let dir = support::scratch_dir()?;
    let image = dir.path().join("v.img");
    support::create_image(&image, IMAGE_BYTES)?;
    let ferry = Ferry::start(dir.path(), &[volume(dir.path(), "v", ",nbd=rw")], &[])?;
    let uri = ferry.unix_uri("v");
    let commands = [
        "write -P 0xab 0 4M",
        "write -f -P 0xcd 8M 64k",
        "write -f -z 1M 64k",
        "discard 2M 1M",
        "aio_write -P 0x11 16M 4k",
        "aio_write -f -P 0x12 16M 4k",
        "aio_flush",
        "flush",
        "read -P 0xab 0 1M",
        "read -P 0 1M 64k",
        "read -P 0 2M 1M",
        "read -P 0xcd 8M 64k",
        "read -P 0x12 16M 4k",
    ];
    let mut args = vec!["-f", "raw"];
    for c in &commands {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(&uri);
    let out = run("qemu-io", &args)?.ok()?;
    ensure!(
        !out.stdout.contains("Pattern verification failed"),
        "{}",
        out.stdout
    );
    let bytes = std::fs::read(&image)?;
    let at = |m: u64| (m * MIB) as usize;
    ensure!(bytes[..at(1)].iter().all(|&b| b == 0xab));
    ensure!(bytes[at(1)..at(1) + 65536].iter().all(|&b| b == 0));
    ensure!(bytes[at(2)..at(3)].iter().all(|&b| b == 0));
    ensure!(bytes[at(3)..at(4)].iter().all(|&b| b == 0xab));
    ensure!(bytes[at(8)..at(8) + 65536].iter().all(|&b| b == 0xcd));
    ensure!(bytes[at(16)..at(16) + 4096].iter().all(|&b| b == 0x12));
    let stats = &ferry.volume_info("v")?["stats"];
    ensure!(
        stats["flush_ops"].as_u64().unwrap_or(0) >= 3 && stats["errors"] == 0,
        "FUA writes are flushed: {stats}"
    );
    Ok(())
}

#[test]
fn nbdinfo_and_nbdcopy_both_ways_over_several_connections() -> Result<()> {
    let dir = support::scratch_dir()?;
    let image = dir.path().join("v.img");
    support::create_image(&image, IMAGE_BYTES)?;
    let ferry = Ferry::start(dir.path(), &[volume(dir.path(), "v", ",nbd=rw")], &[])?;
    let uri = ferry.uri("v", false);
    let info = run("nbdinfo", &["--json", &uri])?.ok()?.json()?;
    let export = &info["exports"][0];
    ensure!(
        export["can_multi_conn"] == true
            && export["can_fua"] == true
            && export["can_trim"] == true
            && export["can_zero"] == true
            && export["block_size_minimum"] == 512
            && export["export-size"] == IMAGE_BYTES,
        "nbdinfo: {info}"
    );
    // A source with holes: nbdcopy writes only its data.
    let source = dir.path().join("source.img");
    let (a, b) = image_with_data(&source)?;
    let _ = (a, b);
    run(
        "nbdcopy",
        &["--connections=4", "--threads=4", &text(&source), &uri],
    )?
    .ok()?;
    ensure!(
        std::fs::read(&image)? == std::fs::read(&source)?,
        "nbdcopy into ferry"
    );
    let map = run("nbdinfo", &["--map", &uri])?.ok()?;
    ensure!(
        map.stdout.contains("hole,zero") && map.stdout.contains("data"),
        "nbdinfo --map: {}",
        map.stdout
    );
    let back = dir.path().join("back.img");
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            &ferry.unix_uri("v"),
            &text(&back),
        ],
    )?
    .ok()?;
    ensure!(
        std::fs::read(&back)? == std::fs::read(&source)?,
        "nbdcopy out of ferry"
    );
    ensure!(
        allocated_bytes(&back)? <= 4 * MIB,
        "nbdcopy copied holes as data"
    );
    let status = &ferry.volume_info("v")?["nbd"];
    ensure!(
        status["connections-total"].as_u64().unwrap_or(0) >= 8,
        "{status}"
    );
    Ok(())
}

/// One TLS server, clients with good and bad credentials.
#[test]
fn tls_clients_are_served_and_the_wrong_ones_refused() -> Result<()> {
    let dir = support::scratch_dir()?;
    let pki = Pki::new()?;
    let good = pki.client("client1")?;
    let unlisted = pki.client("intruder")?;
    let foreign = pki.foreign_client("client1")?;
    let image = dir.path().join("v.img");
    let (a, _) = image_with_data(&image)?;
    let extra = ["--tls-creds", &text(&pki.server), "--tls-authz", "client1"].map(String::from);
    let ferry = Ferry::start(dir.path(), &[volume(dir.path(), "v", ",nbd=rw")], &extra)?;
    let tls_uri =
        |creds: &Path| format!("{}?tls-certificates={}", ferry.uri("v", true), text(creds));
    let info = run("nbdinfo", &["--json", &tls_uri(&good)])?.ok()?.json()?;
    ensure!(info["TLS"] == true, "{info}");
    let copy = dir.path().join("copy.img");
    run(
        "nbdcopy",
        &[
            "--connections=2",
            "--threads=2",
            &tls_uri(&good),
            &text(&copy),
        ],
    )?
    .ok()?;
    ensure!(
        std::fs::read(&copy)? == std::fs::read(&image)?,
        "nbdcopy over TLS"
    );
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", text(&good));
    let opts = format!(
        "driver=nbd,host=127.0.0.1,port={},export=v,tls-creds=tls0",
        ferry.port
    );
    let read = format!("read -P 0x{:02x} 1M 1", a[0]);
    run(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-c",
            &read,
            "-c",
            "write -f -P 0x77 60M 64k",
        ],
    )?
    .ok()?;
    ensure!(std::fs::read(&image)?[(60 * MIB) as usize] == 0x77);
    for (what, creds) in [
        ("a foreign CA", &foreign),
        ("a name not in --tls-authz", &unlisted),
    ] {
        let out = run("nbdinfo", &[&tls_uri(creds)])?;
        ensure!(
            !out.success,
            "a client with {what} was served: {}",
            out.stdout
        );
    }
    let plain = run("nbdinfo", &[&ferry.uri("v", false)])?;
    ensure!(
        !plain.success,
        "a plaintext client was served: {}",
        plain.stdout
    );
    let plain_qemu = run("qemu-img", &["info", &ferry.uri("v", false)])?;
    ensure!(!plain_qemu.success, "qemu-img without TLS was served");
    let log = ferry.daemon.log();
    ensure!(
        log.contains("not in --tls-authz"),
        "no log line for the refused name:\n{log}"
    );
    Ok(())
}

/// QEMU attaches a ferry volume with `-blockdev driver=nbd` over TLS; the guest writes a
/// pattern on it, reads it back, and the image holds it.
#[test]
fn qemu_attaches_the_volume_over_nbd_with_tls() -> Result<()> {
    let dir = support::scratch_dir()?;
    let pki = Pki::new()?;
    let client = pki.client("qemu")?;
    let boot_spec = format!("{},size=16M", volume(dir.path(), "boot", ""));
    let disk_spec = format!("{},size=64M,nbd=rw", volume(dir.path(), "disk", ""));
    let extra = ["--tls-creds", &text(&pki.server)].map(String::from);
    let ferry = Ferry::start(dir.path(), &[boot_spec, disk_spec], &extra)?;
    let opts = GuestOpts {
        extra_args: vec![
            "-object".into(),
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                text(&client)
            ),
            "-blockdev".into(),
            format!(
                "driver=nbd,node-name=nbd0,server.type=inet,server.host=127.0.0.1,\
                 server.port={},export=disk,tls-creds=tls0",
                ferry.port
            ),
            "-device".into(),
            "virtio-blk-pci,drive=nbd0".into(),
        ],
        ..GuestOpts::default()
    };
    let script = r#"
md5() { md5sum | cut -d' ' -f1; }
n=0; while [ ! -b /dev/vdb ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
echo "RESULT size_sectors=$(cat /sys/block/vdb/size)"
seq 1 999999 | head -c 4194304 > /tmp/p
dd if=/tmp/p of=/dev/vdb bs=65536 seek=128 oflag=direct 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
r=$(dd if=/dev/vdb bs=65536 skip=128 count=64 iflag=direct 2>/dev/null | md5)
echo "RESULT same=$([ "$r" = "$(md5 < /tmp/p)" ] && echo 1 || echo 0)"
"#;
    let boot = dir.path().join("boot.sock");
    let out = Guest::run_script(&boot, script, &opts)?;
    out.ensure_success()?;
    ensure!(
        out.result("size_sectors")? == (64 * MIB / 512).to_string(),
        "{}",
        out.tail()
    );
    ensure!(out.result("same")? == "1", "{}", out.tail());
    let expected: Vec<u8> = (1..=999_999u32)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .take(4 << 20)
        .collect();
    let image = std::fs::read(dir.path().join("disk.img"))?;
    ensure!(
        image[(8 * MIB) as usize..(12 * MIB) as usize] == expected[..],
        "the image does not hold what the guest wrote"
    );
    let status = &ferry.volume_info("disk")?["nbd"];
    ensure!(
        status["tls"] == true && status["connections-total"].as_u64() >= Some(1),
        "{status}"
    );
    Ok(())
}

/// Writes over NBD reach the journal like a guest's: `journal restore` rebuilds the image.
#[test]
fn nbd_writes_are_journaled_and_restore_the_image() -> Result<()> {
    let dir = support::scratch_dir()?;
    let journal = dir.path().join("journal");
    let extra = [
        "--journal".to_string(),
        format!("dir={},mode=sync", text(&journal)),
    ];
    let spec = format!("{},size=64M,nbd=rw", volume(dir.path(), "vol", ""));
    let mut ferry = Ferry::start(dir.path(), &[spec], &extra)?;
    let source = dir.path().join("source.img");
    image_with_data(&source)?;
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            &text(&source),
            &ferry.uri("vol", false),
        ],
    )?
    .ok()?;
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -f -P 0x5e 5M 64k",
            "-c",
            "discard 1M 64k",
            &ferry.unix_uri("vol"),
        ],
    )?
    .ok()?;
    ensure!(
        ferry.daemon.terminate(HANG_TIMEOUT)?.success(),
        "ferry serve did not stop cleanly"
    );
    let image = dir.path().join("vol.img");
    let verify = run(
        support::ferry_bin(),
        &["journal", "verify", &text(&journal)],
    )?;
    ensure!(
        verify.success,
        "journal verify: {}{}",
        verify.stdout,
        verify.stderr
    );
    let base = dir.path().join("base.img");
    support::create_image(&base, IMAGE_BYTES)?;
    let restored = dir.path().join("restored.img");
    let args = [
        "journal",
        "restore",
        &text(&journal),
        "--volume",
        "vol",
        "--base",
        &text(&base),
        "--out",
        &text(&restored),
    ];
    run(support::ferry_bin(), &args)?.ok()?;
    ensure!(
        std::fs::read(&restored)? == std::fs::read(&image)?,
        "the journal does not restore what NBD clients wrote"
    );
    Ok(())
}

/// A migration of a volume that an NBD client writes throughout, cut over while it writes:
/// the client's requests wait out the cutover's pause, and the target holds every write.
#[test]
fn nbd_writes_during_a_migration_reach_the_target() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = support::scratch_dir()?;
    let image = dir.path().join("v.img");
    let (a, _) = image_with_data(&image)?;
    let ferry = Ferry::start(dir.path(), &[volume(dir.path(), "v", ",nbd=rw")], &[])?;
    let ctl = text(&ferry.control);
    let stop = AtomicBool::new(false);
    let target = dir.path().join("target.img");
    let (model, job) = std::thread::scope(|scope| -> Result<_> {
        let writer = scope.spawn(|| -> Result<Vec<u8>> {
            let mut model = std::fs::read(&image)?;
            let mut client = hostile::Raw::session(ferry.port, "v")?;
            let mut round = 0u64;
            while !stop.load(Ordering::Acquire) || round < 64 {
                let offset = (round % 512) * 65536 + 8 * MIB;
                let data = support::pattern(1000 + round, 65536);
                client.round_trip(round * 2, offset, &data)?;
                model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                round += 1;
            }
            Ok(model)
        });
        let started = support::ferry_cli::ferry(&[
            "migrate",
            "start",
            "--control",
            &ctl,
            "--volume",
            "v",
            "--target",
            &text(&target),
            "--json",
        ])?
        .ok()?
        .json()?;
        let job = started["job"].as_u64().context("no job id")?.to_string();
        support::wait::wait_until("the migration is ready", HANG_TIMEOUT, || {
            let status = support::ferry_cli::ferry(&[
                "migrate",
                "status",
                "--control",
                &ctl,
                "--job",
                &job,
                "--json",
            ])?
            .ok()?
            .json()?;
            ensure!(status[0]["state"] != "failed", "{status}");
            Ok(status[0]["state"] == "ready")
        })?;
        support::ferry_cli::ferry(&[
            "migrate",
            "cutover",
            "--control",
            &ctl,
            "--job",
            &job,
            "--json",
        ])?
        .ok()?;
        stop.store(true, Ordering::Release);
        let model = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        Ok((model, job))
    })?;
    ensure!(
        ferry.volume_info("v")?["path"] == text(&target).as_str(),
        "job {job}: the volume is not served from the target"
    );
    let on_target = std::fs::read(&target)?;
    ensure!(
        on_target[MIB as usize..MIB as usize + a.len()] == a[..],
        "the copied data"
    );
    ensure!(
        on_target == model,
        "the target lacks NBD writes made during the migration"
    );
    Ok(())
}

/// Listening beyond loopback without TLS needs `--insecure`; an `nbd=` volume needs a
/// listener: both refused in one line with a non-zero exit.
#[test]
fn plaintext_beyond_loopback_and_exports_without_listener_are_refused() -> Result<()> {
    let dir = support::scratch_dir()?;
    let spec = format!("{},size=1M,nbd=rw", volume(dir.path(), "v", ""));
    let cases = [
        (
            vec!["--nbd-listen", "0.0.0.0:10809"],
            "needs --tls-creds DIR (or --insecure)",
        ),
        (vec![], "no --nbd-listen"),
        (
            vec!["--nbd-listen", "127.0.0.1:1", "--tls-authz", "x"],
            "--tls-authz needs --tls-creds",
        ),
    ];
    for (extra, says) in cases {
        let mut args = vec!["serve".to_string(), "--volume".into(), spec.clone()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = support::ferry::run(&args, None, rig::CLIENT_TIMEOUT)?;
        ensure!(!out.status.success(), "ferry {args:?} started");
        let err = out.stderr.trim();
        ensure!(
            err.contains(says) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
        ensure!(
            !dir.path().join("v.img").exists(),
            "an image was created before the refusal"
        );
    }
    Ok(())
}
