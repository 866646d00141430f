//! Frames read from a byte stream (a peer's connection, the DR log): the header first,
//! its length checked against the bound before the payload is read or allocated.

use std::io::{ErrorKind, Read};

use super::frame::{Frame, FrameError, Header, HEADER_BYTES};

/// Why no frame could be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    #[error("reading a replication frame: {0}")]
    Io(#[from] std::io::Error),
    #[error("the stream ended inside a frame ({available} of {needed} bytes)")]
    TruncatedStream { needed: usize, available: usize },
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads one frame from `reader` into `buf` (reused between calls) and decodes it.
/// `Ok(None)` is a clean end of stream between frames.
pub fn read_frame(
    reader: &mut impl Read,
    buf: &mut Vec<u8>,
) -> Result<Option<Frame>, ReadFrameError> {
    buf.clear();
    buf.resize(HEADER_BYTES, 0);
    let got = read_full(reader, &mut buf[..])?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_BYTES {
        return Err(ReadFrameError::TruncatedStream {
            needed: HEADER_BYTES,
            available: got,
        });
    }
    // Checks magic, version, kind and the payload bound before allocating for the payload.
    let header = Header::decode(buf)?;
    let len = header.frame_len_bytes();
    buf.resize(len, 0);
    let got = read_full(reader, &mut buf[HEADER_BYTES..])?;
    if got < len - HEADER_BYTES {
        return Err(ReadFrameError::TruncatedStream {
            needed: len,
            available: HEADER_BYTES + got,
        });
    }
    let (frame, _) = Frame::decode(buf)?;
    Ok(Some(frame))
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match reader.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}
