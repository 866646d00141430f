//! A connection's requests in flight: a fixed set of slots (allocated once), each with the
//! request, its payload buffer and its encoded reply, and the bounds on what they hold.
//!
//! A slot is taken when a request's header is read and freed when its reply has been
//! handed to the socket, so a client that sends and never reads runs out of slots and the
//! connection stops reading from it: what it can make the server hold is bounded by
//! [`INFLIGHT_MAX`] requests and [`PAYLOAD_BYTES_INFLIGHT_MAX`] bytes of payload.
//!
//! Payload buffers stay with their slot from one request to the next (no allocation per
//! request once a workload's sizes have been seen), up to [`RETAINED_BYTES_MAX`] per
//! connection; a larger buffer is released when its request ends.

use crate::nbd::protocol::{
    errno_to_wire, BlockDescriptor, BlockStatusHeader, ErrorChunk, OffsetDataHeader, SimpleReply,
    BLOCK_DESCRIPTOR_BYTES, NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_EPERM,
};
use crate::IoFailure;

use super::negotiation::{BASE_ALLOCATION_ID, PAYLOAD_BYTES_MAX};
use super::request::Command;

/// Requests one connection has in flight at most.
pub const INFLIGHT_MAX: usize = 64;
/// Payload bytes (read data, write data) one connection's requests hold at most; a
/// request of the maximum payload is taken alone when it does not fit beside others.
pub const PAYLOAD_BYTES_INFLIGHT_MAX: u64 = 16 << 20;
/// Payload buffer bytes a connection keeps between requests.
pub const RETAINED_BYTES_MAX: usize = 8 << 20;
/// The buffer a block status request takes for its descriptors.
pub const BLOCK_STATUS_BYTES_MAX: usize =
    super::allocation::DESCRIPTORS_MAX * BLOCK_DESCRIPTOR_BYTES;
/// The largest encoded reply head: a read's data chunk header.
const REPLY_HEAD_BYTES_MAX: usize = 32;
const _: () = assert!(crate::nbd::protocol::OFFSET_DATA_HEADER_BYTES <= REPLY_HEAD_BYTES_MAX);
const _: () = assert!(crate::nbd::protocol::BLOCK_STATUS_HEADER_BYTES <= REPLY_HEAD_BYTES_MAX);
const _: () = assert!(PAYLOAD_BYTES_INFLIGHT_MAX <= PAYLOAD_BYTES_MAX as u64);
const _: () = assert!(INFLIGHT_MAX <= u16::MAX as usize);

/// Where a slot's request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Free,
    /// A write whose payload is still arriving.
    Receiving,
    /// In the engine.
    Submitted,
    /// A FUA write done, its flush in the engine.
    Flushing,
    /// The reply is encoded and waits for the socket.
    Replying,
}

pub struct Slot {
    pub state: State,
    pub cookie: u64,
    pub command: Command,
    /// The payload (read data, write data) or the encoded block status descriptors.
    pub buf: Vec<u8>,
    /// Bytes of `buf` the request uses.
    pub len: usize,
    /// Bytes of a write's payload received so far.
    pub received: usize,
    reply_head: [u8; REPLY_HEAD_BYTES_MAX],
    reply_head_len: u8,
    /// Bytes of `buf` sent after the reply head.
    reply_data_len: usize,
}

impl Slot {
    fn new() -> Self {
        Self {
            state: State::Free,
            cookie: 0,
            command: Command::Flush,
            buf: Vec::new(),
            len: 0,
            received: 0,
            reply_head: [0; REPLY_HEAD_BYTES_MAX],
            reply_head_len: 0,
            reply_data_len: 0,
        }
    }

    /// The reply's parts: the head, then the data.
    pub fn reply(&self) -> (&[u8], &[u8]) {
        (
            &self.reply_head[..usize::from(self.reply_head_len)],
            &self.buf[..self.reply_data_len],
        )
    }

    pub fn reply_bytes(&self) -> usize {
        usize::from(self.reply_head_len) + self.reply_data_len
    }

    fn set_head(&mut self, head: &[u8], data_len: usize) {
        self.reply_head[..head.len()].copy_from_slice(head);
        self.reply_head_len = head.len() as u8;
        self.reply_data_len = data_len;
        self.state = State::Replying;
    }

