//! The numbered set of media in a journal directory, and reading a set (or loose medium
//! files) back as one ordered stream of records for the offline tools.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::catalog::{Catalog, RunRecord, RunState};
use super::error::JournalError;
use super::format::{
    GapInfo, Op, RecordHeader, StopCause, StopInfo, StreamDef, MEDIUM_FLAG_DEMUXED,
};
use super::scan::{read_payload, scan_medium, FileSource, MediumScan, Problem, ScannedRecord};

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

/// One scanned medium of a set.
pub struct OpenedMedium {
    pub path: PathBuf,
    pub source: FileSource,
    pub scan: MediumScan,
    /// Set when a later medium of the same journal says where this one's valid data ends
    /// (recovery after a crash): records from here on are orphans of the interrupted append.
    pub recovered_end_bytes: Option<u64>,
}

impl OpenedMedium {
    pub fn index(&self) -> Option<u32> {
        self.scan.medium_header.map(|h| h.medium_index)
    }

    /// The records that count: those before a recovered end.
    pub fn live_records(&self) -> impl Iterator<Item = &ScannedRecord> {
        let end = self.recovered_end_bytes.unwrap_or(u64::MAX);
        self.scan
            .records
            .iter()
            .filter(move |r| r.position_bytes < end)
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
        read_payload(&self.source, record.position_bytes, &record.header).map_err(|source| {
            JournalError::Medium {
                path: self.path.clone(),
                step: "read",
                source,
            }
        })
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
        let paths = expand_inputs(inputs)?;
        let mut media = Vec::new();
        for path in paths {
            let source = FileSource::open(&path).map_err(|source| JournalError::Medium {
                path: path.clone(),
                step: "open",
                source,
            })?;
            let scan = scan_medium(&source).map_err(|source| JournalError::Medium {
                path: path.clone(),
                step: "read",
                source,
            })?;
            // An all-zero file is a formatted medium taken just before a crash: empty.
            if scan.records.is_empty() && scan.len_bytes > scan.zero_tail_bytes {
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
                recovered_end_bytes: None,
            });
        }
        apply_recovered_ends(&mut media);
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
            for r in m.live_records().filter(|r| r.header.op == Op::StreamDef) {
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

    /// Every live sequenced record of the set, ordered by sequence number.
    pub fn sequenced(&self) -> Vec<RecordRef> {
        let mut out: Vec<RecordRef> = self
            .media
            .iter()
            .enumerate()
            .flat_map(|(i, m)| {
                m.live_records()
                    .filter(|r| r.header.is_sequenced())
                    .map(move |r| RecordRef {
                        medium: i,
                        record: *r,
                    })
            })
            .collect();
        out.sort_by_key(|r| r.record.header.seq);
        // The same record read from two inputs (journal-wide records in demuxed streams).
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

    /// Breaks in the sequence among `records` (sorted): (after_seq, next_seq, explained
    /// by a gap record).
    pub fn sequence_breaks(&self, records: &[RecordRef]) -> Vec<SequenceBreak> {
        let gaps = self.gap_records(records);
        let mut out = Vec::new();
        for pair in records.windows(2) {
            let (a, b) = (pair[0].record.header.seq, pair[1].record.header.seq);
            if b == a {
                out.push(SequenceBreak {
                    after_seq: a,
                    next_seq: b,
                    recorded_gap: false,
                    duplicate: true,
                });
            } else if b != a + 1 {
                let recorded_gap = gaps.iter().any(|g| {
                    g.first_missing_seq <= a + 1 && g.first_missing_seq + g.missing_count >= b
                });
                out.push(SequenceBreak {
                    after_seq: a,
                    next_seq: b,
                    recorded_gap,
                    duplicate: false,
                });
            }
        }
        out
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
    /// directories whose catalog says the journal is (still) stopped.
    pub fn stops(&self, records: &[RecordRef]) -> Result<Vec<StopNote>, JournalError> {
        let has_seq = |seq: u64| {
            records
                .binary_search_by_key(&seq, |r| r.record.header.seq)
                .is_ok()
        };
        let gaps = self.gap_records(records);
        let explained = |first: u64| {
            gaps.iter().any(|g| {
                g.first_missing_seq <= first && first < g.first_missing_seq + g.missing_count
            })
        };
        let mut out = Vec::new();
        for m in &self.media {
            for r in m.live_records().filter(|r| r.header.op == Op::Stop) {
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
                    resolved: has_seq(first) || explained(first),
                });
            }
        }
        for (dir, run) in self
            .runs
            .iter()
            .filter(|(_, r)| r.state == RunState::Stopped)
        {
            let count = run.unjournaled_count;
            let first = run.first_unjournaled_seq;
            out.push(StopNote {
                after_seq: first.saturating_sub(1),
                timestamp_ns: u64::MAX,
                cause: StopCause::Error,
                first_unjournaled_seq: first,
                unjournaled_count: (count != super::catalog::COUNT_UNKNOWN).then_some(count),
                reason: "the catalog says the journal stopped (write error or full medium) and was not restarted".into(),
                source: dir.clone(),
                resolved: has_seq(first) || explained(first),
            });
        }
        out.sort_by_key(|s| s.after_seq);
        out.dedup_by(|a, b| {
            a.after_seq == b.after_seq && a.first_unjournaled_seq == b.first_unjournaled_seq
        });
        Ok(out)
    }

    /// The payloads of the gap records among `records`.
    fn gap_records(&self, records: &[RecordRef]) -> Vec<GapInfo> {
        records
            .iter()
            .filter(|r| r.record.header.op == Op::Gap)
            .filter_map(|r| self.payload(r).ok())
            .filter_map(|p| GapInfo::decode(&p).ok())
            .collect()
    }
}

/// A place where sequence numbers are not consecutive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SequenceBreak {
    pub after_seq: u64,
    pub next_seq: u64,
    /// A gap record says the journal was stopped over this range.
    pub recorded_gap: bool,
    pub duplicate: bool,
}

/// A medium whose successor (same journal, next index) records the predecessor's valid end
/// gets that end applied.
fn apply_recovered_ends(media: &mut [OpenedMedium]) {
    let headers: Vec<_> = media.iter().map(|m| m.scan.medium_header).collect();
    for (i, m) in media.iter_mut().enumerate() {
        let Some(h) = headers[i] else { continue };
        let successor = headers.iter().flatten().find(|n| {
            n.journal_id == h.journal_id
                && n.medium_index == h.medium_index.wrapping_add(1)
                && n.prev_valid_end_bytes != u64::MAX
        });
        if let Some(n) = successor {
            m.recovered_end_bytes = Some(n.prev_valid_end_bytes);
        }
    }
}

/// A record header with its medium position, for listing.
pub fn describe(header: &RecordHeader) -> &'static str {
    header.op.name()
}
