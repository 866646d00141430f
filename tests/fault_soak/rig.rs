//! What the soak runs on: the source image and its base copy, the journal on a tmpfs the
//! test mounts with a size limit, the migration target behind `nbdkit --filter=error`
//! (errors injected while a trigger file exists), `ferry serve` restarted with the same
//! arguments, the current migration job, and the final checks.

use crate::support::{
    self, ferry_cli::ferry, ferry_cli::CliOutput, ferry_cli::FerryServe, nbd::NbdAddr,
    nbd::NbdServer,
};
use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The guest's disk: small, TCG is slow.
pub const DISK_BYTES: u64 = 16 * MIB;
/// One guest write (`dd bs=65536`).
pub const SLOT_BYTES: u64 = 64 << 10;
/// The journal's tmpfs: more than the default soak's records (the guest writes about
/// 0.5 MiB/s of blocks) between two of the test's fills, which free it.
const JOURNAL_TMPFS_BYTES: u64 = 96 * MIB;
/// Each journal medium: small, so that the media a killed daemon leaves mapped (as long as
/// their capacity) take little of the tmpfs, and archiving copies little.
const JOURNAL_MEDIUM_BYTES: u64 = 8 * MIB;
/// The migration's speed limit: 16 MiB at 128 KiB/s take two minutes, so that the job is in
/// progress through the faults (a failed job starts over).
const MIGRATION_SPEED: &str = "128K";
const PERSIST_INTERVAL_MS: &str = "500";
/// Bound on a job failing after a target fault.
const JOB_WAIT: Duration = Duration::from_secs(90);
/// What the target's injected errors are, in turn (a new nbdkit takes the next).
const TARGET_ERRORS: [&str; 2] = ["EIO", "ENOSPC"];
const EXIT_WAIT: Duration = Duration::from_secs(30);

/// What the soak did, printed at the end.
#[derive(Default, Debug)]
pub struct Counts {
    pub kills: u64,
    pub resumes: u64,
    pub control_abuses: u64,
    pub journal_fulls: u64,
    pub journal_stops_unprovoked: u64,
    pub target_errors: u64,
    pub targets_gone: u64,
    pub migrations_started: u64,
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} kills survived ({} migrations resumed), {} control abuses, {} full journals ({} more unprovoked), \
             {} target write errors, {} targets gone, {} migrations started; {} faults injected",
            self.kills,
            self.resumes,
            self.control_abuses,
            self.journal_fulls,
            self.journal_stops_unprovoked,
            self.target_errors,
            self.targets_gone,
            self.migrations_started,
            self.kills
                + self.control_abuses
                + self.journal_fulls
                + self.target_errors
                + self.targets_gone
        )
    }
}

/// A tmpfs the test mounted; unmounted (lazily, a killed daemon may hold a mapping) on drop.
pub struct TmpfsMount {
    pub path: PathBuf,
}

impl TmpfsMount {
    fn mount(path: &Path, size_bytes: u64) -> Result<Self> {
        std::fs::create_dir_all(path).context("create the tmpfs mount point")?;
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_bytes}"),
                "ferry-soak",
            ])
            .arg(path)
            .status()
            .context("run mount")?;
        ensure!(status.success(), "mount -t tmpfs failed: {status}");
        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// When the test cut over, in the guest's generations: every generation up to `before` is
/// in the source image, none after `after`.
pub struct Cutover {
    pub before: u64,
    pub after: u64,
}

pub struct Rig {
    // Field order is drop order: the daemon goes before the tmpfs it maps is unmounted.
    pub serve: Option<FerryServe>,
    pub nbd: Option<NbdServer>,
    pub nbd_addr: NbdAddr,
    pub tmpfs: TmpfsMount,
    pub dir: tempfile::TempDir,
    /// The migration job in progress (None: failed, the next recovery starts another).
    pub job: Option<u64>,
    /// Directories the full journal's media were moved to, oldest first.
    pub archives: Vec<PathBuf>,
    /// Journaling stopped at least once: the journal has recorded gaps.
    pub journal_gaps: bool,
    /// nbdkit servers started so far: the next one injects `TARGET_ERRORS[starts % 2]`.
    pub target_starts: usize,
}

