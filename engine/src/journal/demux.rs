//! `demux`: splits a journal into one journal per stream (volume + queue). Each output is a
//! single medium holding that stream's records plus the journal-wide ones (log-init, marks,
//! gaps), with their original sequence numbers; its header carries the "demuxed" flag.
//! Every unresolved stop of the journal (a stop record, or a catalog saying the journal
//! stopped, with no gap record or later record accounting for the lost numbers) is written
//! into every output as a stop record at its place in the sequence: a demuxed stream has no
//! contiguous numbers to show the loss, so `verify` and `restore` see it only that way.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::entry::now_ns;
use super::error::JournalError;
use super::format::{
    encode_record, padding_needed, padding_record, MediumHeader, Op, StopInfo, StreamDef,
    BLOCK_BYTES, MEDIUM_FLAG_DEMUXED,
};
use super::media::{medium_file_name, MediaSet, StopNote};
use super::prologue::unsequenced;
use super::running::JOURNAL_STREAM_ID;

/// One journal written by demux.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemuxOutput {
    pub stream_id: u32,
    pub volume: String,
    pub queue_index: u16,
    pub path: PathBuf,
    pub records: u64,
}

/// Writes `DIR/<volume>.q<queue>/medium-000000.fj` for every stream of `set`: one walk of
/// the set per [`OUTPUTS_PER_WALK`] streams (one walk for all of them in most journals).
pub fn demux(set: &MediaSet, out_dir: &Path) -> Result<Vec<DemuxOutput>, JournalError> {
    let stops: Vec<StopNote> = set.stops()?.into_iter().filter(|s| !s.resolved).collect();
    let journal_id = set
        .media
        .iter()
        .find_map(|m| m.scan.medium_header)
        .map_or(0, |h| h.journal_id);
    let streams: Vec<(&u32, &StreamDef)> = set.streams.iter().collect();
    let mut done = Vec::new();
    for group in streams.chunks(OUTPUTS_PER_WALK) {
        done.extend(demux_streams(set, out_dir, group, &stops, journal_id)?);
    }
    Ok(done)
}

/// The outputs open at once (each a file and a buffer): bounded so that a journal of
/// thousands of streams stays within the process's open-file limit.
const OUTPUTS_PER_WALK: usize = 256;

/// Writes the outputs of `streams` in one walk of the set.
fn demux_streams(
    set: &MediaSet,
    out_dir: &Path,
    streams: &[(&u32, &StreamDef)],
    stops: &[StopNote],
    journal_id: u64,
) -> Result<Vec<DemuxOutput>, JournalError> {
    let mut outputs = Vec::new();
    let mut by_stream = BTreeMap::new();
    for &(&stream_id, def) in streams {
        by_stream.insert(stream_id, outputs.len());
        outputs.push(StreamOutput::create(out_dir, stream_id, def, journal_id)?);
    }
    let mut last_seq = 0;
    for r in set.sequenced() {
        let r = r?;
        let h = r.record.header;
        last_seq = h.seq;
        let targets = if h.stream_id == JOURNAL_STREAM_ID {
            0..outputs.len()
        } else {
            match by_stream.get(&h.stream_id) {
                Some(&i) => i..i + 1,
                None => continue,
            }
        };
        let payload = set.payload(&r)?;
        for out in &mut outputs[targets] {
            out.stops_before(h.seq, stops)?;
            out.writer
                .record(|b| encode_record(b, h, &payload))
                .map_err(out.err("write"))?;
            out.records += 1;
        }
    }
    outputs
        .into_iter()
        .map(|out| out.finish(stops, last_seq))
        .collect()
}

/// One stream's output medium while demux writes it.
struct StreamOutput {
    stream_id: u32,
    volume: String,
    queue_index: u16,
    path: PathBuf,
    writer: RecordWriter,
    records: u64,
    /// How many of the unresolved stops are written.
    stops_written: usize,
}

impl StreamOutput {
    /// Creates the output's directory and medium and writes its medium header.
    fn create(
        out_dir: &Path,
        stream_id: u32,
        def: &StreamDef,
        journal_id: u64,
    ) -> Result<Self, JournalError> {
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
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| JournalError::Medium {
                path: path.clone(),
                step: "create",
                source,
            })?;
        let mut out = Self {
            stream_id,
            volume: def.volume.clone(),
            queue_index: def.queue_index,
            path,
            writer: RecordWriter::new(file),
            records: 0,
            stops_written: 0,
        };
        out.writer
            .record(|b| encode_record(b, unsequenced(Op::MediumHeader, 0, 0, 0), &header.encode()))
            .map_err(out.err("write"))?;
        Ok(out)
    }

    fn err(&self, step: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
        let path = self.path.clone();
        move |source| JournalError::Medium { path, step, source }
    }

    /// Writes the stops that come before sequence number `seq`.
    fn stops_before(&mut self, seq: u64, stops: &[StopNote]) -> Result<(), JournalError> {
        while let Some(stop) = stops.get(self.stops_written).filter(|s| s.after_seq < seq) {
            self.writer
                .record(|b| encode_stop(b, stop))
                .map_err(self.err("write"))?;
            self.stops_written += 1;
        }
        Ok(())
    }

    /// Writes the remaining stops and the padding to a whole block, and syncs the medium.
    fn finish(mut self, stops: &[StopNote], last_seq: u64) -> Result<DemuxOutput, JournalError> {
        self.stops_before(u64::MAX, stops)?;
        let pad = padding_needed(self.writer.len_bytes as usize % BLOCK_BYTES);
        if pad > 0 {
            self.writer
                .record(|b| b.extend_from_slice(&padding_record(pad, last_seq, 0)))
                .map_err(self.err("write"))?;
        }
        let sync_err = self.err("sync");
        self.writer.finish().map_err(sync_err)?;
        Ok(DemuxOutput {
            stream_id: self.stream_id,
            volume: self.volume,
            queue_index: self.queue_index,
            path: self.path,
            records: self.records,
        })
    }
}

/// The write buffer of each output (up to [`OUTPUTS_PER_WALK`] are open at once).
const OUTPUT_BUFFER_BYTES: usize = 128 << 10;

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
            out: std::io::BufWriter::with_capacity(OUTPUT_BUFFER_BYTES, file),
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
