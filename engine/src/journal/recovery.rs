//! Reopening an existing journal directory: scan the last medium, find where its valid
//! records end (cutting a torn tail logically: the medium is never rewritten), and recover
//! what the journal must continue with: sequence numbers, stream table, current log.
//!
//! The journal then continues on a NEW medium whose header records the previous medium's
//! valid end, so readers ignore whatever lies beyond it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::catalog::{Catalog, CatalogEntry, MediumState, RunRecord, RunState, COUNT_UNKNOWN};
use super::entry::now_ns;
use super::error::JournalError;
use super::format::{GapInfo, Op, StopInfo, StreamDef};
use super::media::list_media;
use super::scan::{read_payload, scan_medium, FileSource, ScannedRecord};

/// What a journal continues from.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    pub journal_id: u64,
    pub next_medium_index: u32,
    pub last_seq: u64,
    pub streams: BTreeMap<u32, StreamDef>,
    pub log_id: u32,
    pub label: String,
    /// `u64::MAX` when the last medium was sealed with nothing after its trailer; else where
    /// its valid data ends.
    pub prev_valid_end_bytes: u64,
    pub catalog: Catalog,
    /// Set when the last medium ended in a torn tail: (medium, valid end, torn bytes).
    pub torn_tail: Option<RecoveredTail>,
    pub fresh: bool,
    /// Writes the previous run may have taken unjournaled: the journal records this gap
    /// first (`true`: the count is a lower bound, the real number is unknown).
    pub resume_gap: Option<(GapInfo, bool)>,
}

/// A torn tail cut on recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecoveredTail {
    pub medium: u32,
    pub valid_end_bytes: u64,
    pub torn_bytes: u64,
}

