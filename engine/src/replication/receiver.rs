//! The DR side of one replication group: records received from the primary are checked,
//! appended to the group's DR log and synced, acknowledged, then applied to the replica
//! images strictly in sequence order, with the applied checkpoint moved only after the
//! replicas are synced. So the replicas equal the primary after the checkpoint's sequence
//! number, and after a crash at any moment the log re-applied past the checkpoint brings them
//! to the log's end (re-applying records already applied is harmless: applied in order, every
//! range ends with the content of its last record).
//!
//! A misbehaving peer costs only its connection: a frame that does not decode, a record out
//! of order or outside its replica ends the connection with the reason, and the record is
//! neither logged nor applied.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use super::checkpoint::{Checkpoint, CheckpointError};
use super::dr_log::{DrLog, DrLogError};
use super::frame::{Ack, Frame, Record, RecordOp};
use super::replica::{ReplicaError, ReplicaImages, ReplicaSpec};
use super::stream::{read_frame, ReadFrameError};
use crate::mirror::DestinationError;

/// The log file and the checkpoint file in a group's directory.
pub const LOG_FILE: &str = "log.frpl";
pub const CHECKPOINT_FILE: &str = "applied.frpc";
/// Received records are logged and acknowledged together once the peer has nothing more
/// buffered, or once this many bytes are waiting.
pub const BATCH_BYTES_MAX: usize = 16 << 20;
/// The read buffer in front of the peer's stream.
const READ_BUFFER_BYTES: usize = 1 << 20;

/// Why the receiver refused a stream or could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("refusing the replication stream: {0}")]
    Frame(#[from] ReadFrameError),
    #[error("refusing record {seq}: {reason}")]
    Refused { seq: u64, reason: String },
    #[error(transparent)]
    Log(#[from] DrLogError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("applying to a replica: {0}")]
    Apply(#[from] DestinationError),
    #[error("sending an acknowledgment: {0}")]
    SendAck(#[source] std::io::Error),
    #[error("group {dir} was promoted: its replicas take no more records")]
    Promoted { dir: PathBuf },
    #[error("cannot promote to {point}: {reason}")]
    Point { point: String, reason: String },
}

/// Where promotion rolls the replicas to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromotePoint {
    /// Everything the log holds.
    Latest,
    /// The state after record `N`.
    Seq(u64),
    /// The state at the mark of this label (the last one, if several).
    Mark(String),
}

impl std::str::FromStr for PromotePoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "latest" {
            return Ok(PromotePoint::Latest);
        }
        if let Some(n) = s.strip_prefix("seq:") {
            return n
                .parse()
                .map(PromotePoint::Seq)
                .map_err(|_| format!("{s:?}: seq:N needs a number"));
        }
        if let Some(label) = s.strip_prefix("mark:") {
            return Ok(PromotePoint::Mark(label.to_owned()));
        }
        Err(format!("{s:?}: expected latest, seq:N or mark:LABEL"))
    }
}

impl std::fmt::Display for PromotePoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PromotePoint::Latest => write!(f, "latest"),
            PromotePoint::Seq(n) => write!(f, "seq:{n}"),
            PromotePoint::Mark(l) => write!(f, "mark:{l}"),
        }
    }
}

/// What the receiver reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReceiverStatus {
    /// The last record in the DR log on stable storage.
    pub durable_seq: u64,
    /// The replicas equal the primary after this record.
    pub applied_seq: u64,
    pub promoted: bool,
    pub records_received: u64,
    pub bytes_received: u64,
    /// The primary's completion time of the last record logged (ns since the Unix epoch).
    pub last_record_timestamp_ns: u64,
    /// Why the last connection ended, if it was refused or failed.
    pub last_error: Option<String>,
    /// The `ResyncBegin` record of a resync the DR log holds no end of yet: the replicas are
    /// no prefix of the write order.
    pub resync_since: Option<u64>,
}

/// One group's DR state: its log, checkpoint and replicas.
pub struct Receiver {
    dir: PathBuf,
    log: DrLog,
    replicas: ReplicaImages,
    checkpoint: Checkpoint,
    status: Arc<Mutex<ReceiverStatus>>,
}

/// The records of a batch waiting to be logged: their frames as received, and the records.
#[derive(Default)]
struct Batch {
    frames: Vec<u8>,
    frame_lens: Vec<usize>,
    records: Vec<Record>,
}

