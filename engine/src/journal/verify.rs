//! `verify`: checks media for bad records (checksums), torn tails and sequence gaps, and
//! reports every problem with the medium and offset where it is.

use std::path::PathBuf;

use super::media::{MediaSet, StopNote};
use super::merge::{BreakFinder, SequenceBreak};

/// One damaged stretch of a medium.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BadRecord {
    pub offset_bytes: u64,
    pub error: String,
    pub skipped_bytes: u64,
}

/// What verify found on one medium.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MediumReport {
    pub path: PathBuf,
    pub medium_index: Option<u32>,
    pub len_bytes: u64,
    pub records: u64,
    pub valid_end_bytes: u64,
    pub sealed: bool,
    pub bad_records: Vec<BadRecord>,
    /// A torn tail nobody recovered from (the journal crashed and was not reopened).
    pub torn_tail: Option<BadRecord>,
    /// Set when a later medium records where this one's valid data ends (torn tail cut
    /// on recovery): not a problem.
    pub recovered_end_bytes: Option<u64>,
}

/// The whole verification.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub media: Vec<MediumReport>,
    pub sequence_breaks: Vec<SequenceBreak>,
    /// Every stop of the journal; an unresolved stop that lost guest writes (the journal
    /// stopped and was never restarted) counts as a problem.
    pub stops: Vec<StopNote>,
    /// A stop record that could not be read (counted as a problem).
    pub stops_error: Option<String>,
    /// A medium that could not be read again while walking the set (counted as a problem).
    pub read_error: Option<String>,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub problems: usize,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems == 0
    }
}

/// Verifies an opened set.
pub fn verify(set: &MediaSet) -> VerifyReport {
    let mut problems = 0;
    let mut media = Vec::new();
    for m in &set.media {
        let mut bad_records = Vec::new();
        let mut torn_tail = None;
        for p in m.open_problems() {
            let bad = BadRecord {
                offset_bytes: p.offset_bytes,
                error: p.error.to_string(),
                skipped_bytes: p.skipped_bytes,
            };
            problems += 1;
            if p.torn_tail {
                torn_tail = Some(bad);
            } else {
                bad_records.push(bad);
            }
        }
        media.push(MediumReport {
            path: m.path.clone(),
            medium_index: m.index(),
            len_bytes: m.scan.len_bytes,
            records: m.live.records,
            valid_end_bytes: m.scan.valid_end_bytes,
            sealed: m.scan.sealed,
            bad_records,
            torn_tail,
            recovered_end_bytes: m.recovered_end_bytes,
        });
    }
    let mut breaks = BreakFinder::new(set);
    let (mut first_seq, mut last_seq) = (None, None);
    let mut read_error = None;
    for r in set.sequenced() {
        match r {
            Ok(r) => {
                let seq = r.record.header.seq;
                breaks.push(seq);
                first_seq.get_or_insert(seq);
                last_seq = Some(seq);
            }
            Err(e) => read_error = Some(e.to_string()),
        }
    }
    let sequence_breaks = breaks.finish();
    problems += sequence_breaks.len();
    let (stops, stops_error) = match set.stops() {
        Ok(stops) => (stops, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    problems += usize::from(stops_error.is_some()) + usize::from(read_error.is_some());
    problems += stops
        .iter()
        .filter(|s| s.cause.loses_writes() && !s.resolved)
        .count();
    VerifyReport {
        media,
        sequence_breaks,
        stops,
        stops_error,
        read_error,
        first_seq,
        last_seq,
        problems,
    }
}
