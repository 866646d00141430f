//! The medium writer: appends batches of encoded records to the current medium in whole
//! 4 KiB blocks (one vectored write linked to one `fdatasync` per batch, through io_uring:
//! group commit, see [`super::commit_ring`]; on a memory-backed medium, where io_uring would
//! only hand the copy to a kernel worker thread, with `pwritev` on the calling thread),
//! rotates to the next medium of the set when the current one would overflow, and seals
//! media with a trailer. Media are written with `O_DIRECT` where `cache=` allows (see
//! [`super::direct`]). The measurements behind these choices: `benches/journal-notes.md`,
//! *Appends: `pwritev` on tmpfs, io_uring elsewhere*.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::Arc;

use super::catalog::{sync_dir, Catalog, CatalogEntry, MediumState, RunRecord};
use super::commit_ring::{write_all_vectored_at, CommitRingState};
use super::device::device_spares;
use super::direct::{apply_cache_mode, clear_direct, StagingBuffer};
use super::entry::{now_ns, LogEntry};
use super::error::JournalError;
use super::format::{
    encode_record, encode_trailer_entry, padding_needed, padding_record, trailer_records_bytes,
    MediumHeader, Op, StopCause, StopInfo, BLOCK_BYTES, FLAG_TRAILER_CONTINUES, HEADER_BYTES,
    TRAILER_ENTRIES_PER_RECORD, TRAILER_ENTRY_BYTES,
};
use super::mapped::{MappedTail, MediumMapping, Prefaulter, TailParts};
use super::media::{list_media, medium_file_name};
use super::options::{JournalOptions, MediumCache, OnFull};
use super::prologue::{encode_prologue, unsequenced, Prologue};
use super::spares::{list_spares, SpareFormatter};
use crate::volume::open::is_memory_backed;

/// A record of a batch as the journal encoded it: where it starts in the batch and its
/// log entry (medium and position are filled in when it is written).
#[derive(Debug, Clone, Copy)]
pub struct PendingRecord {
    pub batch_offset: usize,
    pub entry: LogEntry,
}

/// Encodes the trailer records of a medium whose log is `entries` into `out`: one record
/// per [`TRAILER_ENTRIES_PER_RECORD`] entries, all but the last flagged
/// [`FLAG_TRAILER_CONTINUES`] (one empty record for an empty log). `payload` is scratch.
fn encode_trailer(out: &mut Vec<u8>, payload: &mut Vec<u8>, entries: &[LogEntry], last_seq: u64) {
    let parts = entries.len().div_ceil(TRAILER_ENTRIES_PER_RECORD).max(1);
    for k in 0..parts {
        let from = k * TRAILER_ENTRIES_PER_RECORD;
        let to = (from + TRAILER_ENTRIES_PER_RECORD).min(entries.len());
        payload.clear();
        payload.reserve((to - from) * TRAILER_ENTRY_BYTES);
        for e in entries.get(from..to).unwrap_or_default() {
            encode_trailer_entry(payload, e);
        }
        let mut header = unsequenced(Op::Trailer, last_seq, 0, 0);
        if k + 1 < parts {
            header.flags |= FLAG_TRAILER_CONTINUES;
        }
        encode_record(out, header, payload);
    }
}

/// Why a batch could not be written.
#[derive(Debug)]
pub enum WriteFailure {
    /// The last allowed medium is full.
    Full,
    Error(JournalError),
}

impl From<JournalError> for WriteFailure {
    fn from(e: JournalError) -> Self {
        WriteFailure::Error(e)
    }
}

impl std::fmt::Display for WriteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteFailure::Full => write!(f, "the last allowed medium is full"),
            WriteFailure::Error(e) => write!(f, "{e}"),
        }
    }
}

struct OpenMedium {
    index: u32,
    path: PathBuf,
    file: File,
    /// Opened with `O_DIRECT`: appends go through the aligned staging buffer.
    direct: bool,
    /// Bytes this medium may hold (a registered block device's size, else `capacity`).
    capacity_bytes: u64,
    /// A registered block device: sealing leaves its zeroed rest instead of truncating.
    is_device: bool,
    /// A file on tmpfs or ramfs: appends are plain `pwritev` on the calling thread.
    memory_backed: bool,
    position_bytes: u64,
    entries: Vec<LogEntry>,
    /// The shared mapping of a memory-backed medium, kept between lends of its tail.
    mapping: Option<Arc<MediumMapping>>,
}

