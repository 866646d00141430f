//! The DR receiver against real files: records logged, acknowledged and applied in order;
//! hostile streams refused with nothing applied; a crash between logging and applying (and a
//! torn append) recovered on reopen; promotion to a point.

use std::io::{Read, Write};
use std::path::Path;

use crate::replication::dr_log::DrLog;
use crate::replication::frame::{Ack, Frame, FrameError, Record, RecordOp};
use crate::replication::receiver::{PromotePoint, Receiver, ReceiverError, LOG_FILE};
use crate::replication::stream::ReadFrameError;
use crate::replication::ReplicaSpec;

const SIZE: u64 = 1 << 20;

/// A peer connection: what the primary sends, and what the receiver answers.
struct Peer {
    input: std::io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Peer {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Peer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn peer(bytes: Vec<u8>) -> Peer {
    Peer {
        input: std::io::Cursor::new(bytes),
        output: Vec::new(),
    }
}

fn acks(out: &[u8]) -> Vec<Ack> {
    let mut at = 0;
    let mut acks = Vec::new();
    while at < out.len() {
        let Ok((Frame::Ack(a), n)) = Frame::decode(&out[at..]) else {
            panic!("the receiver sent something other than acknowledgments");
        };
        acks.push(a);
        at += n;
    }
    acks
}

fn locked(rx: &std::sync::Mutex<Receiver>) -> std::sync::MutexGuard<'_, Receiver> {
    rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn status(rx: &std::sync::Mutex<Receiver>) -> crate::replication::ReceiverStatus {
    locked(rx).status()
}

fn specs(dir: &Path) -> Vec<ReplicaSpec> {
    (0..2)
        .map(|i| ReplicaSpec {
            path: dir.join(format!("replica-{i}.img")),
            size_bytes: SIZE,
        })
        .collect()
}

/// Record `seq`: a 4 KiB write stamped with its sequence, on volume `seq % 2`, at a block
/// chosen so later records overwrite earlier ones.
fn record(seq: u64) -> Record {
    let block = (seq * 7) % 16;
    Record {
        seq,
        volume_index: (seq % 2) as u32,
        timestamp_ns: seq,
        op: RecordOp::Write {
            offset_bytes: block * 4096,
            data: vec![seq as u8; 4096],
        },
    }
}

fn encode(records: impl IntoIterator<Item = Record>) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        r.encode_into(&mut out);
    }
    out
}

/// The two volumes after records `1..=n`, computed independently of the receiver.
fn model(n: u64) -> Vec<Vec<u8>> {
    let mut vols = vec![vec![0u8; SIZE as usize]; 2];
    for seq in 1..=n {
        let r = record(seq);
        if let RecordOp::Write { offset_bytes, data } = &r.op {
            let at = *offset_bytes as usize;
            vols[r.volume_index as usize][at..at + data.len()].copy_from_slice(data);
        }
    }
    vols
}

fn replicas(dir: &Path) -> Vec<Vec<u8>> {
    specs(dir)
        .iter()
        .map(|s| std::fs::read(&s.path).unwrap_or_default())
        .collect()
}

#[test]
fn logs_acknowledges_and_applies_in_order() -> Result<(), ReceiverError> {
    let dir = tempfile::tempdir().map_err(ReadFrameError::Io)?;
    let rx = std::sync::Mutex::new(Receiver::open(dir.path(), &specs(dir.path()))?);
    let mut p = peer(encode((1..=40).map(record)));
    Receiver::serve(&rx, &mut p)?;
    let acks = acks(&p.output);
    assert_eq!(
        (acks[0].durable_seq, acks[0].applied_seq),
        (0, 0),
        "first says where it stands"
    );
    let last = acks.last().copied();
    assert_eq!(last.map(|a| (a.durable_seq, a.applied_seq)), Some((40, 40)));
    assert_eq!(replicas(dir.path()), model(40));
    assert_eq!(status(&rx).records_received, 40);
    // A second connection resumes after 40 and refuses a replay of old records.
    let mut p = peer(encode((41..=50).map(record)));
    Receiver::serve(&rx, &mut p)?;
    assert_eq!(replicas(dir.path()), model(50));
    let mut replay = peer(encode((45..=46).map(record)));
    let err = Receiver::serve(&rx, &mut replay).expect_err("replay refused");
    assert!(
        err.to_string()
            .contains("refusing record 45: out of order (expected record 51)"),
        "{err}"
    );
    assert_eq!(replicas(dir.path()), model(50));
    Ok(())
}