impl Receiver {
    /// Opens the group in `dir` (created if missing), and re-applies the log past the
    /// checkpoint, so the replicas equal the primary after the log's last record.
    pub fn open(dir: &Path, replicas: &[ReplicaSpec]) -> Result<Receiver, ReceiverError> {
        std::fs::create_dir_all(dir).map_err(|source| {
            ReceiverError::Checkpoint(CheckpointError::Io {
                op: "creating",
                path: dir.to_owned(),
                source,
            })
        })?;
        let log = DrLog::open(&dir.join(LOG_FILE))?;
        let checkpoint = Checkpoint::load(&dir.join(CHECKPOINT_FILE))?;
        let replicas = ReplicaImages::open(replicas)?;
        let mut receiver = Receiver {
            dir: dir.to_owned(),
            log,
            replicas,
            checkpoint,
            status: Arc::default(),
        };
        if !receiver.checkpoint.promoted {
            let last = receiver.durable_seq();
            receiver.apply_through(last)?;
        }
        let open = receiver.resync_open_at(receiver.durable_seq())?;
        receiver.publish(|s| s.resync_since = open);
        Ok(receiver)
    }

    /// The status, shared with whoever reports it while a connection is served.
    pub fn status_handle(&self) -> Arc<Mutex<ReceiverStatus>> {
        self.status.clone()
    }

    pub fn status(&self) -> ReceiverStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn durable_seq(&self) -> u64 {
        self.log
            .last_seq()
            .unwrap_or(0)
            .max(self.checkpoint.applied_seq)
    }

    fn publish(&self, f: impl FnOnce(&mut ReceiverStatus)) {
        if let Ok(mut s) = self.status.lock() {
            s.durable_seq = self.durable_seq();
            s.applied_seq = self.checkpoint.applied_seq;
            s.promoted = self.checkpoint.promoted;
            f(&mut s);
        }
    }

    /// Serves one connection from the primary until it ends. The receiver first says where it
    /// stands (an acknowledgment), so the primary resumes after the durable sequence. Frames
    /// are read without holding the receiver, so a promotion or a status call never waits for
    /// a silent peer; once the group is promoted, the connection's next batch is refused.
    pub fn serve(shared: &Mutex<Receiver>, stream: impl Read + Write) -> Result<(), ReceiverError> {
        let result = serve_connection(shared, stream);
        if let Err(e) = &result {
            let message = e.to_string();
            lock(shared).publish(|s| s.last_error = Some(message));
        }
        result
    }

    /// Logs the batch durably, acknowledges it, applies it, and acknowledges the application.
    fn commit(&mut self, batch: &mut Batch, peer: &mut impl Write) -> Result<(), ReceiverError> {
        let Some(first) = batch.records.first().map(|r| r.seq) else {
            return Ok(());
        };
        self.check_not_promoted()?;
        self.log.append(first, &batch.frames, &batch.frame_lens)?;
        let bytes = batch.frames.len() as u64;
        let count = batch.records.len() as u64;
        let last_ts = batch.records.last().map_or(0, |r| r.timestamp_ns);
        let boundary = batch.records.iter().rev().find_map(|r| match r.op {
            RecordOp::ResyncBegin => Some(Some(r.seq)),
            RecordOp::ResyncEnd => Some(None),
            _ => None,
        });
        self.publish(|s| {
            if let Some(open) = boundary {
                s.resync_since = open;
            }
            s.records_received += count;
            s.bytes_received += bytes;
            s.last_record_timestamp_ns = last_ts;
        });
        self.send_ack(peer)?;
        for record in batch.records.drain(..) {
            self.replicas.apply(&record)?;
        }
        batch.frames.clear();
        batch.frame_lens.clear();
        self.settle(self.durable_seq())?;
        self.send_ack(peer)
    }

    /// Applies the log's records after the checkpoint through `to` (re-reading them).
    fn apply_through(&mut self, to: u64) -> Result<(), ReceiverError> {
        let from = self.checkpoint.applied_seq + 1;
        if to < from {
            return Ok(());
        }
        let replicas = &self.replicas;
        let mut failure = None;
        self.log.for_each_in(from, to, |record| {
            if let Err(e) = replicas.apply(&record) {
                failure = Some(e);
            }
            Ok(())
        })?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        self.settle(to)
    }

    /// Syncs the replicas, then records that they hold everything through `seq`.
    fn settle(&mut self, seq: u64) -> Result<(), ReceiverError> {
        self.replicas.sync()?;
        self.checkpoint.applied_seq = seq;
        self.checkpoint.store(&self.dir.join(CHECKPOINT_FILE))?;
        self.publish(|_| {});
        Ok(())
    }

