//! QEMU's own live migration of a VM whose disk ferry serves: two `ferry serve` daemons on
//! the same image (source and destination side), a TCG guest migrated between two QEMUs
//! over a unix socket while it reads the disk into its RAM with O_DIRECT and writes to it.
//!
//! The reads are the point: the kernel DMAs read data into guest RAM behind vm-memory's
//! back, so unless ferry marks those pages in the frontend's dirty log (`VHOST_F_LOG_ALL`,
//! `LOG_SHMFD`), the destination runs on with stale pages. Without dirty-logging support
//! QEMU refuses to migrate at all. Two checks:
//! - the O_DIRECT copies (`dd iflag=direct` into tmpfs, md5 of every copy): the guest CPU
//!   copies each buffer into tmpfs, which QEMU logs itself, so only a buffer filled on the
//!   source and copied out on the destination can go stale: a narrow window;
//! - a buffered read into the guest's page cache after QEMU's first pass over RAM: with
//!   `init_on_alloc=0` nothing but the device writes those pages (mostly free pages QEMU
//!   has sent and not seen dirtied since), so without marking they are not sent again and
//!   the destination's page cache holds their old contents (zeros); it is read there.

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::daemon::Daemon;
use support::ferry;
use support::guest::{Guest, GuestOpts, RunningGuest};
use support::qmp::Qmp;

const IMAGE_BYTES: u64 = 64 << 20;
/// The disk range the guest reads into RAM, pre-filled with `support::pattern(READ_SEED)`.
const READ_BYTES: usize = 8 << 20;
const READ_SEED: u64 = 0xf3_22;
/// The disk range read into the page cache during the migration (pattern `CACHED_SEED`).
const CACHED_AT_BYTES: u64 = 16 << 20;
const CACHED_BYTES: usize = 16 << 20;
const CACHED_SEED: u64 = 0x5e_c0;
/// Where the guest writes during the migration: 8 chunks of 1 MiB from 32 MiB on.
const WRITE_AT_BYTES: u64 = 32 << 20;
const WRITE_CHUNKS: u64 = 8;
/// The write the guest makes after the migration (through the destination's daemon).
const LATE_WRITE_AT_BYTES: u64 = 40 << 20;
/// Migration bandwidth and allowed downtime at first: the guest loops several times while
/// RAM is copied, and the migration cannot converge...
const MIGRATE_SLOW_BYTES_PER_SEC: u64 = 24 << 20;
const DOWNTIME_SLOW_MS: u64 = 1;
/// ...until the guest has finished this many read loops after QEMU's first pass and filled
/// its page cache; then both go up so that it converges (with the loop still running).
const LOOPS_WHILE_SLOW: u64 = 3;
const MIGRATE_FAST_BYTES_PER_SEC: u64 = 1 << 30;
const DOWNTIME_LIMIT_MS: u64 = 2000;
/// Bound on the migration itself.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Guest RAM (mostly zero pages, which migrate as flags).
const GUEST_MEM_MIB: u32 = 256;

/// What busybox prints for `seq FIRST 9999999 | head -c LEN`.
fn seq_pattern(first: u64, len_bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len_bytes + 16);
    let mut n = first;
    while out.len() < len_bytes {
        out.extend_from_slice(format!("{n}\n").as_bytes());
        n += 1;
    }
    out.truncate(len_bytes);
    out
}

/// `ferry serve` of the image as volume `vol` on `socket`.
fn serve(image: &Path, socket: &Path) -> Result<Daemon> {
    let spec = format!(
        "name=vol,path={},socket={},size={IMAGE_BYTES}",
        image.display(),
        socket.display()
    );
    ferry::serve(&ferry::volume_args(&spec), &[socket])
}

