//! The `ferry` program's test harness: `ferry serve` and CLI runners, QEMU guests, libblkio
//! clients, the pattern writer and QMP, over the workspace's shared test support
//! (`ferry-test-support`, re-exported here so that a test has one import root; see
//! `test-support/README.md` for the layers).
//!
//! Each test file includes it with `#[path = "support/mod.rs"] mod support;`. Not every test
//! file uses every helper, so dead code is allowed here.
#![allow(dead_code)]

pub mod blkio_client;
pub mod ferry;
pub mod ferry_cli;
pub mod guest;
pub mod initramfs;
pub mod pattern_writer;
pub mod qmp;
pub mod two_hosts;

// Not every test file uses every re-export either.
#[allow(unused_imports)]
pub use ferry_test_support::{
    compare_bytes, compare_image, create_image, pattern, require_ok, scratch_dir, Rng,
};
#[allow(unused_imports)]
pub use ferry_test_support::{
    daemon, images, limits, loop_device, nbd, pki, require, vhost_user, wait,
};

/// The `ferry` binary built for this test run.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}
