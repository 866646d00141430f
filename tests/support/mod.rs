//! Shared harness for ferry's integration tests: real clients and reference backends.
//!
//! Each test file includes it with `#[path = "support/mod.rs"] mod support;`. Not every test
//! file uses every helper, so dead code is allowed here.
#![allow(dead_code)]

pub mod blkio_client;
pub mod daemon;
pub mod ferry;
pub mod ferry_cli;
pub mod guest;
pub mod initramfs;
pub mod nbd;
pub mod pattern_writer;
pub mod qmp;

use std::path::PathBuf;

/// The `ferry` binary built for this test run.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// A fresh temporary directory for sockets and images; short path (unix socket limit: 108 bytes).
pub fn scratch_dir() -> anyhow::Result<tempfile::TempDir> {
    use anyhow::Context as _;
    tempfile::Builder::new()
        .prefix("ferry-test-")
        .tempdir_in("/tmp")
        .context("create scratch dir in /tmp")
}

/// Creates a sparse raw image of `len_bytes` at `path`.
pub fn create_image(path: &std::path::Path, len_bytes: u64) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(len_bytes)
        .with_context(|| format!("truncate {} to {len_bytes}", path.display()))?;
    Ok(path.to_path_buf())
}

/// A deterministic byte pattern: byte `i` of the stream seeded with `seed`.
pub fn pattern(seed: u64, len_bytes: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len_bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}
