//! The DR site's log of one group: the records received, as the frames they arrived in,
//! appended to one file and synced (`fdatasync`) before they are acknowledged.
//!
//! Opening the log scans it: it must hold records numbered without gaps; a torn or corrupt
//! tail (a crash during an append) ends the log there and is cut off, since nothing past it
//! was acknowledged. Only the sequence number and file offset of each record are kept in
//! memory; the records themselves are read back from the file when applied.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::frame::{Frame, Record};
use super::stream::{read_frame, ReadFrameError};

/// Why the log could not be opened, appended to or read.
#[derive(Debug, thiserror::Error)]
pub enum DrLogError {
    #[error("{op} the DR log {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the DR log {path} is not in order: record {found} follows {previous}")]
    OutOfOrder {
        path: PathBuf,
        previous: u64,
        found: u64,
    },
    #[error("reading record {seq} back from the DR log {path}: {source}")]
    ReadBack {
        path: PathBuf,
        seq: u64,
        #[source]
        source: ReadFrameError,
    },
}

/// An open DR log.
pub struct DrLog {
    path: PathBuf,
    file: File,
    /// The first record's sequence number, if the log holds any.
    first_seq: Option<u64>,
    /// File offset of each record, `offsets[i]` for record `first_seq + i`.
    offsets: Vec<u64>,
    end_bytes: u64,
}

impl DrLog {
    /// Opens (or creates) the log at `path`, cutting off a torn tail.
    pub fn open(path: &Path) -> Result<DrLog, DrLogError> {
        let io = |op, source| DrLogError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io("opening", e))?;
        let mut log = DrLog {
            path: path.to_owned(),
            file,
            first_seq: None,
            offsets: Vec::new(),
            end_bytes: 0,
        };
        log.scan()?;
        let len = log.file.metadata().map_err(|e| io("examining", e))?.len();
        if len != log.end_bytes {
            log::warn!(
                "DR log {}: cutting off {} bytes after record {} (an append torn by a crash)",
                path.display(),
                len - log.end_bytes,
                log.last_seq().unwrap_or(0)
            );
            log.file
                .set_len(log.end_bytes)
                .map_err(|e| io("truncating", e))?;
            log.file.sync_data().map_err(|e| io("syncing", e))?;
        }
        Ok(log)
    }

    fn scan(&mut self) -> Result<(), DrLogError> {
        let mut reader = BufReader::new(&self.file);
        let mut buf = Vec::new();
        let mut at = 0u64;
        // Anything that does not decode ends the log: only a torn append can put it there.
        while let Ok(Some(Frame::Record(r))) = read_frame(&mut reader, &mut buf) {
            if let Some(last) = self.last_seq() {
                if r.seq != last + 1 {
                    return Err(DrLogError::OutOfOrder {
                        path: self.path.clone(),
                        previous: last,
                        found: r.seq,
                    });
                }
            } else {
                self.first_seq = Some(r.seq);
            }
            self.offsets.push(at);
            at += buf.len() as u64;
        }
        self.end_bytes = at;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn first_seq(&self) -> Option<u64> {
        self.first_seq
    }

    /// The last record the log holds (durable once `append` returned).
    pub fn last_seq(&self) -> Option<u64> {
        self.first_seq.map(|f| f + self.offsets.len() as u64 - 1)
    }

    /// Appends already-encoded, already-checked frames of the records `first..=first+n-1`
    /// (their lengths in `frame_lens`) and syncs them to stable storage.
    pub fn append(
        &mut self,
        first: u64,
        frames: &[u8],
        frame_lens: &[usize],
    ) -> Result<(), DrLogError> {
        if let Some(last) = self.last_seq() {
            if first != last + 1 {
                return Err(DrLogError::OutOfOrder {
                    path: self.path.clone(),
                    previous: last,
                    found: first,
                });
            }
        }
        let io = |op, source| DrLogError::Io {
            op,
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all(frames)
            .map_err(|e| io("appending to", e))?;
        self.file.sync_data().map_err(|e| io("syncing", e))?;
        if self.first_seq.is_none() && !frame_lens.is_empty() {
            self.first_seq = Some(first);
        }
        let mut at = self.end_bytes;
        for len in frame_lens {
            self.offsets.push(at);
            at += *len as u64;
        }
        self.end_bytes = at;
        Ok(())
    }

    /// Reads records `from..=to` back, in order, handing each to `each`.
    pub fn for_each_in(
        &self,
        from: u64,
        to: u64,
        mut each: impl FnMut(Record) -> Result<(), DrLogError>,
    ) -> Result<(), DrLogError> {
        let (Some(first), Some(_)) = (self.first_seq, self.last_seq()) else {
            return Ok(());
        };
        if from > to {
            return Ok(());
        }
        let index = from.saturating_sub(first) as usize;
        let Some(&start) = self.offsets.get(index) else {
            return Ok(());
        };
        let mut file = &self.file;
        file.seek(SeekFrom::Start(start))
            .map_err(|source| DrLogError::Io {
                op: "seeking in",
                path: self.path.clone(),
                source,
            })?;
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        let mut seq = first + index as u64;
        while seq <= to {
            let read_back = |source| DrLogError::ReadBack {
                path: self.path.clone(),
                seq,
                source,
            };
            match read_frame(&mut reader, &mut buf) {
                Ok(Some(Frame::Record(r))) if r.seq == seq => each(r)?,
                Ok(_) => {
                    let torn =
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "record missing");
                    return Err(read_back(ReadFrameError::Io(torn)));
                }
                Err(e) => return Err(read_back(e)),
            }
            seq += 1;
        }
        Ok(())
    }
}
