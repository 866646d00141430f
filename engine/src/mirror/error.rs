//! Why a migration could not start, cut over or be cancelled. The guest is untouched by all of them.

use super::destination::DestinationError;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("volume {volume:?} has an interrupted migration ({path}): resume or discard it first")]
    InterruptedJobExists {
        volume: String,
        path: std::path::PathBuf,
    },
    #[error(transparent)]
    Persist(#[from] super::persist::PersistError),
    #[error(transparent)]
    Recover(#[from] super::persist::tracker::RecoverError),
    #[error("volume {volume:?}: the interrupted migration cannot be resumed: {reason}")]
    BrokenJobFile { volume: String, reason: String },
    #[error("no interrupted migration job{0}")]
    NoInterruptedJob(String),
    #[error("no volume to migrate")]
    NoVolumes,
    #[error("unknown volume {0:?}")]
    UnknownVolume(String),
    #[error("volume {0:?} is named twice")]
    DuplicateVolume(String),
    #[error("volume {volume:?} is already migrating (job {job_id})")]
    AlreadyMigrating { volume: String, job_id: u64 },
    #[error("bad migration options: {0}")]
    BadOptions(String),
    #[error(transparent)]
    Destination(#[from] DestinationError),
    #[error("target {target} has {size_bytes} bytes, but {needed_bytes} are needed")]
    DestinationTooSmall {
        target: String,
        size_bytes: u64,
        needed_bytes: u64,
    },
    #[error("target {target} is the image of volume {volume:?} itself")]
    DestinationIsSource { target: String, volume: String },
    #[error("volume {volume:?}: cannot look at the source image: {source}")]
    Source {
        volume: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Layout(#[from] super::layout::LayoutError),
    #[error("cannot start a migration thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("volume {volume:?}: guest I/O did not drain within {timeout_ms} ms")]
    PauseTimeout { volume: String, timeout_ms: u64 },
    #[error("the last dirty chunks were not copied within {timeout_ms} ms")]
    DrainTimeout { timeout_ms: u64 },
    #[error("cannot cut over: the job is {state}, not ready")]
    NotReady { state: String },
    #[error("the job has already ended ({state})")]
    Ended { state: String },
    #[error("the job failed: {reason}")]
    Failed { reason: String },
    #[error("volume {volume:?}: cannot open the target as its new image: {source}")]
    OpenNewBacking {
        volume: String,
        #[source]
        source: crate::EngineError,
    },
    #[error("job {job} moves its volumes to another host: it ends by its hand-off, not a cutover")]
    HandOffOnly { job: u64 },
    #[error("job {job} cuts over: it has no hand-off")]
    NoHandOff { job: u64 },
    #[error("unknown migration job {0}")]
    UnknownJob(u64),
}