/// The md5 of `data` as `md5sum` prints it.
fn md5_hex(dir: &Path, data: &[u8]) -> Result<String> {
    let path = dir.join("md5-input");
    std::fs::write(&path, data).context("write md5 input")?;
    let out = Command::new("md5sum")
        .arg(&path)
        .output()
        .context("run md5sum")?;
    ensure!(out.status.success(), "md5sum failed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .map(str::to_string)
        .context("md5sum printed nothing")
}

/// The guest's script. A background loop reads the pattern range into RAM with O_DIRECT
/// (1 MiB buffers), checks each copy's md5 and writes a chunk. The foreground waits for
/// the host's "cache" (typed on the source's console during the migration) to read the
/// cached range into the page cache, then for "go" (typed on the destination's console
/// after the migration) to stop the loop, check the copies and the page cache again, and
/// write and read once more through the destination's daemon.
fn script(want_md5: &str, cached_md5: &str) -> String {
    let read_mib = READ_BYTES >> 20;
    let (cached_skip, cached_mib) = (CACHED_AT_BYTES >> 20, CACHED_BYTES >> 20);
    let write_seek = WRITE_AT_BYTES >> 16;
    let late_seek = LATE_WRITE_AT_BYTES >> 16;
    format!(
        r#"
md5() {{ md5sum | cut -d' ' -f1; }}
want={want_md5}
# Linux drops a block device's page cache at its last close: keep /dev/vda open.
exec 3< /dev/vda
seq 1 9999999 | head -c 1048576 > /tmp/w
loop() {{
  n=0; bad=0
  while [ ! -e /tmp/stop ]; do
    k=$((n % 2))
    dd if=/dev/vda of=/tmp/copy$k bs=1M count={read_mib} iflag=direct 2>/dev/null || echo "RESULT read_failed=$n"
    [ "$(md5 < /tmp/copy$k)" = "$want" ] || {{ bad=$((bad+1)); echo "RESULT stale_copy_at=$n"; }}
    dd if=/tmp/w of=/dev/vda bs=64k seek=$(({write_seek} + (n % {WRITE_CHUNKS}) * 16)) oflag=direct 2>/dev/null || echo "RESULT write_failed=$n"
    n=$((n+1))
    echo "$n $bad" > /tmp/count
    echo "ITERATION $n"
  done
}}
loop &
pid=$!
echo "RESULT phase=looping"
read -r cache < /dev/console
dd if=/dev/vda of=/dev/null bs=1M skip={cached_skip} count={cached_mib} 2>/dev/null
echo "RESULT phase=cached"
read -r go < /dev/console
touch /tmp/stop
wait $pid
read n bad < /tmp/count
echo "RESULT iterations=$n bad=$bad"
for k in 0 1; do
  [ "$(md5 < /tmp/copy$k)" = "$want" ] && echo "RESULT copy${{k}}_ok=1" || echo "RESULT copy${{k}}_ok=0"
done
r=$(dd if=/dev/vda bs=1M skip={cached_skip} count={cached_mib} 2>/dev/null | md5)
echo "RESULT cached_ok=$([ "$r" = "{cached_md5}" ] && echo 1 || echo 0)"
seq 777 9999999 | head -c 1048576 > /tmp/w2
dd if=/tmp/w2 of=/dev/vda bs=64k seek={late_seek} oflag=direct 2>/dev/null || echo "RESULT late_write=failed"
r=$(dd if=/dev/vda bs=64k skip={late_seek} count=16 iflag=direct 2>/dev/null | md5)
echo "RESULT late_read_ok=$([ "$r" = "$(md5 < /tmp/w2)" ] && echo 1 || echo 0)"
"#
    )
}

/// The last `ITERATION n` the guest printed whole on this console (0 if none). A line still
/// being printed, or one a kernel message broke into, is skipped rather than read as 0.
fn last_iteration(console: &str) -> u64 {
    let complete = match console.rfind('\n') {
        Some(end) => &console[..end],
        None => "",
    };
    complete
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("ITERATION ")?.trim().parse().ok())
        .unwrap_or(0)
}

fn guest_opts(qmp: &Path, incoming: Option<&str>) -> GuestOpts {
    let mut extra_args = vec![
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ];
    if let Some(uri) = incoming {
        extra_args.extend(["-incoming".to_string(), uri.to_string()]);
    }
    GuestOpts {
        mem_mib: GUEST_MEM_MIB,
        // Page-cache pages are then written by the device alone (not zeroed first by the CPU,
        // which QEMU would log): the case that needs ferry's dirty marking.
        extra_cmdline: "init_on_alloc=0".to_string(),
        extra_args,
        ..GuestOpts::default()
    }
}

/// The number of dirty-log syncs of the running migration (1 during the first pass).
fn dirty_syncs(qmp: &mut Qmp) -> Result<u64> {
    let info = qmp.execute("query-migrate", json!({}))?;
    Ok(info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0))
}

