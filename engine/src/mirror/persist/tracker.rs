//! A job interrupted by a daemon restart, found at start-up by its job file: until an
//! operator resumes it (`MigrationJob::resume`) or discards it, every guest write to its
//! volumes is tracked as in a `background` job (marked dirty and armed in the job file),
//! so that the resume also copies what the guest wrote in between, and a second crash
//! loses nothing either.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::format::JobFile;
use super::{JobMeta, JobPersist, PersistError};
use crate::mirror::dirty_bitmap::ChunkTable;
use crate::observer::{Observed, ObserverTicket, WriteEvent, WriteKind, WriteObserver};
use crate::volume::Volume;

/// Why an interrupted job cannot be taken up again.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error(
        "job file {path}: volume {volume:?} of the interrupted job is not served by this daemon"
    )]
    MissingVolume { path: String, volume: String },
    #[error("job file {path}: volume {volume:?} has {size_bytes} bytes, the job recorded {recorded_bytes}")]
    SizeChanged {
        path: String,
        volume: String,
        size_bytes: u64,
        recorded_bytes: u64,
    },
    #[error("cannot start the job file's thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// An interrupted job and the tracking of its volumes' writes.
pub struct InterruptedJob {
    pub id: u64,
    /// The daemon that ran the job did not shut down cleanly.
    pub crashed: bool,
    pub speed_bytes_per_s: u64,
    pub persist: Arc<JobPersist>,
    pub volumes: Vec<Arc<Volume>>,
    pub tables: Vec<Arc<Mutex<ChunkTable>>>,
    /// Bytes to copy as found at start-up (pending, plus what a crash may have left).
    pub uncopied_bytes: u64,
    observers: Mutex<Vec<Arc<dyn WriteObserver>>>,
    stop: Arc<AtomicBool>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    discarded: AtomicBool,
}

/// Ids of interrupted jobs, apart from those of running jobs (which start at 1).
static NEXT_ID: AtomicU64 = AtomicU64::new(1 << 32);

impl InterruptedJob {
    /// Takes up the job in `file` (read from `persist_path`) on `volumes` (looked up by
    /// name): rewrites the file at once (the chunks a crash may have left are dirty from
    /// now on), starts tracking writes and rewriting the file every `interval`.
    pub fn recover(
        persist_path: std::path::PathBuf,
        file: &JobFile,
        lookup: impl Fn(&str) -> Option<Arc<Volume>>,
        interval: Duration,
    ) -> Result<Arc<Self>, RecoverError> {
        let record = &file.record;
        let path = persist_path.display().to_string();
        let mut volumes = Vec::new();
        let mut tables = Vec::new();
        let mut uncopied_bytes = 0;
        for (index, v) in record.volumes.iter().enumerate() {
            let volume = lookup(&v.name).ok_or_else(|| RecoverError::MissingVolume {
                path: path.clone(),
                volume: v.name.clone(),
            })?;
            if volume.size_bytes() != v.length_bytes {
                return Err(RecoverError::SizeChanged {
                    path,
                    volume: v.name.clone(),
                    size_bytes: volume.size_bytes(),
                    recorded_bytes: v.length_bytes,
                });
            }
            let (table, bytes) = ChunkTable::from_words(
                v.length_bytes,
                record.granularity_bytes,
                &file.uncopied(index),
            );
            uncopied_bytes += bytes;
            volumes.push(volume);
            tables.push(Arc::new(Mutex::new(table)));
        }
        let meta = JobMeta {
            mode: record.mode,
            granularity_bytes: record.granularity_bytes,
            target: record.target.clone(),
            volumes: record
                .volumes
                .iter()
                .map(|v| (v.name.clone(), v.placement_offset_bytes, v.length_bytes))
                .collect(),
        };
        let persist = Arc::new(JobPersist::new(persist_path, meta, record.sequence));
        let job = Arc::new(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            crashed: record.in_use,
            speed_bytes_per_s: record.speed_bytes_per_s,
            persist,
            volumes,
            tables,
            uncopied_bytes,
            observers: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
            flusher: Mutex::new(None),
            discarded: AtomicBool::new(false),
        });
        job.write(false)?;
        job.attach();
        job.start_flusher(interval)?;
        Ok(job)
    }

    fn write(&self, last: bool) -> Result<(), PersistError> {
        let tables: Vec<&Mutex<ChunkTable>> = self.tables.iter().map(|t| t.as_ref()).collect();
        // Nothing is copied while the job waits: there is no target to flush.
        self.persist
            .write(&tables, self.speed_bytes_per_s, last, || Ok(()))
    }

    fn attach(&self) {
        let Ok(mut observers) = self.observers.lock() else {
            return;
        };
        for (index, volume) in self.volumes.iter().enumerate() {
            let observer: Arc<dyn WriteObserver> = Arc::new(Tracker {
                index,
                table: self.tables[index].clone(),
                persist: self.persist.clone(),
            });
            volume.add_observer(observer.clone());
            observers.push(observer);
        }
    }

    fn start_flusher(self: &Arc<Self>, interval: Duration) -> Result<(), RecoverError> {
        let job = Arc::downgrade(self);
        let stop = self.stop.clone();
        let handle = std::thread::Builder::new()
            .name("ferry-migrate-file".into())
            .spawn(move || {
                crate::confine::enter(&super::super::syscalls::JOB_FILE_SYSCALLS);
                while sleep_unless(&stop, interval) {
                    let Some(job) = job.upgrade() else { return };
                    if let Err(e) = job.write(false) {
                        log::error!("interrupted migration job {}: {e}", job.id);
                    }
                }
            })
            .map_err(RecoverError::Spawn)?;
        if let Ok(mut flusher) = self.flusher.lock() {
            *flusher = Some(handle);
        }
        Ok(())
    }

    /// Stops the file's thread (a resumed job has its own).
    pub fn stop_flusher(&self) {
        self.stop.store(true, Ordering::Release);
        let handle = self.flusher.lock().ok().and_then(|mut f| f.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    /// Detaches the tracking from volume `index` (the resumed job's mirror takes over, or
    /// the job is discarded).
    pub fn detach(&self, index: usize) {
        let observer = self
            .observers
            .lock()
            .ok()
            .and_then(|o| o.get(index).cloned());
        if let Some(observer) = observer {
            self.volumes[index].remove_observer(&observer);
        }
    }

    /// Clean shutdown (guest I/O held): writes the file for the last time, `in_use` clear.
    pub fn suspend(&self) -> Result<(), PersistError> {
        self.stop_flusher();
        self.write(true)
    }

    /// The operator gave the job up (or a resume failed half-way): stop tracking, remove
    /// the file.
    pub fn discard(&self) -> Result<(), PersistError> {
        self.discarded.store(true, Ordering::Release);
        self.stop_flusher();
        for index in 0..self.volumes.len() {
            self.detach(index);
        }
        self.persist.remove()
    }

    /// True once given up: it cannot be resumed any more.
    pub fn is_discarded(&self) -> bool {
        self.discarded.load(Ordering::Acquire)
    }

    /// Bytes still to copy now.
    pub fn pending_bytes(&self) -> u64 {
        self.tables
            .iter()
            .map(|t| t.lock().map(|t| t.pending_bytes()).unwrap_or(0))
            .sum()
    }
}

/// Sleeps `interval` in short steps; false once `stop` is set.
pub(crate) fn sleep_unless(stop: &AtomicBool, interval: Duration) -> bool {
    let until = Instant::now() + interval;
    while Instant::now() < until {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10).min(interval));
    }
    !stop.load(Ordering::Acquire)
}

