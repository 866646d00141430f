//! Reading sets of media without holding their records: the opening scan keeps only
//! summaries, and `sequenced` merges the media in sequence order as it reads them, over
//! hand-made media (several media of one journal, interleaved inputs, a medium out of order,
//! the same records on two inputs).

use std::path::{Path, PathBuf};

use super::super::demux::demux;
use super::super::format::*;
use super::super::media::{MediaSet, Phase};
use super::super::restore::{restore, RestoreOptions, Until};
use super::super::verify::verify;
use super::support::TestResult;

const STREAM: u32 = 1;

fn header(op: Op, seq: u64) -> RecordHeader {
    RecordHeader {
        op,
        flags: 0,
        seq,
        stream_id: STREAM,
        log_id: 0,
        timestamp_ns: 1_000 + seq,
        offset_bytes: 0,
        len_bytes: 0,
        payload_len_bytes: 0,
        payload_crc: 0,
    }
}

/// Writes medium `index` of journal `journal_id` at `path`: a medium header, a stream
/// definition for volume "v", then a 512-byte write at sector `seq` for every sequence
/// number of `seqs` (payload: the byte `seq`), and a mark "m<seq>" after `mark_after`.
fn write_medium(
    path: &Path,
    journal_id: u64,
    index: u32,
    seqs: &[u64],
    mark_after: Option<u64>,
) -> TestResult<PathBuf> {
    let mut out = Vec::new();
    let medium = MediumHeader {
        journal_id,
        medium_index: index,
        flags: 0,
        capacity_bytes: 1 << 30,
        prev_valid_end_bytes: u64::MAX,
    };
    let mut h = header(Op::MediumHeader, 0);
    h.flags = FLAG_UNSEQUENCED;
    encode_record(&mut out, h, &medium.encode());
    let def = StreamDef {
        volume: "v".into(),
        queue_index: 0,
    };
    encode_record(&mut out, h_unsequenced(Op::StreamDef), &def.encode());
    for &seq in seqs {
        let mut w = header(Op::Write, seq);
        w.offset_bytes = seq * 512;
        w.len_bytes = 512;
        encode_record(&mut out, w, &[seq as u8; 512]);
        if mark_after == Some(seq) {
            let mut m = header(Op::Mark, seq + 1);
            m.stream_id = 0;
            encode_record(&mut out, m, format!("m{seq}").as_bytes());
        }
    }
    std::fs::create_dir_all(path.parent().ok_or("no parent")?)?;
    std::fs::write(path, &out)?;
    Ok(path.to_path_buf())
}

fn h_unsequenced(op: Op) -> RecordHeader {
    let mut h = header(op, 0);
    h.flags = FLAG_UNSEQUENCED;
    h
}

fn seqs_of(set: &MediaSet) -> TestResult<Vec<u64>> {
    Ok(set
        .sequenced()
        .map(|r| r.map(|r| r.record.header.seq))
        .collect::<Result<Vec<_>, _>>()?)
}

#[test]
fn an_opened_set_keeps_summaries_not_records_and_walks_media_in_order() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let d = tmp.path().join("j");
    let first: Vec<u64> = (1..=300).collect();
    let second: Vec<u64> = (302..=600).collect();
    write_medium(&d.join("medium-000000.fj"), 7, 0, &first, Some(300))?;
    write_medium(&d.join("medium-000001.fj"), 7, 1, &second, None)?;
    let mut scanned = Vec::new();
    let set = MediaSet::open_with_progress(std::slice::from_ref(&d), &mut |p| scanned.push(p))?;
    let media_bytes: u64 = std::fs::read_dir(&d)?
        .map(|e| Ok(e?.metadata()?.len()))
        .sum::<std::io::Result<u64>>()?;
    let last = scanned.last().ok_or("no scanning progress")?;
    assert_eq!(
        (last.phase, last.done, last.total),
        (Phase::Scanning, media_bytes, media_bytes)
    );
    for m in &set.media {
        assert!(m.scan.records.is_empty(), "records are not kept");
        assert!(m.live.in_order);
        assert!(
            m.live.notable.len() <= 3,
            "only header, stream def and mark: {:?}",
            m.live.notable
        );
    }
    assert_eq!(set.media[0].live.records, 303);
    assert_eq!(
        (set.media[1].live.first_seq, set.media[1].live.last_seq),
        (Some(302), Some(600))
    );
    assert_eq!(seqs_of(&set)?, (1..=600).collect::<Vec<_>>());
    assert_eq!(set.last_seq(), 600);
    let report = verify(&set);
    assert!(report.ok(), "{report:#?}");
    assert_eq!((report.first_seq, report.last_seq), (Some(1), Some(600)));
    Ok(())
}

