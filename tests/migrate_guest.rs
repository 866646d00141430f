//! End-to-end test of live migration under a real guest: a QEMU (TCG) guest on `ferry serve`
//! keeps writing 1 MiB blocks with `dd` and reading each back with an md5sum check while the
//! operator migrates its disk to a new file with `ferry migrate` and cuts over. The guest must
//! see no error, the target image must hold the guest's data, and `query-volumes` must show
//! the new path.

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::ferry_cli::FerryServe;
use support::guest::{parse_results, Guest, GuestOpts};

const MIB: u64 = 1 << 20;
/// The guest's disk: small, TCG is slow.
const DISK_BYTES: u64 = 32 * MIB;
const BLOCKS: u64 = DISK_BYTES / MIB;

/// Writes block `n % 32` with data that depends on `n`, reads it back (O_DIRECT) and compares
/// md5sums, until the host types a line; then reads every written block back once more.
const SCRIPT: &str = r#"
mkdir -p /tmp/m
( read -r line < /dev/console; touch /tmp/stop ) &
n=0; errors=0
echo "RESULT phase=running"
while [ ! -e /tmp/stop ]; do
  b=$((n % 32))
  seq $n 99999999 | head -c 1048576 > /tmp/d
  dd if=/tmp/d of=/dev/vda bs=64k seek=$((b * 16)) count=16 oflag=direct conv=fsync 2>/dev/null \
    || { errors=$((errors + 1)); echo "RESULT write_error_iter=$n"; }
  w=$(md5sum < /tmp/d | cut -d' ' -f1)
  r=$(dd if=/dev/vda bs=64k skip=$((b * 16)) count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$w" = "$r" ] || { errors=$((errors + 1)); echo "RESULT mismatch_iter=$n"; }
  echo "$w" > /tmp/m/$b
  n=$((n + 1))
  echo "RESULT iter=$n"
done
final=0
for b in $(seq 0 31); do
  [ -e /tmp/m/$b ] || continue
  r=$(dd if=/dev/vda bs=64k skip=$((b * 16)) count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$r" = "$(cat /tmp/m/$b)" ] || final=$((final + 1))
  echo "RESULT blk$b=$(cat /tmp/m/$b)"
done
echo "RESULT errors=$errors final_errors=$final iters=$n"
[ $errors = 0 ] && [ $final = 0 ]
"#;

fn md5_of(bytes: &[u8]) -> Result<String> {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn md5sum")?;
    child
        .stdin
        .take()
        .context("md5sum stdin")?
        .write_all(bytes)
        .context("feed md5sum")?;
    let out = child.wait_with_output().context("md5sum output")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The guest's iteration count printed so far (whole lines only: a line still being
/// printed could read `iter=1` of `iter=12`).
fn iterations(console: &str) -> u64 {
    let whole_lines = console.rfind('\n').map_or("", |end| &console[..end]);
    parse_results(whole_lines)
        .get("iter")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Waits until the guest has printed iteration `n` (or a later one) on a whole line.
fn wait_iterations(guest: &support::guest::RunningGuest, n: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while iterations(&guest.console()) < n {
        ensure!(
            Instant::now() < deadline,
            "timeout waiting for guest iteration {n}\n{}",
            guest.console()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn text(path: &Path) -> Result<&str> {
    path.to_str().context("path is not UTF-8")
}

#[test]
fn guest_io_across_migration_and_cutover() -> Result<()> {
    let dir = support::scratch_dir()?;
    let source = dir.path().join("vda.img");
    let initial = support::pattern(5, DISK_BYTES as usize);
    std::fs::write(&source, &initial).context("write source image")?;
    let socket = dir.path().join("vda.sock");
    let spec = format!(
        "name=vda,path={},socket={}",
        source.display(),
        socket.display()
    );
    let serve = FerryServe::start(&[spec], &dir.path().join("ctl.sock"))?;
    let opts = GuestOpts::default();
    let mut guest = Guest::spawn(&socket, SCRIPT, &opts)?;
    wait_iterations(&guest, 3, opts.timeout)?;

    let target = dir.path().join("dst.img");
    let id = serve.start_migration(&[
        "--volume",
        "vda",
        "--target",
        text(&target)?,
        "--max-speed",
        "8M",
    ])?;
    let ready = serve.wait_ready(id)?;
    let at_ready = iterations(&guest.console());
    let report = serve.cutover(id)?;
    ensure!(report["switched"] == true, "cutover report {report}");
    ensure!(
        serve.volume_path("vda")? == target,
        "query-volumes does not show the target"
    );
    let at_cutover = iterations(&guest.console());
    // Enough iterations after the cutover that every one of them ran on the target.
    wait_iterations(&guest, at_cutover + 4, opts.timeout)?;
    guest.send_line("stop")?;
    let out = guest.wait(opts.timeout)?;
    out.ensure_success()?;
    let results = out.results();
    ensure!(
        out.result("errors")? == "0" && out.result("final_errors")? == "0",
        "the guest saw errors\n{}",
        out.tail()
    );

    let image = std::fs::read(&target).context("read target")?;
    ensure!(
        image.len() as u64 == DISK_BYTES,
        "target size {}",
        image.len()
    );
    for b in 0..BLOCKS as usize {
        let block = &image[b * MIB as usize..(b + 1) * MIB as usize];
        match results.get(&format!("blk{b}")) {
            Some(md5) => ensure!(
                &md5_of(block)? == md5,
                "block {b} of the target is not what the guest wrote last"
            ),
            None => ensure!(
                block == &initial[b * MIB as usize..(b + 1) * MIB as usize],
                "block {b} (not written by the guest) changed"
            ),
        }
    }
    eprintln!(
        "guest: {} iterations ({at_ready} at ready, {at_cutover} at cutover); ready {ready}; cutover {report}",
        out.result("iters")?
    );
    Ok(())
}