#[test]
fn refuses_garbage_with_nothing_applied() -> Result<(), ReceiverError> {
    let dir = tempfile::tempdir().map_err(ReadFrameError::Io)?;
    let rx = std::sync::Mutex::new(Receiver::open(dir.path(), &specs(dir.path()))?);
    let garbage: Vec<u8> = (0..5000u32).map(|i| (i * 31 + 7) as u8).collect();
    let err = Receiver::serve(&rx, &mut peer(garbage)).expect_err("garbage refused");
    assert!(matches!(
        err,
        ReceiverError::Frame(ReadFrameError::Frame(FrameError::BadMagic { .. }))
    ));
    assert!(status(&rx)
        .last_error
        .is_some_and(|e| e.contains("not a replication frame")));
    let mut bad_crc = encode([record(1)]);
    bad_crc[100] ^= 1;
    let err = Receiver::serve(&rx, &mut peer(bad_crc)).expect_err("bad checksum refused");
    assert!(err.to_string().contains("bad frame checksum"), "{err}");
    let mut truncated = encode([record(1)]);
    truncated.truncate(1000);
    let err = Receiver::serve(&rx, &mut peer(truncated)).expect_err("truncated refused");
    assert!(err.to_string().contains("ended inside a frame"), "{err}");
    let outside = Record {
        seq: 1,
        volume_index: 0,
        timestamp_ns: 0,
        op: RecordOp::Write {
            offset_bytes: SIZE - 512,
            data: vec![1; 4096],
        },
    };
    let err = Receiver::serve(&rx, &mut peer(encode([outside]))).expect_err("outside refused");
    assert!(
        err.to_string().contains("beyond the end of the replica"),
        "{err}"
    );
    let other = Record {
        volume_index: 2,
        ..record(1)
    };
    let err = Receiver::serve(&rx, &mut peer(encode([other]))).expect_err("unknown volume refused");
    assert!(
        err.to_string().contains("no volume with this index"),
        "{err}"
    );
    assert_eq!(replicas(dir.path()), model(0));
    assert_eq!(
        std::fs::metadata(dir.path().join(LOG_FILE))
            .map(|m| m.len())
            .ok(),
        Some(0)
    );
    Ok(())
}

#[test]
fn keeps_sound_records_before_a_corrupt_one() -> Result<(), ReceiverError> {
    let dir = tempfile::tempdir().map_err(ReadFrameError::Io)?;
    let rx = std::sync::Mutex::new(Receiver::open(dir.path(), &specs(dir.path()))?);
    let mut bytes = encode((1..=3).map(record));
    let good_len = bytes.len();
    bytes.extend(encode([record(4)]));
    bytes[good_len + 200] ^= 0x40;
    let err = Receiver::serve(&rx, &mut peer(bytes)).expect_err("record 4 refused");
    assert!(err.to_string().contains("sequence 4"), "{err}");
    assert_eq!(status(&rx).applied_seq, 3);
    assert_eq!(replicas(dir.path()), model(3));
    Ok(())
}

#[test]
fn reopening_applies_the_log_past_the_checkpoint_and_cuts_a_torn_tail() -> Result<(), ReceiverError>
{
    let dir = tempfile::tempdir().map_err(ReadFrameError::Io)?;
    {
        let rx = std::sync::Mutex::new(Receiver::open(dir.path(), &specs(dir.path()))?);
        Receiver::serve(&rx, &mut peer(encode((1..=10).map(record))))?;
    }
    // A crash after records 11..=30 were logged (and acknowledged) but before they were
    // applied, in the middle of appending record 31.
    {
        let mut log = DrLog::open(&dir.path().join(LOG_FILE))?;
        let frames = encode((11..=30).map(record));
        let lens = vec![frames.len() / 20; 20];
        log.append(11, &frames, &lens)?;
        let torn = encode([record(31)]);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG_FILE))
            .map_err(ReadFrameError::Io)?;
        f.write_all(&torn[..torn.len() / 2])
            .map_err(ReadFrameError::Io)?;
    }
    assert_eq!(replicas(dir.path()), model(10));
    let rx = std::sync::Mutex::new(Receiver::open(dir.path(), &specs(dir.path()))?);
    assert_eq!((status(&rx).durable_seq, status(&rx).applied_seq), (30, 30));
    assert_eq!(replicas(dir.path()), model(30));
    Receiver::serve(&rx, &mut peer(encode((31..=35).map(record))))?;
    assert_eq!(replicas(dir.path()), model(35));
    Ok(())
}

