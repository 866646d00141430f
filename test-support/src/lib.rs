//! Test support shared by every crate of the workspace: the engine's unit and integration
//! tests, vhost's and the `ferry` program's. What each module is for, and where the helpers
//! that need the engine or the `ferry` binary live, is in `README.md` beside this crate.

pub mod daemon;
pub mod images;
pub mod limits;
pub mod loop_device;
pub mod nbd;
pub mod netns;
pub mod pki;
pub mod require;
pub mod rng;
pub mod vhost_user;
pub mod wait;

pub use images::{compare_bytes, compare_image, create_image, scratch_dir};
pub use require::{command_available, require, require_ok};
pub use rng::{pattern, Rng};
pub use wait::{wait_until, HANG_TIMEOUT};
