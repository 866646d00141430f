//! A migration job: its shared state, how it starts, and its operator controls.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::destination::{Destination, DestinationSpec};
use super::dirty_bitmap::ChunkTable;
use super::layout::{Layout, Placement};
use super::observer::{MirrorObserver, MirrorQueue};
use super::opening::{check_volume_list, open_target};
use super::options::MigrationOptions;
use super::persist::tracker::InterruptedJob;
use super::persist::JobPersist;
use super::status::{CutoverReport, MigrationState, MigrationStatus, VolumeMigrationStatus};
use super::syscalls;
use super::throttle::Throttle;
use super::MigrationError;
use crate::confine::{self, Allowlist};
use crate::observer::WriteObserver;
use crate::volume::{Backing, Volume};

static NEXT_JOB_ID: AtomicU64 = AtomicU64::new(1);

/// One volume of a job.
pub(crate) struct VolumeMirror {
    pub volume: Arc<Volume>,
    pub placement: Placement,
    /// The source image the copier reads; released when the job ends.
    pub source: Mutex<Option<Arc<Backing>>>,
    /// Shared with an interrupted job's tracking when the job resumes one.
    pub table: Arc<Mutex<ChunkTable>>,
}

impl VolumeMirror {
    /// `volume` placed at `placement` on the target, with `table` (a new one, all clean,
    /// when none is given).
    pub(crate) fn new(
        volume: Arc<Volume>,
        placement: Placement,
        granularity_bytes: u64,
        table: Option<Arc<Mutex<ChunkTable>>>,
    ) -> Self {
        let table = table.unwrap_or_else(|| {
            Arc::new(Mutex::new(ChunkTable::new(
                placement.length_bytes,
                granularity_bytes,
            )))
        });
        Self {
            source: Mutex::new(Some(volume.backing())),
            table,
            volume,
            placement,
        }
    }
}

/// Byte counters, updated with relaxed atomics (statistics).
#[derive(Default)]
pub(crate) struct Counters {
    pub total_bytes: AtomicU64,
    pub copied_bytes: AtomicU64,
    pub mirrored_bytes: AtomicU64,
    pub dirtied_bytes: AtomicU64,
}

