//! One queue's NBD connection: the data path of a volume that lives on an NBD export.
//!
//! Design. Each [`super::queue::VolumeQueue`] owns its own connection (made on its first
//! request), so queues never contend. The socket is non-blocking and every byte of it is
//! moved by the queue's own thread with plain `sendmsg`/`recv` calls; the queue's io_uring
//! only tells it *when*: a one-shot `POLL_ADD(POLLIN)` on the socket is always armed while
//! connected, a `POLL_ADD(POLLOUT)` only while the socket's send buffer is full, and a
//! one-second `TIMEOUT` tick while requests are outstanding. Their completions land in the
//! ring like any other and signal the ring's eventfd, so the front end's wait on
//! `notify_fd()` and its `submit`/`commit`/`reap` calls are the same as for a file.
//!
//! - Requests are pipelined: any number in flight (up to the queue's slots); the NBD handle
//!   of a request is its slot index. A read or write larger than the export's maximum payload
//!   (at most 32 MiB, [`NbdExport::request_bytes_max`]; also a write-zeroes written as zeros),
//!   or a write-zeroes / discard larger than [`NbdExport::effect_bytes_max`], goes out as
//!   several commands, one after another. Guest requests are whole logical blocks and the
//!   export's minimum block size is at most one (checked at open), so every piece is aligned.
//! - `submit` queues a request's header (and a write's payload, sent straight from the
//!   caller's iovecs); `commit` (and `reap`) send what is queued, many requests per
//!   `sendmsg`. `reap` reads replies into a buffer, matches them by handle and copies read
//!   data into the request's iovecs.
//! - Flush is `NBD_CMD_FLUSH` (success without effect when the server has no `SEND_FLUSH`).
//!   A write while the guest's write cache is off carries `FUA`, or is followed by a flush
//!   when the server has no `SEND_FUA`. Write-zeroes is `NBD_CMD_WRITE_ZEROES` (`NO_HOLE`
//!   unless unmap is allowed), else zeros written from a static buffer. Discard is
//!   `NBD_CMD_WRITE_ZEROES` without `NO_HOLE` (the server may deallocate): a discarded range
//!   of a file volume reads back as zeros and the mirror relies on it, so the NBD path keeps
//!   that; without `SEND_WRITE_ZEROES` it is `NBD_CMD_TRIM`, else success without effect.
//! - TLS. An export reached over TLS (`tls.rs`, `link.rs`) keeps all of the above, with the
//!   TLS session between the queue and the socket: requests are written into the session as
//!   plaintext and its ciphertext is sent while the socket takes it (`POLLOUT` armed while
//!   some waits); received ciphertext is decrypted and its plaintext parsed as on a plain
//!   connection. A TLS error or the server's `close_notify` is a broken connection. The
//!   plain path does not go through any of it.
//! - Failure. A server error fails that request with its errno. A broken connection, a
//!   reply with a bad magic or an unknown handle, a short reply, or no progress at all for
//!   [`REPLY_TIMEOUT`] while requests are outstanding drop the connection: every request on
//!   it fails (`ECONNRESET`; the guest sees an I/O error). The next request connects again:
//!   one attempt per request, bounded by `CONNECT_TIMEOUT`; after a failed attempt requests
//!   fail at once (`ENOTCONN`) for [`RECONNECT_BACKOFF`]. Nothing here panics or waits
//!   without a bound.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};

use super::queue::slot::{Kind, Slot, ZeroStage};
use super::NbdExport;
use crate::nbd::protocol::{
    errno_from_wire, RequestHeader, SimpleReply, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES,
    REQUEST_HEADER_BYTES, SIMPLE_REPLY_BYTES,
};
use crate::reactor::ring::wake_eventfd;
use crate::reactor::Ring;
use crate::{IoFailure, IovecArray};

mod link;
mod tls;

use link::Link;

/// Marks the ring's `user_data` of this module's operations (request slots are below 2^32).
pub(crate) const NBD_USER_DATA: u64 = 1 << 63;
const OP_POLL_IN: u64 = 1;
const OP_POLL_OUT: u64 = 2;
const OP_TICK: u64 = 3;

