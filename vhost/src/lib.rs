//! ferry's vhost-user-blk device: parses virtio-blk requests from guest memory and hands
//! them to the engine as byte-range block operations.
//!
//! - [`request`]: descriptor chain -> request (all guest input validated here), and the
//!   one action for it ([`request::action`]): submit an engine operation, or answer now.
//! - [`config`]: feature bits and the virtio-blk configuration space.
//! - [`dirty_log`]: dirty-page logging for the frontend's live migration of the VM.
//! - [`gate`]: whether a volume's device may take requests (the hand-off of a move to
//!   another host).
//! - [`queue_worker`]: the per-thread loop between virtqueues and the engine.
//! - [`guest_warnings`]: the rate limit on warnings a guest can cause.
//! - [`backend`]: the `VhostUserBackend` implementation routing events to workers.
//! - [`server`]: the socket, one frontend connection after another, until stopped.
//!
//! Nothing here touches io_uring: that is the engine's job.

pub mod backend;
pub mod config;
pub mod dirty_log;
pub mod gate;
pub mod guest_warnings;
pub mod queue_worker;
pub mod request;
mod seccomp;
pub mod server;

pub use backend::{check_settings, BlockDevice, DeviceSettings};
pub use gate::{DeviceGate, GateEvents, StopCause};
pub use server::{bind_socket, serve_volume, BindError, ConnectionState, ServeStop, Serving};
