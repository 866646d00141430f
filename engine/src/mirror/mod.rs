//! Live migration of running volumes to a file, block device or NBD export, the operator's
//! *target*.
//!
//! A [`MigrationJob`] copies every allocated range of its volumes to the target in the
//! background ([`copier`]) while it mirrors the guest's writes through the volume's
//! [`WriteObserver`](crate::WriteObserver) hook ([`observer`]); the per-chunk state in
//! [`dirty_bitmap`] keeps copies from overwriting newer guest data. The target is a
//! [`Destination`] ([`destination`]: a file or an NBD export). When the target is in
//! sync the job is `ready`, and [`MigrationJob::cutover`] ([`cutover`]) switches the volumes
//! over under a short pause. Several volumes can be merged into one target ([`layout`]).
//! A job keeps a file beside its first volume's image ([`persist`]) so that it survives a
//! restart of the daemon, crash or not, and resumes where it was.
//! The control socket holds a [`MigrationRegistry`]. `docs/migration.md` has the design.

pub mod copier;
pub mod cutover;
pub mod destination;
pub mod dirty_bitmap;
pub mod error;
pub mod job;
pub mod layout;
pub mod observer;
pub mod opening;
pub mod options;
pub mod persist;
pub mod registry;
pub mod status;
pub mod supervisor;
mod syscalls;
pub mod throttle;

#[cfg(test)]
mod tests;

pub use destination::{Destination, DestinationError, DestinationSpec};
pub use error::MigrationError;
pub use job::MigrationJob;
pub use layout::{Layout, Placement};
pub use options::{MigrationOptions, MirrorMode};
pub use persist::tracker::InterruptedJob;
pub use registry::MigrationRegistry;
pub use status::{CutoverReport, MigrationState, MigrationStatus, VolumeMigrationStatus};
