//! `restore`: rebuilds one volume's image at a chosen point (sequence number, time or mark)
//! by applying its journaled writes, in sequence order, to a copy of a base image.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::JournalError;
use super::format::{Op, RecordHeader};
use super::media::{MediaSet, Phase, Progress, RecordRef, StopNote};
use super::merge::{BreakFinder, SequenceBreak};

/// Up to where a restore goes (inclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Until {
    End,
    Seq(u64),
    /// Nanoseconds since the Unix epoch: every record stamped at or before it.
    TimeNs(u64),
    /// Everything before the first mark with this label.
    Mark(String),
}

impl Until {
    /// Parses `SEQ` (digits), `seq:N`, `time:NANOS`, `time:YYYY-MM-DDTHH:MM:SS[.frac]Z`,
    /// `mark:LABEL`, or any other text as a mark label.
    pub fn parse(s: &str) -> Result<Until, JournalError> {
        if let Some(n) = s.strip_prefix("seq:") {
            return n.parse().map(Until::Seq).map_err(|_| bad_until(s));
        }
        if let Some(t) = s.strip_prefix("time:") {
            return parse_time_ns(t)
                .map(Until::TimeNs)
                .ok_or_else(|| bad_until(s));
        }
        if let Some(m) = s.strip_prefix("mark:") {
            return Ok(Until::Mark(m.to_string()));
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse().map(Until::Seq).map_err(|_| bad_until(s));
        }
        Ok(Until::Mark(s.to_string()))
    }
}

fn bad_until(s: &str) -> JournalError {
    JournalError::Invalid(format!(
        "--until {s:?}: expected SEQ, seq:N, time:NANOS, time:RFC3339 (UTC, Z) or mark:LABEL"
    ))
}

/// Parses nanoseconds or `YYYY-MM-DDTHH:MM:SS[.fraction]Z`.
pub fn parse_time_ns(t: &str) -> Option<u64> {
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().ok();
    }
    let t = t.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut h = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (h.next()??, h.next()??, h.next()??);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let days = days_from_civil(y, mo, da);
    let secs = days * 86400 + hh * 3600 + mm * 60 + ss;
    let mut nanos: u64 = 0;
    if !frac.is_empty() {
        let digits: String = frac.chars().take(9).collect();
        nanos = format!("{digits:0<9}").parse().ok()?;
    }
    u64::try_from(secs)
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(nanos)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub volume: String,
    pub base: PathBuf,
    pub out: PathBuf,
    pub until: Until,
    pub allow_gaps: bool,
}

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub volume: String,
    pub out: PathBuf,
    /// The last sequence number included.
    pub until_seq: u64,
    pub records_applied: u64,
    pub bytes_applied: u64,
    pub gaps: Vec<SequenceBreak>,
    /// Stops of the journal the restored range reaches past (see [`stops_in_range`]).
    pub stops: Vec<StopNote>,
    /// Why writes may be missing from the restored image, one line each.
    pub warnings: Vec<String>,
}

/// The stops `until` reaches past: a stop after seq N is reached by any point after N,
/// and by `End` (or a time after the stop) even when N is the last number.
pub fn stops_in_range(stops: Vec<StopNote>, until_seq: u64, until: &Until) -> Vec<StopNote> {
    stops
        .into_iter()
        .filter(|s| {
            until_seq > s.after_seq
                || (until_seq == s.after_seq
                    && match until {
                        Until::End => true,
                        Until::TimeNs(t) => s.timestamp_ns <= *t,
                        _ => false,
                    })
        })
        .collect()
}

/// One line per stop: what may be missing. The bool says whether writes the guest made
/// are known or likely to be missing (restore refuses without `--allow-gaps`).
pub fn describe_stop(s: &StopNote, until_seq: u64) -> Option<(bool, String)> {
    if s.cause.loses_writes() {
        if s.resolved {
            // A gap record (a sequence break) or an unbroken sequence accounts for it.
            return None;
        }
        let count = s
            .unjournaled_count
            .map_or("an unknown number of".to_string(), |n| n.to_string());
        return Some((
            true,
            format!(
                "journaling stopped after seq {} ({}: {}): {count} later write(s) of the guest are not in the journal",
                s.after_seq,
                s.cause.name(),
                s.reason
            ),
        ));
    }
    (until_seq > s.after_seq).then(|| {
        (
            false,
            format!(
                "the journal was closed after seq {} and started again: writes made to the volume while no journal ran are not in it",
                s.after_seq
            ),
        )
    })
}

