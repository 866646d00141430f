//! Every backend kind the suite runs over, each a fixture (set-up, the volume, a post-check,
//! tear-down) in its own module.

pub mod file;
pub mod journal;
pub mod mirror;
pub mod nbd;

use anyhow::Result;
use ferry_engine::mirror::MirrorMode;
use ferry_engine::CacheMode;

use crate::fixture::{Access, Fixture};

/// One backend kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    File(file::Place, CacheMode),
    Journal(journal::Kind),
    Mirror(MirrorMode),
    Nbd(nbd::Server),
}

impl Backend {
    /// A fresh volume of [`VOLUME_BYTES`](crate::fixture::VOLUME_BYTES) full of
    /// [`FILL_BYTE`](crate::fixture::FILL_BYTE) on this backend; `None` when a prerequisite
    /// is missing (the test then skips, or fails under `FERRY_REQUIRE_ALL`).
    pub fn open(self, access: Access) -> Result<Option<Fixture>> {
        match self {
            Self::File(place, cache) => file::open(place, cache, access),
            Self::Journal(kind) => journal::open(kind, access),
            Self::Mirror(mode) => mirror::open(mode, access),
            Self::Nbd(server) => nbd::open(server, access),
        }
    }
}