/// Owns the medium being written.
pub struct MediumWriter {
    options: JournalOptions,
    journal_id: u64,
    next_index: u32,
    /// The valid end of the previous medium to record in the next medium header.
    prev_valid_end_bytes: u64,
    current: Option<OpenMedium>,
    catalog: Catalog,
    /// Refills spare media (started with the first medium when `options.spares > 0`).
    formatter: Option<SpareFormatter>,
    /// Media opened by taking a formatted spare.
    spares_taken: u64,
    /// Where direct appends are assembled.
    staging: StagingBuffer,
    /// The ring appends go through, made by the writer thread on its first append (if the
    /// kernel refuses io_uring, appends use `pwritev` + `fdatasync`).
    commit_ring: CommitRingState,
    /// Some append went to a memory-backed medium with `pwritev` (not through the ring).
    memory_appends: bool,
    /// The last sealed medium's entry list and trailer buffers, cleared, for the next
    /// medium to fill: memory the process already has instead of fresh pages per medium.
    reusable_entries: Vec<LogEntry>,
    trailer_payload: Vec<u8>,
    trailer_record: Vec<u8>,
    /// The open medium's tail is lent out (see [`MediumWriter::lend_tail`]).
    lent: bool,
    /// Some tail was lent: records go onto mapped media (`status` says `mapped`).
    mapped_appends: bool,
    /// The entry list of the last tail taken back, for the next one to fill.
    tail_entries: Vec<LogEntry>,
    /// Lending failed for this medium (no mapping, or no pages): not tried again on it.
    lending_refused: Option<u32>,
    /// Faults in pages ahead of lent tails (started with the first lend).
    prefaulter: Option<Arc<Prefaulter>>,
}

/// How the writer appends to its media (see [`MediumWriter::append_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppendPath {
    /// One vectored write linked to one `fdatasync` through io_uring.
    IoUring,
    /// `pwritev` + `fdatasync`: the kernel refused the writer an io_uring.
    Pwritev,
    /// Memory-backed media: `pwritev` on the committing thread (io_uring would hand the
    /// copy to a kernel worker and add two wake-ups).
    Memory,
    /// Memory-backed media: records encoded straight into a shared mapping of the medium by
    /// the threads that observe the writes (`mapped=`, see [`super::mapped`]).
    Mapped,
}

impl MediumWriter {
    pub fn new(
        options: JournalOptions,
        journal_id: u64,
        next_index: u32,
        prev_valid_end_bytes: u64,
        catalog: Catalog,
    ) -> Self {
        Self {
            options,
            journal_id,
            next_index,
            prev_valid_end_bytes,
            current: None,
            catalog,
            formatter: None,
            spares_taken: 0,
            staging: StagingBuffer::default(),
            commit_ring: CommitRingState::NotYet,
            memory_appends: false,
            reusable_entries: Vec::new(),
            trailer_payload: Vec::new(),
            trailer_record: Vec::new(),
            lent: false,
            mapped_appends: false,
            tail_entries: Vec::new(),
            lending_refused: None,
            prefaulter: None,
        }
    }