/// The inclusive sequence number `until` stands for in `set`.
pub fn resolve_until(set: &MediaSet, until: &Until) -> Result<u64, JournalError> {
    match until {
        Until::End => Ok(set.last_seq()),
        Until::Seq(n) => Ok(*n),
        Until::TimeNs(t) => {
            let mut last = 0;
            for r in set.sequenced() {
                let h = r?.record.header;
                if h.timestamp_ns > *t {
                    break;
                }
                last = h.seq;
            }
            Ok(last)
        }
        Until::Mark(label) => {
            for r in set.notable(Op::Mark) {
                if set.label(&r)? == *label {
                    return Ok(r.record.header.seq);
                }
            }
            Err(JournalError::Invalid(format!(
                "no mark labelled {label:?} in the journal"
            )))
        }
    }
}

/// How often (in records) checking the range reports progress.
const PROGRESS_RECORDS: u64 = 1 << 14;

/// Restores `opts.volume`. Reads the set twice: once to check the range (sequence breaks,
/// records to apply; [`Phase::Checking`], records walked of the set's records), once to apply
/// ([`Phase::Applying`], records applied of those to apply).
pub fn restore(
    set: &MediaSet,
    opts: &RestoreOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<RestoreReport, JournalError> {
    let streams = volume_streams(set, &opts.volume)?;
    let until_seq = resolve_until(set, &opts.until)?;
    let stops = stops_in_range(set.stops()?, until_seq, &opts.until);
    let notes: Vec<(bool, String)> = stops
        .iter()
        .filter_map(|s| describe_stop(s, until_seq))
        .collect();
    if let Some((_, why)) = notes.iter().find(|n| n.0).filter(|_| !opts.allow_gaps) {
        return Err(JournalError::Invalid(format!(
            "writes may be missing in the range to restore: {why}; use --allow-gaps to restore anyway"
        )));
    }
    let warnings: Vec<String> = notes.into_iter().map(|n| n.1).collect();
    let ours = |h: &RecordHeader| h.op.is_data() && streams.contains(&h.stream_id);
    let checked = check_range(set, until_seq, ours, progress)?;
    if let Some(first) = checked.gaps.first().filter(|_| !opts.allow_gaps) {
        return Err(broken_range_refused(first, checked.gaps.len()));
    }
    let image = OutputImage::copy_of(&opts.base, &opts.out)?;
    let applied = apply_range(
        set,
        &image,
        until_seq,
        ours,
        checked.records_to_apply,
        progress,
    )?;
    image.sync()?;
    Ok(RestoreReport {
        volume: opts.volume.clone(),
        out: opts.out.clone(),
        until_seq,
        records_applied: applied.records,
        bytes_applied: applied.bytes,
        gaps: checked.gaps,
        stops,
        warnings,
    })
}

/// The stream ids of `volume`, or an error naming the volumes the journal has.
fn volume_streams(set: &MediaSet, volume: &str) -> Result<Vec<u32>, JournalError> {
    let streams = set.streams_of(volume);
    if streams.is_empty() {
        let known: Vec<_> = set.streams.values().map(|d| d.volume.clone()).collect();
        return Err(JournalError::Invalid(format!(
            "volume {volume:?} is not in the journal (it has: {known:?})"
        )));
    }
    Ok(streams)
}

/// What the first walk over the range to restore found.
struct RangeCheck {
    gaps: Vec<SequenceBreak>,
    records_to_apply: u64,
}

/// Walks the set up to `until_seq`: the breaks in its sequence, and how many of its records
/// `ours` selects (the total that applying them reports progress against).
fn check_range(
    set: &MediaSet,
    until_seq: u64,
    ours: impl Fn(&RecordHeader) -> bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<RangeCheck, JournalError> {
    let mut breaks = BreakFinder::new(set);
    let mut records_to_apply = 0u64;
    let set_records = set.media.iter().map(|m| m.live.records).sum();
    let checking = |done| Progress {
        phase: Phase::Checking,
        done,
        total: set_records,
    };
    for (walked, r) in set.sequenced().enumerate() {
        let h = r?.record.header;
        if h.seq > until_seq {
            break;
        }
        breaks.push(h.seq);
        records_to_apply += u64::from(ours(&h));
        if (walked as u64).is_multiple_of(PROGRESS_RECORDS) {
            progress(checking(walked as u64));
        }
    }
    progress(checking(set_records));
    Ok(RangeCheck {
        gaps: breaks.finish(),
        records_to_apply,
    })
}

/// The refusal to restore over a broken sequence, naming the first of `count` breaks.
fn broken_range_refused(first: &SequenceBreak, count: usize) -> JournalError {
    JournalError::Invalid(format!(
        "the journal is broken in the range to restore: after seq {} comes {} ({} break(s){}); use --allow-gaps to restore anyway",
        first.after_seq,
        first.next_seq,
        count,
        if first.recorded_gap { ", journaling was stopped" } else { ", records missing or damaged" }
    ))
}

/// What applying the range wrote.
struct Applied {
    records: u64,
    bytes: u64,
}

/// Applies, in sequence order, the records up to `until_seq` that `ours` selects.
fn apply_range(
    set: &MediaSet,
    image: &OutputImage,
    until_seq: u64,
    ours: impl Fn(&RecordHeader) -> bool,
    records_to_apply: u64,
    progress: &mut dyn FnMut(Progress),
) -> Result<Applied, JournalError> {
    let mut applied = Applied {
        records: 0,
        bytes: 0,
    };
    for r in set.sequenced() {
        let r = r?;
        let h = &r.record.header;
        if h.seq > until_seq {
            break;
        }
        if !ours(h) {
            continue;
        }
        image.apply(set, &r)?;
        applied.bytes += h.len_bytes;
        applied.records += 1;
        progress(Progress {
            phase: Phase::Applying,
            done: applied.records,
            total: records_to_apply,
        });
    }
    Ok(applied)
}

/// The image being restored: a copy of the base image, written in place.
struct OutputImage<'a> {
    path: &'a Path,
    file: File,
    size_bytes: u64,
}

impl<'a> OutputImage<'a> {
    /// Copies `base` to `path` and opens the copy for writing.
    fn copy_of(base: &Path, path: &'a Path) -> Result<Self, JournalError> {
        let err = |step| output_err(path, step);
        std::fs::copy(base, path).map_err(err("copy the base image"))?;
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(err("open"))?;
        let size_bytes = file.metadata().map_err(err("stat"))?.len();
        Ok(Self {
            path,
            file,
            size_bytes,
        })
    }

    /// Writes one data record (its payload, or zeros) where it belongs. A record reaching
    /// past the image is refused rather than growing it: the base is the wrong size for
    /// this journal.
    fn apply(&self, set: &MediaSet, r: &RecordRef) -> Result<(), JournalError> {
        let h = &r.record.header;
        let end = h
            .offset_bytes
            .checked_add(h.len_bytes)
            .filter(|e| *e <= self.size_bytes);
        if end.is_none() {
            return Err(JournalError::Invalid(format!(
                "seq {}: {} at offset {} length {} reaches past the base image ({} bytes)",
                h.seq,
                h.op.name(),
                h.offset_bytes,
                h.len_bytes,
                self.size_bytes
            )));
        }
        if h.op == Op::Write {
            let payload = set.payload(r)?;
            self.file
                .write_all_at(&payload, h.offset_bytes)
                .map_err(output_err(self.path, "write"))
        } else {
            write_zeros(&self.file, h.offset_bytes, h.len_bytes)
                .map_err(output_err(self.path, "write zeros"))
        }
    }

    fn sync(&self) -> Result<(), JournalError> {
        self.file.sync_all().map_err(output_err(self.path, "sync"))
    }
}

/// Maps an I/O error of `step` on the output image to a journal error naming the file.
fn output_err(path: &Path, step: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Medium { path, step, source }
}

fn write_zeros(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        file.write_all_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}
