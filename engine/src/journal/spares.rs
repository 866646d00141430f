//! Pre-formatted spare media: zero-filled files of exactly a medium's capacity, kept in the
//! journal directory (`spare-<k>.fjs`) so the writer can take one (rename it to the next
//! medium's name) and overwrite it in place instead of growing a fresh file. A background
//! formatter thread refills the spares while the journal runs, at idle CPU and I/O priority
//! so that it only uses time the guest's I/O leaves over; `ferry journal format` creates
//! them up front.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::catalog::sync_dir;
use super::commit_ring::write_all_vectored_at;
use super::direct::{apply_cache_mode, StagingBuffer};
use super::error::JournalError;
use super::format::BLOCK_BYTES;
use super::options::MediumCache;
use crate::confine::{self, Allowlist};

/// The spare formatter lowers its own priority, then creates, writes, flushes and renames
/// media files in the journal directory.
const FORMATTER_SYSCALLS: Allowlist = Allowlist {
    kind: "journal-formatter",
    groups: &[confine::RUNTIME, confine::FILE_IO, confine::FILE_PATHS],
    extra: &[libc::SYS_sched_setscheduler, libc::SYS_ioprio_set],
};

/// Bytes of zeros per `pwrite` while formatting.
pub const FORMAT_CHUNK_BYTES: usize = 1 << 20;
/// How long the formatter sleeps before looking at the directory again when not woken.
const FORMATTER_POLL: Duration = Duration::from_secs(1);
/// The highest spare number tried when looking for a free name.
const SPARE_NAMES_MAX: u32 = 100_000;

/// The file name of spare `k`.
pub fn spare_file_name(k: u32) -> String {
    format!("spare-{k}.fjs")
}

fn parse_spare_file_name(name: &str) -> Option<u32> {
    name.strip_prefix("spare-")?
        .strip_suffix(".fjs")?
        .parse()
        .ok()
}

/// The finished spares in `dir` of exactly `capacity_bytes`, sorted by number.
pub fn list_spares(dir: &Path, capacity_bytes: u64) -> Result<Vec<PathBuf>, JournalError> {
    let entries = std::fs::read_dir(dir).map_err(|source| JournalError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut spares = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(k) = name.to_str().and_then(parse_spare_file_name) else {
            continue;
        };
        if entry.metadata().is_ok_and(|m| m.len() == capacity_bytes) {
            spares.push((k, entry.path()));
        }
    }
    spares.sort();
    Ok(spares.into_iter().map(|(_, p)| p).collect())
}

/// Formats one spare of `capacity_bytes` zeros in `dir` (written as `*.tmp`, made durable,
/// then renamed). `progress(done_bytes)` is called after every chunk; `stop` aborts (the
/// temporary file is removed). Returns the spare's path, or `None` when stopped.
pub fn format_spare(
    dir: &Path,
    capacity_bytes: u64,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(u64),
) -> Result<Option<PathBuf>, JournalError> {
    let k = (0..SPARE_NAMES_MAX)
        .find(|k| {
            let name = spare_file_name(*k);
            !dir.join(&name).exists() && !dir.join(format!("{name}.tmp")).exists()
        })
        .ok_or_else(|| JournalError::Invalid("no free spare file name".into()))?;
    let path = dir.join(spare_file_name(k));
    let tmp = dir.join(format!("{}.tmp", spare_file_name(k)));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|source| spare_err(&tmp, "create", source))?;
    // Zeros bypass the page cache where media do (`cache=auto`): a disk's cache is not
    // filled with a gigabyte of them.
    let direct = capacity_bytes.is_multiple_of(BLOCK_BYTES as u64)
        && apply_cache_mode(&file, MediumCache::Auto).unwrap_or(false);
    let mut staging = StagingBuffer::default();
    let unaligned_zeros;
    let zeros: &[u8] = if direct {
        staging.fill(&[&[0u8; FORMAT_CHUNK_BYTES]])
    } else {
        unaligned_zeros = vec![0u8; FORMAT_CHUNK_BYTES];
        &unaligned_zeros
    };
    let mut done = 0u64;
    while done < capacity_bytes {
        if stop.load(Ordering::Relaxed) {
            drop(file);
            let _ = std::fs::remove_file(&tmp);
            return Ok(None);
        }
        let n = (capacity_bytes - done).min(FORMAT_CHUNK_BYTES as u64) as usize;
        write_all_vectored_at(&file, &[&zeros[..n]], done)
            .map_err(|source| spare_err(&tmp, "write zeros", source))?;
        done += n as u64;
        progress(done);
    }
    file.sync_data()
        .map_err(|source| spare_err(&tmp, "sync", source))?;
    std::fs::rename(&tmp, &path).map_err(|source| spare_err(&tmp, "rename", source))?;
    sync_dir(dir).map_err(|source| spare_err(dir, "sync directory", source))?;
    Ok(Some(path))
}