/// No byte sent or received for this long while requests are outstanding: the server is gone.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failed connection attempt, requests fail at once for this long.
pub const RECONNECT_BACKOFF: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_secs(1);
/// Bytes read from the socket per `recv`.
const RECV_BUFFER_BYTES: usize = 256 << 10;
/// `recv` calls per readiness event before the poll is re-armed (fairness to other work).
const RECV_ROUNDS_MAX: u32 = 64;
/// iovecs per `sendmsg` (the kernel's `UIO_MAXIOV` is 1024).
const SEND_IOVECS_MAX: usize = 512;

/// Where a slot's current command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmdState {
    Idle,
    /// In the send queue (header and payload not yet all sent).
    Sending,
    /// Sent; waiting for its reply.
    Awaiting,
}

/// A slot's current NBD command.
struct Cmd {
    state: CmdState,
    header: [u8; REQUEST_HEADER_BYTES],
    header_sent: usize,
    /// Payload bytes (from the slot's iovecs) still to send.
    payload_left: u64,
    cmd: u16,
    len_bytes: u64,
    /// A flush still to send after the data (a write-through write without `FUA`, or a
    /// guest flush).
    flush_pending: bool,
}

impl Cmd {
    fn new() -> Self {
        Self {
            state: CmdState::Idle,
            header: [0; REQUEST_HEADER_BYTES],
            header_sent: 0,
            payload_left: 0,
            cmd: 0,
            len_bytes: 0,
            flush_pending: false,
        }
    }
}

/// What reading the reply stream expects next.
#[derive(Clone, Copy)]
enum RxState {
    Header,
    /// Read data of slot `slot`: `left` bytes still to copy into its iovecs.
    Payload {
        slot: u32,
        left: u64,
    },
}

/// A connection ended while polls on it were in the kernel: shut down, and open until
/// they have completed.
struct ClosedConn {
    epoch: u64,
    _link: Link,
    /// Its polls still in the kernel.
    polls: u32,
}

/// The result of starting a slot's next command.
pub(super) enum Started {
    Queued,
    /// Nothing (more) to send: the request is done, or failed.
    Done(Option<IoFailure>),
}

/// A queue's connection to an NBD export and the commands on it.
pub(super) struct NbdPath {
    export: Arc<NbdExport>,
    conn: Option<Link>,
    /// Bumped per connection; stale poll completions of an earlier one are ignored.
    epoch: u64,
    retry_after: Option<Instant>,
    cmds: Vec<Cmd>,
    send_queue: VecDeque<u32>,
    send_iovecs: IovecArray,
    rx: Vec<u8>,
    rx_header: [u8; SIMPLE_REPLY_BYTES],
    rx_header_len: usize,
    rx_state: RxState,
    poll_in_armed: bool,
    poll_out_armed: bool,
    /// Connections ended while polls on them were in the kernel.
    closed: Vec<ClosedConn>,
    tick_armed: bool,
    tick: Box<types::Timespec>,
    /// Commands queued or awaiting a reply.
    outstanding: u32,
    last_progress: Instant,
    /// Commands ended (slot, failure), for the queue to continue or complete.
    done: Vec<(u32, Option<IoFailure>)>,
}

impl NbdPath {
    pub(super) fn new(export: Arc<NbdExport>, slots: usize) -> Self {
        Self {
            export,
            conn: None,
            epoch: 0,
            retry_after: None,
            cmds: (0..slots).map(|_| Cmd::new()).collect(),
            send_queue: VecDeque::with_capacity(slots),
            send_iovecs: IovecArray::with_capacity(SEND_IOVECS_MAX),
            rx: vec![0; RECV_BUFFER_BYTES],
            rx_header: [0; SIMPLE_REPLY_BYTES],
            rx_header_len: 0,
            rx_state: RxState::Header,
            poll_in_armed: false,
            poll_out_armed: false,
            closed: Vec::new(),
            tick_armed: false,
            tick: Box::new(types::Timespec::from(TICK)),
            outstanding: 0,
            last_progress: Instant::now(),
            done: Vec::new(),
        }
    }

    pub(super) fn export(&self) -> &Arc<NbdExport> {
        &self.export
    }

