//! A medium whose log is longer than one trailer record may carry (more than
//! `TRAILER_ENTRIES_PER_RECORD` records, e.g. a 1 GiB medium of 512-byte writes): the log is
//! split over several trailer records, each under the format's payload limit, and the
//! medium reads back as sealed with no problem.

use super::super::catalog::Catalog;
use super::super::entry::LogEntry;
use super::super::format::{
    decode_trailer, encode_record, Op, RecordHeader, FLAG_TRAILER_CONTINUES, PAYLOAD_MAX_BYTES,
    TRAILER_ENTRIES_PER_RECORD, TRAILER_ENTRY_BYTES,
};
use super::super::media::medium_file_name;
use super::super::prologue::Prologue;
use super::super::scan::{read_payload, scan_medium, FileSource};
use super::super::writer::{MediumWriter, PendingRecord};
use super::super::{JournalOptions, MediumCache};
use super::support::TestResult;

#[test]
fn a_log_longer_than_one_trailer_record_is_split_and_the_medium_reads_as_sealed() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut options = JournalOptions::new(tmp.path().join("j"));
    options.capacity_bytes = 1 << 30;
    options.cache = MediumCache::Writeback;
    std::fs::create_dir_all(&options.dir)?;
    let dir = options.dir.clone();
    let mut writer = MediumWriter::new(options, 42, 0, u64::MAX, Catalog::default());

    // More entries than one record's payload may hold; flush records (header only, 64 bytes
    // each) keep the medium small.
    let count = u64::from(PAYLOAD_MAX_BYTES) / TRAILER_ENTRY_BYTES as u64 + 1000;
    assert!(count > TRAILER_ENTRIES_PER_RECORD as u64);
    let mut batch = Vec::with_capacity(count as usize * 64);
    let mut records = Vec::with_capacity(count as usize);
    for seq in 1..=count {
        let header = RecordHeader {
            op: Op::Flush,
            flags: 0,
            seq,
            stream_id: 0,
            log_id: 1,
            timestamp_ns: seq,
            offset_bytes: 0,
            len_bytes: 0,
            payload_len_bytes: 0,
            payload_crc: 0,
        };
        records.push(PendingRecord {
            batch_offset: batch.len(),
            entry: LogEntry {
                seq,
                stream_id: 0,
                log_id: 1,
                timestamp_ns: seq,
                op: Op::Flush,
                offset_bytes: 0,
                len_bytes: 0,
                medium: 0,
                position_bytes: 0,
            },
        });
        encode_record(&mut batch, header, &[]);
    }
    let prologue = Prologue {
        streams: Vec::new(),
        log_id: 1,
        label: "long".into(),
        last_seq: count,
    };
    let mut written = Vec::new();
    writer
        .write_batch(&batch, &records, &prologue, &mut written)
        .map_err(|e| e.to_string())?;
    assert_eq!(written.len() as u64, count);
    writer.seal(count, None).map_err(|e| e.to_string())?;

    let src = FileSource::open(&dir.join(medium_file_name(0)))?;
    let scan = scan_medium(&src)?;
    assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    assert!(scan.sealed);
    let trailers: Vec<_> = scan
        .records
        .iter()
        .filter(|r| r.header.op == Op::Trailer)
        .collect();
    assert_eq!(trailers.len(), 2);
    assert!(trailers[0].header.flags & FLAG_TRAILER_CONTINUES != 0);
    assert!(trailers[1].header.flags & FLAG_TRAILER_CONTINUES == 0);
    let mut log = Vec::new();
    for t in trailers {
        log.extend(decode_trailer(&read_payload(
            &src,
            t.position_bytes,
            &t.header,
        )?)?);
    }
    assert!(
        log == written,
        "the trailers hold the medium's log in order"
    );
    Ok(())
}
