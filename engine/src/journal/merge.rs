//! Walking a set of media as one stream in sequence order ([`Sequenced`], what
//! [`MediaSet::sequenced`] returns), and finding the breaks in that stream ([`BreakFinder`]).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::error::JournalError;
use super::format::{GapInfo, RecordHeader};
use super::media::{MediaSet, RecordRef};
use super::scan::ScannedRecord;

/// A place where sequence numbers are not consecutive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SequenceBreak {
    pub after_seq: u64,
    pub next_seq: u64,
    /// A gap record says the journal was stopped over this range.
    pub recorded_gap: bool,
    pub duplicate: bool,
}

/// Finds the breaks in a sequence fed to it in order: (after_seq, next_seq, explained by
/// a gap record). For a demuxed set only duplicates count (other streams' numbers are
/// missing on purpose).
pub struct BreakFinder {
    gaps: Vec<GapInfo>,
    duplicates_only: bool,
    previous: Option<u64>,
    breaks: Vec<SequenceBreak>,
}

impl BreakFinder {
    pub fn new(set: &MediaSet) -> Self {
        Self {
            gaps: set.gap_infos(),
            duplicates_only: set.demuxed(),
            previous: None,
            breaks: Vec::new(),
        }
    }

    pub fn push(&mut self, seq: u64) {
        let Some(a) = self.previous.replace(seq) else {
            return;
        };
        let b = seq;
        if b == a {
            self.breaks.push(SequenceBreak {
                after_seq: a,
                next_seq: b,
                recorded_gap: false,
                duplicate: true,
            });
        } else if b != a + 1 && !self.duplicates_only {
            let recorded_gap = self.gaps.iter().any(|g| {
                g.first_missing_seq <= a + 1 && g.first_missing_seq + g.missing_count >= b
            });
            self.breaks.push(SequenceBreak {
                after_seq: a,
                next_seq: b,
                recorded_gap,
                duplicate: false,
            });
        }
    }

    pub fn finish(self) -> Vec<SequenceBreak> {
        self.breaks
    }
}

/// The live sequenced records of a set merged in sequence order: one head record per
/// medium in a heap. A medium is opened for reading when the merge reaches its first sequence
/// number and closed when its records run out, so a journal's media (whose ranges follow one
/// another) are read one or two at a time. A medium whose records are out of order is sorted
/// in memory first.
pub struct Sequenced<'a> {
    set: &'a MediaSet,
    sources: Vec<SequencedSource<'a>>,
    /// (sequence number, medium) of every open medium's next record, and of every medium not
    /// opened yet at its first sequence number.
    heads: BinaryHeap<Reverse<(u64, usize)>>,
    last: Option<RecordHeader>,
    started: bool,
    failed: bool,
}

enum SequencedSource<'a> {
    NotOpened,
    Open {
        records: Box<dyn Iterator<Item = Result<ScannedRecord, JournalError>> + 'a>,
        head: Option<ScannedRecord>,
    },
    Done,
}

impl<'a> Sequenced<'a> {
    pub(super) fn new(set: &'a MediaSet) -> Self {
        Self {
            set,
            sources: Vec::new(),
            heads: BinaryHeap::new(),
            last: None,
            started: false,
            failed: false,
        }
    }

    fn start(&mut self) {
        for (i, m) in self.set.media.iter().enumerate() {
            self.sources.push(SequencedSource::NotOpened);
            if let Some(first) = m.live.first_seq {
                self.heads.push(Reverse((first, i)));
            }
        }
    }

    /// Starts reading medium `i` and takes its first record into its head.
    fn open(&mut self, i: usize) -> Result<(), JournalError> {
        let m = &self.set.media[i];
        let live = m
            .live_records()
            .filter(|r| r.as_ref().map_or(true, |r| r.header.is_sequenced()));
        let records: Box<dyn Iterator<Item = Result<ScannedRecord, JournalError>> + 'a> =
            if m.live.in_order {
                Box::new(live)
            } else {
                let mut sorted = live.collect::<Result<Vec<_>, _>>()?;
                sorted.sort_by_key(|r| r.header.seq);
                Box::new(sorted.into_iter().map(Ok))
            };
        self.sources[i] = SequencedSource::Open {
            records,
            head: None,
        };
        self.advance(i)
    }

    /// Takes medium `i`'s next record into its head, or closes it after its last.
    fn advance(&mut self, i: usize) -> Result<(), JournalError> {
        let SequencedSource::Open { records, head } = &mut self.sources[i] else {
            return Ok(());
        };
        *head = records.next().transpose()?;
        match head {
            Some(r) => self.heads.push(Reverse((r.header.seq, i))),
            None => self.sources[i] = SequencedSource::Done,
        }
        Ok(())
    }

    fn next_record(&mut self) -> Result<Option<RecordRef>, JournalError> {
        if !self.started {
            self.started = true;
            self.start();
        }
        while let Some(Reverse((_, i))) = self.heads.pop() {
            let record = match &mut self.sources[i] {
                SequencedSource::NotOpened => {
                    self.open(i)?;
                    continue;
                }
                SequencedSource::Open { head, .. } => head.take(),
                SequencedSource::Done => None,
            };
            let Some(record) = record else {
                continue;
            };
            self.advance(i)?;
            if self.last.replace(record.header) == Some(record.header) {
                continue;
            }
            return Ok(Some(RecordRef { medium: i, record }));
        }
        Ok(None)
    }
}

impl Iterator for Sequenced<'_> {
    type Item = Result<RecordRef, JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let next = self.next_record();
        self.failed = next.is_err();
        next.transpose()
    }
}