    /// Lends the end of the open medium to the observing threads when it can be mapped (a
    /// memory-backed file, `mapped=` on): the file is grown to its capacity first (sparse;
    /// the scan reads the zeros after the last record of a medium as long as its capacity
    /// as the end of data). `last_seq` is the last sequence number assigned. The writer must
    /// not touch the medium until [`MediumWriter::reclaim_tail`].
    pub fn lend_tail(&mut self, last_seq: u64) -> Option<MappedTail> {
        let m = self.current.as_mut()?;
        let lendable = self.options.maps_media() && m.memory_backed && !m.direct && !m.is_device;
        if !lendable || self.lent || self.lending_refused == Some(m.index) {
            return None;
        }
        let mapping = match m.mapping.take() {
            Some(mapping) => Ok(mapping),
            None => grow_to_capacity(&m.file, m.capacity_bytes)
                .and_then(|()| MediumMapping::new(&m.file, m.capacity_bytes))
                .map(Arc::new),
        };
        if self.prefaulter.is_none() {
            match Prefaulter::start() {
                Ok(p) => self.prefaulter = Some(Arc::new(p)),
                Err(e) => log::warn!("journal: no prefaulter thread ({e}); queues fault pages in"),
            }
        }
        let lent = mapping.and_then(|mapping| {
            let parts = TailParts {
                mapping,
                medium: m.index,
                position_bytes: m.position_bytes,
                capacity_bytes: m.capacity_bytes,
                entries_before: m.entries.len(),
                entries: std::mem::take(&mut self.tail_entries),
            };
            MappedTail::lend(parts, self.prefaulter.clone(), last_seq).map_err(|(parts, e)| {
                m.mapping = Some(parts.mapping);
                self.tail_entries = parts.entries;
                e
            })
        });
        match lent {
            Ok(tail) => {
                self.lent = true;
                self.mapped_appends = true;
                Some(tail)
            }
            Err(e) => {
                log::warn!(
                    "journal medium {}: cannot map it for appends ({e}); the writer appends",
                    m.path.display()
                );
                self.lending_refused = Some(m.index);
                None
            }
        }
    }

    /// Takes back a tail lent by [`MediumWriter::lend_tail`]: its records join the medium's
    /// log and appends go on at the block boundary after them.
    pub fn reclaim_tail(&mut self, tail: MappedTail) {
        let mut parts = tail.finish();
        self.lent = false;
        match self.current.as_mut() {
            Some(m) if m.index == parts.medium => {
                m.position_bytes = parts.position_bytes;
                m.entries.append(&mut parts.entries);
                m.mapping = Some(parts.mapping);
            }
            _ => log::error!(
                "journal: a tail of medium {} came back after it was closed",
                parts.medium
            ),
        }
        self.tail_entries = parts.entries;
    }

    /// How many media were opened by taking a formatted spare.
    pub fn spares_taken(&self) -> u64 {
        self.spares_taken
    }

    /// Whether the open medium is written with `O_DIRECT` (`None`: no medium open).
    pub fn direct(&self) -> Option<bool> {
        self.current.as_ref().map(|m| m.direct)
    }

    /// How appends are made, for `status`: `io_uring`, `pwritev` (the kernel refused a
    /// ring) or `memory` (memory-backed media, `pwritev` on the committing thread).
    pub fn append_path(&self) -> Option<AppendPath> {
        if self.mapped_appends {
            return Some(AppendPath::Mapped);
        }
        match (&self.commit_ring, self.memory_appends) {
            (CommitRingState::Ready(_), _) => Some(AppendPath::IoUring),
            (CommitRingState::Unavailable, _) => Some(AppendPath::Pwritev),
            (CommitRingState::NotYet, true) => Some(AppendPath::Memory),
            (CommitRingState::NotYet, false) => None,
        }
    }

    /// (medium index, position) of the append point, if a medium is open.
    pub fn position(&self) -> Option<(u32, u64)> {
        self.current.as_ref().map(|m| (m.index, m.position_bytes))
    }

