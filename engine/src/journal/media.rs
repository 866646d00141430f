//! The numbered set of media in a journal directory, and reading a set (or loose medium
//! files) back as one ordered stream of records for the offline tools.
//!
//! Memory stays bounded by the number of media, not of records: opening a set scans each
//! medium once and keeps only a summary (counts, sequence range, and the few notable
//! records: stream definitions, marks, log inits, gaps, stops); the records themselves are
//! read again, medium by medium, whenever a tool walks them ([`MediaSet::sequenced`], whose
//! merge of the media in sequence order is in [`super::merge`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::catalog::{Catalog, RunRecord, RunState};
use super::error::JournalError;
use super::format::{
    GapInfo, MediumHeader, Op, StopCause, StopInfo, StreamDef, MEDIUM_FLAG_DEMUXED,
};
use super::merge::Sequenced;
use super::scan::{
    read_payload, read_record, FileSource, MediumScan, MediumWalk, Problem, ScannedRecord,
};

/// The file name of medium `index`.
pub fn medium_file_name(index: u32) -> String {
    format!("medium-{index:06}.fj")
}

/// The medium index a file name stands for, if it is a medium's name.
pub fn parse_medium_file_name(name: &str) -> Option<u32> {
    name.strip_prefix("medium-")?
        .strip_suffix(".fj")?
        .parse()
        .ok()
}

/// The media in `dir`, sorted by index.
pub fn list_media(dir: &Path) -> Result<Vec<(u32, PathBuf)>, JournalError> {
    let entries = std::fs::read_dir(dir).map_err(|source| JournalError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut media = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if let Some(index) = name.to_str().and_then(parse_medium_file_name) {
            media.push((index, entry.path()));
        }
    }
    media.sort();
    Ok(media)
}

/// Expands command-line arguments: a directory stands for all its media.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, JournalError> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let media = list_media(input)?;
            if media.is_empty() {
                return Err(JournalError::NoMedia(input.clone()));
            }
            out.extend(media.into_iter().map(|(_, p)| p));
        } else {
            out.push(input.clone());
        }
    }
    Ok(out)
}

/// What a long offline operation is doing, for a progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Opening a set: bytes of media scanned.
    Scanning,
    /// Checking the range to restore: records walked.
    Checking,
    /// Writing the restored image: records applied.
    Applying,
}

/// One progress report: `done` of `total` in the phase's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
}

/// How often (in bytes of media) scanning reports progress.
const PROGRESS_BYTES: u64 = 16 << 20;

/// One scanned medium of a set.
pub struct OpenedMedium {
    pub path: PathBuf,
    pub source: FileSource,
    /// What the opening scan found: problems, valid end, header, sealed. Its `records` are
    /// not kept (empty): walk them with [`OpenedMedium::live_records`].
    pub scan: MediumScan,
    /// Set when a later medium of the same journal says where this one's valid data ends
    /// (recovery after a crash): records from here on are orphans of the interrupted append.
    pub recovered_end_bytes: Option<u64>,
    /// What the opening scan kept of the live records.
    pub live: LiveSummary,
}

/// What the opening scan of a medium keeps of its live records (those before a recovered
/// end).
#[derive(Debug, Clone, Default)]
pub struct LiveSummary {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The sequenced records come in ascending order of sequence number (as the journal
    /// writes them); when not, walking the set sorts this medium's records in memory.
    pub in_order: bool,
    /// The live records other than data, flushes and padding (stream definitions, marks,
    /// log inits, gaps, stops, medium headers, trailers), in medium order.
    pub notable: Vec<ScannedRecord>,
}

impl LiveSummary {
    fn add(&mut self, record: &ScannedRecord) {
        let h = &record.header;
        self.records += 1;
        if h.is_sequenced() {
            self.in_order &= self.last_seq.is_none_or(|last| last <= h.seq);
            self.first_seq = Some(self.first_seq.map_or(h.seq, |f| f.min(h.seq)));
            self.last_seq = Some(self.last_seq.map_or(h.seq, |l| l.max(h.seq)));
        }
        if !matches!(
            h.op,
            Op::Write | Op::Discard | Op::WriteZeroes | Op::Flush | Op::Padding
        ) {
            self.notable.push(*record);
        }
    }
}

impl OpenedMedium {
    pub fn index(&self) -> Option<u32> {
        self.scan.medium_header.map(|h| h.medium_index)
    }

    /// Reads the records that count again, in medium order: those before a recovered end.
    /// The walk stops where the opening scan found valid data to end, without looking at
    /// what follows again (a formatted medium's zeros, a torn tail).
    pub fn live_records(&self) -> LiveRecords<'_> {
        let end = self
            .recovered_end_bytes
            .unwrap_or(u64::MAX)
            .min(self.scan.valid_end_bytes);
        LiveRecords {
            medium: self,
            walk: MediumWalk::new(&self.source),
            end,
            done: false,
        }
    }

