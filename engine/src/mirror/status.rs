//! What a migration job reports: its state, progress and the result of a cutover.

use super::layout::Placement;
use super::options::MirrorMode;
use crate::nbd::BlockSizes;

/// The life of a job: `copying` → `ready` → `cutting-over` → `completed`; or `failed` /
/// `cancelled` from any state before `completed`. A job found at start-up by its job file
/// is `interrupted` until it is resumed (as a new job) or discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    Copying,
    Ready,
    CuttingOver,
    Completed,
    Failed,
    Cancelled,
    Interrupted,
}

impl MigrationState {
    /// True once the job has ended and its mirror is detached.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copying => "copying",
            Self::Ready => "ready",
            Self::CuttingOver => "cutting-over",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Interrupted => "interrupted",
        }
    }
}

impl std::fmt::Display for MigrationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One volume of a job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VolumeMigrationStatus {
    #[serde(flatten)]
    pub placement: Placement,
    /// Bytes still to copy (dirty or being copied).
    pub pending_bytes: u64,
}

/// A job's status (`query-migrations` on the control socket).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MigrationStatus {
    pub id: u64,
    pub state: MigrationState,
    pub mode: MirrorMode,
    pub target: String,
    /// The size constraints an NBD target negotiated (`None` for a file target).
    pub target_block_sizes: Option<BlockSizes>,
    pub volumes: Vec<VolumeMigrationStatus>,
    /// Bytes to copy so far: the allocated ranges at the start plus everything re-dirtied.
    pub total_bytes: u64,
    /// Bytes the copier has written to the target (including re-copies).
    pub copied_bytes: u64,
    /// Bytes still to copy (dirty or being copied) over all volumes.
    pub dirty_bytes: u64,
    /// Guest bytes written to the target by the active mirror.
    pub mirrored_bytes: u64,
    /// The copier's recent rate.
    pub rate_bytes_per_s: u64,
    /// `dirty_bytes / rate`, when there is a rate.
    pub eta_s: Option<f64>,
    pub speed_limit_bytes_per_s: u64,
    /// False when guests dirty data faster than the copier drains it (background mode).
    pub converging: bool,
    /// How long guest I/O was held at cutover.
    pub cutover_pause_us: Option<u64>,
    /// True when the volumes now run on the target (file targets); false for NBD targets,
    /// where cutover stops mirroring and the volumes stay on their source.
    pub switched: bool,
    /// True when the job ended by handing its volumes over to another host.
    pub handed_off: bool,
    /// Why the job failed.
    pub error: Option<String>,
    pub elapsed_ms: u64,
    /// The job file that lets the job survive a restart.
    pub job_file: Option<std::path::PathBuf>,
    /// For an `interrupted` job: the daemon that ran it did not shut down cleanly, so the
    /// chunks written since the file's last rewrite are copied again.
    pub crashed: bool,
}

/// The result of a cutover.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CutoverReport {
    pub pause_us: u64,
    /// Bytes copied while the guest was held.
    pub drained_bytes: u64,
    /// See [`MigrationStatus::switched`].
    pub switched: bool,
    /// See [`MigrationStatus::handed_off`].
    pub handed_off: bool,
}