impl Counters {
    pub fn add_dirtied(&self, bytes: u64) {
        if bytes > 0 {
            self.dirtied_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.total_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }
    pub fn add_copied(&self, bytes: u64) {
        self.copied_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    pub fn add_mirrored(&self, bytes: u64) {
        self.mirrored_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The state an operator sees, changed under one lock.
pub(crate) struct Control {
    pub state: MigrationState,
    pub error: Option<String>,
    pub report: Option<CutoverReport>,
}

/// Rates measured by the supervisor.
#[derive(Default, Clone, Copy)]
pub(crate) struct Rates {
    pub copy_bytes_per_s: u64,
    pub dirty_bytes_per_s: u64,
    pub converging: bool,
}

/// Everything the job's threads, its observers and its controls share.
pub struct JobShared {
    pub(crate) id: u64,
    pub(crate) options: MigrationOptions,
    pub(crate) target: Arc<dyn Destination>,
    pub(crate) target_name: String,
    /// The path of a file target or the URI of an NBD target: what the volumes switch to
    /// at cutover.
    pub(crate) target_path: Option<PathBuf>,
    pub(crate) layout: Layout,
    pub(crate) volumes: Vec<VolumeMirror>,
    pub(crate) control: Mutex<Control>,
    pub(crate) mirroring: AtomicBool,
    pub(crate) stop: AtomicBool,
    /// Set during cutover: the copier ignores the speed limit while the guest is held.
    pub(crate) unthrottled: AtomicBool,
    /// `MigrationOptions::copy_hold` in microseconds, changeable while the job runs.
    pub(crate) copy_hold_us: AtomicU64,
    pub(crate) throttle: Throttle,
    /// Target writes under way (copier, mirror workers and legs); `cancel` waits for them
    /// to end.
    pub(crate) target_writes: AtomicUsize,
    pub(crate) queue: MirrorQueue,
    pub(crate) observers: Mutex<Vec<(usize, Arc<dyn WriteObserver>)>>,
    pub(crate) counters: Counters,
    pub(crate) rates: Mutex<Rates>,
    pub(crate) started: Instant,
    /// The job file that lets the job survive a restart (none when the first volume has
    /// no local image).
    pub(crate) persist: Option<Arc<JobPersist>>,
    /// Set by a clean shutdown: the job ends but its file stays, for a resume.
    pub(crate) keep_file: AtomicBool,
    /// Set once the `ferry-migrate-file` thread runs: from then on a failed job's file is
    /// removed by that thread (see [`JobShared::end`]).
    pub(crate) file_thread: AtomicBool,
}

impl JobShared {
    /// The state of a job about to launch: copying, mirroring, nothing counted yet.
    pub(crate) fn new(
        options: MigrationOptions,
        target: Arc<dyn Destination>,
        target_path: PathBuf,
        layout: Layout,
        volumes: Vec<VolumeMirror>,
        persist: Option<Arc<JobPersist>>,
    ) -> Self {
        let copy_hold_us = options.copy_hold.as_micros() as u64;
        Self {
            id: NEXT_JOB_ID.fetch_add(1, Ordering::Relaxed),
            throttle: Throttle::new(options.speed_bytes_per_s),
            options,
            target_name: target.describe(),
            target,
            target_path: Some(target_path),
            layout,
            volumes,
            control: Mutex::new(Control {
                state: MigrationState::Copying,
                error: None,
                report: None,
            }),
            mirroring: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            unthrottled: AtomicBool::new(false),
            copy_hold_us: AtomicU64::new(copy_hold_us),
            target_writes: AtomicUsize::new(0),
            queue: MirrorQueue::default(),
            observers: Mutex::new(Vec::new()),
            counters: Counters::default(),
            rates: Mutex::new(Rates {
                converging: true,
                ..Rates::default()
            }),
            started: Instant::now(),
            persist,
            keep_file: AtomicBool::new(false),
            file_thread: AtomicBool::new(false),
        }
    }

    pub(crate) fn mirroring(&self) -> bool {
        self.mirroring.load(Ordering::Acquire)
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Runs one target write unless the job has ended (`None` then). Counted, so that
    /// [`quiesce`](Self::quiesce) can wait until nothing more lands on the target: either
    /// this sees `stop`, or `quiesce` sees the count (both sequentially consistent).
    pub(crate) fn write_target<T>(&self, write: impl FnOnce() -> T) -> Option<T> {
        if !self.begin_target_write() {
            return None;
        }
        let result = write();
        self.end_target_write();
        Some(result)
    }

    /// Counts a target write about to start elsewhere (a leg on a volume queue's ring);
    /// false, and nothing counted, when the job has ended. Every `true` is matched by one
    /// [`end_target_write`](Self::end_target_write) once the write is over.
    pub(crate) fn begin_target_write(&self) -> bool {
        self.target_writes.fetch_add(1, Ordering::SeqCst);
        if self.stop.load(Ordering::SeqCst) {
            self.target_writes.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub(crate) fn end_target_write(&self) {
        self.target_writes.fetch_sub(1, Ordering::SeqCst);
    }

    /// After the job ended: waits until no target write is under way, `timeout` at most;
    /// false on timeout.
    pub(crate) fn quiesce(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.target_writes.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    pub(crate) fn state(&self) -> MigrationState {
        self.control
            .lock()
            .map(|c| c.state)
            .unwrap_or(MigrationState::Failed)
    }

    /// Moves from `from` to `to`; false if the job was not in `from`.
    pub(crate) fn transition(&self, from: MigrationState, to: MigrationState) -> bool {
        match self.control.lock() {
            Ok(mut c) if c.state == from => {
                c.state = to;
                true
            }
            _ => false,
        }
    }

    /// Fails the job (unless it already ended): the guest stays on its source, every held
    /// write is released with success, and the mirror is detached.
    pub(crate) fn fail(&self, reason: String) {
        if self.end(MigrationState::Failed, Some(reason.clone()), None) {
            log::error!("migration job {} failed: {reason}", self.id);
        }
    }

    /// Ends the job in `state`; false if it had already ended.
    pub(crate) fn end(
        &self,
        state: MigrationState,
        error: Option<String>,
        report: Option<CutoverReport>,
    ) -> bool {
        match self.control.lock() {
            Ok(mut c) if !c.state.is_terminal() => {
                c.state = state;
                c.error = error;
                c.report = report;
            }
            _ => return false,
        }
        self.mirroring.store(false, Ordering::Release);
        self.stop.store(true, Ordering::SeqCst);
        self.queue.close();
        self.detach();
        // A job fails on whichever thread meets the failure, an NBD target's reply reader
        // among them, whose seccomp filter has no file paths (no unlink): the file thread,
        // which may, removes a failed job's file as it exits (woken by `stop`). Completion
        // and cancellation come from the supervisor and control threads, which remove it
        // here, before the end is reported.
        let deferred = state == MigrationState::Failed && self.file_thread.load(Ordering::Acquire);
        if !deferred && !self.keep_file.load(Ordering::Acquire) {
            super::persist::job_file::remove(self);
        }
        for vm in &self.volumes {
            if let Ok(mut source) = vm.source.lock() {
                source.take();
            }
        }
        // The job is over: its own connection goes now, not with the daemon (the volumes
        // served from an NBD target after cutover have connections of their own).
        self.target.close();
        true
    }

    fn detach(&self) {
        let observers = match self.observers.lock() {
            Ok(mut o) => std::mem::take(&mut *o),
            Err(_) => return,
        };
        for (index, observer) in observers {
            self.volumes[index].volume.remove_observer(&observer);
        }
    }

    /// Bytes left to copy over all volumes.
    pub(crate) fn pending_bytes(&self) -> u64 {
        self.volumes
            .iter()
            .map(|vm| vm.table.lock().map(|t| t.pending_bytes()).unwrap_or(0))
            .sum()
    }

    /// True when every volume's table is clean.
    pub(crate) fn all_clean(&self) -> bool {
        self.volumes
            .iter()
            .all(|vm| vm.table.lock().map(|t| t.is_clean()).unwrap_or(true))
    }
}

/// A running (or ended) migration of one or more volumes to one target.
pub struct MigrationJob {
    pub(super) shared: Arc<JobShared>,
    pub(super) threads: Mutex<Vec<JoinHandle<()>>>,
}

impl MigrationJob {
    /// Opens the target, plans the copy, attaches the mirror to every volume (each is paused
    /// for the moment it takes its in-flight requests to drain) and starts copying.
    pub fn start(
        volumes: Vec<Arc<Volume>>,
        target: DestinationSpec,
        options: MigrationOptions,
    ) -> Result<Arc<Self>, MigrationError> {
        options.validate().map_err(MigrationError::BadOptions)?;
        check_volume_list(&volumes)?;
        let sizes: Vec<(String, u64)> = volumes
            .iter()
            .map(|v| (v.name().to_string(), v.size_bytes()))
            .collect();
        let layout = Layout::place(&sizes);
        // Before the target is opened (maybe created): an interrupted job refuses the start.
        let persist = super::persist::job_file::create(&volumes, &layout, &target, &options)?;
        let (target_obj, target_path) = open_target(&target, &layout, &volumes, &options)?;
        if volumes.len() > 1 {
            let layout_path = options
                .layout_path
                .clone()
                .or_else(|| target_path.as_deref().map(Layout::path_for));
            if let Some(path) = layout_path {
                layout.write(&path)?;
            }
        }
        let mirrors: Vec<VolumeMirror> = volumes
            .into_iter()
            .zip(layout.volumes.iter())
            .map(|(volume, placement)| {
                VolumeMirror::new(volume, placement.clone(), options.granularity_bytes, None)
            })
            .collect();
        // Without a file path the volumes switch to the target's URI at cutover.
        let target_path = target_path.unwrap_or_else(|| PathBuf::from(target.to_string()));
        let shared = Arc::new(JobShared::new(
            options,
            target_obj,
            target_path,
            layout,
            mirrors,
            persist,
        ));
        let job = Arc::new(Self {
            shared,
            threads: Mutex::new(Vec::new()),
        });
        job.launch(None)?;
        log::info!(
            "migration job {} started: {} volume(s) to {}, {} bytes to copy",
            job.id(),
            job.shared.volumes.len(),
            job.shared.target_name,
            job.shared.counters.total_bytes.load(Ordering::Relaxed)
        );
        Ok(job)
    }

    /// Starts the mirror workers, attaches the observers, plans the copy, then starts the
    /// copier and the supervisor. The plan comes after the attach: a write that lands in a
    /// hole before the plan is seen by the plan, one after it by the mirror. A resumed job
    /// (`resuming`) has its chunks to copy already: its mirror replaces the interrupted
    /// job's tracking under the same pause, and there is no plan.
    pub(super) fn launch(&self, resuming: Option<&InterruptedJob>) -> Result<(), MigrationError> {
        let s = &self.shared;
        let (mirror_threads, copy_threads) = if s.target.is_remote() {
            (
                s.options.mirror_threads_remote,
                s.options.copy_threads_remote,
            )
        } else {
            (s.options.mirror_threads, s.options.copy_threads)
        };
        for i in 0..mirror_threads {
            self.spawn(
                &format!("ferry-mirror-{i}"),
                &syscalls::MIRROR_SYSCALLS,
                super::observer::run_mirror_worker,
            )?;
        }
        for (index, vm) in s.volumes.iter().enumerate() {
            let observer: Arc<dyn WriteObserver> = Arc::new(MirrorObserver {
                job: s.clone(),
                volume_index: index,
            });
            // Attach under a pause, so that no write submitted before the observer was
            // there can still be in flight when the copier reads the source.
            let Some(guard) = vm.volume.pause(s.options.pause_timeout) else {
                let err = MigrationError::PauseTimeout {
                    volume: vm.volume.name().to_string(),
                    timeout_ms: s.options.pause_timeout.as_millis() as u64,
                };
                s.end(MigrationState::Cancelled, Some(err.to_string()), None);
                return Err(err);
            };
            vm.volume.add_observer(observer.clone());
            if let Some(interrupted) = resuming {
                interrupted.detach(index);
            }
            if let Ok(mut observers) = s.observers.lock() {
                observers.push((index, observer));
            }
            drop(guard);
        }
        match resuming {
            None => self.plan()?,
            Some(_) => {
                let pending = s.pending_bytes();
                s.counters.total_bytes.fetch_add(pending, Ordering::Relaxed);
            }
        }
        if s.persist.is_some() {
            // The first version before any copy, so that the file exists from the start.
            super::persist::job_file::write(s, false).map_err(|e| {
                let reason = e.to_string();
                s.end(MigrationState::Cancelled, Some(reason), None);
                MigrationError::Persist(e)
            })?;
            s.file_thread.store(true, Ordering::Release);
            self.spawn(
                "ferry-migrate-file",
                &syscalls::JOB_FILE_SYSCALLS,
                super::persist::job_file::run,
            )?;
        }
        for i in 0..copy_threads {
            self.spawn(
                &format!("ferry-copy-{i}"),
                &syscalls::COPIER_SYSCALLS,
                super::copier::run,
            )?;
        }
        self.spawn(
            "ferry-migrate",
            &syscalls::SUPERVISOR_SYSCALLS,
            super::supervisor::run,
        )?;
        Ok(())
    }

    /// Marks the chunks to copy (see [`super::copier::plan`]).
    fn plan(&self) -> Result<(), MigrationError> {
        let s = &self.shared;
        for vm in &s.volumes {
            let planned = match (vm.source.lock(), vm.table.lock()) {
                (Ok(source), Ok(mut table)) => match source.as_ref() {
                    Some(source) => {
                        let known_zero = s.target.known_zero() || s.options.target_known_zero;
                        super::copier::plan(&mut table, source, known_zero)
                    }
                    None => Ok(0),
                },
                _ => Ok(0),
            };
            match planned {
                Ok(bytes) => s.counters.total_bytes.fetch_add(bytes, Ordering::Relaxed),
                Err(source) => {
                    let err = MigrationError::Source {
                        volume: vm.volume.name().to_string(),
                        source,
                    };
                    s.end(MigrationState::Cancelled, Some(err.to_string()), None);
                    return Err(err);
                }
            };
        }
        Ok(())
    }

    fn spawn(
        &self,
        name: &str,
        syscalls: &'static Allowlist,
        f: fn(Arc<JobShared>),
    ) -> Result<(), MigrationError> {
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                confine::enter(syscalls);
                f(shared)
            });
        match handle {
            Ok(h) => {
                if let Ok(mut threads) = self.threads.lock() {
                    threads.push(h);
                }
                Ok(())
            }
            Err(e) => {
                self.shared.fail(format!("cannot start thread {name}: {e}"));
                Err(MigrationError::Spawn(e))
            }
        }
    }

    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The job's shared state, for tests that look at its chunk tables.
    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<JobShared> {
        &self.shared
    }

    pub fn state(&self) -> MigrationState {
        self.shared.state()
    }

    /// The names of the job's volumes.
    pub fn volume_names(&self) -> Vec<String> {
        self.shared
            .volumes
            .iter()
            .map(|vm| vm.volume.name().to_string())
            .collect()
    }

    /// Where each volume lies in the target.
    pub fn layout(&self) -> &Layout {
        &self.shared.layout
    }

    /// Changes the copy speed limit (bytes per second, 0 = unlimited) of a running job.
    pub fn set_speed(&self, bytes_per_s: u64) {
        self.shared.throttle.set(bytes_per_s);
    }

    /// Changes how long each copy is held between its read and its write (tests of races);
    /// a copy held now is released as soon as it has been held for the new duration.
    pub fn set_copy_hold(&self, hold: Duration) {
        self.shared
            .copy_hold_us
            .store(hold.as_micros() as u64, Ordering::Release);
    }

    /// Switches the volumes to the target; only when the job is `ready`.
    pub fn cutover(&self) -> Result<CutoverReport, MigrationError> {
        if self.shared.options.hand_off {
            return Err(MigrationError::HandOffOnly { job: self.id() });
        }
        super::cutover::run(&self.shared, super::cutover::Ending::Switch)
    }

    /// Ends a `ready` job that hands off (`MigrationOptions::hand_off`): holds guest I/O,
    /// copies what is left, flushes the target and detaches, leaving the volumes on their
    /// source, untouched. The caller has stopped the volumes' guests for good before, so
    /// that once this returns every write they completed is on the target.
    pub fn hand_off(&self) -> Result<CutoverReport, MigrationError> {
        if !self.shared.options.hand_off {
            return Err(MigrationError::NoHandOff { job: self.id() });
        }
        super::cutover::run(&self.shared, super::cutover::Ending::HandOff)
    }

    /// Stops the job before cutover: the guest stays on its source, which the job never wrote.
    /// Returns once no copy or mirror write can land on the target any more (so the target
    /// can be reused at once), or after `nbd_request_timeout` with a warning.
    pub fn cancel(&self) -> Result<(), MigrationError> {
        let state = self.state();
        if state == MigrationState::CuttingOver {
            return Err(MigrationError::NotReady {
                state: "cutting-over (cancel refused)".into(),
            });
        }
        if self.shared.end(MigrationState::Cancelled, None, None) {
            if !self.shared.quiesce(self.shared.options.nbd_request_timeout) {
                log::warn!(
                    "migration job {}: target writes still under way after cancel",
                    self.id()
                );
            }
            log::info!("migration job {} cancelled", self.id());
            Ok(())
        } else {
            Err(MigrationError::Ended {
                state: self.state().to_string(),
            })
        }
    }

    /// Waits until `done(state)` holds or `timeout` passes; returns the last state seen.
    pub fn wait_for(
        &self,
        done: impl Fn(MigrationState) -> bool,
        timeout: Duration,
    ) -> MigrationState {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.state();
            if done(state) || Instant::now() >= deadline {
                return state;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The job's status.
    pub fn status(&self) -> MigrationStatus {
        let s = &self.shared;
        let (state, error, report) = match s.control.lock() {
            Ok(c) => (c.state, c.error.clone(), c.report.clone()),
            Err(_) => (
                MigrationState::Failed,
                Some("state lock poisoned".into()),
                None,
            ),
        };
        let rates = s.rates.lock().map(|r| *r).unwrap_or_default();
        let volumes: Vec<VolumeMigrationStatus> = s
            .volumes
            .iter()
            .map(|vm| VolumeMigrationStatus {
                placement: vm.placement.clone(),
                pending_bytes: vm.table.lock().map(|t| t.pending_bytes()).unwrap_or(0),
            })
            .collect();
        let dirty_bytes: u64 = volumes.iter().map(|v| v.pending_bytes).sum();
        let eta_s = (rates.copy_bytes_per_s > 0 && !state.is_terminal())
            .then(|| dirty_bytes as f64 / rates.copy_bytes_per_s as f64);
        MigrationStatus {
            id: s.id,
            state,
            mode: s.options.mode,
            target: s.target_name.clone(),
            target_block_sizes: s.target.block_sizes(),
            volumes,
            total_bytes: s.counters.total_bytes.load(Ordering::Relaxed),
            copied_bytes: s.counters.copied_bytes.load(Ordering::Relaxed),
            dirty_bytes,
            mirrored_bytes: s.counters.mirrored_bytes.load(Ordering::Relaxed),
            rate_bytes_per_s: rates.copy_bytes_per_s,
            eta_s,
            speed_limit_bytes_per_s: s.throttle.bytes_per_s(),
            converging: rates.converging,
            cutover_pause_us: report.as_ref().map(|r| r.pause_us),
            switched: report.as_ref().is_some_and(|r| r.switched),
            handed_off: report.as_ref().is_some_and(|r| r.handed_off),
            error,
            elapsed_ms: s.started.elapsed().as_millis() as u64,
            job_file: s.persist.as_ref().map(|p| p.path().to_path_buf()),
            crashed: false,
        }
    }
}

impl Drop for MigrationJob {
    fn drop(&mut self) {
        self.shared.end(MigrationState::Cancelled, None, None);
        let threads = match self.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => return,
        };
        for handle in threads {
            let _ = handle.join();
        }
    }
}