    /// Encodes the reply to a finished request: `error` 0 for success.
    pub fn set_reply(&mut self, error: u32, structured: bool) {
        let cookie = self.cookie;
        let is_read = matches!(self.command, Command::Read { .. });
        if error != 0 {
            if structured {
                self.set_head(&ErrorChunk { cookie, error }.encode(), 0);
            } else {
                self.set_head(&SimpleReply { error, cookie }.encode(), 0);
            }
            return;
        }
        match self.command {
            Command::Read { offset_bytes, .. } if structured => {
                let header = OffsetDataHeader {
                    cookie,
                    offset_bytes,
                    data_len_bytes: self.len as u32,
                };
                // The length is bounded by the maximum payload, so it always fits.
                match header.encode() {
                    Some(head) => self.set_head(&head, self.len),
                    None => self.set_head(
                        &ErrorChunk {
                            cookie,
                            error: NBD_EIO,
                        }
                        .encode(),
                        0,
                    ),
                }
            }
            _ => {
                let data_len = if is_read { self.len } else { 0 };
                self.set_head(&SimpleReply { error, cookie }.encode(), data_len);
            }
        }
    }

    /// Encodes a block status reply for `base:allocation` with `descriptors` (at least
    /// one) into the slot's buffer, which was taken with room for
    /// [`BLOCK_STATUS_BYTES_MAX`].
    pub fn set_block_status(&mut self, descriptors: &[BlockDescriptor]) {
        let room = self.buf.len() / BLOCK_DESCRIPTOR_BYTES;
        let descriptors = &descriptors[..descriptors.len().min(room)];
        for (chunk, d) in self
            .buf
            .chunks_exact_mut(BLOCK_DESCRIPTOR_BYTES)
            .zip(descriptors)
        {
            chunk.copy_from_slice(&d.encode());
        }
        let header = BlockStatusHeader {
            cookie: self.cookie,
            context_id: BASE_ALLOCATION_ID,
            descriptors: descriptors.len() as u32,
        };
        match header.encode() {
            Some(head) if !descriptors.is_empty() => {
                self.set_head(&head, descriptors.len() * BLOCK_DESCRIPTOR_BYTES)
            }
            _ => self.set_reply(NBD_EIO, true),
        }
    }
}

/// The error a failed engine request is answered with.
pub fn wire_error(failure: IoFailure, command: &Command) -> u32 {
    match failure {
        IoFailure::Os(errno) => errno_to_wire(errno),
        IoFailure::ReadOnly => NBD_EPERM,
        IoFailure::OutOfRange if command.writes() => NBD_ENOSPC,
        IoFailure::OutOfRange => NBD_EINVAL,
        IoFailure::NoProgress | IoFailure::Observer | IoFailure::Busy => NBD_EIO,
    }
}

/// The slots of one connection and what they hold.
pub struct Slots {
    slots: Vec<Slot>,
    free: Vec<u16>,
    payload_bytes: u64,
    retained_bytes: usize,
}

impl Slots {
    pub fn new() -> Self {
        Self {
            slots: (0..INFLIGHT_MAX).map(|_| Slot::new()).collect(),
            free: (0..INFLIGHT_MAX as u16).rev().collect(),
            payload_bytes: 0,
            retained_bytes: 0,
        }
    }

    pub fn get(&mut self, index: u16) -> &mut Slot {
        &mut self.slots[usize::from(index)]
    }

    pub fn slot(&self, index: u16) -> &Slot {
        &self.slots[usize::from(index)]
    }

    /// Requests in flight.
    pub fn busy(&self) -> usize {
        INFLIGHT_MAX - self.free.len()
    }

    /// True when a request with `payload_bytes` of payload can be taken now.
    pub fn can_take(&self, payload_bytes: u64) -> bool {
        !self.free.is_empty()
            && (self.payload_bytes == 0
                || self.payload_bytes + payload_bytes <= PAYLOAD_BYTES_INFLIGHT_MAX)
    }

    /// Takes a slot for a request with a payload buffer of `payload_bytes` (its contents
    /// are whatever the buffer held before: a read overwrites them, a write fills them).
    pub fn take(&mut self, cookie: u64, command: Command, payload_bytes: usize) -> Option<u16> {
        let index = self.free.pop()?;
        self.payload_bytes += payload_bytes as u64;
        let slot = &mut self.slots[usize::from(index)];
        if slot.buf.len() < payload_bytes {
            self.retained_bytes -= slot.buf.len();
            slot.buf.resize(payload_bytes, 0);
            self.retained_bytes += slot.buf.len();
        }
        slot.state = State::Receiving;
        slot.cookie = cookie;
        slot.command = command;
        slot.len = payload_bytes;
        slot.received = 0;
        slot.reply_head_len = 0;
        slot.reply_data_len = 0;
        Some(index)
    }

    /// Frees a slot whose reply has been sent; releases its buffer when the connection
    /// holds more than it may keep.
    pub fn release(&mut self, index: u16) {
        let slot = &mut self.slots[usize::from(index)];
        self.payload_bytes -= slot.len as u64;
        slot.len = 0;
        slot.state = State::Free;
        if self.retained_bytes > RETAINED_BYTES_MAX {
            self.retained_bytes -= slot.buf.len();
            slot.buf = Vec::new();
        }
        self.free.push(index);
    }
}