    /// Starts a new request in `slot` (already prepared by the queue).
    pub(super) fn begin(&mut self, ring: &mut Ring, index: u32, slot: &mut Slot) -> Started {
        let export = &self.export;
        let cmd = &mut self.cmds[index as usize];
        cmd.flush_pending = match slot.kind() {
            Kind::Flush => export.has_flush(),
            Kind::Write => slot.dsync() && !export.has_fua() && export.has_flush(),
            _ => false,
        };
        if let Kind::Zero { .. } = slot.kind() {
            if !slot.is_discard() && !export.has_write_zeroes() {
                slot.set_zero_stage(ZeroStage::WriteZeros);
            }
        }
        self.next(ring, index, slot)
    }

    /// Queues the slot's next command (the next piece of data, or a pending flush).
    pub(super) fn next(&mut self, ring: &mut Ring, index: u32, slot: &mut Slot) -> Started {
        let Some((cmd, flags, len_bytes, payload)) = self.next_command(index, slot) else {
            return Started::Done(None);
        };
        if let Err(failure) = self.ensure_connected(ring) {
            return Started::Done(Some(failure));
        }
        let entry = &mut self.cmds[index as usize];
        entry.header = RequestHeader {
            flags,
            command: cmd,
            cookie: u64::from(index),
            offset_bytes: slot.file_offset(),
            len_bytes: len_bytes as u32,
        }
        .encode();
        entry.header_sent = 0;
        entry.payload_left = if payload { len_bytes } else { 0 };
        entry.cmd = cmd;
        entry.len_bytes = len_bytes;
        entry.state = CmdState::Sending;
        if self.outstanding == 0 {
            self.last_progress = Instant::now();
        }
        self.outstanding += 1;
        self.send_queue.push_back(index);
        self.arm_tick(ring);
        Started::Queued
    }

    /// The command that moves the slot on: (type, flags, length, carries a payload).
    fn next_command(&mut self, index: u32, slot: &mut Slot) -> Option<(u16, u16, u64, bool)> {
        let export = &self.export;
        let entry = &mut self.cmds[index as usize];
        if slot.remaining_bytes() == 0 {
            if entry.flush_pending {
                entry.flush_pending = false;
                return Some((NBD_CMD_FLUSH, 0, 0, false));
            }
            return None;
        }
        // Payloads at most the export's maximum; zeroing (no payload) up to its own bound.
        let payload = slot.remaining_bytes().min(export.request_bytes_max());
        let piece = slot.remaining_bytes().min(export.effect_bytes_max());
        Some(match slot.kind() {
            Kind::Read => (NBD_CMD_READ, 0, payload, false),
            Kind::Write => {
                let fua = slot.dsync() && export.has_fua();
                (
                    NBD_CMD_WRITE,
                    if fua { NBD_CMD_FLAG_FUA } else { 0 },
                    payload,
                    true,
                )
            }
            Kind::Flush => return None,
            Kind::Zero {
                stage: ZeroStage::WriteZeros,
            } => (NBD_CMD_WRITE, 0, slot.fill_zero_iovecs(payload), true),
            Kind::Zero { .. } if slot.is_discard() => {
                if export.has_write_zeroes() {
                    (NBD_CMD_WRITE_ZEROES, 0, piece, false)
                } else if export.has_trim() {
                    (NBD_CMD_TRIM, 0, piece, false)
                } else {
                    slot.skip_remaining();
                    return None; // advisory: success without effect
                }
            }
            Kind::Zero { stage } => {
                let unmap = stage == ZeroStage::PunchHole;
                let flags = if unmap { 0 } else { NBD_CMD_FLAG_NO_HOLE };
                (NBD_CMD_WRITE_ZEROES, flags, piece, false)
            }
        })
    }

    /// Connects if there is no connection (one attempt, unless one failed just now).
    fn ensure_connected(&mut self, ring: &mut Ring) -> Result<(), IoFailure> {
        if self.conn.is_some() {
            return Ok(());
        }
        if self.retry_after.is_some_and(|t| Instant::now() < t) {
            return Err(IoFailure::Os(libc::ENOTCONN));
        }
        match self.export.connect().and_then(|conn| {
            Link::new(conn).map_err(|e| format!("{}: TLS: {e}", self.export.uri()))
        }) {
            Ok(link) => {
                self.conn = Some(link);
                self.epoch += 1;
                self.retry_after = None;
                self.rx_state = RxState::Header;
                self.rx_header_len = 0;
                self.last_progress = Instant::now();
                self.arm_poll(ring, OP_POLL_IN);
                Ok(())
            }
            Err(reason) => {
                log::warn!("{reason}");
                self.retry_after = Some(Instant::now() + RECONNECT_BACKOFF);
                Err(IoFailure::Os(libc::ENOTCONN))
            }
        }
    }

