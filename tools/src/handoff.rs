//! The source's half of moving a running VM's disks to another host (`migrate-start` with a
//! `ferry://HOST:PORT/NAME` target; `docs/migration.md`, "Across hosts"): the destination
//! daemon prepares an incoming volume for each disk, one mirror job per disk copies into
//! its NBD export until in sync, and when the source QEMU stops the devices at the
//! switchover of its VM migration, the volumes are handed over: their gates closed (armed
//! at the start, closed by the device stop itself), what is left copied and flushed, and
//! the incoming volumes activated. A volume the source also exports over NBD read-write has
//! that export fenced at the hand-off, before what is left is copied, so no NBD client
//! writes the source after the destination takes over. Any failure before the activation reopens the gates
//! and lifts those fences (the VM goes on on the source), cancels the jobs and abandons the incoming volumes.
//!
//! The destination is only ever activated after every job has handed off, so it never
//! serves a disk the source could still write or one that is not complete.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ferry_engine::mirror::{
    DestinationSpec, MigrationError, MigrationJob, MigrationOptions, MigrationState,
};
use ferry_engine::nbd::{ExportUri, NbdServer};
use ferry_engine::peer::link::{LinkOptions, PeerError, PeerLink};
use ferry_engine::peer::{ControlAddress, FerryUrl};
use ferry_vhost::{DeviceGate, StopCause};
use serde_json::{json, Value};

use crate::control::ControlError;
use crate::daemon::Daemon;
use crate::volume_spec::NbdExportMode;

/// Default image and socket on the destination, `{name}` standing for the volume's name.
pub const REMOTE_PATH_DEFAULT: &str = "/var/lib/ferry/{name}.img";
pub const REMOTE_SOCKET_DEFAULT: &str = "/run/ferry/{name}.sock";
/// How often the destination's leases are renewed and its state read, and the longest
/// the hand-off thread sleeps between looks at the jobs.
const TICK: Duration = Duration::from_millis(50);
/// How long a device stopped before its job is `ready` waits for the copy to catch up. At
/// a VM migration's switchover the bound is the destination's `--incoming-start-wait`
/// instead, when shorter: past it the destination VM's device has been refused, and the
/// VM is better resumed on the source than handed a disk nobody serves.
const READY_WAIT_MAX: Duration = Duration::from_secs(120);

/// One volume moving.
struct Moving {
    local: String,
    remote: String,
    job: Arc<MigrationJob>,
    gate: Arc<DeviceGate>,
    /// The source volume is exported read-write on this daemon's NBD server (fenced at
    /// the hand-off).
    exported_rw: bool,
    /// The destination's last answer to `incoming-status`.
    remote_status: Value,
}

/// Why an activation did not succeed.
enum Activation {
    /// The destination answered no: it did not activate.
    Refused(String),
    /// No answer within the lease: it may have.
    Unknown(String),
}

/// What the operator sees of a move besides its jobs.
#[derive(Debug, Clone, Default)]
struct Outcome {
    handed_off: bool,
    /// From the devices' stop seen to the destination's last activation: how long a
    /// destination VM's first disk request can wait for the hand-off.
    hand_off_ms: Option<u64>,
    error: Option<String>,
    /// When set, the gates stay closed: the destination may have activated.
    uncertain: bool,
}

/// A move of one VM's volumes to another host.
pub struct HandOff {
    peer: String,
    link: PeerLink,
    /// This daemon's NBD server, which may export the moving volumes.
    nbd: Option<Arc<NbdServer>>,
    /// The destination's lease (the shortest it named), in milliseconds.
    lease_ms: AtomicU64,
    /// How long the destination's devices wait for an activation, in milliseconds.
    start_wait_ms: AtomicU64,
    moving: Mutex<Vec<Moving>>,
    outcome: Mutex<Outcome>,
}

/// What `migrate-start` was asked for.
pub struct MoveRequest {
    pub volumes: Vec<String>,
    pub target: FerryUrl,
    pub path: Option<String>,
    pub socket: Option<String>,
    pub options: MigrationOptions,
}

