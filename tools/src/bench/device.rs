//! Connects to a vhost-user-blk backend through libblkio: queues, queue size and mapped buffers.

use anyhow::{bail, Context};
use blkio::{Blkio, Blkioq, MemoryRegion};

/// libblkio's virtio-blk driver puts each request in 3 descriptors (header, data, status) and
/// uses no indirect descriptors, so a queue of depth `qd` needs `3 * qd` ring slots.
pub const DESCRIPTORS_PER_REQUEST: usize = 3;
/// libblkio's own default ring size; never go below it.
pub const QUEUE_SIZE_MIN: u32 = 256;
/// The largest ring QEMU's backends (libvhost-user, `VIRTQUEUE_MAX_SIZE`) accept.
pub const QUEUE_SIZE_DEFAULT_MAX: u32 = 1024;

/// How to set up the connection.
pub struct DeviceConfig<'a> {
    pub socket: &'a std::path::Path,
    pub queues: usize,
    pub poll: bool,
    pub queue_size: u32,
    pub buffer_bytes: usize,
}

/// A started libblkio instance with its queues and one mapped buffer region.
pub struct Device {
    /// Kept alive for as long as the queues run.
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub capacity_bytes: u64,
    pub region: MemoryRegion,
}

/// The ring size for `queue_depth`: a power of two holding every descriptor, at least
/// [`QUEUE_SIZE_MIN`], at most `max` (above it, libblkio backlogs requests in the client).
pub fn queue_size_for(queue_depth: usize, max: u32) -> u32 {
    let needed = (queue_depth * DESCRIPTORS_PER_REQUEST).next_power_of_two();
    let needed = u32::try_from(needed).unwrap_or(u32::MAX);
    needed.max(QUEUE_SIZE_MIN).min(max)
}

/// Asks libblkio for the device size before start (needs only a connection).
pub fn open(cfg: &DeviceConfig<'_>) -> anyhow::Result<Device> {
    let mut b = Blkio::new("virtio-blk-vhost-user").context("creating the libblkio instance")?;
    let path = cfg.socket.to_str().context("socket path is not UTF-8")?;
    b.set_str("path", path).context("setting path")?;
    b.connect()
        .with_context(|| format!("connecting to vhost-user socket {}", cfg.socket.display()))?;
    let capacity_bytes = b.get_u64("capacity").context("reading capacity")?;
    let max_queues = b.get_i32("max-queues").context("reading max-queues")?;
    if cfg.queues > usize::try_from(max_queues).unwrap_or(0) {
        bail!(
            "{} queues requested, the backend offers {max_queues}",
            cfg.queues
        );
    }
    let queue_size = i32::try_from(cfg.queue_size).context("queue size")?;
    b.set_i32("queue-size", queue_size)
        .context("setting queue-size")?;
    let n = i32::try_from(cfg.queues).context("queue count")?;
    let (regular, poll) = if cfg.poll { (0, n) } else { (n, 0) };
    b.set_i32("num-queues", regular)
        .context("setting num-queues")?;
    b.set_i32("num-poll-queues", poll)
        .context("setting num-poll-queues")?;
    let started = b
        .start()
        .context("starting the device (is queue-size too large?)")?;
    let queues = if cfg.poll {
        started.poll_queues
    } else {
        started.queues
    };
    let region = map_buffers(&mut b, cfg.buffer_bytes)?;
    Ok(Device {
        blkio: b,
        queues,
        capacity_bytes,
        region,
    })
}

/// Allocates and maps the buffer memory shared with the backend, filled with a non-zero pattern.
fn map_buffers(b: &mut Blkio, bytes: usize) -> anyhow::Result<MemoryRegion> {
    let align = b
        .get_u64("mem-region-alignment")
        .context("reading mem-region-alignment")?;
    let align = usize::try_from(align.max(1)).context("mem-region-alignment")?;
    let len = bytes.div_ceil(align) * align;
    let region = b
        .alloc_mem_region(len)
        .context("allocating buffer memory")?;
    b.map_mem_region(&region).context("mapping buffer memory")?;
    // SAFETY: the region is `len` bytes of fresh, writable, exclusively owned memory.
    let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = (i % 251) as u8 | 1;
    }
    Ok(region)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_size_fits_three_descriptors_per_request() {
        assert_eq!(queue_size_for(1, 1024), 256);
        assert_eq!(queue_size_for(32, 1024), 256);
        assert_eq!(queue_size_for(128, 1024), 512);
        assert_eq!(queue_size_for(341, 1024), 1024);
        assert_eq!(queue_size_for(512, 1024), 1024);
        assert_eq!(queue_size_for(512, 4096), 2048);
    }
}
