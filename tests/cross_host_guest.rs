//! A running VM moves to another host with its disk: a QEMU TCG guest in host A's network
//! namespace writes and verifies a checksummed pattern on its ferry disk without pause;
//! `ferry migrate start --target ferry://B…` copies the disk into an incoming volume on
//! host B; a destination QEMU in B's namespace, started with `-incoming` on the incoming
//! volume's socket, receives the VM through QMP `migrate` over TCP between the
//! namespaces; the source QEMU's device stop hands the disk over, and the guest goes on
//! writing on B. Every slot the guest wrote is checked in the guest and in B's image.
//!
//! And the moves that fail (the destination killed or its link down mid-copy, its disk
//! full, the VM's migration cancelled, its switchover long before the copy is ready): the guest goes on on its source with no error and
//! every slot right, the job ends with a reason, and B keeps nothing.

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::guest::{Guest, GuestOpts, GuestOutput, RunningGuest};
use support::qmp::Qmp;
use support::two_hosts::{HostOptions, TwoHosts};
use support::wait::{wait_until, HANG_TIMEOUT};

/// The guest writes slot `n % SLOTS` (1 MiB each, from the disk's start) at iteration n.
const SLOTS: u64 = 8;
const SLOT_BYTES: usize = 1 << 20;
const GUEST_MEM_MIB: u32 = 256;
const MIGRATION_PORT: u16 = 4444;
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);

/// The pattern of iteration `n`: what busybox prints for `seq FIRST 999999999 | head -c`.
fn slot_pattern(n: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(SLOT_BYTES + 16);
    let mut k = n * 100_000 + 1;
    while out.len() < SLOT_BYTES {
        out.extend_from_slice(format!("{k}\n").as_bytes());
        k += 1;
    }
    out.truncate(SLOT_BYTES);
    out
}

/// The guest's script: a background loop writes iteration n's pattern into its slot with
/// O_DIRECT, reads it back and checks its md5; "go" on the console stops it, and every
/// slot is checked against the last pattern written to it.
fn script() -> String {
    format!(
        r#"
md5() {{ md5sum | cut -d' ' -f1; }}
pat() {{ seq $(( $1 * 100000 + 1 )) 999999999 | head -c {SLOT_BYTES}; }}
loop() {{
  n=0; bad=0
  while [ ! -e /tmp/stop ]; do
    s=$((n % {SLOTS}))
    pat $n > /tmp/w
    dd if=/tmp/w of=/dev/vda bs=64k seek=$((s * 16)) oflag=direct 2>/dev/null || echo "RESULT write_failed=$n"
    r=$(dd if=/dev/vda bs=64k skip=$((s * 16)) count=16 iflag=direct 2>/dev/null | md5)
    [ "$r" = "$(md5 < /tmp/w)" ] || {{ bad=$((bad+1)); echo "RESULT bad_at=$n"; }}
    n=$((n+1))
    echo "$n $bad" > /tmp/count
    echo "ITERATION $n"
  done
}}
loop &
pid=$!
read -r go < /dev/console
touch /tmp/stop
wait $pid
read n bad < /tmp/count
echo "RESULT iterations=$n bad=$bad"
ok=1
for s in $(seq 0 $(({SLOTS} - 1))); do
  if [ $n -gt $s ]; then
    k=$(( s + {SLOTS} * ((n - 1 - s) / {SLOTS}) ))
    r=$(dd if=/dev/vda bs=64k skip=$((s * 16)) count=16 iflag=direct 2>/dev/null | md5)
    [ "$r" = "$(pat $k | md5)" ] || {{ ok=0; echo "RESULT slot_bad=$s"; }}
  fi
done
echo "RESULT slots_ok=$ok"
"#
    )
}

/// The last `ITERATION n` printed whole on a console (0 if none).
fn last_iteration(console: &str) -> u64 {
    let complete = console.rfind('\n').map_or("", |end| &console[..end]);
    complete
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("ITERATION ")?.trim().parse().ok())
        .unwrap_or(0)
}

fn guest_opts(namespace: &str, qmp: &Path, incoming: Option<&str>) -> GuestOpts {
    let mut extra_args = vec![
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ];
    if let Some(uri) = incoming {
        extra_args.extend(["-incoming".to_string(), uri.to_string()]);
    }
    GuestOpts {
        mem_mib: GUEST_MEM_MIB,
        extra_args,
        namespace: Some(namespace.to_string()),
        ..GuestOpts::default()
    }
}

