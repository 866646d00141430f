//! The journal's log: one entry per record, kept in memory as the journal runs and rebuilt
//! by scanning media; rendering as JSON lines and CSV.

use super::format::{Op, RecordHeader};

/// One record as the log lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LogEntry {
    pub seq: u64,
    pub stream_id: u32,
    pub log_id: u32,
    /// Nanoseconds since the Unix epoch (CLOCK_REALTIME) when the record was made.
    pub timestamp_ns: u64,
    pub op: Op,
    /// Guest byte offset and length (0 for flush and bookkeeping records).
    pub offset_bytes: u64,
    pub len_bytes: u64,
    /// Which medium of the set and where on it the record starts.
    pub medium: u32,
    pub position_bytes: u64,
}

impl LogEntry {
    /// The entry of the record `header` at `position_bytes` of medium `medium`.
    pub fn of(header: &RecordHeader, medium: u32, position_bytes: u64) -> Self {
        Self {
            seq: header.seq,
            stream_id: header.stream_id,
            log_id: header.log_id,
            timestamp_ns: header.timestamp_ns,
            op: header.op,
            offset_bytes: header.offset_bytes,
            len_bytes: header.len_bytes,
            medium,
            position_bytes,
        }
    }
}

/// The CSV header line matching [`render_csv_line`].
pub const CSV_HEADER: &str =
    "seq,stream_id,log_id,timestamp_ns,op,offset_bytes,len_bytes,medium,position_bytes";

/// Renders one entry as a CSV line (no newline).
pub fn render_csv_line(e: &LogEntry) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{}",
        e.seq,
        e.stream_id,
        e.log_id,
        e.timestamp_ns,
        e.op.name(),
        e.offset_bytes,
        e.len_bytes,
        e.medium,
        e.position_bytes
    )
}

/// Renders entries as CSV with a header line.
pub fn render_csv(entries: &[LogEntry]) -> String {
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    for e in entries {
        s.push_str(&render_csv_line(e));
        s.push('\n');
    }
    s
}

/// Renders entries as JSON lines (one object per line).
pub fn render_jsonl(entries: &[LogEntry]) -> String {
    let mut s = String::new();
    for e in entries {
        if let Ok(line) = serde_json::to_string(e) {
            s.push_str(&line);
            s.push('\n');
        }
    }
    s
}

/// Nanoseconds since the Unix epoch, now (CLOCK_REALTIME).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