impl Rig {
    /// The rig, or None (the test skips) when root, QEMU or nbdkit is missing.
    pub fn new() -> Result<Option<Self>> {
        let root = nix::unistd::geteuid().is_root();
        if !support::require("root (the test mounts a tmpfs)", root)
            || !support::require("nbdkit", support::require::command_available("nbdkit"))
            || !support::require(
                "qemu-system-x86_64",
                support::require::command_available("qemu-system-x86_64"),
            )
        {
            return Ok(None);
        }
        let dir = support::scratch_dir()?;
        let image = dir.path().join("vda.img");
        std::fs::write(&image, initial_image()).context("write the source image")?;
        std::fs::copy(&image, dir.path().join("vda.base")).context("copy the base")?;
        support::create_image(&dir.path().join("dst.img"), DISK_BYTES)?;
        let tmpfs = TmpfsMount::mount(&dir.path().join("jfs"), JOURNAL_TMPFS_BYTES)?;
        let mut rig = Self {
            serve: None,
            nbd: None,
            nbd_addr: NbdAddr::free_tcp()?,
            tmpfs,
            dir,
            job: None,
            archives: Vec::new(),
            journal_gaps: false,
            target_starts: 0,
        };
        rig.start_target()?;
        rig.start_ferry()?;
        Ok(Some(rig))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("vda.sock")
    }

    pub fn control(&self) -> PathBuf {
        self.path("ctl.sock")
    }

    pub fn journal_dir(&self) -> PathBuf {
        self.tmpfs.path.join("journal")
    }

    /// The file that makes nbdkit fail every request while it exists.
    pub fn trigger(&self) -> PathBuf {
        self.path("target-errors")
    }

    pub fn target_uri(&self) -> String {
        self.nbd_addr.uri("soak")
    }

    /// nbdkit serving `dst.img`, failing every request (EIO or ENOSPC, in turn from one
    /// server to the next) while the trigger file exists.
    pub fn start_target(&mut self) -> Result<()> {
        let file = format!("file={}", self.path("dst.img").display());
        let error = format!(
            "error={}",
            TARGET_ERRORS[self.target_starts % TARGET_ERRORS.len()]
        );
        self.target_starts += 1;
        let trigger = format!("error-file={}", self.trigger().display());
        self.nbd = Some(NbdServer::nbdkit(
            "soak",
            &self.nbd_addr,
            &[
                "--filter=error",
                "file",
                &file,
                &error,
                "error-rate=100%",
                &trigger,
            ],
        )?);
        Ok(())
    }

    /// `ferry serve` with the same arguments every time.
    pub fn start_ferry(&mut self) -> Result<()> {
        let spec = format!(
            "name=vda,path={},socket={}",
            self.path("vda.img").display(),
            self.socket().display()
        );
        let journal = format!(
            "dir={},mode=sync,capacity={JOURNAL_MEDIUM_BYTES}",
            self.journal_dir().display()
        );
        self.serve = Some(FerryServe::start_with(
            &[spec],
            &self.control(),
            &["--journal", &journal],
        )?);
        Ok(())
    }

    /// The running daemon's log so far (for a failure's message).
    pub fn log(&self) -> String {
        self.serve
            .as_ref()
            .map_or_else(String::new, |s| s.daemon.log())
    }

    pub fn serve(&self) -> Result<&FerryServe> {
        self.serve.as_ref().context("ferry is not running")
    }

