//! `demux`: splits a journal into one journal per stream (volume + queue). Each output is a
//! single medium holding that stream's records plus the journal-wide ones (log-init, marks,
//! gaps), with their original sequence numbers; its header carries the "demuxed" flag.
//! Every unresolved stop of the journal (a stop record, or a catalog saying the journal
//! stopped, with no gap record or later record accounting for the lost numbers) is written
//! into every output as a stop record at its place in the sequence: a demuxed stream has no
//! contiguous numbers to show the loss, so `verify` and `restore` see it only that way.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::entry::now_ns;
use super::error::JournalError;
use super::format::{
    encode_record, padding_needed, padding_record, MediumHeader, Op, StopInfo, BLOCK_BYTES,
    MEDIUM_FLAG_DEMUXED,
};
use super::media::{medium_file_name, MediaSet, StopNote};
use super::running::JOURNAL_STREAM_ID;
use super::writer::unsequenced;

/// One journal written by demux.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemuxOutput {
    pub stream_id: u32,
    pub volume: String,
    pub queue_index: u16,
    pub path: PathBuf,
    pub records: u64,
}

/// Writes `DIR/<volume>.q<queue>/medium-000000.fj` for every stream of `set`.
pub fn demux(set: &MediaSet, out_dir: &Path) -> Result<Vec<DemuxOutput>, JournalError> {
    let records = set.sequenced();
    let stops: Vec<StopNote> = set
        .stops(&records)?
        .into_iter()
        .filter(|s| !s.resolved)
        .collect();
    let journal_id = set
        .media
        .iter()
        .find_map(|m| m.scan.medium_header)
        .map_or(0, |h| h.journal_id);
    let mut outputs = Vec::new();
    for (&stream_id, def) in &set.streams {
        let dir = out_dir.join(format!("{}.q{}", def.volume, def.queue_index));
        std::fs::create_dir_all(&dir).map_err(|source| JournalError::Dir {
            path: dir.clone(),
            source,
        })?;
        let header = MediumHeader {
            journal_id,
            medium_index: 0,
            flags: MEDIUM_FLAG_DEMUXED,
            capacity_bytes: 0,
            prev_valid_end_bytes: u64::MAX,
        };
        let path = dir.join(medium_file_name(0));
        let err = |step: &'static str| {
            let path = path.clone();
            move |source| JournalError::Medium { path, step, source }
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(err("create"))?;
        let mut out = RecordWriter::new(file);
        out.record(|b| {
            encode_record(
                b,
                unsequenced(super::format::Op::MediumHeader, 0, 0, 0),
                &header.encode(),
            )
        })
        .map_err(err("write"))?;
        let mut count = 0;
        let mut pending_stops = stops.iter().peekable();
        for r in records.iter().filter(|r| {
            r.record.header.stream_id == stream_id || r.record.header.stream_id == JOURNAL_STREAM_ID
        }) {
            while let Some(stop) = pending_stops.next_if(|s| s.after_seq < r.record.header.seq) {
                out.record(|b| encode_stop(b, stop)).map_err(err("write"))?;
            }
            let payload = set.payload(r)?;
            out.record(|b| encode_record(b, r.record.header, &payload))
                .map_err(err("write"))?;
            count += 1;
        }
        for stop in pending_stops {
            out.record(|b| encode_stop(b, stop)).map_err(err("write"))?;
        }
        let pad = padding_needed(out.len_bytes as usize % BLOCK_BYTES);
        if pad > 0 {
            let last = records.last().map_or(0, |r| r.record.header.seq);
            out.record(|b| b.extend_from_slice(&padding_record(pad, last, 0)))
                .map_err(err("write"))?;
        }
        out.finish().map_err(err("sync"))?;
        outputs.push(DemuxOutput {
            stream_id,
            volume: def.volume.clone(),
            queue_index: def.queue_index,
            path,
            records: count,
        });
    }
    Ok(outputs)
}

/// Writes one output medium record by record through a buffer (a stream's records are
/// never all in memory at once).
struct RecordWriter {
    out: std::io::BufWriter<std::fs::File>,
    len_bytes: u64,
    scratch: Vec<u8>,
}

impl RecordWriter {
    fn new(file: std::fs::File) -> Self {
        Self {
            out: std::io::BufWriter::with_capacity(1 << 20, file),
            len_bytes: 0,
            scratch: Vec::new(),
        }
    }

    /// Encodes a record with `encode` and writes it.
    fn record(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> std::io::Result<()> {
        self.scratch.clear();
        encode(&mut self.scratch);
        self.out.write_all(&self.scratch)?;
        self.len_bytes += self.scratch.len() as u64;
        Ok(())
    }

    /// Flushes the buffer and makes the medium durable.
    fn finish(self) -> std::io::Result<()> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    }
}

/// Appends `stop` as a stop record (`seq` = the last number journaled before it).
fn encode_stop(out: &mut Vec<u8>, stop: &StopNote) {
    let mut header = unsequenced(Op::Stop, stop.after_seq, 0, 0);
    if stop.timestamp_ns != u64::MAX {
        header.timestamp_ns = stop.timestamp_ns;
    } else {
        header.timestamp_ns = now_ns();
    }
    let info = StopInfo {
        cause: stop.cause,
        first_unjournaled_seq: stop.first_unjournaled_seq,
        unjournaled_count: stop.unjournaled_count.unwrap_or(0),
        reason: stop.reason.clone(),
    };
    encode_record(out, header, &info.encode());
}
