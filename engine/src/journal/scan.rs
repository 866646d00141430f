//! Reading a medium back: walks its records, checks every checksum, skips damaged records
//! by resynchronising on the next valid header, and finds where valid data ends (torn tail).
//!
//! Used by recovery when a journal is reopened and by every offline tool. Never panics on
//! foreign, truncated or corrupted input: every problem becomes a [`Problem`] with its offset.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::error::FormatError;
use super::format::{
    MediumHeader, Op, RecordHeader, FLAG_TRAILER_CONTINUES, HEADER_BYTES, RECORD_ALIGN_BYTES,
    RECORD_MAGIC,
};

/// Random access to the bytes of a medium.
pub trait RecordSource {
    fn len_bytes(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The medium ends with its trailer's append whatever follows: a block device, which
    /// sealing cannot truncate (the rest is the zeros it was registered with).
    fn ends_at_trailer(&self) -> bool {
        false
    }
}

impl RecordSource for [u8] {
    fn len_bytes(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let src = self.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// A medium file (or block device) with its length taken once.
pub struct FileSource {
    pub file: File,
    pub len_bytes: u64,
    pub is_device: bool,
}

impl FileSource {
    pub fn open(path: &std::path::Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let device_bytes = super::device::block_device_bytes(&file)?;
        let len_bytes = match device_bytes {
            Some(bytes) => bytes,
            None => file.metadata()?.len(),
        };
        Ok(Self {
            file,
            len_bytes,
            is_device: device_bytes.is_some(),
        })
    }
}

impl RecordSource for FileSource {
    fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    fn ends_at_trailer(&self) -> bool {
        self.is_device
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// One valid record found on a medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedRecord {
    pub header: RecordHeader,
    pub position_bytes: u64,
}

/// Something wrong found while scanning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub offset_bytes: u64,
    /// True when nothing valid follows: the tail of an interrupted append.
    pub torn_tail: bool,
    pub error: FormatError,
    /// Bytes skipped from `offset_bytes` to the next valid record (or the end).
    pub skipped_bytes: u64,
}

/// The result of scanning one medium.
#[derive(Debug, Clone, Default)]
pub struct MediumScan {
    pub len_bytes: u64,
    /// Every valid record, in medium order ([`scan_medium`]; empty from a [`MediumWalk`]).
    pub records: Vec<ScannedRecord>,
    pub problems: Vec<Problem>,
    /// End of the last valid record: where an append would have continued.
    pub valid_end_bytes: u64,
    /// The medium-header payload, when the first record is a valid medium header.
    pub medium_header: Option<MediumHeader>,
    /// True when the last valid record is a trailer: the medium was sealed.
    pub sealed: bool,
    /// Bytes of zeros after the last valid record up to the end of a medium exactly
    /// `capacity` long: the unwritten rest of a formatted (spare) medium. A clean end of
    /// data, not a problem.
    pub zero_tail_bytes: u64,
}

impl MediumScan {
    pub fn torn_tail(&self) -> Option<&Problem> {
        self.problems.iter().find(|p| p.torn_tail)
    }
}

/// Bytes looked at per read while searching for the next valid header.
const RESYNC_WINDOW_BYTES: usize = 1 << 20;

/// Scans a whole medium, keeping every record.
pub fn scan_medium<S: RecordSource + ?Sized>(src: &S) -> io::Result<MediumScan> {
    let mut walk = MediumWalk::new(src);
    let mut records = Vec::new();
    while let Some(record) = walk.next_record()? {
        records.push(record);
    }
    let mut scan = walk.finish()?;
    scan.records = records;
    Ok(scan)
}

/// Walks a medium record by record: the pull form of [`scan_medium`], for readers that must
/// not hold every record of a large medium in memory. [`MediumWalk::finish`] gives what the
/// walk found (problems, valid end, header, sealed) with `records` left empty.
pub struct MediumWalk<'a, S: RecordSource + ?Sized> {
    src: ReadAhead<'a, S>,
    pos: u64,
    done: bool,
    scan: MediumScan,
    /// The padding after a block device's final trailer, found with the trailer.
    pending: Option<ScannedRecord>,
    /// The ops of the last two records (sealed: a final trailer, maybe then padding).
    last_two: [Option<RecordHeader>; 2],
}

impl<'a, S: RecordSource + ?Sized> MediumWalk<'a, S> {
    pub fn new(src: &'a S) -> Self {
        Self {
            src: ReadAhead::new(src),
            pos: 0,
            done: false,
            scan: MediumScan {
                len_bytes: src.len_bytes(),
                ..Default::default()
            },
            pending: None,
            last_two: [None, None],
        }
    }