    fn user_data(&self, op: u64) -> u64 {
        NBD_USER_DATA | (self.epoch << 8) | op
    }

    fn arm_poll(&mut self, ring: &mut Ring, op: u64) {
        let Some(conn) = &self.conn else {
            return;
        };
        let events = if op == OP_POLL_IN {
            libc::POLLIN
        } else {
            libc::POLLOUT
        };
        let entry = opcode::PollAdd::new(types::Fd(conn.fd()), events as u32)
            .build()
            .user_data(self.user_data(op));
        // SAFETY: a poll refers to no memory of ours. The socket stays open until the poll
        // completes: an ended connection is shut down (which completes its polls) and kept in
        // `closed` until they have; the path itself is dropped only after the ring is.
        match unsafe { ring.push(&entry) } {
            Ok(()) if op == OP_POLL_IN => self.poll_in_armed = true,
            Ok(()) => self.poll_out_armed = true,
            Err(e) => self.fail_connection(ring, &format!("arming a poll: {e}")),
        }
    }

    fn arm_tick(&mut self, ring: &mut Ring) {
        if self.tick_armed {
            return;
        }
        let entry = opcode::Timeout::new(&*self.tick as *const types::Timespec)
            .build()
            .user_data(NBD_USER_DATA | OP_TICK);
        // SAFETY: the timespec is boxed and lives as long as this path; the kernel reads it
        // when the entry is submitted.
        if unsafe { ring.push(&entry) }.is_ok() {
            self.tick_armed = true;
        }
    }

    /// Handles one of this module's ring completions.
    pub(super) fn on_completion(&mut self, ring: &mut Ring, user_data: u64, slots: &mut [Slot]) {
        let op = user_data & 0xff;
        if op == OP_TICK {
            self.tick_armed = false;
            if self.outstanding > 0 {
                if self.last_progress.elapsed() > REPLY_TIMEOUT {
                    let reason = format!("no reply within {REPLY_TIMEOUT:?}");
                    self.fail_connection(ring, &reason);
                } else {
                    self.arm_tick(ring);
                }
            }
            return;
        }
        let epoch = (user_data & !NBD_USER_DATA) >> 8;
        if epoch != self.epoch || self.conn.is_none() {
            self.closed_poll_done(epoch);
            return;
        }
        if op == OP_POLL_OUT {
            self.poll_out_armed = false;
            self.send(ring, slots);
            return;
        }
        self.poll_in_armed = false;
        match self.receive(slots) {
            Ok(()) => self.arm_poll(ring, OP_POLL_IN),
            Err(reason) => self.fail_connection(ring, &reason),
        }
        // A TLS session may answer what it received (a key update).
        if self.conn.as_ref().is_some_and(Link::tls_wants_write) {
            self.send(ring, slots);
        }
    }