fn placeholder(
    template: &str,
    name: &str,
    several: bool,
    key: &str,
) -> Result<String, ControlError> {
    if several && !template.contains("{name}") {
        return Err(ControlError::bad_argument(format!(
            "{key} {template}: with several volumes it must contain {{name}}"
        )));
    }
    Ok(template.replace("{name}", name))
}

fn peer_error(e: PeerError) -> ControlError {
    ControlError::new("MigrationError", e.to_string())
}

impl HandOff {
    /// Prepares the incoming volumes, starts a job per volume and the hand-off thread.
    /// On any failure every incoming volume prepared is abandoned and every job cancelled.
    pub fn start(daemon: &Daemon, request: MoveRequest) -> Result<Arc<Self>, ControlError> {
        let several = request.volumes.len() > 1;
        if several && !request.target.path.is_empty() {
            return Err(ControlError::bad_argument(
                "with several volumes the target is ferry://HOST:PORT (each keeps its name)",
            ));
        }
        let ControlAddress::Tcp { host, .. } = &request.target.address else {
            return Err(ControlError::bad_argument(
                "a ferry:// target is a TCP address",
            ));
        };
        let peer = format!("peer {}", request.target.address);
        let link = PeerLink::new(
            &peer,
            request.target.address.clone(),
            daemon.tls.as_deref(),
            LinkOptions::default(),
        )
        .map_err(peer_error)?;
        let handoff = Arc::new(Self {
            peer,
            link,
            nbd: daemon.nbd.clone(),
            lease_ms: AtomicU64::new(u64::MAX),
            start_wait_ms: AtomicU64::new(u64::MAX),
            moving: Mutex::new(Vec::new()),
            outcome: Mutex::new(Outcome::default()),
        });
        let mut prepared: Vec<String> = Vec::new();
        let started = handoff.prepare_and_start(daemon, &request, host, &mut prepared);
        if let Err(e) = started {
            handoff.unwind(&prepared, &e.desc);
            return Err(e);
        }
        let thread = {
            let handoff = handoff.clone();
            std::thread::Builder::new()
                .name("ferry-handoff".into())
                .spawn(move || handoff.run())
        };
        if let Err(e) = thread {
            let reason = format!("cannot start the hand-off thread: {e}");
            handoff.unwind(&prepared, &reason);
            return Err(ControlError::new("MigrationError", reason));
        }
        Ok(handoff)
    }

