//! ferry's userspace storage engine: volumes and the io_uring data path under them.
//!
//! The engine knows nothing of virtio or vhost-user. A front end (the `ferry-vhost`
//! crate, or a benchmark) opens [`Volume`]s, creates one [`VolumeQueue`] per
//! worker thread, and submits byte-range block operations ([`BlockOp`]) tagged
//! with its own `u64`; completions come back carrying that tag.
//!
//! See `engine/ARCHITECTURE.md` for the parts and what each must not know.

pub mod confine;
pub mod error;
pub mod iovec;
pub mod journal;
pub mod mirror;
pub mod nbd;
pub mod observer;
pub mod peer;
pub mod poll_window;
pub mod reactor;
pub mod replication;
pub mod tls;
pub mod units;
pub mod volume;

#[cfg(any(test, feature = "test-support"))]
pub mod testing;

pub use error::{EngineError, IoFailure};
pub use iovec::IovecArray;
pub use observer::{LegTarget, Observed, ObserverTicket, WriteEvent, WriteKind, WriteObserver};
pub use volume::queue::{BlockOp, Completion, VolumeQueue};
pub use volume::stats::VolumeStats;
pub use volume::{CacheMode, Volume, VolumeConfig};

/// The sector size that offsets and lengths of block devices are counted in (virtio-blk,
/// the Linux block layer and NBD all use 512 bytes).
pub const SECTOR_SIZE: u64 = 512;