    /// Problems that are not explained by a recovered torn tail.
    pub fn open_problems(&self) -> impl Iterator<Item = &Problem> {
        let end = self.recovered_end_bytes.unwrap_or(u64::MAX);
        self.scan
            .problems
            .iter()
            .filter(move |p| p.offset_bytes < end)
    }

    pub fn payload(&self, record: &ScannedRecord) -> Result<Vec<u8>, JournalError> {
        read_payload(&self.source, record.position_bytes, &record.header)
            .map_err(|source| self.read_error(source))
    }

    fn read_error(&self, source: std::io::Error) -> JournalError {
        JournalError::Medium {
            path: self.path.clone(),
            step: "read",
            source,
        }
    }
}

/// The live records of one medium, read from it as they are taken.
pub struct LiveRecords<'a> {
    medium: &'a OpenedMedium,
    walk: MediumWalk<'a, FileSource>,
    end: u64,
    done: bool,
}

impl Iterator for LiveRecords<'_> {
    type Item = Result<ScannedRecord, JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.walk.position_bytes() >= self.end {
            self.done = true;
            return None;
        }
        match self.walk.next_record() {
            Ok(Some(r)) if r.position_bytes < self.end => Some(Ok(r)),
            Ok(_) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(self.medium.read_error(e)))
            }
        }
    }
}

/// Media read together.
pub struct MediaSet {
    pub media: Vec<OpenedMedium>,
    /// Stream id -> volume and queue, from every stream-def record seen.
    pub streams: BTreeMap<u32, StreamDef>,
    /// The run records of the catalogs of the journal directories given as inputs.
    pub runs: Vec<(PathBuf, RunRecord)>,
}

/// A stop record of a set, or a catalog saying the journal is stopped: writes after
/// `after_seq` may not be in the journal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StopNote {
    /// The last sequence number journaled before the stop.
    pub after_seq: u64,
    pub timestamp_ns: u64,
    pub cause: StopCause,
    pub first_unjournaled_seq: u64,
    /// `None`: unknown (the journal is still stopped, or the daemon died while stopped).
    pub unjournaled_count: Option<u64>,
    pub reason: String,
    /// Where it was found: a medium file, or a journal directory's catalog.
    pub source: PathBuf,
    /// Journaling went on after it without missing a number (nothing was lost), or a
    /// gap record explains the missing numbers.
    pub resolved: bool,
}

/// Where one record of a set is: medium (index into `MediaSet::media`) and record.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef {
    pub medium: usize,
    pub record: ScannedRecord,
}

impl MediaSet {
    /// Opens and scans every input (files or journal directories). A file that holds no
    /// valid record at all is refused as foreign.
    pub fn open(inputs: &[PathBuf]) -> Result<Self, JournalError> {
        Self::open_with_progress(inputs, &mut |_| {})
    }

    /// [`MediaSet::open`], reporting the bytes of media scanned ([`Phase::Scanning`]).
    pub fn open_with_progress(
        inputs: &[PathBuf],
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Self, JournalError> {
        let paths = expand_inputs(inputs)?;
        let mut sources = Vec::new();
        for path in paths {
            let source = FileSource::open(&path).map_err(|source| JournalError::Medium {
                path: path.clone(),
                step: "open",
                source,
            })?;
            let header = first_medium_header(&source).map_err(|source| JournalError::Medium {
                path: path.clone(),
                step: "read",
                source,
            })?;
            sources.push((path, source, header));
        }
        let headers: Vec<_> = sources.iter().map(|(_, _, h)| *h).collect();
        let ends = recovered_ends(&headers);
        let total = sources.iter().map(|(_, s, _)| s.len_bytes).sum();
        let mut scanned = 0;
        let mut media = Vec::new();
        for ((path, source, _), recovered_end_bytes) in sources.into_iter().zip(ends) {
            let (scan, live, all_records) = summarize(&source, recovered_end_bytes, &mut |at| {
                progress(Progress {
                    phase: Phase::Scanning,
                    done: scanned + at,
                    total,
                })
            })
            .map_err(|source| JournalError::Medium {
                path: path.clone(),
                step: "read",
                source,
            })?;
            scanned += source.len_bytes;
            progress(Progress {
                phase: Phase::Scanning,
                done: scanned,
                total,
            });
            // An all-zero file is a formatted medium taken just before a crash: empty.
            if all_records == 0 && scan.len_bytes > scan.zero_tail_bytes {
                let reason = match scan.problems.first() {
                    Some(p) => {
                        format!("no valid record; at offset {}: {}", p.offset_bytes, p.error)
                    }
                    None => "no valid record".to_string(),
                };
                return Err(JournalError::Foreign { path, reason });
            }
            media.push(OpenedMedium {
                path,
                source,
                scan,
                recovered_end_bytes,
                live,
            });
        }
        let mut set = Self {
            media,
            streams: BTreeMap::new(),
            runs: load_runs(inputs),
        };
        set.collect_streams()?;
        Ok(set)
    }

    fn collect_streams(&mut self) -> Result<(), JournalError> {
        let mut streams = BTreeMap::new();
        for m in &self.media {
            for r in m
                .live
                .notable
                .iter()
                .filter(|r| r.header.op == Op::StreamDef)
            {
                let payload = m.payload(r)?;
                let def = StreamDef::decode(&payload).map_err(|source| JournalError::Record {
                    path: m.path.clone(),
                    offset_bytes: r.position_bytes,
                    source,
                })?;
                streams.insert(r.header.stream_id, def);
            }
        }
        self.streams = streams;
        Ok(())
    }

    /// True when any medium was produced by `demux` (other streams' sequence numbers are
    /// missing on purpose).
    pub fn demuxed(&self) -> bool {
        self.media.iter().any(|m| {
            m.scan
                .medium_header
                .is_some_and(|h| h.flags & MEDIUM_FLAG_DEMUXED != 0)
        })
    }

    /// Every live sequenced record of the set, ordered by sequence number, read from the
    /// media as it is taken (a record found on two inputs, e.g. a journal-wide record in
    /// several demuxed streams, comes once).
    pub fn sequenced(&self) -> Sequenced<'_> {
        Sequenced::new(self)
    }