/// Removes leftover `spare-*.fjs.tmp` files (an interrupted format).
pub fn remove_stale_tmps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let stale = name
            .to_str()
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(parse_spare_file_name)
            .is_some();
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn spare_err(path: &Path, step: &'static str, source: std::io::Error) -> JournalError {
    JournalError::Medium {
        path: path.to_path_buf(),
        step,
        source,
    }
}

struct FormatterShared {
    stop: AtomicBool,
    wake: Mutex<bool>,
    cond: Condvar,
}

/// The background thread keeping `spares_max` spares formatted. Stopped (and joined) on drop.
pub struct SpareFormatter {
    shared: Arc<FormatterShared>,
    thread: Option<JoinHandle<()>>,
}

impl SpareFormatter {
    pub fn start(dir: PathBuf, capacity_bytes: u64, spares_max: u32) -> Result<Self, JournalError> {
        let shared = Arc::new(FormatterShared {
            stop: AtomicBool::new(false),
            wake: Mutex::new(false),
            cond: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-journal-fmt".into())
            .spawn(move || {
                confine::enter(&FORMATTER_SYSCALLS);
                formatter_main(&s, &dir, capacity_bytes, spares_max)
            })
            .map_err(JournalError::Thread)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Tells the formatter a spare was taken.
    pub fn wake(&self) {
        let mut w = self.shared.wake.lock().unwrap_or_else(|p| p.into_inner());
        *w = true;
        self.shared.cond.notify_one();
    }
}

impl Drop for SpareFormatter {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn formatter_main(shared: &FormatterShared, dir: &Path, capacity_bytes: u64, spares_max: u32) {
    lower_priority_to_idle();
    remove_stale_tmps(dir);
    while !shared.stop.load(Ordering::Relaxed) {
        let present = list_spares(dir, capacity_bytes).map_or(usize::MAX, |s| s.len());
        if present < spares_max as usize {
            if let Err(e) = format_spare(dir, capacity_bytes, &shared.stop, &mut |_| {}) {
                log::warn!("journal: cannot format a spare medium: {e}");
            } else {
                continue;
            }
        }
        let mut w = shared.wake.lock().unwrap_or_else(|p| p.into_inner());
        if !*w && !shared.stop.load(Ordering::Relaxed) {
            w = shared
                .cond
                .wait_timeout(w, FORMATTER_POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
        *w = false;
    }
}

/// Puts the calling thread in the idle scheduling class (`SCHED_IDLE`: it runs only when a
/// CPU has nothing else to do) and the idle I/O priority class. Best effort: a refusal is
/// logged and the thread formats at normal priority.
fn lower_priority_to_idle() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(2) on the calling thread (pid 0) with a valid parameter.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        log::warn!(
            "journal: spare formatter keeps normal CPU priority: {}",
            std::io::Error::last_os_error()
        );
    }
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: u32 = 13;
    // SAFETY: ioprio_set(2) on the calling thread (who = 0); takes no pointers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if rc != 0 {
        log::debug!(
            "journal: spare formatter keeps its I/O priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// What [`format_spares`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FormatReport {
    pub dir: PathBuf,
    pub capacity_bytes: u64,
    /// Spares of this capacity present when done.
    pub spares: usize,
    /// Spares created by this call.
    pub created: usize,
    pub bytes_written: u64,
}

/// Formats spares in `dir` (created when missing) until `count` of `capacity_bytes` exist.
/// `progress(done_bytes, total_bytes)` follows the writing.
pub fn format_spares(
    dir: &Path,
    count: u32,
    capacity_bytes: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<FormatReport, JournalError> {
    std::fs::create_dir_all(dir).map_err(|source| JournalError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    remove_stale_tmps(dir);
    let present = list_spares(dir, capacity_bytes)?.len();
    let missing = (count as usize).saturating_sub(present);
    let total = missing as u64 * capacity_bytes;
    let stop = AtomicBool::new(false);
    let mut written = 0u64;
    for _ in 0..missing {
        let base = written;
        format_spare(dir, capacity_bytes, &stop, &mut |done| {
            progress(base + done, total)
        })?;
        written += capacity_bytes;
    }
    Ok(FormatReport {
        dir: dir.to_path_buf(),
        capacity_bytes,
        spares: present + missing,
        created: missing,
        bytes_written: written,
    })
}