    /// Writes `batch` (records described by `records`), returning their log entries with
    /// medium and position set, in `written` (also the part written before a failure).
    /// Durable when this returns `Ok`.
    pub fn write_batch(
        &mut self,
        batch: &[u8],
        records: &[PendingRecord],
        prologue: &Prologue,
        written: &mut Vec<LogEntry>,
    ) -> Result<(), WriteFailure> {
        debug_assert!(!self.lent, "the writer appends while its tail is lent");
        let mut i = 0;
        while i < records.len() {
            let fresh = self.current.is_none();
            let prologue_bytes = if fresh {
                self.open_next(prologue)?
            } else {
                Vec::new()
            };
            let end = self.fitting(batch, records, i, prologue_bytes.len());
            if end == i {
                if fresh {
                    return Err(WriteFailure::Error(JournalError::Invalid(format!(
                        "a record of {} bytes does not fit on a medium of {} bytes",
                        rec_len(batch, records, i),
                        self.options.capacity_bytes
                    ))));
                }
                // The last allowed medium overflows: with on-full=stop, say so on it.
                let stop =
                    (self.options.on_full == OnFull::Stop && self.last_allowed()?).then(|| {
                        StopInfo {
                            cause: StopCause::Full,
                            first_unjournaled_seq: records[i].entry.seq,
                            unjournaled_count: prologue.last_seq + 1 - records[i].entry.seq,
                            reason: "the last allowed medium is full".into(),
                        }
                    });
                self.seal(prologue.last_seq, stop.as_ref())?;
                continue;
            }
            let start_off = records[i].batch_offset;
            let end_off = records.get(end).map_or(batch.len(), |r| r.batch_offset);
            let chunk = &batch[start_off..end_off];
            let base = self.append(&prologue_bytes, chunk, prologue.last_seq)?;
            let Some(m) = self.current.as_mut() else {
                break;
            };
            for r in &records[i..end] {
                let mut e = r.entry;
                e.medium = m.index;
                e.position_bytes = base + (r.batch_offset - start_off) as u64;
                m.entries.push(e);
                written.push(e);
            }
            i = end;
        }
        Ok(())
    }

    /// How many records from `start` fit on the current medium (exclusive end index).
    fn fitting(
        &self,
        batch: &[u8],
        records: &[PendingRecord],
        start: usize,
        prologue_len: usize,
    ) -> usize {
        let Some(m) = self.current.as_ref() else {
            return start;
        };
        let cap = m.capacity_bytes;
        let mut used = m.position_bytes + prologue_len as u64;
        let mut end = start;
        while end < records.len() {
            let len = rec_len(batch, records, end) as u64;
            let entries = m.entries.len() + (end - start) + 1;
            let trailer =
                (trailer_records_bytes(entries) + 2 * (BLOCK_BYTES + HEADER_BYTES)) as u64;
            if used + len + trailer > cap {
                break;
            }
            used += len;
            end += 1;
        }
        end
    }

    /// True when no further medium may be created (`media-max` files present).
    fn last_allowed(&self) -> Result<bool, WriteFailure> {
        let present = list_media(&self.options.dir)
            .map_err(WriteFailure::Error)?
            .len();
        Ok(present >= self.options.media_max as usize)
    }

    /// Sets the catalog's run record (stored with the next catalog update).
    pub fn set_run(&mut self, run: RunRecord) {
        self.catalog.run = Some(run);
    }

    /// Stores the catalog now.
    pub fn store_catalog(&self) -> Result<(), JournalError> {
        self.catalog.store(&self.options.dir)
    }

    /// Creates the next medium and returns its prologue records (written with the first chunk).
    fn open_next(&mut self, prologue: &Prologue) -> Result<Vec<u8>, WriteFailure> {
        let dir = self.options.dir.clone();
        let present = list_media(&dir).map_err(WriteFailure::Error)?.len();
        if present >= self.options.media_max as usize {
            return Err(WriteFailure::Full);
        }
        let index = self.next_index;
        let path = dir.join(medium_file_name(index));
        let (file, device_bytes) = self.take_spare(&path)?;
        let capacity_bytes = device_bytes.unwrap_or(self.options.capacity_bytes);
        let direct = apply_cache_mode(&file, self.options.cache)
            .map_err(|source| medium_err(&path, "open with O_DIRECT (cache=none)", source))?;
        sync_dir(&dir).map_err(|source| medium_err(&path, "sync directory", source))?;
        let header = MediumHeader {
            journal_id: self.journal_id,
            medium_index: index,
            flags: 0,
            capacity_bytes,
            prev_valid_end_bytes: self.prev_valid_end_bytes,
        };
        let bytes = encode_prologue(&header, prologue);
        self.next_index += 1;
        self.prev_valid_end_bytes = u64::MAX;
        let memory_backed = device_bytes.is_none() && is_memory_backed(&file);
        self.current = Some(OpenMedium {
            index,
            path,
            file,
            direct,
            capacity_bytes,
            is_device: device_bytes.is_some(),
            memory_backed,
            position_bytes: 0,
            entries: std::mem::take(&mut self.reusable_entries),
            mapping: None,
        });
        self.update_catalog(MediumState::Open)?;
        Ok(bytes)
    }