    /// `ferry CMD SUB --control CTL ARGS...`.
    pub fn cli(&self, cmd: &str, sub: &str, args: &[&str]) -> Result<CliOutput> {
        let control = self.control().display().to_string();
        let mut all = vec![cmd, sub, "--control", &control];
        all.extend_from_slice(args);
        ferry(&all)
    }

    pub fn journal_status(&self) -> Result<Value> {
        self.cli("journal", "status", &["--json"])?.ok()?.json()
    }

    /// What `docs/journal.md` (*Modes and failures*) asks of the operator once journaling
    /// has stopped on a full medium: the sealed media are moved to an archive (on another
    /// file system) and `journal init` restarts journaling, recording the gap.
    pub fn restart_journal(&mut self) -> Result<()> {
        let archive = self.path(&format!("archive-{}", self.archives.len()));
        std::fs::create_dir(&archive).context("create an archive directory")?;
        for entry in std::fs::read_dir(self.journal_dir()).context("list the journal")? {
            let name = entry.context("journal entry")?.file_name();
            let text = name.to_string_lossy();
            if text.starts_with("medium-") && text.ends_with(".fj") {
                std::fs::copy(self.journal_dir().join(&name), archive.join(&name))
                    .context("archive a medium")?;
                std::fs::remove_file(self.journal_dir().join(&name))
                    .context("remove an archived medium")?;
            }
        }
        self.archives.push(archive);
        let label = format!("after-stop-{}", self.archives.len());
        self.cli("journal", "init", &["--label", &label])?.ok()?;
        let status = self.journal_status()?;
        ensure!(
            status["state"] == "running",
            "journal init did not restart the journal: {status}"
        );
        Ok(())
    }

    /// Starts a new migration of the volume to the NBD target.
    pub fn start_migration(&mut self) -> Result<()> {
        let uri = self.target_uri();
        let id = self.serve()?.start_migration(&[
            "--volume",
            "vda",
            "--target",
            &uri,
            "--mode",
            "active",
            "--max-speed",
            MIGRATION_SPEED,
            "--persist-interval-ms",
            PERSIST_INTERVAL_MS,
        ])?;
        self.job = Some(id);
        Ok(())
    }

    /// The state of the current job ("none" when there is none).
    pub fn job_state(&self) -> Result<String> {
        let Some(id) = self.job else {
            return Ok("none".into());
        };
        let status = self.serve()?.job_status(id)?;
        Ok(status["state"].as_str().unwrap_or("").to_string())
    }