    /// Where the next record would start.
    pub fn position_bytes(&self) -> u64 {
        self.pending.map_or(self.pos, |r| r.position_bytes)
    }

    fn note(&mut self, header: RecordHeader) {
        self.last_two = [self.last_two[1], Some(header)];
    }

    /// The next valid record, skipping (and noting) damaged stretches; `None` at the end.
    pub fn next_record(&mut self) -> io::Result<Option<ScannedRecord>> {
        if let Some(record) = self.pending.take() {
            return Ok(Some(record));
        }
        let len = self.scan.len_bytes;
        while !self.done && self.pos < len {
            let pos = self.pos;
            match read_record(&self.src, pos)? {
                Ok(header) => {
                    if pos == 0 && header.op == Op::MediumHeader {
                        let payload = read_payload(&self.src, pos, &header)?;
                        self.scan.medium_header = MediumHeader::decode(&payload).ok();
                    }
                    self.note(header);
                    self.pos = pos + header.record_bytes();
                    self.scan.valid_end_bytes = self.pos;
                    if is_final_trailer(&header) && self.src.ends_at_trailer() {
                        // The padding of the trailer's append, then the end.
                        if let Ok(Ok(padding)) = read_record(&self.src, self.pos) {
                            if padding.op == Op::Padding {
                                self.pending = Some(ScannedRecord {
                                    header: padding,
                                    position_bytes: self.pos,
                                });
                                self.note(padding);
                                self.scan.valid_end_bytes = self.pos + padding.record_bytes();
                            }
                        }
                        // Counted as the zeroed rest without reading it.
                        self.scan.zero_tail_bytes = len - self.scan.valid_end_bytes;
                        self.done = true;
                    }
                    return Ok(Some(ScannedRecord {
                        header,
                        position_bytes: pos,
                    }));
                }
                Err(_) if formatted(&self.scan, pos) && rest_is_zero(&self.src, pos)? => {
                    self.scan.zero_tail_bytes = len - pos;
                    self.done = true;
                }
                Err(error) => {
                    let next = find_next_record(&self.src, pos + RECORD_ALIGN_BYTES as u64)?;
                    let torn_tail = next.is_none();
                    let resume = next.unwrap_or(len);
                    self.scan.problems.push(Problem {
                        offset_bytes: pos,
                        torn_tail,
                        error,
                        skipped_bytes: resume - pos,
                    });
                    self.pos = resume;
                }
            }
        }
        self.done = true;
        Ok(None)
    }

    /// Walks the rest and returns what the walk found (`records` empty).
    pub fn finish(mut self) -> io::Result<MediumScan> {
        while self.next_record()?.is_some() {}
        self.scan.sealed = match self.last_two {
            [_, Some(last)] if is_final_trailer(&last) => true,
            [Some(before), Some(last)] => last.op == Op::Padding && is_final_trailer(&before),
            _ => false,
        };
        Ok(self.scan)
    }
}

/// Bytes a [`ReadAhead`] reads at a time.
const READ_AHEAD_BYTES: usize = 1 << 20;

/// A source read a window at a time, so that walking a medium costs one read per window
/// instead of two (header, payload) per record. Reads of more than half a window go
/// straight to the source.
struct ReadAhead<'a, S: RecordSource + ?Sized> {
    src: &'a S,
    /// The window's offset in the source, and its bytes.
    window: RefCell<(u64, Vec<u8>)>,
}

impl<'a, S: RecordSource + ?Sized> ReadAhead<'a, S> {
    fn new(src: &'a S) -> Self {
        Self {
            src,
            window: RefCell::new((0, Vec::new())),
        }
    }
}

impl<S: RecordSource + ?Sized> RecordSource for ReadAhead<'_, S> {
    fn len_bytes(&self) -> u64 {
        self.src.len_bytes()
    }

    fn ends_at_trailer(&self) -> bool {
        self.src.ends_at_trailer()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let wanted = buf.len() as u64;
        let end = offset
            .checked_add(wanted)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if buf.len() > READ_AHEAD_BYTES / 2 || end > self.src.len_bytes() {
            return self.src.read_at(offset, buf);
        }
        let mut window = self.window.borrow_mut();
        let (start, bytes) = &mut *window;
        if offset < *start || end > *start + bytes.len() as u64 {
            let n = (self.src.len_bytes() - offset).min(READ_AHEAD_BYTES as u64) as usize;
            bytes.resize(n, 0);
            *start = offset;
            if let Err(e) = self.src.read_at(offset, bytes) {
                bytes.clear();
                return Err(e);
            }
        }
        let at = (offset - *start) as usize;
        buf.copy_from_slice(&bytes[at..at + buf.len()]);
        Ok(())
    }
}

