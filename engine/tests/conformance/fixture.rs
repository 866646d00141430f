//! What a case runs against: one volume on one backend kind, the queue the case drives, and
//! what the backend runs beside the volume (a journal, a migration job, an NBD server, the
//! image's directory), checked after the case and torn down on drop.

use std::sync::Arc;

use anyhow::{ensure, Context as _, Result};
use ferry_engine::{BlockOp, Volume, VolumeQueue};

/// Every fixture's volume: large enough for the cases' ranges (up to 8 MiB in), small enough
/// that a backend's set-up and check stay quick.
pub const VOLUME_BYTES: u64 = 16 << 20;
/// What every byte of a fresh volume holds, so that zeroed ranges stand out.
pub const FILL_BYTE: u8 = 0xAA;

/// Request slots of a fixture's queue: more than any case keeps in flight.
const QUEUE_DEPTH: u32 = 256;
/// Iovecs per slot before it grows.
const QUEUE_SEGMENTS: usize = 16;
/// The pieces the post-check reads the volume back in (each one request).
const READ_BACK_PIECES: u64 = 16;

/// Whether a case's volume takes writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

impl Access {
    pub fn read_only(self) -> bool {
        self == Self::ReadOnly
    }
}

/// What a backend kind keeps beside its volume for the length of a case.
pub trait Beside {
    /// Runs once the case has passed, with `content`, what the volume reads back whole (every
    /// write the case made has completed; a flush has been made). Fails when the backend's
    /// own state disagrees: the image, the journal's restore, the migration's target.
    fn check_after(&mut self, io: &mut FixtureIo, content: &[u8]) -> Result<()>;
}

/// The volume and the queue a case drives.
pub struct FixtureIo {
    pub queue: VolumeQueue,
    pub volume: Arc<Volume>,
}

impl FixtureIo {
    /// A queue (index 0) on `volume`.
    pub fn new(volume: Arc<Volume>) -> Result<Self> {
        let queue = VolumeQueue::new(volume.clone(), 0, QUEUE_DEPTH, QUEUE_SEGMENTS)
            .context("create the volume's queue")?;
        Ok(Self { queue, volume })
    }

    /// Flushes, then reads the whole volume back through the queue.
    pub fn flush_and_read_all(&mut self) -> Result<Vec<u8>> {
        let flushed = ferry_engine::testing::run_op(&mut self.queue, BlockOp::Flush);
        ensure!(flushed == Ok(0), "the flush after the case: {flushed:?}");
        let size = self.volume.size_bytes();
        let mut content = vec![0u8; size as usize];
        let piece = size.div_ceil(READ_BACK_PIECES) as usize;
        for (i, chunk) in content.chunks_mut(piece).enumerate() {
            let offset_bytes = (i * piece) as u64;
            let read = ferry_engine::testing::read_at(&mut self.queue, offset_bytes, chunk);
            ensure!(
                read == Ok(chunk.len() as u64),
                "reading the volume back at {offset_bytes}: {read:?}"
            );
        }
        Ok(content)
    }
}

/// A volume on a backend, ready for a case.
pub struct Fixture {
    io: FixtureIo,
    /// Dropped after the queue: a server outlives the connections to it, a journal and a
    /// migration job the volume they observe.
    beside: Box<dyn Beside>,
}

impl Fixture {
    pub fn new(io: FixtureIo, beside: impl Beside + 'static) -> Self {
        Self {
            io,
            beside: Box::new(beside),
        }
    }

    /// The queue the case drives.
    pub fn queue(&mut self) -> &mut VolumeQueue {
        &mut self.io.queue
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.io.volume
    }

    /// The post-check: nothing is left in flight, the volume reads back whole, and the
    /// backend agrees with what it reads.
    pub fn check_after(&mut self) -> Result<()> {
        let inflight = self.io.queue.inflight();
        ensure!(inflight == 0, "the case left {inflight} requests in flight");
        let content = self.io.flush_and_read_all()?;
        self.beside.check_after(&mut self.io, &content)
    }
}