/// Starts the source guest on A and waits until it has written a few slots.
fn start_source(hosts: &TwoHosts) -> Result<(RunningGuest, Qmp)> {
    let qmp = hosts.path("qmp-a.sock");
    let opts = guest_opts(&hosts.host_a().namespace, &qmp, None);
    let mut guest = Guest::spawn(&hosts.path("a.sock"), &script(), &opts)?;
    guest.wait_for("ITERATION 2\n", opts.timeout)?;
    let qmp = Qmp::connect(&qmp, Duration::from_secs(30))?;
    Ok((guest, qmp))
}

/// The guest's own checks (every read-back and every slot right, no write failed) and
/// its iterations in all.
fn checked_iterations(out: &GuestOutput) -> Result<u64> {
    out.ensure_success()?;
    ensure!(
        out.result("bad")? == "0",
        "a read-back differed\n{}",
        out.tail()
    );
    ensure!(
        out.result("slots_ok")? == "1",
        "a slot is wrong\n{}",
        out.tail()
    );
    ensure!(
        !out.results().contains_key("write_failed"),
        "a guest write failed\n{}",
        out.tail()
    );
    Ok(out.result("iterations")?.parse()?)
}

/// Checks an image: every slot holds the last pattern the guest wrote to it.
fn check_slots(image: &Path, iterations: u64) -> Result<()> {
    for slot in 0..SLOTS.min(iterations) {
        let last = slot + SLOTS * ((iterations - 1 - slot) / SLOTS);
        let at = slot * SLOT_BYTES as u64;
        let data = support::images::read_range(image, at, SLOT_BYTES)?;
        support::compare_bytes(
            &format!("slot {slot} (iteration {last})"),
            &data,
            &slot_pattern(last),
        )?;
    }
    Ok(())
}

#[test]
fn a_running_vm_moves_to_another_host_with_its_disk() -> Result<()> {
    let options = HostOptions {
        start_wait_s: 60,
        ..HostOptions::default()
    };
    let Some(hosts) = TwoHosts::start(options)? else {
        return Ok(());
    };
    let (mut source, mut source_qmp) = start_source(&hosts)?;
    let job = hosts.migrate_to_b(&[])?;
    hosts.wait_ready(job)?;
    // The destination QEMU, attached to the incoming volume's socket, waits for the VM.
    let address_b = hosts.network.host(1).address;
    let incoming = format!("tcp:{address_b}:{MIGRATION_PORT}");
    let qmp_b = hosts.path("qmp-b.sock");
    let dest_opts = guest_opts(&hosts.network.host(1).namespace, &qmp_b, Some(&incoming));
    let mut dest = Guest::spawn(&hosts.path("b-vm1.sock"), &script(), &dest_opts)?;
    let _dest_qmp = Qmp::connect(&qmp_b, Duration::from_secs(30))?;
    source_qmp.execute("migrate-set-parameters", json!({"downtime-limit": 2000}))?;
    source_qmp.migrate(&incoming)?;
    let info = source_qmp.wait_migration(MIGRATE_TIMEOUT)?;
    let on_source = last_iteration(&source.console());
    let status = hosts.wait_handed_off(job)?;
    ensure!(
        status["cross-host"]["incoming"]["state"] == "active",
        "{status}"
    );
    // The guest goes on writing on B.
    dest.wait_for(&format!("ITERATION {}\n", on_source + 3), MIGRATE_TIMEOUT)?;
    drop(source_qmp);
    source.kill();
    dest.send_line("go")?;
    let out = dest.wait(dest_opts.timeout)?;
    let iterations = checked_iterations(&out)?;
    ensure!(iterations > on_source, "the guest wrote nothing on B");
    check_slots(&hosts.path("b-vm1.img"), iterations)?;
    eprintln!(
        "moved after {on_source} iterations on A, {iterations} in all; QEMU's downtime {} ms, \
         the disk's hand-off {} ms (guest I/O held {} us)",
        info["downtime"], status["cross-host"]["hand-off-ms"], status["cutover_pause_us"]
    );
    Ok(())
}

/// A small tmpfs (the destination's disk that fills up), mounted in the destination
/// daemon's own mount namespace: `ip netns exec` gives each process one, and this
/// machine's root mount is private, so a mount made here would not reach it. It goes
/// with the daemon.
struct SmallDisk {
    path: PathBuf,
    pid: u32,
}