/// The observer of one volume of an interrupted job.
struct Tracker {
    index: usize,
    table: Arc<Mutex<ChunkTable>>,
    persist: Arc<JobPersist>,
}

impl WriteObserver for Tracker {
    fn observe(&self, event: &WriteEvent<'_>, ticket: ObserverTicket) -> Observed {
        if event.kind == WriteKind::Flush {
            return Observed::Done(ticket);
        }
        let chunks = match self.table.lock() {
            Ok(mut t) => {
                t.begin_write(event.offset_bytes, event.len_bytes, true);
                let chunks = t.chunks_of(event.offset_bytes, event.len_bytes);
                (!t.is_armed(&chunks)).then_some(chunks)
            }
            Err(_) => None,
        };
        if let Some(chunks) = chunks {
            if let Err(e) = self.persist.arm(self.index, chunks, &self.table) {
                // The file can no longer name every written chunk: without it the job
                // starts over instead of resuming from a file that may miss one.
                log::error!("{e}; removing the job file: the migration must start over");
                if let Err(e) = self.persist.remove() {
                    log::error!("{e}");
                }
            }
        }
        Observed::Done(ticket)
    }

    fn source_done(&self, event: &WriteEvent<'_>) {
        if let Ok(mut t) = self.table.lock() {
            t.end_write(event.offset_bytes, event.len_bytes);
        }
    }
}

impl InterruptedJob {
    /// What `query-migrations` shows of the job until it is resumed.
    pub fn status(&self) -> crate::mirror::MigrationStatus {
        use crate::mirror::{layout::Placement, MigrationState, VolumeMigrationStatus};
        let meta = self.persist.meta();
        let volumes: Vec<VolumeMigrationStatus> = meta
            .volumes
            .iter()
            .zip(&self.tables)
            .map(|((name, offset, length), table)| VolumeMigrationStatus {
                placement: Placement {
                    name: name.clone(),
                    offset_bytes: *offset,
                    length_bytes: *length,
                },
                pending_bytes: table.lock().map(|t| t.pending_bytes()).unwrap_or(0),
            })
            .collect();
        let dirty_bytes = volumes.iter().map(|v| v.pending_bytes).sum();
        crate::mirror::MigrationStatus {
            id: self.id,
            state: MigrationState::Interrupted,
            mode: meta.mode,
            target: meta.target.clone(),
            target_block_sizes: None,
            volumes,
            total_bytes: dirty_bytes,
            copied_bytes: 0,
            dirty_bytes,
            mirrored_bytes: 0,
            rate_bytes_per_s: 0,
            eta_s: None,
            speed_limit_bytes_per_s: self.speed_bytes_per_s,
            converging: true,
            cutover_pause_us: None,
            switched: false,
            handed_off: false,
            error: None,
            elapsed_ms: 0,
            job_file: Some(self.persist.path().to_path_buf()),
            crashed: self.crashed,
        }
    }

    /// The names of the job's volumes.
    pub fn volume_names(&self) -> Vec<String> {
        self.volumes.iter().map(|v| v.name().to_string()).collect()
    }
}
