//! What the operator can choose for a migration job, with the defaults.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::tls::TlsCredentials;

/// How guest writes reach the target while the copy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorMode {
    /// A guest write completes only when the source and the target have it.
    #[default]
    Active,
    /// Guest writes only mark a dirty bitmap that the copier drains.
    Background,
}

/// Settings of one migration job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationOptions {
    pub mode: MirrorMode,
    /// Copy speed limit in bytes per second (0 = unlimited); see [`MigrationJob::set_speed`](super::MigrationJob::set_speed).
    pub speed_bytes_per_s: u64,
    /// Size of the chunks whose state is tracked (a power of two, at least 4 KiB).
    pub granularity_bytes: u64,
    /// The largest single copy (a multiple of the granularity).
    pub copy_chunk_bytes: u64,
    /// Copier threads, each with one chunk in flight: the bound on copies in flight, for a
    /// local target.
    pub copy_threads: usize,
    /// The same for a remote (NBD) target. Each copier waits a round trip per chunk, which
    /// over TLS includes the encryption on both ends, so more copies in flight keep the link
    /// and both hosts' cores busy: 16 copied at 0.96x of `nbdcopy` where 4 reached 0.66x
    /// (docs/BENCHMARKS.md, *Migration between hosts*). The speed limit is booked before
    /// each copy, so their number does not loosen it.
    pub copy_threads_remote: usize,
    /// Threads that write mirrored guest writes to a local target (`active` mode).
    pub mirror_threads: usize,
    /// The same for a remote (NBD) target. Its writes are pipelined (a worker sends a batch
    /// and goes on; the replies release the guest), so few threads keep all the guest's
    /// writes in flight; its discards, write-zeroes and flushes each wait a round trip on a
    /// worker, so more than one keeps a flush from holding up the writes behind it.
    pub mirror_threads_remote: usize,
    /// Cut over by itself as soon as the job is ready.
    pub auto_cutover: bool,
    /// The job ends by handing its volumes over to the host its target is on
    /// ([`MigrationJob::hand_off`](super::MigrationJob::hand_off)): the volumes are never
    /// switched to the target, and a cutover is refused.
    pub hand_off: bool,
    /// The target is known to read as zeros wherever nothing was written (an incoming
    /// volume its host has just created sparse), so holes of the source are not copied,
    /// as for a file target the job creates itself.
    pub target_known_zero: bool,
    /// The job is ready when at most this many bytes are left to copy; `None`: 0 in
    /// `active` mode, 4 MiB in `background` mode (drained during the cutover pause).
    pub ready_pending_bytes_max: Option<u64>,
    /// How long attaching the mirror or a cutover may wait for the guest's in-flight requests.
    pub pause_timeout: Duration,
    /// How long a cutover may take to copy the last dirty chunks while the guest is held.
    pub drain_timeout: Duration,
    /// How long an NBD request may wait for its reply before the connection counts as lost.
    pub nbd_request_timeout: Duration,
    /// The TLS credentials for an NBD target (`--tls-creds`): with them the job's connection,
    /// and the volumes' after the cutover, use TLS whatever the URI's scheme; an `nbds://`
    /// target needs them.
    pub nbd_tls: Option<Arc<TlsCredentials>>,
    /// Where to write the layout of a merge; default `TARGET.layout.json` for file targets
    /// and none for NBD targets (the layout is then only in the status).
    pub layout_path: Option<PathBuf>,
    /// Holds every copy between reading the source and writing the target. Zero in
    /// normal use; tests set it to make guest writes race copies on purpose.
    pub copy_hold: Duration,
    /// Keep a job file beside the first volume's image, so that the job survives a restart
    /// (`persist`).
    pub persist: bool,
    /// How often the job file is rewritten: after a crash, the chunks written since the
    /// last rewrite are copied again.
    pub persist_interval: Duration,
}

/// The default tracking granularity.
pub const GRANULARITY_BYTES_DEFAULT: u64 = 64 << 10;
/// The default copy size.
pub const COPY_CHUNK_BYTES_DEFAULT: u64 = 1 << 20;
/// The default bound of bytes left to copy at which a `background` job is ready.
pub const BACKGROUND_READY_PENDING_BYTES_DEFAULT: u64 = 4 << 20;

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            mode: MirrorMode::Active,
            speed_bytes_per_s: 0,
            granularity_bytes: GRANULARITY_BYTES_DEFAULT,
            copy_chunk_bytes: COPY_CHUNK_BYTES_DEFAULT,
            copy_threads: 4,
            copy_threads_remote: 16,
            mirror_threads: 2,
            mirror_threads_remote: 2,
            auto_cutover: false,
            hand_off: false,
            target_known_zero: false,
            ready_pending_bytes_max: None,
            pause_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(60),
            nbd_request_timeout: crate::nbd::REQUEST_TIMEOUT_DEFAULT,
            nbd_tls: None,
            layout_path: None,
            copy_hold: Duration::ZERO,
            persist: true,
            persist_interval: super::persist::INTERVAL_DEFAULT,
        }
    }
}

impl MigrationOptions {
    /// The bytes left to copy at which the job counts as ready.
    pub fn ready_pending_bytes(&self) -> u64 {
        self.ready_pending_bytes_max.unwrap_or(match self.mode {
            MirrorMode::Active => 0,
            MirrorMode::Background => BACKGROUND_READY_PENDING_BYTES_DEFAULT,
        })
    }

    /// Checks the numbers; returns why they are unusable.
    pub fn validate(&self) -> Result<(), String> {
        let g = self.granularity_bytes;
        if !g.is_power_of_two() || g < 4096 {
            return Err(format!(
                "granularity {g} must be a power of two of at least 4096"
            ));
        }
        if self.copy_chunk_bytes < g || self.copy_chunk_bytes / g * g != self.copy_chunk_bytes {
            return Err(format!(
                "copy chunk {} must be a multiple of the granularity {g}",
                self.copy_chunk_bytes
            ));
        }
        if self.persist_interval.is_zero() {
            return Err("the job file's interval must not be zero".into());
        }
        if self.hand_off && self.auto_cutover {
            return Err("a job that hands off does not cut over by itself".into());
        }
        let threads = [
            self.copy_threads,
            self.copy_threads_remote,
            self.mirror_threads,
            self.mirror_threads_remote,
        ];
        if threads.contains(&0) {
            return Err(
                "copy_threads and mirror_threads (local and remote) must be at least 1".into(),
            );
        }
        Ok(())
    }
}