#[test]
fn promotes_to_a_point_and_then_refuses_the_stream() -> Result<(), ReceiverError> {
    let dir = tempfile::tempdir().map_err(ReadFrameError::Io)?;
    let rx = std::sync::Mutex::new(Receiver::open(dir.path(), &specs(dir.path()))?);
    Receiver::serve(&rx, &mut peer(encode((1..=5).map(record))))?;
    let mark = Record {
        seq: 6,
        volume_index: 0,
        timestamp_ns: 6,
        op: RecordOp::Mark { label: "m1".into() },
    };
    Receiver::serve(&rx, &mut peer(encode([mark])))?;
    let err = locked(&rx)
        .promote(&PromotePoint::Seq(3))
        .expect_err("behind the replicas");
    assert!(err.to_string().contains("keeps no undo"), "{err}");
    let err = locked(&rx)
        .promote(&PromotePoint::Seq(99))
        .expect_err("past the log");
    assert!(
        err.to_string().contains("the DR log ends at record 6"),
        "{err}"
    );
    assert_eq!(locked(&rx).promote(&PromotePoint::Mark("m1".into()))?, 6);
    assert!(status(&rx).promoted);
    let err = Receiver::serve(
        &rx,
        &mut peer(encode([Record {
            seq: 7,
            ..record(7)
        }])),
    )
    .expect_err("promoted");
    assert!(matches!(err, ReceiverError::Promoted { .. }));
    drop(rx);
    let rx = std::sync::Mutex::new(Receiver::open(dir.path(), &specs(dir.path()))?);
    assert!(status(&rx).promoted, "promotion survives a restart");
    assert_eq!(replicas(dir.path()), model(5));
    assert_eq!("seq:12".parse(), Ok(PromotePoint::Seq(12)));
    assert!("seq:x".parse::<PromotePoint>().is_err());
    Ok(())
}

fn boundary(seq: u64, op: RecordOp) -> Record {
    Record {
        seq,
        volume_index: 0,
        timestamp_ns: seq,
        op,
    }
}

#[test]
fn refuses_to_promote_inside_a_resync_unless_forced() -> Result<(), ReceiverError> {
    let dir = tempfile::tempdir().map_err(ReadFrameError::Io)?;
    let rx = std::sync::Mutex::new(Receiver::open(dir.path(), &specs(dir.path()))?);
    Receiver::serve(&rx, &mut peer(encode((1..=3).map(record))))?;
    let begun = [boundary(4, RecordOp::ResyncBegin), record(5), record(6)];
    Receiver::serve(&rx, &mut peer(encode(begun)))?;
    assert_eq!(status(&rx).resync_since, Some(4));
    let err = locked(&rx)
        .promote(&PromotePoint::Latest)
        .expect_err("inside the resync");
    assert!(
        err.to_string()
            .contains("inside the resync that began at record 4"),
        "{err}"
    );
    // Reopened (a DR daemon restarted), the log still says so.
    drop(rx);
    let rx = std::sync::Mutex::new(Receiver::open(dir.path(), &specs(dir.path()))?);
    assert_eq!(status(&rx).resync_since, Some(4));
    assert!(locked(&rx).promote(&PromotePoint::Seq(6)).is_err());
    Receiver::serve(&rx, &mut peer(encode([boundary(7, RecordOp::ResyncEnd)])))?;
    assert_eq!(status(&rx).resync_since, None);
    assert_eq!(locked(&rx).promote(&PromotePoint::Latest)?, 7);
    Ok(())
}

#[test]
fn promotes_inside_a_resync_when_forced() -> Result<(), ReceiverError> {
    let dir = tempfile::tempdir().map_err(ReadFrameError::Io)?;
    let rx = std::sync::Mutex::new(Receiver::open(dir.path(), &specs(dir.path()))?);
    let records = [record(1), boundary(2, RecordOp::ResyncBegin), record(3)];
    Receiver::serve(&rx, &mut peer(encode(records)))?;
    assert_eq!(locked(&rx).promote_at(&PromotePoint::Latest, true)?, 3);
    assert!(status(&rx).promoted);
    Ok(())
}