    /// The highest sequence number of the set (0 when it has none).
    pub fn last_seq(&self) -> u64 {
        self.media
            .iter()
            .filter_map(|m| m.live.last_seq)
            .max()
            .unwrap_or(0)
    }

    /// The live sequenced notable records of every medium with `op`, by sequence number.
    pub fn notable(&self, op: Op) -> Vec<RecordRef> {
        let mut out: Vec<RecordRef> = self
            .media
            .iter()
            .enumerate()
            .flat_map(|(i, m)| {
                m.live
                    .notable
                    .iter()
                    .filter(move |r| r.header.op == op && r.header.is_sequenced())
                    .map(move |r| RecordRef {
                        medium: i,
                        record: *r,
                    })
            })
            .collect();
        out.sort_by_key(|r| r.record.header.seq);
        out.dedup_by(|a, b| a.record.header == b.record.header);
        out
    }

    /// Stream ids that belong to `volume`.
    pub fn streams_of(&self, volume: &str) -> Vec<u32> {
        self.streams
            .iter()
            .filter(|(_, d)| d.volume == volume)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn payload(&self, r: &RecordRef) -> Result<Vec<u8>, JournalError> {
        self.media[r.medium].payload(&r.record)
    }

    /// The label of a mark or log-init record.
    pub fn label(&self, r: &RecordRef) -> Result<String, JournalError> {
        Ok(String::from_utf8_lossy(&self.payload(r)?).into_owned())
    }

    /// The payloads of the set's gap records.
    pub(super) fn gap_infos(&self) -> Vec<GapInfo> {
        self.notable(Op::Gap)
            .iter()
            .filter_map(|r| self.payload(r).ok())
            .filter_map(|p| GapInfo::decode(&p).ok())
            .collect()
    }
}

/// The run records of the catalogs of the directories among `inputs` (unreadable or
/// version 1 catalogs are skipped: the media say the rest).
fn load_runs(inputs: &[PathBuf]) -> Vec<(PathBuf, RunRecord)> {
    inputs
        .iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| match Catalog::load(p) {
            Ok(c) => c.and_then(|c| c.run).map(|r| (p.clone(), r)),
            Err(e) => {
                log::warn!("{e}");
                None
            }
        })
        .collect()
}

impl MediaSet {
    /// Every stop the set knows of, in order: stop records on the media, then journal
    /// directories whose catalog says the journal is (still) stopped. A stop is resolved
    /// when a gap record accounts for the numbers it lost or the set holds its first
    /// unjournaled number (which takes one walk of the set, only when a stop needs it).
    pub fn stops(&self) -> Result<Vec<StopNote>, JournalError> {
        let gaps = self.gap_infos();
        let explained = |first: u64| {
            gaps.iter().any(|g| {
                g.first_missing_seq <= first && first < g.first_missing_seq + g.missing_count
            })
        };
        let mut out = self.stop_records(explained)?;
        out.extend(self.stopped_runs(explained));
        let wanted: BTreeSet<u64> = out
            .iter()
            .filter(|s| !s.resolved)
            .map(|s| s.first_unjournaled_seq)
            .collect();
        if !wanted.is_empty() {
            let present = self.sequenced_among(&wanted)?;
            for s in &mut out {
                s.resolved |= present.contains(&s.first_unjournaled_seq);
            }
        }
        out.sort_by_key(|s| s.after_seq);
        out.dedup_by(|a, b| {
            a.after_seq == b.after_seq && a.first_unjournaled_seq == b.first_unjournaled_seq
        });
        Ok(out)
    }