/// Polls until `done` (given the dirty-sync count and the source's console) or fails after
/// `MIGRATE_TIMEOUT` from `started`.
fn wait_until(
    qmp: &mut Qmp,
    source: &RunningGuest,
    started: Instant,
    what: &str,
    done: impl Fn(u64, &str) -> bool,
) -> Result<()> {
    while !done(dirty_syncs(qmp)?, &source.console()) {
        ensure!(
            started.elapsed() < MIGRATE_TIMEOUT,
            "timeout waiting for {what}\n{}",
            source.console()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Migrates the source to the destination, slowly while the guest loops `LOOPS_WHILE_SLOW`
/// times after QEMU's first pass over RAM, has the guest read into its page cache, then
/// lets the migration converge. Returns the guest's loop iterations on the source while the
/// migration ran.
fn migrate(source: &mut RunningGuest, qmp: &mut Qmp, uri: &str) -> Result<u64> {
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": MIGRATE_SLOW_BYTES_PER_SEC, "downtime-limit": DOWNTIME_SLOW_MS}),
    )?;
    let before = last_iteration(&source.console());
    let started = Instant::now();
    qmp.migrate(uri)?;
    wait_until(
        qmp,
        source,
        started,
        "loops after the first pass",
        |syncs, console| syncs >= 2 && last_iteration(console) >= before + LOOPS_WHILE_SLOW,
    )?;
    source.send_line("cache")?;
    if let Err(e) = source.wait_for("RESULT phase=cached", MIGRATE_TIMEOUT) {
        let info = qmp.execute("query-migrate", json!({}))?;
        return Err(e.context(format!("migration state: {info}")));
    }
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": MIGRATE_FAST_BYTES_PER_SEC, "downtime-limit": DOWNTIME_LIMIT_MS}),
    )?;
    let info = qmp.wait_migration(MIGRATE_TIMEOUT)?;
    let during = last_iteration(&source.console()).saturating_sub(before);
    eprintln!(
        "migration completed in {:?} ({during} guest iterations on the source meanwhile): {}",
        started.elapsed(),
        info["ram"]
    );
    Ok(during)
}

/// Host-side checks of the image after the run: the chunks written during the migration
/// and the write made after it.
fn check_image(image: &Path, iterations: u64) -> Result<()> {
    let chunk = seq_pattern(1, 1 << 20);
    for j in 0..iterations.min(WRITE_CHUNKS) {
        let at = WRITE_AT_BYTES + (j << 20);
        let host = support::images::read_range(image, at, chunk.len())?;
        ensure!(
            host == chunk,
            "chunk {j} written by the guest is not on the image"
        );
    }
    let late = support::images::read_range(image, LATE_WRITE_AT_BYTES, 1 << 20)?;
    ensure!(
        late == seq_pattern(777, 1 << 20),
        "the write made after the migration is not on the image"
    );
    Ok(())
}

#[test]
fn vm_live_migration_keeps_read_buffers() -> Result<()> {
    let dir = support::scratch_dir()?;
    let image = support::create_image(&dir.path().join("vol.img"), IMAGE_BYTES)?;
    let pattern = support::pattern(READ_SEED, READ_BYTES);
    let cached = support::pattern(CACHED_SEED, CACHED_BYTES);
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new().write(true).open(&image)?;
        f.write_all_at(&pattern, 0).context("fill image")?;
        f.write_all_at(&cached, CACHED_AT_BYTES)
            .context("fill image")?;
    }
    let want_md5 = md5_hex(dir.path(), &pattern)?;
    let cached_md5 = md5_hex(dir.path(), &cached)?;
    let (sock_a, sock_b): (PathBuf, PathBuf) =
        (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let _daemon_a = serve(&image, &sock_a)?;
    let _daemon_b = serve(&image, &sock_b)?;
    let (qmp_a, qmp_b) = (dir.path().join("qmp-a.sock"), dir.path().join("qmp-b.sock"));
    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    let script = script(&want_md5, &cached_md5);

    let source_opts = guest_opts(&qmp_a, None);
    let mut source = Guest::spawn(&sock_a, &script, &source_opts)?;
    source.wait_for("ITERATION 1\n", source_opts.timeout)?;
    let dest_opts = guest_opts(&qmp_b, Some(&uri));
    let mut dest = Guest::spawn(&sock_b, &script, &dest_opts)?;
    let _dest_qmp = Qmp::connect(&qmp_b, Duration::from_secs(30))?;
    let mut source_qmp = Qmp::connect(&qmp_a, Duration::from_secs(30))?;
    let during = migrate(&mut source, &mut source_qmp, &uri)?;
    let source_console = source.console();
    drop(source_qmp);
    source.kill();
    ensure!(
        during >= LOOPS_WHILE_SLOW,
        "the guest finished no read loop while the migration ran\n{source_console}"
    );

    dest.send_line("go")?;
    let out = dest.wait(dest_opts.timeout)?;
    out.ensure_success()?;
    let iterations: u64 = out.result("iterations")?.parse()?;
    ensure!(
        out.result("bad")? == "0",
        "stale in-RAM copies after the migration (source console: {} iterations)\n{}",
        last_iteration(&source_console),
        out.tail()
    );
    ensure!(
        out.result("cached_ok")? == "1",
        "the page cache filled during the migration is stale on the destination\n{}",
        out.tail()
    );
    for key in ["copy0_ok", "copy1_ok", "late_read_ok"] {
        ensure!(out.result(key)? == "1", "{key} failed\n{}", out.tail());
    }
    ensure!(
        !out.results().contains_key("read_failed") && !out.results().contains_key("write_failed"),
        "a guest I/O failed\n{}",
        out.tail()
    );
    check_image(&image, iterations)?;
    eprintln!(
        "{iterations} guest iterations in all, {during} during the migration; dest ran {:?}",
        out.elapsed
    );
    Ok(())
}

#[test]
fn last_iteration_skips_partial_and_broken_lines() {
    assert_eq!(last_iteration(""), 0);
    assert_eq!(last_iteration("ITERATION 3\nITERATION 4\n"), 4);
    assert_eq!(last_iteration("ITERATION 3\nITERATION 1"), 3);
    assert_eq!(
        last_iteration("ITERATION 7\nITERATION 8[   12.3] virtio_blk\n"),
        7
    );
}