/// Recovers the state of the journal in `dir` (creating the directory when missing).
pub fn recover(dir: &Path) -> Result<Recovered, JournalError> {
    std::fs::create_dir_all(dir).map_err(|source| JournalError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let media = list_media(dir)?;
    let catalog = Catalog::load(dir).unwrap_or_else(|e| {
        log::warn!("{e}; rebuilding it");
        None
    });
    let Some(&(last_index, _)) = media.last() else {
        return Ok(without_media(catalog));
    };
    let mut rec = Recovered {
        next_medium_index: last_index + 1,
        prev_valid_end_bytes: u64::MAX,
        catalog: catalog.unwrap_or_default(),
        ..Default::default()
    };
    let found = read_newest_media(&media, &mut rec)?;
    rec.last_seq = found.last_sequenced.unwrap_or(found.last_any);
    if rec.journal_id == 0 {
        rec.journal_id = rec.catalog.journal_id;
    }
    rec.catalog.journal_id = rec.journal_id;
    rec.resume_gap = resume_gap(rec.catalog.run, found.last_stop.as_ref(), rec.last_seq);
    if let Some((gap, estimated)) = rec.resume_gap {
        log::warn!(
            "journal: the previous run did not end cleanly; recording a gap of {}{} write(s) from seq {}",
            if estimated { "at least " } else { "" },
            gap.missing_count,
            gap.first_missing_seq
        );
    }
    Ok(rec)
}

/// What reading the media, newest first, found about where the journal stands.
#[derive(Default)]
struct NewestRecords {
    /// The last number journaled: the newest sequenced record. Bookkeeping records (padding,
    /// trailer, restated stream-defs) repeat the last number *assigned*, which a writer killed
    /// between sealing a medium and appending the rest of its batch never journaled; counting
    /// them would make the restart skip numbers that are then missing from the journal.
    last_sequenced: Option<u64>,
    /// The highest number of any record read, for media that hold no sequenced record.
    last_any: u64,
    /// The newest medium's last stop record, unless a data record follows it.
    last_stop: Option<StopInfo>,
}

/// Reads `media` (in index order) newest first, noting the newest one in `rec`'s catalog.
/// The newest medium with a readable header tells the journal id, streams and log; older
/// media are read only if it holds no sequenced record.
fn read_newest_media(
    media: &[(u32, PathBuf)],
    rec: &mut Recovered,
) -> Result<NewestRecords, JournalError> {
    let mut found = NewestRecords::default();
    let mut header_seen = false;
    for (n, (index, path)) in media.iter().rev().enumerate() {
        let src = FileSource::open(path).map_err(|source| medium_err(path, "open", source))?;
        let scan = scan_medium(&src).map_err(|source| medium_err(path, "read", source))?;
        if n == 0 {
            note_last_medium(rec, *index, &scan);
        }
        let newest_sequenced = scan
            .records
            .iter()
            .filter(|r| r.header.is_sequenced())
            .map(|r| r.header.seq)
            .max();
        found.last_any = scan
            .records
            .iter()
            .map(|r| r.header.seq)
            .fold(found.last_any, u64::max);
        if header_seen {
            if newest_sequenced.is_some() {
                found.last_sequenced = newest_sequenced;
                break;
            }
            continue;
        }
        let Some(header) = scan.medium_header else {
            continue;
        };
        header_seen = true;
        found.last_sequenced = newest_sequenced;
        rec.journal_id = header.journal_id;
        found.last_stop = read_definitions(rec, &src, path, &scan.records, n == 0)?;
        if found.last_sequenced.is_some() {
            break;
        }
    }
    Ok(found)
}

/// Takes the stream table and log from the records of the medium at `path` into `rec`.
/// On the `newest` medium, also returns its last stop record that no data record follows
/// (`None` for an older medium).
fn read_definitions(
    rec: &mut Recovered,
    src: &FileSource,
    path: &Path,
    records: &[ScannedRecord],
    newest: bool,
) -> Result<Option<StopInfo>, JournalError> {
    let mut last_stop = None;
    for r in records {
        let payload = || {
            read_payload(src, r.position_bytes, &r.header)
                .map_err(|source| medium_err(path, "read", source))
        };
        match r.header.op {
            Op::StreamDef => {
                if let Ok(def) = StreamDef::decode(&payload()?) {
                    rec.streams.insert(r.header.stream_id, def);
                }
            }
            Op::LogInit => {
                rec.log_id = r.header.log_id;
                rec.label = String::from_utf8_lossy(&payload()?).into_owned();
            }
            Op::Stop if newest => last_stop = StopInfo::decode(&payload()?).ok(),
            Op::Write | Op::Discard | Op::WriteZeroes | Op::Flush | Op::Mark if newest => {
                last_stop = None;
            }
            _ => {}
        }
    }
    Ok(last_stop)
}

/// The gap the previous run left, from the catalog's run record and the last stop record
/// of the newest medium (`None`: it ended cleanly, or nothing says otherwise).
pub fn resume_gap(
    run: Option<RunRecord>,
    last_stop: Option<&StopInfo>,
    last_seq: u64,
) -> Option<(GapInfo, bool)> {
    let (first, count, estimated) = match (run, last_stop) {
        (Some(r), _) if r.state != RunState::Running => {
            let unknown = r.unjournaled_count == COUNT_UNKNOWN;
            let count = if unknown { 1 } else { r.unjournaled_count };
            (r.first_unjournaled_seq, count, unknown)
        }
        (_, Some(stop)) if stop.cause.loses_writes() => (
            stop.first_unjournaled_seq,
            stop.unjournaled_count.max(1),
            true,
        ),
        (_, Some(stop)) => (stop.first_unjournaled_seq, stop.unjournaled_count, false),
        // Died while running: in async mode acknowledged writes may be lost.
        (Some(r), None) if r.async_mode => (last_seq + 1, 1, true),
        _ => return None,
    };
    if count == 0 {
        return None;
    }
    let first_missing_seq = first.max(last_seq + 1);
    let end = first.saturating_add(count).max(first_missing_seq + 1);
    Some((
        GapInfo {
            first_missing_seq,
            missing_count: end - first_missing_seq,
        },
        estimated,
    ))
}

/// A directory without media: a new journal, or one whose media were all moved away
/// (archived), which continues from what its catalog says.
fn without_media(catalog: Option<Catalog>) -> Recovered {
    let Some(catalog) = catalog.filter(|c| c.journal_id != 0 && c.run.is_some()) else {
        let journal_id = new_journal_id();
        return Recovered {
            journal_id,
            prev_valid_end_bytes: u64::MAX,
            catalog: Catalog {
                journal_id,
                ..Catalog::default()
            },
            fresh: true,
            ..Default::default()
        };
    };
    let last_seq = catalog
        .run
        .filter(|r| r.state != RunState::Running)
        .map_or(0, |r| r.first_unjournaled_seq.saturating_sub(1));
    Recovered {
        journal_id: catalog.journal_id,
        next_medium_index: catalog
            .media
            .iter()
            .map(|e| e.medium_index + 1)
            .max()
            .unwrap_or(0),
        last_seq,
        prev_valid_end_bytes: u64::MAX,
        resume_gap: resume_gap(catalog.run, None, last_seq),
        catalog,
        ..Default::default()
    }
}

fn note_last_medium(rec: &mut Recovered, index: u32, scan: &super::scan::MediumScan) {
    let state = if scan.sealed {
        MediumState::Sealed
    } else {
        MediumState::Cut
    };
    let torn_bytes = scan.len_bytes - scan.valid_end_bytes - scan.zero_tail_bytes;
    // The next medium's header tells readers where this one ends: needed when it was cut,
    // and when bytes that are not records follow its trailer (a sealed medium is never
    // written after its trailer, but the file may have been damaged since).
    if !scan.sealed || torn_bytes > 0 {
        rec.prev_valid_end_bytes = scan.valid_end_bytes;
    }
    if torn_bytes > 0 {
        log::warn!(
            "journal medium {index}: torn tail of {torn_bytes} bytes after offset {}; continuing on medium {}",
            scan.valid_end_bytes,
            index + 1
        );
        rec.torn_tail = Some(RecoveredTail {
            medium: index,
            valid_end_bytes: scan.valid_end_bytes,
            torn_bytes,
        });
    }
    rec.catalog.upsert(CatalogEntry {
        medium_index: index,
        state,
        valid_end_bytes: scan.valid_end_bytes,
        records: scan.records.len() as u64,
    });
}

fn medium_err(path: &Path, step: &'static str, source: std::io::Error) -> JournalError {
    JournalError::Medium {
        path: path.to_path_buf(),
        step,
        source,
    }
}

/// A journal id unlikely to repeat: time, process id and a stack address mixed.
fn new_journal_id() -> u64 {
    let local = 0u8;
    let mut x = now_ns() ^ (u64::from(std::process::id()) << 32) ^ (&local as *const u8 as u64);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) | 1
}