/// The last trailer record of a sealed medium (a long log is split over several).
fn is_final_trailer(header: &RecordHeader) -> bool {
    header.op == Op::Trailer && header.flags & FLAG_TRAILER_CONTINUES == 0
}

/// Reads and fully checks (header and payload CRC) the record at `pos`. The outer error is
/// an I/O failure of the source; the inner one says why the bytes are not a valid record.
pub fn read_record<S: RecordSource + ?Sized>(
    src: &S,
    pos: u64,
) -> io::Result<Result<RecordHeader, FormatError>> {
    let len = src.len_bytes();
    let available = len.saturating_sub(pos);
    if available < HEADER_BYTES as u64 {
        return Ok(Err(FormatError::Truncated {
            needed_bytes: HEADER_BYTES as u64,
            available_bytes: available,
        }));
    }
    let mut hb = [0u8; HEADER_BYTES];
    src.read_at(pos, &mut hb)?;
    let header = match RecordHeader::decode(&hb) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    if header.record_bytes() > available {
        return Ok(Err(FormatError::Truncated {
            needed_bytes: header.record_bytes(),
            available_bytes: available,
        }));
    }
    let payload = read_payload(src, pos, &header)?;
    Ok(header.check_payload(&payload).map(|()| header))
}

/// Reads the payload of the record whose header is at `pos` (not checked here).
pub fn read_payload<S: RecordSource + ?Sized>(
    src: &S,
    pos: u64,
    header: &RecordHeader,
) -> io::Result<Vec<u8>> {
    let mut payload = vec![0u8; header.payload_len_bytes as usize];
    src.read_at(pos + HEADER_BYTES as u64, &mut payload)?;
    Ok(payload)
}

/// True when the medium may carry a zero tail: it is exactly as long as its header's
/// capacity (a formatted spare; a growing medium never is, a sealed one has no tail), or
/// nothing precedes `pos` (a spare taken just before a crash). Elsewhere zeros after the
/// last record are a torn tail (a file extended whose data never landed).
fn formatted(scan: &MediumScan, pos: u64) -> bool {
    pos == 0
        || scan
            .medium_header
            .is_some_and(|h| h.capacity_bytes == scan.len_bytes)
}

/// True when every byte from `pos` to the end of `src` is zero (a record never is: its
/// magic is not).
fn rest_is_zero<S: RecordSource + ?Sized>(src: &S, pos: u64) -> io::Result<bool> {
    let len = src.len_bytes();
    let mut buf = vec![0u8; len.saturating_sub(pos).min(RESYNC_WINDOW_BYTES as u64) as usize];
    let zeros = vec![0u8; buf.len()];
    let mut at = pos;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        src.read_at(at, &mut buf[..n])?;
        // Slice equality is a memcmp, fast even in a debug build.
        if buf[..n] != zeros[..n] {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Finds the first offset at or after `from` (record-aligned) holding a fully valid record.
fn find_next_record<S: RecordSource + ?Sized>(src: &S, from: u64) -> io::Result<Option<u64>> {
    let len = src.len_bytes();
    let mut window_start = from.next_multiple_of(RECORD_ALIGN_BYTES as u64);
    let magic = RECORD_MAGIC.to_le_bytes();
    // No bigger than what is left to search (short inputs are common when fuzzing).
    let left = len
        .saturating_sub(window_start)
        .min(RESYNC_WINDOW_BYTES as u64) as usize;
    let mut buf = vec![0u8; left];
    while window_start + HEADER_BYTES as u64 <= len {
        let n = (len - window_start).min(buf.len() as u64) as usize;
        src.read_at(window_start, &mut buf[..n])?;
        let mut at = 0usize;
        while at + 4 <= n {
            if buf[at..at + 4] == magic {
                let candidate = window_start + at as u64;
                if read_record(src, candidate)?.is_ok() {
                    return Ok(Some(candidate));
                }
            }
            at += RECORD_ALIGN_BYTES;
        }
        window_start += n as u64;
    }
    Ok(None)
}