    /// Sends as much of the send queue as the socket takes; arms `POLLOUT` for the rest.
    pub(super) fn send(&mut self, ring: &mut Ring, slots: &mut [Slot]) {
        if self.conn.as_ref().is_some_and(Link::is_tls) {
            return self.send_tls(ring, slots);
        }
        while !self.send_queue.is_empty() && !self.poll_out_armed {
            let Some(fd) = self.conn.as_ref().map(Link::fd) else {
                return;
            };
            self.gather_send_iovecs(slots);
            // SAFETY: an all-zero msghdr is valid; we set the iovec array below.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = self.send_iovecs.as_mut_ptr();
            msg.msg_iovlen = self.send_iovecs.len() as _;
            // SAFETY: the iovecs point to request headers owned by `self.cmds` and to write
            // payloads valid until their requests complete (`submit`'s contract); the call
            // is synchronous and copies them into the socket.
            let sent = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            if sent < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => self.arm_poll(ring, OP_POLL_OUT),
                    _ => self.fail_connection(ring, &format!("sending: {e}")),
                }
                return;
            }
            self.last_progress = Instant::now();
            self.consume_sent(sent as u64, slots);
        }
    }

    /// Fills `send_iovecs` with the unsent bytes of the queued commands, in order.
    fn gather_send_iovecs(&mut self, slots: &[Slot]) {
        self.send_iovecs.clear();
        for &index in &self.send_queue {
            if self.send_iovecs.len() + 2 > SEND_IOVECS_MAX {
                break;
            }
            let cmd = &self.cmds[index as usize];
            if cmd.header_sent < cmd.header.len() {
                self.send_iovecs.push(libc::iovec {
                    iov_base: cmd.header[cmd.header_sent..].as_ptr() as *mut libc::c_void,
                    iov_len: cmd.header.len() - cmd.header_sent,
                });
            }
            let mut left = cmd.payload_left;
            let slot = &slots[index as usize];
            for iov in slot.pending_iovecs() {
                if left == 0 || self.send_iovecs.len() >= SEND_IOVECS_MAX {
                    break;
                }
                let n = (iov.iov_len as u64).min(left);
                self.send_iovecs.push(libc::iovec {
                    iov_base: iov.iov_base,
                    iov_len: n as usize,
                });
                left -= n;
            }
            if left > 0 {
                break; // later commands must wait for this one's payload
            }
        }
    }

    /// Moves the send queue on by `sent` bytes.
    fn consume_sent(&mut self, mut sent: u64, slots: &mut [Slot]) {
        while sent > 0 {
            let Some(&index) = self.send_queue.front() else {
                return;
            };
            let cmd = &mut self.cmds[index as usize];
            let header_left = (cmd.header.len() - cmd.header_sent) as u64;
            let h = header_left.min(sent);
            cmd.header_sent += h as usize;
            sent -= h;
            let p = cmd.payload_left.min(sent);
            if p > 0 {
                slots[index as usize].advance(p as usize);
                cmd.payload_left -= p;
                sent -= p;
            }
            if cmd.header_sent == cmd.header.len() && cmd.payload_left == 0 {
                cmd.state = CmdState::Awaiting;
                self.send_queue.pop_front();
            }
        }
        // A command with nothing left after a partial send of its predecessor.
        while let Some(&index) = self.send_queue.front() {
            let cmd = &mut self.cmds[index as usize];
            if cmd.header_sent < cmd.header.len() || cmd.payload_left > 0 {
                break;
            }
            cmd.state = CmdState::Awaiting;
            self.send_queue.pop_front();
        }
    }

    /// Reads what the socket holds and handles every complete reply in it.
    fn receive(&mut self, slots: &mut [Slot]) -> Result<(), String> {
        let Some(fd) = self.conn.as_ref().map(Link::fd) else {
            return Ok(());
        };
        if self.conn.as_ref().is_some_and(Link::is_tls) {
            return self.receive_tls(slots);
        }
        let mut rx = std::mem::take(&mut self.rx);
        let mut result = Ok(());
        for _ in 0..RECV_ROUNDS_MAX {
            let n = match recv(fd, &mut rx, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => {
                    result = Err("the server closed the connection".to_string());
                    break;
                }
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    result = Err(format!("receiving: {}", std::io::Error::from(e)));
                    break;
                }
            };
            self.last_progress = Instant::now();
            if let Err(reason) = self.parse(&rx[..n], slots) {
                result = Err(reason);
                break;
            }
        }
        self.rx = rx;
        result
    }

    /// Consumes received bytes: reply headers and read data.
    fn parse(&mut self, mut bytes: &[u8], slots: &mut [Slot]) -> Result<(), String> {
        while !bytes.is_empty() {
            match self.rx_state {
                RxState::Header => {
                    let n = (SIMPLE_REPLY_BYTES - self.rx_header_len).min(bytes.len());
                    self.rx_header[self.rx_header_len..self.rx_header_len + n]
                        .copy_from_slice(&bytes[..n]);
                    self.rx_header_len += n;
                    bytes = &bytes[n..];
                    if self.rx_header_len == SIMPLE_REPLY_BYTES {
                        self.rx_header_len = 0;
                        self.on_reply_header(slots)?;
                    }
                }
                RxState::Payload { slot, left } => {
                    let n = (left.min(bytes.len() as u64)) as usize;
                    slots[slot as usize].copy_into_iovecs(&bytes[..n]);
                    bytes = &bytes[n..];
                    let left = left - n as u64;
                    if left == 0 {
                        self.rx_state = RxState::Header;
                        self.complete(slot, None, slots);
                    } else {
                        self.rx_state = RxState::Payload { slot, left };
                    }
                }
            }
        }
        Ok(())
    }

    fn on_reply_header(&mut self, slots: &mut [Slot]) -> Result<(), String> {
        let reply = SimpleReply::decode(&self.rx_header).map_err(|e| e.to_string())?;
        let slot = match usize::try_from(reply.cookie) {
            Ok(i) if i < self.cmds.len() && self.cmds[i].state == CmdState::Awaiting => i as u32,
            _ => return Err(format!("reply for unknown handle {}", reply.cookie)),
        };
        let cmd = &self.cmds[slot as usize];
        if reply.error != 0 {
            let errno = errno_from_wire(reply.error);
            self.complete(slot, Some(IoFailure::Os(errno)), slots);
        } else if cmd.cmd == NBD_CMD_READ && cmd.len_bytes > 0 {
            self.rx_state = RxState::Payload {
                slot,
                left: cmd.len_bytes,
            };
        } else {
            self.complete(slot, None, slots);
        }
        Ok(())
    }

    /// A command of `slot` ended: account its bytes and hand it to the queue.
    fn complete(&mut self, slot: u32, failure: Option<IoFailure>, slots: &mut [Slot]) {
        let cmd = &mut self.cmds[slot as usize];
        cmd.state = CmdState::Idle;
        self.outstanding -= 1;
        if failure.is_none() {
            slots[slot as usize].consume(cmd.len_bytes);
        }
        self.done.push((slot, failure));
    }

    /// Drops the connection: every command on it fails, and the queue's owner is woken to
    /// reap them.
    fn fail_connection(&mut self, ring: &mut Ring, reason: &str) {
        if self.conn.is_some() {
            log::warn!("{}: connection lost: {reason}", self.export.uri());
            self.close_connection(ring);
        }
    }

    /// The volume moved to another export: ends the connection to this one; the next
    /// request connects to `export`.
    pub(super) fn switch_export(&mut self, ring: &mut Ring, export: Arc<NbdExport>) {
        self.close_connection(ring);
        self.export = export;
        self.retry_after = None;
    }

    /// Ends the connection (`NBD_CMD_DISC`, then shut down): every command on it fails,
    /// and the queue's owner is woken to reap them.
    pub(super) fn close_connection(&mut self, ring: &mut Ring) {
        let Some(mut link) = self.conn.take() else {
            return;
        };
        link.disconnect();
        let polls = u32::from(self.poll_in_armed) + u32::from(self.poll_out_armed);
        if polls > 0 {
            // Its polls still name its descriptor: closed only once they have completed, so
            // that the number is not handed to another file while a poll may look it up.
            self.closed.push(ClosedConn {
                epoch: self.epoch,
                _link: link,
                polls,
            });
        }
        self.epoch += 1;
        self.poll_in_armed = false;
        self.poll_out_armed = false;
        self.send_queue.clear();
        self.rx_state = RxState::Header;
        self.rx_header_len = 0;
        for (index, cmd) in self.cmds.iter_mut().enumerate() {
            if cmd.state != CmdState::Idle {
                cmd.state = CmdState::Idle;
                cmd.flush_pending = false;
                self.done
                    .push((index as u32, Some(IoFailure::Os(libc::ECONNRESET))));
            }
        }
        self.outstanding = 0;
        wake_eventfd(ring.notify_fd());
    }

    /// A poll of an ended connection completed; the connection closes after its last.
    fn closed_poll_done(&mut self, epoch: u64) {
        let Some(i) = self.closed.iter().position(|c| c.epoch == epoch) else {
            return;
        };
        self.closed[i].polls -= 1;
        if self.closed[i].polls == 0 {
            self.closed.swap_remove(i);
        }
    }

    /// Moves the ended commands into `out`.
    pub(super) fn take_done(&mut self, out: &mut Vec<(u32, Option<IoFailure>)>) {
        out.append(&mut self.done);
    }

    pub(super) fn has_done(&self) -> bool {
        !self.done.is_empty()
    }
}

impl Drop for NbdPath {
    fn drop(&mut self) {
        if let Some(mut link) = self.conn.take() {
            link.disconnect();
        }
    }
}