    fn prepare_and_start(
        &self,
        daemon: &Daemon,
        request: &MoveRequest,
        host: &str,
        prepared: &mut Vec<String>,
    ) -> Result<(), ControlError> {
        let several = request.volumes.len() > 1;
        let path = request.path.as_deref().unwrap_or(REMOTE_PATH_DEFAULT);
        let socket = request.socket.as_deref().unwrap_or(REMOTE_SOCKET_DEFAULT);
        for local in &request.volumes {
            let served = daemon
                .volume(local)
                .ok_or_else(|| ControlError::new("NotFound", format!("no volume named {local}")))?;
            let remote = if request.target.path.is_empty() {
                local.clone()
            } else {
                request.target.path.clone()
            };
            let volume = &served.volume;
            let reply = self
                .link
                .call(
                    "incoming-prepare",
                    &json!({
                        "name": remote,
                        "size": volume.size_bytes(),
                        "logical-block-size": volume.config().request_block_bytes(),
                        "path": placeholder(path, &remote, several, "path")?,
                        "socket": placeholder(socket, &remote, several, "socket")?,
                    }),
                )
                .map_err(peer_error)?;
            prepared.push(remote.clone());
            if let Some(ms) = reply.get("lease-ms").and_then(Value::as_u64) {
                self.lease_ms.fetch_min(ms, Ordering::Relaxed);
            }
            if let Some(ms) = reply.get("start-wait-ms").and_then(Value::as_u64) {
                self.start_wait_ms.fetch_min(ms, Ordering::Relaxed);
            }
            let port = reply
                .get("nbd-port")
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    ControlError::new(
                        "MigrationError",
                        format!("{}: incoming-prepare named no NBD port", self.peer),
                    )
                })?;
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            let uri = ExportUri::parse(&format!("nbds://{host}:{port}/{remote}"))
                .map_err(|e| ControlError::new("MigrationError", e.to_string()))?;
            let mut options = request.options.clone();
            options.hand_off = true;
            // The destination has just created the image sparse: holes stay holes.
            options.target_known_zero = true;
            options.auto_cutover = false;
            options.nbd_tls = daemon.tls.clone();
            let job = daemon
                .migrations
                .start_named(
                    std::slice::from_ref(local),
                    |n| daemon.volume(n).map(|v| v.volume.clone()),
                    DestinationSpec::Nbd(uri),
                    options,
                )
                .map_err(|e| ControlError::new("MigrationError", e.to_string()))?;
            served.gate.close_on_stop(true);
            self.lock_moving().push(Moving {
                local: local.clone(),
                remote,
                job,
                gate: served.gate.clone(),
                exported_rw: served.nbd == Some(NbdExportMode::ReadWrite),
                remote_status: Value::Null,
            });
        }
        Ok(())
    }

    /// The destination's lease, or this daemon's own when it named none.
    fn lease(&self) -> Duration {
        match self.lease_ms.load(Ordering::Relaxed) {
            u64::MAX => crate::incoming::IncomingOptions::default().lease,
            ms => Duration::from_millis(ms),
        }
    }

    fn lock_moving(&self) -> std::sync::MutexGuard<'_, Vec<Moving>> {
        self.moving.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_outcome(&self) -> std::sync::MutexGuard<'_, Outcome> {
        self.outcome.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The ids of the move's jobs.
    pub fn job_ids(&self) -> Vec<u64> {
        self.lock_moving().iter().map(|m| m.job.id()).collect()
    }

    /// What `query-migrations` adds to job `id`'s status: both ends of the move.
    pub fn describe(&self, id: u64) -> Option<Value> {
        let moving = self.lock_moving();
        let m = moving.iter().find(|m| m.job.id() == id)?;
        let outcome = self.lock_outcome().clone();
        Some(json!({
            "peer": self.link.address().to_string(),
            "remote-volume": m.remote,
            "jobs": moving.iter().map(|m| m.job.id()).collect::<Vec<_>>(),
            "handed-off": outcome.handed_off,
            "hand-off-ms": outcome.hand_off_ms,
            "error": outcome.error,
            "outcome-uncertain": outcome.uncertain,
            "incoming": m.remote_status,
        }))
    }

    /// Cancels the jobs, reopens the gates and abandons the incoming volumes (best effort:
    /// the destination's lease removes whatever this cannot reach).
    fn unwind(&self, prepared: &[String], reason: &str) {
        for m in self.lock_moving().iter() {
            m.gate.close_on_stop(false);
            m.gate.open();
            let _ = m.job.cancel();
        }
        self.unfence_exports();
        for name in prepared {
            if let Err(e) = self.link.call("incoming-abandon", &json!({ "name": name })) {
                log::warn!("{e} (its lease will remove it)");
            }
        }
        let mut outcome = self.lock_outcome();
        if outcome.error.is_none() {
            outcome.error = Some(reason.to_string());
        }
        log::error!("move to {} failed: {reason}", self.peer);
    }

    /// The hand-off thread: renews the leases, watches the jobs and the devices, and hands
    /// over once every device has stopped.
    fn run(self: Arc<Self>) {
        let remotes: Vec<String> = self
            .lock_moving()
            .iter()
            .map(|m| m.remote.clone())
            .collect();
        // The first pass renews at once, so the destination's state shows from the start.
        let mut renewed: Option<Instant> = None;
        let mut renew_failing_since: Option<Instant> = None;
        loop {
            if let Some(reason) = self.failure() {
                self.fail_jobs(&reason);
                self.unwind(&remotes, &reason);
                return;
            }
            if self.all_stopped() {
                self.hand_over(&remotes);
                return;
            }
            if renewed.is_none_or(|at| at.elapsed() >= self.lease() / 3) {
                renewed = Some(Instant::now());
                match self.renew() {
                    Ok(()) => renew_failing_since = None,
                    Err(e) => {
                        let since = *renew_failing_since.get_or_insert_with(Instant::now);
                        log::warn!("{e}");
                        if since.elapsed() >= self.lease() {
                            let reason = format!("the destination is unreachable: {e}");
                            self.fail_jobs(&reason);
                            self.unwind(&remotes, &reason);
                            return;
                        }
                    }
                }
            }
            // Sleep on a device still running (one that stopped would wake at once).
            let running = self
                .lock_moving()
                .iter()
                .find(|m| m.gate.events().closed_by_stop.is_none())
                .map(|m| m.gate.clone());
            if let Some(gate) = running {
                gate.wait_closed_by_stop(TICK);
            }
        }
    }

    /// Why the move cannot go on, if it cannot: a job ended, or the frontend gave its VM
    /// migration up (dirty logging off again without a stop: QMP `migrate_cancel`).
    fn failure(&self) -> Option<String> {
        for m in self.lock_moving().iter() {
            let state = m.job.state();
            if state.is_terminal() {
                let status = m.job.status();
                return Some(format!(
                    "job {} ({}) {state}{}",
                    m.job.id(),
                    m.local,
                    status.error.map(|e| format!(": {e}")).unwrap_or_default()
                ));
            }
            let events = m.gate.events();
            if events.logging_abandoned > 0 && events.closed_by_stop.is_none() {
                return Some(format!(
                    "the VM's migration was cancelled (volume {}'s frontend stopped logging without stopping the device)",
                    m.local
                ));
            }
        }
        None
    }

    fn all_stopped(&self) -> bool {
        self.lock_moving()
            .iter()
            .all(|m| m.gate.events().closed_by_stop.is_some())
    }

    fn fail_jobs(&self, reason: &str) {
        // The reason first: a job's status shows it as soon as the job reads cancelled.
        {
            let mut outcome = self.lock_outcome();
            if outcome.error.is_none() {
                outcome.error = Some(reason.to_string());
            }
        }
        for m in self.lock_moving().iter() {
            if !m.job.state().is_terminal() {
                log::warn!("job {}: {reason}", m.job.id());
                let _ = m.job.cancel();
            }
        }
    }

    /// Renews every incoming volume's lease and records its state; a volume the
    /// destination no longer has fails the move.
    fn renew(&self) -> Result<(), PeerError> {
        let remotes: Vec<String> = self
            .lock_moving()
            .iter()
            .map(|m| m.remote.clone())
            .collect();
        for remote in remotes {
            let status = match self
                .link
                .call("incoming-status", &json!({ "name": remote }))
            {
                Ok(status) => status,
                // The destination does not have it (any more): as good as abandoned.
                Err(PeerError::Refused { class, desc, .. }) if class == "NotFound" => {
                    json!({ "name": remote, "state": "abandoned", "reason": desc })
                }
                Err(e) => return Err(e),
            };
            let abandoned = status.get("state").and_then(Value::as_str) == Some("abandoned");
            if let Some(m) = self.lock_moving().iter_mut().find(|m| m.remote == remote) {
                if abandoned {
                    let reason = status.get("reason").cloned().unwrap_or(Value::Null);
                    let _ = m.job.cancel();
                    log::error!("the destination abandoned {remote}: {reason}");
                }
                m.remote_status = status;
            }
        }
        Ok(())
    }

    /// Every device has stopped (the gates closed themselves): settle every job, then
    /// activate every incoming volume.
    fn hand_over(&self, remotes: &[String]) {
        let began = Instant::now();
        let causes: Vec<Option<StopCause>> = self
            .lock_moving()
            .iter()
            .map(|m| m.gate.events().closed_by_stop)
            .collect();
        log::info!("hand-off to {}: devices stopped ({causes:?})", self.peer);
        let vm_migrating = causes.contains(&Some(StopCause::RingsStoppedWhileLogging));
        let ready_wait = match self.start_wait_ms.load(Ordering::Relaxed) {
            ms if vm_migrating && ms != u64::MAX => READY_WAIT_MAX.min(Duration::from_millis(ms)),
            _ => READY_WAIT_MAX,
        };
        if let Err(reason) = self.fence_exports().and_then(|()| self.settle(ready_wait)) {
            self.fail_jobs(&reason);
            self.unwind(remotes, &reason);
            return;
        }
        for (index, remote) in remotes.iter().enumerate() {
            let activated = self.activate(remote);
            if let Err(Activation::Refused(reason)) = &activated {
                if index == 0 {
                    // Nothing was activated: the source's images are the VM's disks still.
                    self.unwind(remotes, reason);
                    return;
                }
            }
            if let Err(Activation::Refused(e) | Activation::Unknown(e)) = activated {
                let mut outcome = self.lock_outcome();
                outcome.error = Some(e);
                outcome.uncertain = true;
                log::error!(
                    "hand-off to {}: {}; the source's gates stay closed",
                    self.peer,
                    outcome.error.as_deref().unwrap_or_default()
                );
                return;
            }
        }
        for remote in remotes {
            if let Ok(status) = self
                .link
                .call("incoming-status", &json!({ "name": remote }))
            {
                if let Some(m) = self.lock_moving().iter_mut().find(|m| &m.remote == remote) {
                    m.remote_status = status;
                }
            }
        }
        let took = began.elapsed();
        {
            let mut outcome = self.lock_outcome();
            outcome.handed_off = true;
            outcome.hand_off_ms = Some(took.as_millis() as u64);
        }
        log::info!("volumes handed off to {} in {took:?}", self.peer);
    }

    /// Fences the source's read-write NBD exports of the moving volumes: their clients are
    /// disconnected once their writes in flight have landed (in the jobs' dirty bitmaps,
    /// so the settle copies them), and new ones are refused.
    fn fence_exports(&self) -> Result<(), String> {
        let Some(server) = &self.nbd else {
            return Ok(());
        };
        let exported: Vec<String> = self
            .lock_moving()
            .iter()
            .filter(|m| m.exported_rw)
            .map(|m| m.local.clone())
            .collect();
        for name in exported {
            server
                .fence_export(&name, crate::incoming::FENCE_TIMEOUT)
                .map_err(|e| format!("fencing the source's NBD export {name}: {e}"))?;
        }
        Ok(())
    }

    /// Lifts the fences of [`Self::fence_exports`]: the source's volumes serve again.
    fn unfence_exports(&self) {
        let Some(server) = &self.nbd else { return };
        for m in self.lock_moving().iter().filter(|m| m.exported_rw) {
            if let Err(e) = server.unfence_export(&m.local) {
                log::warn!("volume {}: {e}", m.local);
            }
        }
    }

    /// Hands every job off (copies the rest, flushes), each once it is ready: a device
    /// that stopped during the copy leaves nothing more to dirty, so the copy catches up.
    fn settle(&self, ready_wait: Duration) -> Result<(), String> {
        let jobs: Vec<Arc<MigrationJob>> =
            self.lock_moving().iter().map(|m| m.job.clone()).collect();
        let deadline = Instant::now() + ready_wait;
        let mut renewed = Instant::now();
        for job in &jobs {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let state = job.wait_for(|s| s != MigrationState::Copying, left.min(TICK));
                if state == MigrationState::Copying && !left.is_zero() {
                    // The destination's leases run on while the copy catches up.
                    if renewed.elapsed() >= self.lease() / 3 {
                        renewed = Instant::now();
                        if let Err(e) = self.renew() {
                            log::warn!("{e}");
                        }
                    }
                    continue;
                }
                if state != MigrationState::Ready {
                    return Err(format!(
                        "job {} is {state}, not ready, at the hand-off",
                        job.id()
                    ));
                }
                match job.hand_off() {
                    Ok(_) => break,
                    // Back to copying between the look and the hand-off: look again.
                    Err(MigrationError::NotReady { .. }) if !left.is_zero() => continue,
                    Err(e) => return Err(format!("job {}: hand-off: {e}", job.id())),
                }
            }
        }
        Ok(())
    }

    /// Activates one incoming volume. A refusal means it was not activated; a lost reply
    /// is retried (activation is idempotent) for as long as the lease lasts.
    fn activate(&self, remote: &str) -> Result<(), Activation> {
        let deadline = Instant::now() + self.lease();
        loop {
            match self
                .link
                .call("incoming-activate", &json!({ "name": remote }))
            {
                Ok(_) => return Ok(()),
                Err(e @ PeerError::Refused { .. }) => {
                    return Err(Activation::Refused(e.to_string()))
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(Activation::Unknown(format!(
                        "activating {remote}: outcome unknown: {e}"
                    )))
                }
                Err(e) => {
                    log::warn!("{e}; retrying");
                    std::thread::sleep(TICK);
                }
            }
        }
    }
}
