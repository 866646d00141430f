//! The bookkeeping records that open every medium (`docs/journal.md`): the medium header,
//! the stream definitions restated, and the current log's label; and the header of any
//! unsequenced record.

use super::entry::now_ns;
use super::format::{encode_record, MediumHeader, Op, RecordHeader, StreamDef, FLAG_UNSEQUENCED};

/// What the writer restates at the start of every medium.
#[derive(Debug, Clone, Default)]
pub struct Prologue {
    pub streams: Vec<(u32, StreamDef)>,
    pub log_id: u32,
    pub label: String,
    pub last_seq: u64,
}

/// A header for a bookkeeping record.
pub fn unsequenced(op: Op, last_seq: u64, stream_id: u32, log_id: u32) -> RecordHeader {
    RecordHeader {
        op,
        flags: FLAG_UNSEQUENCED,
        seq: last_seq,
        stream_id,
        log_id,
        timestamp_ns: now_ns(),
        offset_bytes: 0,
        len_bytes: 0,
        payload_len_bytes: 0,
        payload_crc: 0,
    }
}

/// Medium header, restated stream definitions and the current log's label.
pub fn encode_prologue(header: &MediumHeader, prologue: &Prologue) -> Vec<u8> {
    let mut out = Vec::new();
    let last = prologue.last_seq;
    encode_record(
        &mut out,
        unsequenced(Op::MediumHeader, last, 0, prologue.log_id),
        &header.encode(),
    );
    for (id, def) in &prologue.streams {
        encode_record(
            &mut out,
            unsequenced(Op::StreamDef, last, *id, prologue.log_id),
            &def.encode(),
        );
    }
    if prologue.log_id != 0 {
        encode_record(
            &mut out,
            unsequenced(Op::LogInit, last, 0, prologue.log_id),
            prologue.label.as_bytes(),
        );
    }
    out
}
