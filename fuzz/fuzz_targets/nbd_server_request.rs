//! Fuzz target: the NBD server's request validation. Any request header (the first 28
//! bytes) against any negotiated limits (the bytes after it) must give a command or a
//! refusal without panicking, and a command must be one the server can run: inside the
//! export, in whole blocks, within the maximum payload, never a change to a read-only
//! export; a refused write must name the payload to drop only when it can be read.
#![no_main]

use ferry_engine::nbd::protocol::{RequestHeader, REQUEST_HEADER_BYTES};
use ferry_engine::nbd::server::request::{validate, Command, ExportLimits, Refusal};

fn limits(bytes: &[u8]) -> ExportLimits {
    let mut b = [0u8; 18];
    let n = bytes.len().min(b.len());
    b[..n].copy_from_slice(&bytes[..n]);
    let flags = b[17];
    ExportLimits {
        size_bytes: u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        // A power of two from 1 to 64 KiB, as the server advertises.
        block_bytes: 1 << (b[8] % 17),
        payload_bytes_max: u32::from_be_bytes([b[9], b[10], b[11], b[12]]).max(1),
        read_only: flags & 1 != 0,
        structured_replies: flags & 2 != 0,
        block_status: flags & 4 != 0,
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some(header) = data.get(..REQUEST_HEADER_BYTES) else {
        return;
    };
    let Ok(header) = RequestHeader::decode(header) else {
        return;
    };
    let limits = limits(&data[REQUEST_HEADER_BYTES..]);
    let in_export = |offset: u64, len: u32| {
        let end = offset.checked_add(u64::from(len));
        let block = u64::from(limits.block_bytes);
        assert!(end.is_some_and(|e| e <= limits.size_bytes));
        assert!(len > 0 && offset % block == 0 && u64::from(len) % block == 0);
    };
    match validate(&header, &limits) {
        Ok(Command::Read { offset_bytes, len_bytes }) => {
            in_export(offset_bytes, len_bytes);
            assert!(len_bytes <= limits.payload_bytes_max);
        }
        Ok(Command::Write { offset_bytes, len_bytes, .. }) => {
            in_export(offset_bytes, len_bytes);
            assert!(len_bytes <= limits.payload_bytes_max && !limits.read_only);
        }
        Ok(Command::Trim { offset_bytes, len_bytes, .. })
        | Ok(Command::WriteZeroes { offset_bytes, len_bytes, .. }) => {
            in_export(offset_bytes, len_bytes);
            assert!(!limits.read_only);
        }
        Ok(Command::BlockStatus { offset_bytes, len_bytes, .. }) => {
            in_export(offset_bytes, len_bytes);
            assert!(limits.block_status);
        }
        Ok(Command::Flush | Command::Disconnect) => {}
        Err(Refusal::Error { payload_bytes, .. }) => {
            assert!(payload_bytes == 0 || payload_bytes == header.len_bytes);
            assert!(payload_bytes <= limits.payload_bytes_max);
        }
        Err(Refusal::Close { .. }) => assert!(header.len_bytes > limits.payload_bytes_max),
    }
});