    /// Opens `path` as the next medium: a registered block device (its link renamed to
    /// `path`; returned with its size) first, else a formatted spare renamed to it (written
    /// over from offset 0), else a new empty file.
    fn take_spare(&mut self, path: &std::path::Path) -> Result<(File, Option<u64>), WriteFailure> {
        if !path.exists() {
            if let Some((link, device, bytes)) =
                device_spares(&self.options.dir)?.into_iter().next()
            {
                std::fs::rename(&link, path)
                    .map_err(|source| medium_err(&device, "take device", source))?;
                let file = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|source| medium_err(&device, "open device", source))?;
                self.spares_taken += 1;
                return Ok((file, Some(bytes)));
            }
        }
        let o = &self.options;
        if o.spares > 0 && self.formatter.is_none() {
            match SpareFormatter::start(o.dir.clone(), o.capacity_bytes, o.spares) {
                Ok(f) => self.formatter = Some(f),
                Err(e) => log::warn!("journal: no spare formatter: {e}"),
            }
        }
        let spare = if o.spares > 0 && !path.exists() {
            list_spares(&o.dir, o.capacity_bytes)?.into_iter().next()
        } else {
            None
        };
        let Some(spare) = spare else {
            return OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map(|f| (f, None))
                .map_err(|source| WriteFailure::Error(medium_err(path, "create", source)));
        };
        std::fs::rename(&spare, path).map_err(|source| medium_err(&spare, "take spare", source))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| medium_err(path, "open spare", source))?;
        self.spares_taken += 1;
        if let Some(f) = &self.formatter {
            f.wake();
        }
        Ok((file, None))
    }

    /// Appends prologue + chunk + padding at the append point and makes it durable.
    /// Returns the position where `chunk` starts.
    fn append(
        &mut self,
        prologue: &[u8],
        chunk: &[u8],
        last_seq: u64,
    ) -> Result<u64, WriteFailure> {
        let Some(m) = self.current.as_mut() else {
            return Err(WriteFailure::Error(JournalError::Invalid(
                "no medium open".into(),
            )));
        };
        let len = prologue.len() + chunk.len();
        let pad = padding_needed(len);
        let padding = if pad > 0 {
            padding_record(pad, last_seq, now_ns())
        } else {
            Vec::new()
        };
        let at = m.position_bytes;
        let parts = [prologue, chunk, padding.as_slice()];
        let ring = &mut self.commit_ring;
        let mut result = if m.memory_backed && !m.direct {
            // io_uring hands buffered writes to tmpfs to a worker thread: two wake-ups for a
            // copy this thread does in the same time. `fdatasync` is a no-op there but keeps
            // the contract if the medium is ever something else.
            self.memory_appends = true;
            write_all_vectored_at(&m.file, &parts, at).and_then(|()| m.file.sync_data())
        } else if m.direct {
            let aligned = self.staging.fill(&parts);
            ring.write_durably(&m.file, &[aligned], at)
        } else {
            ring.write_durably(&m.file, &parts, at)
        };
        // A device or filesystem that took O_DIRECT at open but refuses these appends (a
        // logical block above 4 KiB): under `cache=auto` the medium goes on buffered.
        let refused = matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EINVAL));
        if m.direct && refused && self.options.cache == MediumCache::Auto {
            log::warn!(
                "journal medium {}: O_DIRECT appends refused; continuing through the page cache",
                m.path.display()
            );
            m.direct = false;
            result = clear_direct(&m.file).and_then(|()| ring.write_durably(&m.file, &parts, at));
        }
        if let Err(source) = result {
            let path = m.path.clone();
            return Err(WriteFailure::Error(medium_err(&path, "append", source)));
        }
        m.position_bytes = at + (len + pad) as u64;
        Ok(at + prologue.len() as u64)
    }

    /// Writes the trailer (the medium's log), preceded by `stop` if given, and closes the
    /// medium; the next batch opens a new one.
    pub fn seal(&mut self, last_seq: u64, stop: Option<&StopInfo>) -> Result<(), WriteFailure> {
        debug_assert!(!self.lent, "the writer seals while its tail is lent");
        let Some(m) = self.current.as_ref() else {
            return Ok(());
        };
        let mut payload = std::mem::take(&mut self.trailer_payload);
        let mut rec = std::mem::take(&mut self.trailer_record);
        rec.clear();
        if let Some(stop) = stop {
            // Its seq is the last number journaled before it.
            let after_seq = stop.first_unjournaled_seq.saturating_sub(1);
            encode_record(
                &mut rec,
                unsequenced(Op::Stop, after_seq, 0, 0),
                &stop.encode(),
            );
        }
        encode_trailer(&mut rec, &mut payload, &m.entries, last_seq);
        if let Some(p) = &self.prefaulter {
            // Nothing more goes into this medium's mapping; its zero rest is cut below.
            p.release();
        }
        let appended = self.append(&[], &rec, last_seq);
        self.trailer_payload = payload;
        self.trailer_record = rec;
        appended?;
        self.truncate_to_end()?;
        self.update_catalog(MediumState::Sealed)?;
        if let Some(m) = self.current.take() {
            self.reusable_entries = m.entries;
            self.reusable_entries.clear();
        }
        Ok(())
    }

    /// Cuts the medium at its append point (a formatted spare's zero tail), so sealed media
    /// look the same with or without spares. A no-op for media that grew as written.
    fn truncate_to_end(&mut self) -> Result<(), WriteFailure> {
        let Some(m) = self.current.as_ref() else {
            return Ok(());
        };
        if m.is_device {
            return Ok(());
        }
        let len = m.file.metadata().map(|md| md.len());
        if len.is_ok_and(|l| l == m.position_bytes) {
            return Ok(());
        }
        m.file
            .set_len(m.position_bytes)
            .and_then(|()| m.file.sync_data())
            .map_err(|source| WriteFailure::Error(medium_err(&m.path, "truncate", source)))
    }

    /// Forgets the current medium after a failure (it stays as it is, unsealed).
    pub fn abandon(&mut self) {
        if let Some(p) = &self.prefaulter {
            p.release();
        }
        if let Some(m) = self.current.take() {
            self.prev_valid_end_bytes = m.position_bytes;
            let entry = CatalogEntry {
                medium_index: m.index,
                state: MediumState::Cut,
                valid_end_bytes: m.position_bytes,
                records: m.entries.len() as u64,
            };
            self.catalog.upsert(entry);
            let _ = self.catalog.store(&self.options.dir);
        }
    }

    fn update_catalog(&mut self, state: MediumState) -> Result<(), WriteFailure> {
        let Some(m) = self.current.as_ref() else {
            return Ok(());
        };
        self.catalog.upsert(CatalogEntry {
            medium_index: m.index,
            state,
            valid_end_bytes: m.position_bytes,
            records: m.entries.len() as u64,
        });
        self.catalog
            .store(&self.options.dir)
            .map_err(WriteFailure::Error)
    }
}

fn rec_len(batch: &[u8], records: &[PendingRecord], i: usize) -> usize {
    let end = records.get(i + 1).map_or(batch.len(), |r| r.batch_offset);
    end - records[i].batch_offset
}

/// Grows `file` to `capacity_bytes` if it is shorter (a sparse extension).
fn grow_to_capacity(file: &File, capacity_bytes: u64) -> std::io::Result<()> {
    if file.metadata()?.len() < capacity_bytes {
        file.set_len(capacity_bytes)?;
    }
    Ok(())
}

fn medium_err(path: &std::path::Path, step: &'static str, source: std::io::Error) -> JournalError {
    JournalError::Medium {
        path: path.to_path_buf(),
        step,
        source,
    }
}
