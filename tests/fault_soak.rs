//! The fault soak: a QEMU (TCG) guest writes sequence-stamped blocks with a flush after each
//! while `ferry serve` serves its disk with a `sync` journal on a size-limited tmpfs and an
//! `active` migration to an NBD target (`nbdkit --filter=error`) in progress under a speed
//! limit. For a bounded time (`FERRY_SOAK_SECONDS`, default [`SOAK_SECONDS_DEFAULT`]) the test
//! injects faults in turn: SIGKILL and restart of the daemon (QEMU reconnects, the
//! migration is resumed with `ferry migrate resume`), abuse of the control socket, a full
//! journal medium (ENOSPC; `docs/journal.md`, *Modes and failures*: journaling stops, the
//! guest goes on, `journal init` restarts it with a gap), and a failing or vanishing
//! migration target (`docs/migration.md`, *Faults*: the job fails, the guest goes on from its
//! source, and the test starts the migration again). Then the migration is completed and cut
//! over, and every block the guest saw completed is checked in the guest (read back), on the
//! target (the live image), in the source image as of the cutover, and in a journal restore.
//! The guest must never see an I/O error.

#[path = "support/mod.rs"]
mod support;

#[path = "fault_soak/faults.rs"]
mod faults;
#[path = "fault_soak/rig.rs"]
mod rig;

use anyhow::{ensure, Context as _, Result};
use rig::{Counts, Rig};
use std::time::{Duration, Instant};
use support::guest::{parse_results, Guest, GuestOpts, RunningGuest};

/// The default length of the fault phase: short enough for every CI run.
const SOAK_SECONDS_DEFAULT: u64 = 150;
/// Blocks written in turn by the guest, [`rig::SLOT_BYTES`] each.
pub const SLOTS: u64 = 64;
/// Generations the guest must complete after a fault before the next one: it is making
/// progress, and the fault's aftermath is over.
const GENERATIONS_BETWEEN_FAULTS: u64 = 3;
/// How long the guest may take for those generations (TCG on a loaded machine is slow, and
/// a restart of the daemon stalls it until QEMU has reconnected).
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(120);