    /// Waits until the current job has failed (after a target fault).
    pub fn wait_job_failed(&self) -> Result<Value> {
        let id = self.job.context("no job")?;
        let deadline = Instant::now() + JOB_WAIT;
        loop {
            let status = self
                .serve()?
                .job_status(id)
                .with_context(|| format!("ferry's log:\n{}", self.log()))?;
            match status["state"].as_str() {
                Some("failed") => return Ok(status),
                Some("copying" | "ready") => {}
                _ => bail!("job {id} ended otherwise than failed: {status}"),
            }
            ensure!(Instant::now() < deadline, "job {id} did not fail: {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, then the same `ferry serve` again, and the interrupted job resumed.
    pub fn kill_and_restart(&mut self, counts: &mut Counts) -> Result<()> {
        let mut serve = self.serve.take().context("ferry is not running")?;
        serve.daemon.kill();
        drop(serve);
        counts.kills += 1;
        self.job = None;
        self.start_ferry()?;
        let list = self.cli("migrate", "status", &["--json"])?.ok()?.json()?;
        let interrupted = list
            .as_array()
            .is_some_and(|l| l.iter().any(|j| j["state"] == "interrupted"));
        if interrupted {
            let reply = self
                .cli("migrate", "resume", &["--volume", "vda", "--json"])?
                .ok()?
                .json()?;
            self.job = Some(reply["job"].as_u64().context("resume reply without job")?);
            counts.resumes += 1;
        }
        Ok(())
    }

    /// After a fault: the daemon serves, the journal runs (restarted after a stop), and a
    /// migration is in progress (started again after a failure).
    pub fn recover(&mut self, counts: &mut Counts) -> Result<()> {
        let serve = self.serve.as_mut().context("ferry is not running")?;
        ensure!(
            serve.daemon.is_running(),
            "ferry died:\n{}",
            serve.daemon.log()
        );
        let journal = self.journal_status()?;
        if journal["state"] == "stopped" {
            // The soak's own records filled the tmpfs (a long run).
            eprintln!("soak: the journal stopped by itself: {}", journal["reason"]);
            self.journal_gaps = true;
            self.restart_journal()?;
            counts.journal_stops_unprovoked += 1;
        }
        let journal = self.journal_status()?;
        ensure!(
            journal["state"] == "running",
            "the journal is not running: {journal}"
        );
        match self.job_state()?.as_str() {
            "copying" | "ready" => {}
            "none" | "failed" => {
                self.start_migration()?;
                counts.migrations_started += 1;
            }
            other => bail!("unexpected migration state {other}"),
        }
        Ok(())
    }

    /// Lifts the speed limit, waits for `ready` and cuts over; returns the guest's
    /// generations around the cutover.
    pub fn complete_migration(
        &mut self,
        guest: &crate::support::guest::RunningGuest,
    ) -> Result<Cutover> {
        let id = self.job.context("no migration in progress")?;
        self.cli("migrate", "set-speed", &["--job", &id.to_string(), "0"])?
            .ok()?;
        let serve = self.serve()?;
        serve.wait_ready(id)?;
        let before = crate::completed_generation(&guest.console());
        let report = serve.cutover(id)?;
        ensure!(report["switched"] == true, "cutover report {report}");
        // The generation under way at the cutover may have gone to the source or not.
        let after = crate::completed_generation(&guest.console()) + 1;
        ensure!(
            serve.volume_path("vda")?.as_os_str() == self.target_uri().as_str(),
            "query-volumes does not show the target"
        );
        eprintln!("soak: cut over between generations {before} and {after}: {report}");
        Ok(Cutover { before, after })
    }

    /// The final checks once the guest has stopped at `last_gen`: the target (the live
    /// image) holds every slot's last generation, the source every generation up to the
    /// cutover, and a journal restore equals the target. Returns the bytes compared.
    pub fn verify(&mut self, last_gen: u64, cutover: &Cutover) -> Result<u64> {
        let mut serve = self.serve.take().context("ferry is not running")?;
        let status = serve.daemon.terminate(EXIT_WAIT)?;
        ensure!(
            status.success(),
            "ferry exited {status}:\n{}",
            serve.daemon.log()
        );
        let target = std::fs::read(self.path("dst.img")).context("read the target")?;
        let expected = expected_image(last_gen);
        support::compare_bytes("target vs the guest's writes", &target, &expected)?;
        let source = std::fs::read(self.path("vda.img")).context("read the source")?;
        check_source(&source, cutover)?;
        let restored = self.restore()?;
        support::compare_bytes("journal restore vs target", &restored, &target)?;
        Ok(3 * DISK_BYTES)
    }

    /// `ferry journal restore` of the archived media and the journal directory to the end.
    fn restore(&self) -> Result<Vec<u8>> {
        let out = self.path("restored.img");
        let mut args: Vec<String> = vec!["journal".into(), "restore".into()];
        args.extend(self.archives.iter().map(|p| p.display().to_string()));
        args.push(self.journal_dir().display().to_string());
        for (k, v) in [
            ("--volume", "vda".to_string()),
            ("--base", self.path("vda.base").display().to_string()),
            ("--out", out.display().to_string()),
        ] {
            args.push(k.into());
            args.push(v);
        }
        if self.journal_gaps {
            // The full medium's stops left recorded gaps; every slot was written after them.
            args.push("--allow-gaps".into());
        }
        let finished = support::ferry::run(&args, None, Duration::from_secs(120))?;
        ensure!(
            finished.status.success(),
            "journal restore failed ({}): {}",
            finished.status,
            finished.stderr
        );
        std::fs::read(&out).context("read the restored image")
    }
}

/// The image before the guest writes: a pattern, so that a block restored from the wrong
/// place shows.
pub fn initial_image() -> Vec<u8> {
    support::pattern(20, DISK_BYTES as usize)
}

/// The block the guest writes in generation `gen` (to slot `gen % SLOTS`): what
/// `{ echo "ferry-soak slot=$s gen=$g"; seq $((g * 7)) 99999999; } | head -c 65536` prints.
pub fn block(gen: u64) -> Vec<u8> {
    let slot = gen % crate::SLOTS;
    let mut out = format!("ferry-soak slot={slot} gen={gen}\n").into_bytes();
    let mut n = gen * 7;
    while (out.len() as u64) < SLOT_BYTES {
        out.extend_from_slice(format!("{n}\n").as_bytes());
        n += 1;
    }
    out.truncate(SLOT_BYTES as usize);
    out
}

/// The last generation up to `gen` that wrote `slot`, if any.
fn last_write_of(slot: u64, gen: u64) -> Option<u64> {
    let first = if slot == 0 { crate::SLOTS } else { slot };
    (gen >= first).then(|| gen - (gen - slot) % crate::SLOTS)
}

/// The disk once generations 1..=`gen` have completed.
pub fn expected_image(gen: u64) -> Vec<u8> {
    let mut image = initial_image();
    for slot in 0..crate::SLOTS {
        if let Some(g) = last_write_of(slot, gen) {
            let at = (slot * SLOT_BYTES) as usize;
            image[at..at + SLOT_BYTES as usize].copy_from_slice(&block(g));
        }
    }
    image
}

/// The source after the cutover: each slot holds a whole block of a generation between its
/// last write up to `before` and `after` (the initial pattern when none was written), and
/// nothing past the slots changed.
fn check_source(source: &[u8], cutover: &Cutover) -> Result<()> {
    let initial = initial_image();
    ensure!(
        source.len() == initial.len(),
        "source size {}",
        source.len()
    );
    let slots_end = (crate::SLOTS * SLOT_BYTES) as usize;
    ensure!(
        source[slots_end..] == initial[slots_end..],
        "the source changed past the guest's slots"
    );
    for slot in 0..crate::SLOTS {
        let at = (slot * SLOT_BYTES) as usize;
        let got = &source[at..at + SLOT_BYTES as usize];
        let gen = generation_of(got);
        let floor = last_write_of(slot, cutover.before);
        match gen {
            Some(g) => ensure!(
                g % crate::SLOTS == slot
                    && g <= cutover.after
                    && floor.is_none_or(|f| g >= f)
                    && got == block(g).as_slice(),
                "source slot {slot}: generation {g}, expected at least {floor:?} up to {}",
                cutover.after
            ),
            None => ensure!(
                floor.is_none() && got == &initial[at..at + SLOT_BYTES as usize],
                "source slot {slot}: neither a guest block nor the initial pattern \
                 (last write before the cutover: {floor:?})"
            ),
        }
    }
    Ok(())
}

/// The generation a block's header names.
fn generation_of(block: &[u8]) -> Option<u64> {
    let line = block.split(|&b| b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    text.strip_prefix("ferry-soak ")?
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("gen="))?
        .parse()
        .ok()
}

#[test]
fn expected_slots_follow_the_generations() {
    assert_eq!(last_write_of(1, 0), None);
    assert_eq!(last_write_of(1, 1), Some(1));
    assert_eq!(last_write_of(0, 63), None);
    assert_eq!(last_write_of(0, 64), Some(64));
    assert_eq!(last_write_of(5, 200), Some(197));
    assert_eq!(generation_of(&block(197)), Some(197));
}
