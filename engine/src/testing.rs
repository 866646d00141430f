//! Test helpers that need the engine's types: one request submitted on a [`VolumeQueue`] and
//! waited for. Built for the engine's own unit tests and, with the `test-support` feature,
//! for integration tests (the engine's and the `ferry` program's); never in the daemon.
//! Everything that does not need the engine is in the `ferry-test-support` crate.

use std::time::Duration;

use crate::volume::queue::{BlockOp, VolumeQueue};
use crate::IoFailure;

/// Bound on one request in a test: only a hang reaches it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The tag of the request [`run_op`] submits.
const TAG: u64 = u64::MAX;

/// Submits `op` on `queue`, commits it and waits for its completion; returns its result.
/// A refused submission (queue full or paused) is `Err(IoFailure::Busy)`, a failed commit
/// `Err(IoFailure::Os(errno))`. The iovecs of `op` must point to memory that lives across
/// this call, which returns only once the request completed.
///
/// # Panics
/// When the request has not completed within [`REQUEST_TIMEOUT`] (the engine hangs).
pub fn run_op(queue: &mut VolumeQueue, op: BlockOp<'_>) -> Result<u64, IoFailure> {
    // SAFETY: the memory behind `op`'s iovecs outlives this call (the caller's contract), and
    // this call returns only after the request completed (or panics on a hang, failing the
    // test).
    if unsafe { queue.submit(op, TAG) }.is_err() {
        return Err(IoFailure::Busy);
    }
    if let Err(e) = queue.commit() {
        return Err(IoFailure::Os(e.raw_os_error().unwrap_or(libc::EIO)));
    }
    let mut done = Vec::new();
    assert!(
        queue.drain(&mut done, REQUEST_TIMEOUT),
        "a request did not complete within {REQUEST_TIMEOUT:?}"
    );
    match done.iter().find(|c| c.tag == TAG) {
        Some(completion) => completion.result,
        None => panic!("the queue drained without completing the request"),
    }
}

/// Writes `data` at `offset_bytes` through `queue`; see [`run_op`].
pub fn write_at(queue: &mut VolumeQueue, offset_bytes: u64, data: &[u8]) -> Result<u64, IoFailure> {
    let iovecs = [libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    }];
    run_op(
        queue,
        BlockOp::Write {
            offset_bytes,
            iovecs: &iovecs,
        },
    )
}

/// Reads `buf.len()` bytes at `offset_bytes` through `queue` into `buf`; see [`run_op`].
pub fn read_at(
    queue: &mut VolumeQueue,
    offset_bytes: u64,
    buf: &mut [u8],
) -> Result<u64, IoFailure> {
    let iovecs = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    run_op(
        queue,
        BlockOp::Read {
            offset_bytes,
            iovecs: &iovecs,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Volume, VolumeConfig};

    #[test]
    fn a_write_reads_back_and_a_full_queue_is_busy() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let volume = Volume::open(VolumeConfig {
            name: "v".into(),
            path: dir.path().join("v.img"),
            size_bytes: Some(1 << 20),
            ..Default::default()
        })?;
        let mut queue = VolumeQueue::new(volume, 0, 1, 1)?;
        assert_eq!(write_at(&mut queue, 4096, &[7; 4096]), Ok(4096));
        let mut back = [0u8; 4096];
        assert_eq!(read_at(&mut queue, 4096, &mut back), Ok(4096));
        assert_eq!(back, [7; 4096]);
        assert_eq!(run_op(&mut queue, BlockOp::Flush), Ok(0));
        // SAFETY: a flush has no buffers.
        unsafe { queue.submit(BlockOp::Flush, 1) }.map_err(|e| format!("{e:?}"))?;
        assert_eq!(run_op(&mut queue, BlockOp::Flush), Err(IoFailure::Busy));
        Ok(())
    }
}