    /// The stop records on the media, in media order; `explained` says whether a gap record
    /// accounts for a first unjournaled number.
    fn stop_records(&self, explained: impl Fn(u64) -> bool) -> Result<Vec<StopNote>, JournalError> {
        let mut out = Vec::new();
        for m in &self.media {
            for r in m.live.notable.iter().filter(|r| r.header.op == Op::Stop) {
                let info =
                    StopInfo::decode(&m.payload(r)?).map_err(|source| JournalError::Record {
                        path: m.path.clone(),
                        offset_bytes: r.position_bytes,
                        source,
                    })?;
                let first = info.first_unjournaled_seq;
                out.push(StopNote {
                    after_seq: r.header.seq,
                    timestamp_ns: r.header.timestamp_ns,
                    cause: info.cause,
                    first_unjournaled_seq: first,
                    unjournaled_count: (!info.cause.loses_writes())
                        .then_some(info.unjournaled_count),
                    reason: info.reason,
                    source: m.path.clone(),
                    resolved: explained(first),
                });
            }
        }
        Ok(out)
    }

    /// A stop for each journal directory whose catalog says the journal is (still) stopped;
    /// `explained` as for [`MediaSet::stop_records`].
    fn stopped_runs(&self, explained: impl Fn(u64) -> bool) -> Vec<StopNote> {
        self.runs
            .iter()
            .filter(|(_, r)| r.state == RunState::Stopped)
            .map(|(dir, run)| {
                let count = run.unjournaled_count;
                let first = run.first_unjournaled_seq;
                StopNote {
                    after_seq: first.saturating_sub(1),
                    timestamp_ns: u64::MAX,
                    cause: StopCause::Error,
                    first_unjournaled_seq: first,
                    unjournaled_count: (count != super::catalog::COUNT_UNKNOWN).then_some(count),
                    reason: "the catalog says the journal stopped (write error or full medium) and was not restarted".into(),
                    source: dir.clone(),
                    resolved: explained(first),
                }
            })
            .collect()
    }

    /// Which of the `wanted` sequence numbers the set holds (one walk of the set).
    fn sequenced_among(&self, wanted: &BTreeSet<u64>) -> Result<BTreeSet<u64>, JournalError> {
        let mut present = BTreeSet::new();
        for r in self.sequenced() {
            let seq = r?.record.header.seq;
            if wanted.contains(&seq) {
                present.insert(seq);
            }
        }
        Ok(present)
    }
}

/// The medium header of a medium, when its first record is a valid one.
fn first_medium_header(source: &FileSource) -> std::io::Result<Option<MediumHeader>> {
    if source.len_bytes == 0 {
        return Ok(None);
    }
    Ok(match read_record(source, 0)? {
        Ok(h) if h.op == Op::MediumHeader => {
            MediumHeader::decode(&read_payload(source, 0, &h)?).ok()
        }
        _ => None,
    })
}

/// For every medium (by its header), the valid end its successor (same journal, next index)
/// records for it, if any.
fn recovered_ends(headers: &[Option<MediumHeader>]) -> Vec<Option<u64>> {
    headers
        .iter()
        .map(|h| {
            let h = (*h)?;
            headers
                .iter()
                .flatten()
                .find(|n| {
                    n.journal_id == h.journal_id
                        && n.medium_index == h.medium_index.wrapping_add(1)
                        && n.prev_valid_end_bytes != u64::MAX
                })
                .map(|n| n.prev_valid_end_bytes)
        })
        .collect()
}

/// Scans a medium once: what the scan found, the summary of the records before
/// `recovered_end`, and how many valid records it holds in all.
/// `scanned(offset)` is called every [`PROGRESS_BYTES`] or so.
fn summarize(
    source: &FileSource,
    recovered_end: Option<u64>,
    scanned: &mut dyn FnMut(u64),
) -> std::io::Result<(MediumScan, LiveSummary, u64)> {
    let end = recovered_end.unwrap_or(u64::MAX);
    let mut walk = MediumWalk::new(source);
    let mut live = LiveSummary {
        in_order: true,
        ..Default::default()
    };
    let mut all = 0;
    let mut reported = 0;
    while let Some(r) = walk.next_record()? {
        all += 1;
        if r.position_bytes < end {
            live.add(&r);
        }
        if r.position_bytes - reported >= PROGRESS_BYTES {
            reported = r.position_bytes;
            scanned(reported);
        }
    }
    Ok((walk.finish()?, live, all))
}