/// Each generation `g` writes slot `g % SLOTS` with a block naming its slot and generation,
/// flushed (`conv=fsync`), reads it back and compares checksums, then prints `RESULT gen=g`:
/// the last generation the guest saw completed. When the host types a line the loop ends
/// and every written slot is read back once more.
const SCRIPT: &str = r#"
mkdir -p /tmp/m
( read -r line < /dev/console; touch /tmp/stop ) &
g=0; errors=0
echo "RESULT phase=running"
while [ ! -e /tmp/stop ]; do
  g=$((g + 1)); s=$((g % 64))
  { echo "ferry-soak slot=$s gen=$g"; seq $((g * 7)) 99999999; } | head -c 65536 > /tmp/d
  dd if=/tmp/d of=/dev/vda bs=65536 seek=$s count=1 oflag=direct conv=fsync 2>/dev/null \
    || { errors=$((errors + 1)); echo "RESULT write_error_gen=$g"; }
  w=$(md5sum < /tmp/d | cut -d' ' -f1)
  r=$(dd if=/dev/vda bs=65536 skip=$s count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$w" = "$r" ] || { errors=$((errors + 1)); echo "RESULT mismatch_gen=$g"; }
  echo "$w" > /tmp/m/$s
  echo "RESULT gen=$g"
done
final=0; checked=0
for s in $(seq 0 63); do
  [ -e /tmp/m/$s ] || continue
  r=$(dd if=/dev/vda bs=65536 skip=$s count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$r" = "$(cat /tmp/m/$s)" ] || { final=$((final + 1)); echo "RESULT final_mismatch_slot=$s"; }
  checked=$((checked + 1))
done
dmesg | grep -v 'TSC found unstable' > /tmp/dmesg
grep -i -E 'I/O error|not a head|broken|blk_update_request' /tmp/dmesg | sed 's/^/KERNEL: /'
k=$(grep -c -i -E 'I/O error|not a head|broken|blk_update_request' /tmp/dmesg)
echo "RESULT errors=$errors final_errors=$final checked_slots=$checked kernel_errors=$k last_gen=$g"
[ $errors = 0 ] && [ $final = 0 ] && [ $k = 0 ]
"#;

/// The length of the fault phase: `FERRY_SOAK_SECONDS` or the default.
fn soak_duration() -> Duration {
    let seconds = std::env::var("FERRY_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SOAK_SECONDS_DEFAULT);
    Duration::from_secs(seconds)
}

/// The last generation the guest printed as completed, on a whole line.
pub fn completed_generation(console: &str) -> u64 {
    let whole_lines = console.rfind('\n').map_or("", |end| &console[..end]);
    parse_results(whole_lines)
        .get("gen")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Fails at once when the guest has reported an error.
fn ensure_guest_clean(guest: &RunningGuest) -> Result<()> {
    let console = guest.console();
    let bad = ["write_error_gen=", "mismatch_gen=", "I/O error"];
    ensure!(
        !bad.iter().any(|b| console.contains(b)),
        "the guest saw an error\n{}",
        tail(&console)
    );
    Ok(())
}

fn tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Waits until the guest has completed `more` generations after the current one.
fn wait_progress(guest: &RunningGuest, more: u64) -> Result<u64> {
    let target = completed_generation(&guest.console()) + more;
    let deadline = Instant::now() + PROGRESS_TIMEOUT;
    loop {
        ensure_guest_clean(guest)?;
        let now = completed_generation(&guest.console());
        if now >= target {
            return Ok(now);
        }
        ensure!(
            Instant::now() < deadline,
            "the guest made no progress (at generation {now}, waiting for {target})\n{}",
            tail(&guest.console())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn guest_writes_survive_kills_full_journals_failing_targets_and_control_abuse() -> Result<()> {
    let Some(mut rig) = Rig::new()? else {
        return Ok(());
    };
    let soak = soak_duration();
    let opts = GuestOpts {
        reconnect_ms: Some(500),
        timeout: soak + Duration::from_secs(600),
        ..GuestOpts::default()
    };
    let guest = Guest::spawn(&rig.socket(), SCRIPT, &opts)?;
    wait_progress(&guest, 2)?;
    rig.start_migration()?;
    let started = Instant::now();
    let mut counts = Counts::default();
    let mut round = 0usize;
    while started.elapsed() < soak {
        let fault = faults::ROTATION[round % faults::ROTATION.len()];
        round += 1;
        eprintln!(
            "soak: {:>4} s, generation {}: {fault:?}",
            started.elapsed().as_secs(),
            completed_generation(&guest.console())
        );
        faults::inject(fault, &mut rig, &guest, &mut counts)?;
        ensure_guest_clean(&guest)?;
        wait_progress(&guest, GENERATIONS_BETWEEN_FAULTS)?;
        rig.recover(&mut counts)?;
    }
    let fault_phase = started.elapsed();
    let cutover = rig.complete_migration(&guest)?;
    // Every slot is written at least once more after the last fault and the cutover, so
    // that the journal (whose gaps lie before) holds each slot's last contents.
    wait_progress(&guest, SLOTS + 2)?;
    let mut guest = guest;
    guest.send_line("stop")?;
    let out = guest.wait(opts.timeout)?;
    ensure!(
        out.script_exit == Some(0),
        "the guest saw errors\n{}",
        out.tail()
    );
    let last_gen: u64 = out.result("last_gen")?.parse().context("last_gen")?;
    ensure!(
        completed_generation(&out.console) == last_gen,
        "the guest's last generation did not complete\n{}",
        out.tail()
    );
    let verified = rig.verify(last_gen, &cutover)?;
    eprintln!(
        "soak: {:?} of faults, {last_gen} generations written; {}; {} slots read back in \
         the guest; {verified} bytes verified on the host",
        fault_phase,
        counts,
        out.result("checked_slots")?
    );
    Ok(())
}
