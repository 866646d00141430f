//! What a replication group reads from its volumes itself, rather than from the guests'
//! writes: the initial copy (holes skipped), and the bitmap resyncs after a degradation
//! (`docs/replication.md`). A degradation during the initial copy marks what the copy has
//! not sent yet in the bitmap, so the first resync sends it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::replication::primary::{GroupSequencer, ResyncStep};
use ferry_engine::Volume;

/// The initial copy reads this much at a time.
const COPY_CHUNK_BYTES: u64 = 1 << 20;
/// A resync reads at most this much of consecutive marked chunks at a time.
const RESYNC_RUN_BYTES_MAX: u64 = 1 << 20;

/// The group's copy thread: the initial copy, then a resync each time the group degraded
/// and can catch up, until it stops.
pub fn copy_and_resync(sequencer: &GroupSequencer, volumes: &[Arc<Volume>]) {
    initial_copy(sequencer, volumes);
    let files: Vec<std::io::Result<File>> = volumes
        .iter()
        .map(|v| File::open(&v.backing().path))
        .collect();
    let mut pace = Pace::default();
    while sequencer.wait_resync() {
        loop {
            let read = |index: u32, offset: u64, len: usize| {
                let file = files
                    .get(index as usize)
                    .ok_or_else(|| std::io::Error::other("no such volume"))?
                    .as_ref()
                    .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            };
            match sequencer.resync_step(RESYNC_RUN_BYTES_MAX, read) {
                Ok(ResyncStep::Sent { bytes, .. }) => pace.after(sequencer, bytes),
                Ok(ResyncStep::Done | ResyncStep::Interrupted) => break,
                Err(e) => {
                    sequencer.degrade(format!("resync: reading a volume: {e}"));
                    break;
                }
            }
        }
    }
}

/// Keeps the copy thread within the group's speed limit (`set-speed`), read at each step so
/// a change applies at once.
#[derive(Default)]
struct Pace {
    since: Option<Instant>,
    bytes: u64,
    speed: Option<u64>,
}

impl Pace {
    /// Counts `bytes` read and sleeps until they are within the limit.
    fn after(&mut self, sequencer: &GroupSequencer, bytes: u64) {
        let speed = sequencer.copy_speed();
        if speed != self.speed || self.since.is_none() {
            *self = Pace {
                since: Some(Instant::now()),
                bytes: 0,
                speed,
            };
        }
        let (Some(speed), Some(since)) = (speed, self.since) else {
            return;
        };
        self.bytes += bytes;
        let due = Duration::from_secs_f64(self.bytes as f64 / speed as f64);
        // Short sleeps, so a new limit (or a stop) is seen within 100 ms.
        while since.elapsed() < due
            && sequencer.copy_speed() == self.speed
            && !sequencer.is_stopped()
        {
            std::thread::sleep((due - since.elapsed()).min(Duration::from_millis(100)));
        }
    }
}

/// Copies every volume's data (holes skipped) as records. Once the group degrades (or the
/// copy fails), the data not copied yet is marked in the bitmap instead, for the first
/// resync.
fn initial_copy(sequencer: &GroupSequencer, volumes: &[Arc<Volume>]) {
    let total: u64 = volumes.iter().map(|v| v.size_bytes()).sum();
    sequencer.set_copy_progress(true, total);
    let mut copying = true;
    let mut pace = Pace::default();
    for (index, volume) in volumes.iter().enumerate() {
        let path = volume.backing().path.clone();
        let size = volume.size_bytes();
        let copied = copy_volume(
            sequencer,
            index as u32,
            &path,
            size,
            &mut copying,
            &mut pace,
        );
        if let Err(e) = copied {
            sequencer.degrade(format!("initial copy of {}: {e}", volume.name()));
            // What is left of it is sent whole by the resync (which may read it then).
            sequencer.mark_changed(index as u32, 0, size);
            copying = false;
        }
        if sequencer.is_stopped() {
            break;
        }
    }
    sequencer.set_copy_progress(false, total);
}

/// Copies a volume's data extents as records while `copying`; once the group no longer takes
/// them (degraded), marks the rest changed and clears `copying`.
fn copy_volume(
    sequencer: &GroupSequencer,
    index: u32,
    path: &Path,
    size: u64,
    copying: &mut bool,
    pace: &mut Pace,
) -> std::io::Result<()> {
    let file = File::open(path)?;
    let mut at = 0u64;
    while at < size {
        let Some((data, hole)) = data_extent(&file, at, size)? else {
            return Ok(());
        };
        let mut offset = data;
        while offset < hole && *copying {
            let len = (hole - offset).min(COPY_CHUNK_BYTES) as usize;
            let read = || {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            };
            if !sequencer.push_copy(index, offset, read)? {
                *copying = false;
                break;
            }
            offset += len as u64;
            pace.after(sequencer, len as u64);
        }
        if offset < hole {
            sequencer.mark_changed(index, offset, hole - offset);
        }
        at = hole;
    }
    Ok(())
}

/// The next extent holding data at or after `from`: (its start, the hole after it).
fn data_extent(file: &File, from: u64, size: u64) -> std::io::Result<Option<(u64, u64)>> {
    let seek = |whence| {
        // SAFETY: lseek reads its integer arguments; the descriptor belongs to `file`,
        // alive for the call.
        let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
        if at < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(at as u64)
        }
    };
    let data = match seek(libc::SEEK_DATA) {
        Ok(at) => at,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) => return Err(e),
    };
    if data >= size {
        return Ok(None);
    }
    let hole = {
        // SAFETY: as above.
        let at = unsafe { libc::lseek(file.as_raw_fd(), data as libc::off_t, libc::SEEK_HOLE) };
        if at < 0 {
            size
        } else {
            (at as u64).min(size)
        }
    };
    Ok(Some((data, hole)))
}
