//! Fuzz target: the journal record header and payload decoders must never panic.
#![no_main]

use ferry_engine::journal::catalog::Catalog;
use ferry_engine::journal::format::{
    decode_trailer, GapInfo, MediumHeader, RecordHeader, StopInfo, StreamDef,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(h) = RecordHeader::decode(data) {
        let payload = data.get(64..64 + h.payload_len_bytes as usize).unwrap_or(&[]);
        let _ = h.check_payload(payload);
    }
    let _ = decode_trailer(data);
    let _ = StreamDef::decode(data);
    let _ = MediumHeader::decode(data);
    let _ = GapInfo::decode(data);
    let _ = StopInfo::decode(data);
    let _ = Catalog::decode(data);
});