    fn check_not_promoted(&self) -> Result<(), ReceiverError> {
        if self.checkpoint.promoted {
            return Err(ReceiverError::Promoted {
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    fn send_ack(&self, peer: &mut impl Write) -> Result<(), ReceiverError> {
        let ack = Ack {
            durable_seq: self.durable_seq(),
            applied_seq: self.checkpoint.applied_seq,
            timestamp_ns: now_ns(),
        };
        let mut out = Vec::new();
        ack.encode_into(&mut out);
        peer.write_all(&out)
            .and_then(|()| peer.flush())
            .map_err(ReceiverError::SendAck)
    }

    /// Stops the replicas at `point`, syncs them and marks the group promoted: from then on
    /// they are ordinary volumes and the stream is refused. Returns the sequence number the
    /// replicas now equal the primary after.
    pub fn promote(&mut self, point: &PromotePoint) -> Result<u64, ReceiverError> {
        self.promote_at(point, false)
    }

    /// As [`promote`](Self::promote); a point inside a bitmap resync (after a
    /// `ResyncBegin` record and before its `ResyncEnd`), where the replicas are no prefix of
    /// the write order, is refused unless `force`.
    pub fn promote_at(&mut self, point: &PromotePoint, force: bool) -> Result<u64, ReceiverError> {
        let target = self.resolve(point)?;
        let refuse = |reason: String| ReceiverError::Point {
            point: point.to_string(),
            reason,
        };
        if !force && target <= self.durable_seq() {
            if let Some(begin) = self.resync_open_at(target)? {
                return Err(refuse(format!(
                    "record {target} is inside the resync that began at record {begin}: the replicas are no prefix of the write order there (promote at seq:{}, before it, if the replicas do not hold it yet, or force)",
                    begin.saturating_sub(1)
                )));
            }
        }
        if target < self.checkpoint.applied_seq {
            return Err(refuse(format!(
                "the replicas already hold records through {} and the DR log keeps no undo",
                self.checkpoint.applied_seq
            )));
        }
        if target > self.durable_seq() {
            return Err(refuse(format!(
                "the DR log ends at record {}",
                self.durable_seq()
            )));
        }
        self.apply_through(target)?;
        self.checkpoint.promoted = true;
        self.checkpoint.store(&self.dir.join(CHECKPOINT_FILE))?;
        self.publish(|_| {});
        Ok(target)
    }

    /// The sequence of the `ResyncBegin` record whose resync is not ended at record `at`.
    fn resync_open_at(&self, at: u64) -> Result<Option<u64>, ReceiverError> {
        let mut open = None;
        let Some(from) = self.log.first_seq() else {
            return Ok(None);
        };
        self.log.for_each_in(from, at, |r| {
            match r.op {
                RecordOp::ResyncBegin => open = Some(r.seq),
                RecordOp::ResyncEnd => open = None,
                _ => {}
            }
            Ok(())
        })?;
        Ok(open)
    }

    fn resolve(&self, point: &PromotePoint) -> Result<u64, ReceiverError> {
        match point {
            PromotePoint::Latest => Ok(self.durable_seq()),
            PromotePoint::Seq(n) => Ok(*n),
            PromotePoint::Mark(label) => {
                let mut found = None;
                let from = self.log.first_seq().unwrap_or(1);
                self.log.for_each_in(from, self.durable_seq(), |r| {
                    if matches!(&r.op, RecordOp::Mark { label: l } if l == label) {
                        found = Some(r.seq);
                    }
                    Ok(())
                })?;
                found.ok_or_else(|| ReceiverError::Point {
                    point: point.to_string(),
                    reason: "no such mark in the DR log".into(),
                })
            }
        }
    }
}

fn lock(shared: &Mutex<Receiver>) -> MutexGuard<'_, Receiver> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

fn serve_connection(
    shared: &Mutex<Receiver>,
    stream: impl Read + Write,
) -> Result<(), ReceiverError> {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
    {
        let rx = lock(shared);
        rx.check_not_promoted()?;
        rx.send_ack(reader.get_mut())?;
    }
    let mut buf = Vec::new();
    let mut batch = Batch::default();
    loop {
        let read = read_frame(&mut reader, &mut buf);
        let mut rx = lock(shared);
        let record = match read {
            Ok(Some(Frame::Record(r))) => r,
            Ok(None) => return rx.commit(&mut batch, reader.get_mut()),
            Ok(Some(Frame::Ack(_))) => {
                rx.commit(&mut batch, reader.get_mut())?;
                return Err(ReceiverError::Refused {
                    seq: 0,
                    reason: "the primary sent an acknowledgment".into(),
                });
            }
            Err(e) => {
                // Records before the bad frame were sound; they are kept and acknowledged.
                rx.commit(&mut batch, reader.get_mut())?;
                return Err(e.into());
            }
        };
        let expected = rx.durable_seq() + batch.records.len() as u64 + 1;
        let refusal = if record.seq != expected {
            Some(format!("out of order (expected record {expected})"))
        } else {
            rx.replicas.refusal(&record).map(str::to_owned)
        };
        if let Some(reason) = refusal {
            rx.commit(&mut batch, reader.get_mut())?;
            return Err(ReceiverError::Refused {
                seq: record.seq,
                reason,
            });
        }
        batch.frames.extend_from_slice(&buf);
        batch.frame_lens.push(buf.len());
        batch.records.push(record);
        if reader.buffer().is_empty() || batch.frames.len() >= BATCH_BYTES_MAX {
            rx.commit(&mut batch, reader.get_mut())?;
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
