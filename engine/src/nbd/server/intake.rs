//! A connection's intake: bytes read from the socket into a receive buffer (many small
//! requests per `recv`; a large write's payload straight into its slot), whole requests
//! decoded and checked ([`super::request::validate`]), write payloads gathered, refused
//! requests answered, and the parser stopped (the socket no longer read) when a request
//! cannot be taken yet: no free slot, the payload bound reached, or the volume paused.

use std::io;

use super::request::{validate, Command, Refusal};
use super::slots::BLOCK_STATUS_BYTES_MAX;
use super::transmission::{Ending, Session};
use crate::nbd::protocol::{RequestHeader, REQUEST_HEADER_BYTES};

/// Bytes read from the socket at once: many small requests per `recv`.
const RECV_BUFFER_BYTES: usize = 256 * 1024;
/// A write payload at least this long is read straight into its slot's buffer.
const DIRECT_READ_BYTES_MIN: usize = 64 * 1024;

pub(super) struct RecvBuffer {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RecvBuffer {
    pub fn new() -> Self {
        Self {
            buf: vec![0; RECV_BUFFER_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// True when there is no room left to read into.
    pub fn is_full(&self) -> bool {
        self.start == 0 && self.end == self.buf.len()
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// The free space at the end, after moving what is left to the front.
    pub fn space(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }
}

impl Session {
    /// Reads and takes requests while there is room.
    pub(super) fn receive(&mut self) -> bool {
        let mut progressed = false;
        loop {
            progressed |= self.parse();
            if !self.wants_input() {
                return progressed;
            }
            match self.read_some() {
                Ok(0) => {
                    self.end(Ending::InputClosed);
                    return progressed;
                }
                Ok(_) => progressed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return progressed,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.end(Ending::Abort(format!("receive: {e}")));
                    return progressed;
                }
            }
        }
    }

    /// One read from the socket: straight into a large write's payload, else into the
    /// receive buffer.
    fn read_some(&mut self) -> io::Result<usize> {
        if let Some(index) = self.receiving.filter(|_| self.recv.data().is_empty()) {
            let slot = self.slots.get(index);
            if slot.len - slot.received >= DIRECT_READ_BYTES_MIN {
                let n = self
                    .transport
                    .recv(&mut slot.buf[slot.received..slot.len])?;
                slot.received += n;
                return Ok(n);
            }
        }
        let n = self.transport.recv(self.recv.space())?;
        self.recv.end += n;
        Ok(n)
    }

    /// Takes what the receive buffer holds: payload of the write being received, bytes
    /// to drop, whole requests. Returns true if it took anything.
    fn parse(&mut self) -> bool {
        let mut progressed = false;
        self.stalled = false;
        loop {
            if let Some(index) = self.receiving {
                progressed |= self.fill_payload(index);
                if self.receiving.is_some() {
                    return progressed;
                }
            }
            if self.discard_bytes > 0 {
                let n = (self.recv.data().len() as u64).min(self.discard_bytes);
                self.recv.consume(n as usize);
                self.discard_bytes -= n;
                progressed |= n > 0;
                if self.discard_bytes > 0 {
                    return progressed;
                }
            }
            if self.ending.is_some() || self.recv.data().len() < REQUEST_HEADER_BYTES {
                return progressed;
            }
            if !self.take_request() {
                return progressed;
            }
            progressed = true;
        }
    }

    /// Moves payload from the receive buffer into a write's slot; submits the write once
    /// its payload is complete.
    fn fill_payload(&mut self, index: u16) -> bool {
        let slot = self.slots.get(index);
        let n = self.recv.data().len().min(slot.len - slot.received);
        slot.buf[slot.received..slot.received + n].copy_from_slice(&self.recv.data()[..n]);
        slot.received += n;
        self.recv.consume(n);
        if slot.received == slot.len {
            self.receiving = None;
            self.start(index);
        }
        n > 0
    }

    /// Decodes and takes the request at the front of the buffer; false when it cannot be
    /// taken yet (no slot, payload bound, paused volume) or the stream is broken.
    fn take_request(&mut self) -> bool {
        let header = match RequestHeader::decode(&self.recv.data()[..REQUEST_HEADER_BYTES]) {
            Ok(h) => h,
            Err(e) => {
                self.end(Ending::Abort(format!("bad request: {e}")));
                return false;
            }
        };
        let verdict = validate(&header, &self.limits);
        let buffer_bytes = match verdict {
            Ok(Command::Read { len_bytes, .. } | Command::Write { len_bytes, .. }) => {
                len_bytes as usize
            }
            Ok(Command::BlockStatus { .. }) => BLOCK_STATUS_BYTES_MAX,
            _ => 0,
        };
        if !self.slots.can_take(buffer_bytes as u64) || !self.waiting.is_empty() {
            self.stalled = true;
            return false;
        }
        self.recv.consume(REQUEST_HEADER_BYTES);
        let command = match verdict {
            Ok(Command::Disconnect) => {
                self.end(Ending::Disconnect);
                return true;
            }
            Ok(command) => command,
            Err(Refusal::Close { reason }) => {
                self.end(Ending::Abort(reason.into()));
                return false;
            }
            Err(Refusal::Error {
                error,
                payload_bytes,
                reason,
            }) => {
                log::debug!(
                    "nbd: export {}: client {}: {reason}: {header:?}",
                    self.export().config.name,
                    self.client
                );
                self.refuse(header.cookie, error);
                self.discard_bytes = u64::from(payload_bytes);
                return true;
            }
        };
        let Some(index) = self.slots.take(header.cookie, command, buffer_bytes) else {
            return false;
        };
        if matches!(command, Command::Write { .. }) {
            self.receiving = Some(index);
        } else {
            self.start(index);
        }
        true
    }

    /// Answers a request with an error without running it.
    fn refuse(&mut self, cookie: u64, error: u32) {
        if let Some(index) = self.slots.take(cookie, Command::Flush, 0) {
            self.slots
                .get(index)
                .set_reply(error, self.limits.structured_replies);
            self.replies.push_back(index);
        }
    }
}