impl SmallDisk {
    fn mount_in(pid: u32, path: PathBuf, size: &str) -> Result<Self> {
        std::fs::create_dir_all(&path)?;
        let disk = Self { path, pid };
        let mount = format!("size={size}");
        let out = Command::new("nsenter")
            .arg("-t")
            .arg(pid.to_string())
            .arg("-m")
            .args(["mount", "-t", "tmpfs", "-o", &mount, "tmpfs"])
            .arg(&disk.path)
            .output()
            .context("run nsenter mount")?;
        ensure!(
            out.status.success(),
            "mount the small disk: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(disk)
    }

    /// True when the disk (as the daemon sees it) holds any file.
    fn holds_files(&self) -> Result<bool> {
        let out = Command::new("nsenter")
            .arg("-t")
            .arg(self.pid.to_string())
            .arg("-m")
            .args(["ls", "-A"])
            .arg(&self.path)
            .output()
            .context("run nsenter ls")?;
        ensure!(out.status.success(), "ls the small disk");
        Ok(!out.stdout.is_empty())
    }
}

/// What goes wrong during a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The destination daemon is killed (SIGKILL) during the copy.
    DestinationKilled,
    /// The destination's link goes down during the copy.
    LinkDown,
    /// The destination's image fills its disk.
    DestinationFull,
    /// The VM's migration is cancelled (QMP `migrate_cancel`) once the disk is in sync.
    VmMigrationCancelled,
    /// The VM's switchover comes while the copy is far from `ready` (rate-limited): the
    /// hand-off waits at most the destination's start-wait, then fails, and the VM is
    /// resumed on A with QMP `cont`.
    SwitchoverBeforeReady,
}

/// Waits until the job has copied something and is still copying.
fn wait_mid_copy(hosts: &TwoHosts, job: u64) -> Result<()> {
    wait_until("the copy under way", HANG_TIMEOUT, || {
        let s = hosts.job_status(job)?;
        ensure!(s["state"] == "copying", "the job is not copying: {s}");
        Ok(s["copied_bytes"].as_u64() > Some(0))
    })
}

/// Starts a destination QEMU and a VM migration slow enough never to end, waits until
/// QEMU logs dirty pages (the source device is told at the migration's setup), then
/// cancels it.
fn cancel_vm_migration(hosts: &TwoHosts, qmp: &mut Qmp) -> Result<RunningGuest> {
    let address_b = hosts.network.host(1).address;
    let incoming = format!("tcp:{address_b}:{MIGRATION_PORT}");
    let qmp_b = hosts.path("qmp-b.sock");
    let opts = guest_opts(&hosts.network.host(1).namespace, &qmp_b, Some(&incoming));
    let dest = Guest::spawn(&hosts.path("b-vm1.sock"), &script(), &opts)?;
    drop(Qmp::connect(&qmp_b, Duration::from_secs(30))?);
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1 << 20, "downtime-limit": 1}),
    )?;
    qmp.migrate(&incoming)?;
    wait_until("the VM migration under way", HANG_TIMEOUT, || {
        let info = qmp.execute("query-migrate", json!({}))?;
        Ok(info["status"] == "active" && info["ram"]["transferred"].as_u64() > Some(0))
    })?;
    qmp.execute("migrate_cancel", json!({}))?;
    Ok(dest)
}

/// Starts a destination QEMU and migrates the VM to it while the disk's copy is far from
/// ready; returns once QEMU's migration completed (the source VM paused in `postmigrate`).
fn switch_over_before_ready(hosts: &TwoHosts, qmp: &mut Qmp) -> Result<RunningGuest> {
    let address_b = hosts.network.host(1).address;
    let incoming = format!("tcp:{address_b}:{MIGRATION_PORT}");
    let qmp_b = hosts.path("qmp-b.sock");
    let opts = guest_opts(&hosts.network.host(1).namespace, &qmp_b, Some(&incoming));
    let dest = Guest::spawn(&hosts.path("b-vm1.sock"), &script(), &opts)?;
    drop(Qmp::connect(&qmp_b, Duration::from_secs(30))?);
    qmp.execute("migrate-set-parameters", json!({"downtime-limit": 2000}))?;
    qmp.migrate(&incoming)?;
    qmp.wait_migration(MIGRATE_TIMEOUT)?;
    Ok(dest)
}