#[test]
fn interleaved_inputs_merge_by_sequence_number() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let odd: Vec<u64> = (1..=99).step_by(2).collect();
    let even: Vec<u64> = (2..=100).step_by(2).collect();
    let a = write_medium(&tmp.path().join("a/medium-000000.fj"), 1, 0, &odd, None)?;
    let b = write_medium(&tmp.path().join("b/medium-000000.fj"), 2, 0, &even, None)?;
    let set = MediaSet::open(&[a, b])?;
    assert_eq!(seqs_of(&set)?, (1..=100).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn a_medium_out_of_order_is_sorted_and_restores_in_sequence_order() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("j/medium-000000.fj");
    write_medium(&path, 1, 0, &[5, 3, 4, 1, 2], None)?;
    let set = MediaSet::open(&[tmp.path().join("j")])?;
    assert!(!set.media[0].live.in_order);
    assert_eq!(seqs_of(&set)?, vec![1, 2, 3, 4, 5]);
    let base = tmp.path().join("base.img");
    std::fs::write(&base, vec![0u8; 8 * 512])?;
    let out = tmp.path().join("out.img");
    let mut reports = Vec::new();
    let report = restore(
        &set,
        &RestoreOptions {
            volume: "v".into(),
            base,
            out: out.clone(),
            until: Until::Seq(4),
            allow_gaps: false,
        },
        &mut |p| reports.push(p),
    )?;
    assert_eq!((report.records_applied, report.until_seq), (4, 4));
    let last = |phase| reports.iter().rev().find(|p| p.phase == phase).copied();
    let checked = last(Phase::Checking).ok_or("no checking progress")?;
    assert_eq!(checked.done, checked.total, "checking ends complete");
    let applied = last(Phase::Applying).ok_or("no applying progress")?;
    assert_eq!((applied.done, applied.total), (4, 4));
    let first_applying = reports.iter().position(|p| p.phase == Phase::Applying);
    assert!(first_applying > reports.iter().rposition(|p| p.phase == Phase::Checking));
    let image = std::fs::read(&out)?;
    for seq in 1..=5u64 {
        let sector = &image[seq as usize * 512..(seq as usize + 1) * 512];
        let want = if seq <= 4 { seq as u8 } else { 0 };
        assert!(sector.iter().all(|b| *b == want), "sector {seq}");
    }
    Ok(())
}

#[test]
fn the_same_records_on_two_inputs_come_once() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let seqs: Vec<u64> = (1..=25).chain(27..=50).collect();
    let a = write_medium(
        &tmp.path().join("a/medium-000000.fj"),
        1,
        0,
        &seqs,
        Some(25),
    )?;
    let b = tmp.path().join("b/medium-000000.fj");
    std::fs::create_dir_all(tmp.path().join("b"))?;
    std::fs::copy(&a, &b)?;
    let set = MediaSet::open(&[a, b])?;
    assert_eq!(
        seqs_of(&set)?,
        (1..=50).collect::<Vec<_>>(),
        "the mark is seq 26"
    );
    let report = verify(&set);
    assert!(report.sequence_breaks.is_empty(), "{report:#?}");
    Ok(())
}

/// More streams than demux keeps open at once: every output still gets its stream's records
/// and the journal-wide ones, in order.
#[test]
fn demux_of_more_streams_than_it_opens_at_once() -> TestResult {
    const STREAMS: u32 = 300;
    let tmp = tempfile::tempdir()?;
    let mut out = Vec::new();
    let medium = MediumHeader {
        journal_id: 3,
        medium_index: 0,
        flags: 0,
        capacity_bytes: 1 << 30,
        prev_valid_end_bytes: u64::MAX,
    };
    encode_record(&mut out, h_unsequenced(Op::MediumHeader), &medium.encode());
    for stream in 1..=STREAMS {
        let mut h = h_unsequenced(Op::StreamDef);
        h.stream_id = stream;
        let def = StreamDef {
            volume: "v".into(),
            queue_index: stream as u16,
        };
        encode_record(&mut out, h, &def.encode());
    }
    let mut seq = 0;
    for stream in 1..=STREAMS {
        seq += 1;
        let mut w = header(Op::Write, seq);
        w.stream_id = stream;
        w.offset_bytes = u64::from(stream) * 512;
        w.len_bytes = 512;
        encode_record(&mut out, w, &[stream as u8; 512]);
        if stream == STREAMS / 2 {
            seq += 1;
            let mut m = header(Op::Mark, seq);
            m.stream_id = 0;
            encode_record(&mut out, m, b"half");
        }
    }
    std::fs::create_dir_all(tmp.path().join("j"))?;
    std::fs::write(tmp.path().join("j/medium-000000.fj"), &out)?;
    let set = MediaSet::open(&[tmp.path().join("j")])?;
    let outputs = demux(&set, &tmp.path().join("out"))?;
    assert_eq!(outputs.len(), STREAMS as usize);
    for o in &outputs {
        let stream = MediaSet::open(std::slice::from_ref(&o.path))?;
        let records: Vec<RecordHeader> = stream
            .sequenced()
            .map(|r| r.map(|r| r.record.header))
            .collect::<Result<_, _>>()?;
        let ops: Vec<Op> = records.iter().map(|h| h.op).collect();
        let write_first = o.stream_id <= STREAMS / 2;
        let want = if write_first {
            vec![Op::Write, Op::Mark]
        } else {
            vec![Op::Mark, Op::Write]
        };
        assert_eq!(ops, want, "stream {}", o.stream_id);
        let write = records
            .iter()
            .find(|h| h.op == Op::Write)
            .ok_or("no write")?;
        assert_eq!(write.stream_id, o.stream_id);
        assert!(verify(&stream).ok(), "stream {}", o.stream_id);
    }
    Ok(())
}