/// A move that fails at `failure`: the job ends failed or cancelled with a reason, the
/// guest goes on on A with no error and every slot right, and what B still runs holds no
/// incoming volume and no image.
fn a_failed_move_leaves_the_vm_on_its_source(failure: Failure) -> Result<()> {
    let options = HostOptions {
        // The link-down case relies on B's own lease: A cannot reach it to abandon.
        lease_s: if failure == Failure::LinkDown { 3 } else { 600 },
        start_wait_s: if failure == Failure::SwitchoverBeforeReady {
            2
        } else {
            60
        },
        ..HostOptions::default()
    };
    let Some(mut hosts) = TwoHosts::start(options)? else {
        return Ok(());
    };
    let (mut source, mut qmp) = start_source(&hosts)?;
    // Every slot written once: the copy has 8 MiB to do.
    source.wait_for(&format!("ITERATION {SLOTS}\n"), MIGRATE_TIMEOUT)?;
    let small = match failure {
        Failure::DestinationFull => Some(SmallDisk::mount_in(
            hosts.daemon_b.pid(),
            hosts.path("small"),
            "2M",
        )?),
        _ => None,
    };
    let image = match &small {
        Some(disk) => disk.path.join("vm1.img"),
        None => hosts.path("b-vm1.img"),
    };
    let slow: &[&str] = match failure {
        Failure::DestinationKilled | Failure::LinkDown => &["--max-speed", "256K"],
        // 8 MiB at 64 KiB/s: minutes, far past the 2 s start-wait.
        Failure::SwitchoverBeforeReady => &["--max-speed", "64K"],
        _ => &[],
    };
    let job = hosts.migrate_to_b_at(&image, slow)?;
    let mut dest = None;
    match failure {
        Failure::DestinationKilled => {
            wait_mid_copy(&hosts, job)?;
            hosts.daemon_b.kill();
        }
        Failure::LinkDown => {
            wait_mid_copy(&hosts, job)?;
            hosts.network.host(1).set_link(false)?;
        }
        Failure::DestinationFull => {}
        Failure::VmMigrationCancelled => {
            hosts.wait_ready(job)?;
            dest = Some(cancel_vm_migration(&hosts, &mut qmp)?);
        }
        Failure::SwitchoverBeforeReady => {
            wait_mid_copy(&hosts, job)?;
            dest = Some(switch_over_before_ready(&hosts, &mut qmp)?);
        }
    }
    let failed = wait_until("the move to fail", MIGRATE_TIMEOUT, || {
        let state = hosts.job_status(job)?["state"].clone();
        Ok(state == "failed" || state == "cancelled")
    });
    failed.with_context(|| format!("job: {:?}", hosts.job_status(job)))?;
    let status = hosts.job_status(job)?;
    ensure!(status["error"].is_string(), "no reason given: {status}");
    eprintln!(
        "{failure:?}: job {} {}: {}",
        job, status["state"], status["error"]
    );
    if failure == Failure::LinkDown {
        hosts.network.host(1).set_link(true)?;
    }
    if failure != Failure::DestinationKilled {
        wait_until("B to hold no incoming volume", HANG_TIMEOUT, || {
            Ok(hosts.local_b("query-volumes")? == json!([]))
        })?;
        let left = match &small {
            Some(disk) => disk.holds_files()?,
            None => image.exists(),
        };
        ensure!(!left, "B left its image {}", image.display());
    }
    drop(dest);
    if failure == Failure::SwitchoverBeforeReady {
        let handed_off = &hosts.job_status(job)?["cross-host"]["handed-off"];
        ensure!(*handed_off == json!(false), "handed off: {handed_off}");
        // QEMU's migration completed, the disk's did not: the VM resumes on A.
        qmp.execute("cont", json!({}))?;
    }
    // The guest goes on on A: more iterations, then every slot checked.
    let now = last_iteration(&source.console());
    source.wait_for(&format!("ITERATION {}\n", now + 2), MIGRATE_TIMEOUT)?;
    drop(qmp);
    source.send_line("go")?;
    let out = source.wait(Duration::from_secs(120))?;
    let iterations = checked_iterations(&out)?;
    check_slots(&hosts.path("a.img"), iterations)?;
    Ok(())
}

#[test]
fn the_destination_killed_mid_copy_leaves_the_vm_on_its_source() -> Result<()> {
    a_failed_move_leaves_the_vm_on_its_source(Failure::DestinationKilled)
}

#[test]
fn the_link_down_mid_copy_leaves_the_vm_on_its_source() -> Result<()> {
    a_failed_move_leaves_the_vm_on_its_source(Failure::LinkDown)
}

#[test]
fn the_destination_out_of_space_leaves_the_vm_on_its_source() -> Result<()> {
    a_failed_move_leaves_the_vm_on_its_source(Failure::DestinationFull)
}

#[test]
fn a_switchover_before_the_copy_is_ready_fails_after_the_start_wait_and_the_vm_resumes_on_its_source(
) -> Result<()> {
    a_failed_move_leaves_the_vm_on_its_source(Failure::SwitchoverBeforeReady)
}

#[test]
fn a_cancelled_vm_migration_leaves_the_vm_on_its_source() -> Result<()> {
    a_failed_move_leaves_the_vm_on_its_source(Failure::VmMigrationCancelled)
}
