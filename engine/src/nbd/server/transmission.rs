//! One connection's transmission phase: requests read from the socket in batches and
//! checked (`intake`), handed to the connection's own engine queue (its own io_uring, on the
//! export's volume, so journal and mirror observers see these writes like a guest's), and
//! replies written back in batches, out of order as they complete.
//!
//! The loop is one thread per connection. Each pass reads what the socket holds (as many
//! requests as there are free slots), submits them with one `io_uring_enter`, reaps what
//! completed and sends every ready reply with one `sendmsg` (read data go from the slot's
//! buffer, not copied). After a pass without work it spins for an adaptive window
//! ([`PollWindow`]) before sleeping in `poll` on the socket and the queue's eventfd.
//!
//! A volume paused for a cutover refuses new requests; they wait in order and go in when
//! the volume's resume wakes the queue's eventfd. A fenced export refuses writes with
//! `EPERM` (its connections are also shut down by the fence).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::allocation::{extents, DESCRIPTORS_MAX};
use super::exports::{Attachment, Export};
use super::intake::RecvBuffer;
use super::negotiation::Negotiated;
use super::request::{Command, ExportLimits};
use super::slots::{wire_error, Slots, State, INFLIGHT_MAX};
use super::transport::Transport;
use crate::nbd::protocol::{BlockDescriptor, NBD_EPERM};
use crate::poll_window::PollWindow;
use crate::volume::queue::{BlockOp, Rejected};
use crate::volume::ResumeWakerRegistration;
use crate::{Completion, VolumeQueue};

/// Reply parts handed to one `sendmsg` (a head and data per reply).
const IOV_BATCH: usize = 2 * INFLIGHT_MAX;
/// The longest busy-poll window after the last work.
const POLL_WINDOW_MAX: Duration = Duration::from_micros(50);
/// How long a connection that ends waits for its requests in the engine.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Sleeps are bounded so that a missed wake-up costs at most this.
const SLEEP_MS_MAX: i32 = 1000;

/// Why a connection ends.
#[derive(Debug)]
pub(super) enum Ending {
    /// `NBD_CMD_DISC`: finish what is in flight, reply, close.
    Disconnect,
    /// The client closed its side: finish what is in flight, reply if it still reads.
    InputClosed,
    /// Stop now (the stream cannot be followed, or the socket failed).
    Abort(String),
}

/// Fields drop in order: the queue (which waits for the kernel to finish with the slots'
/// buffers) before the slots, and before the attachment (so that a fence waiting for the
/// connection to detach knows its writes have ended).
pub(super) struct Session {
    pub(super) transport: Transport,
    pub(super) queue: VolumeQueue,
    pub(super) attachment: Attachment,
    pub(super) limits: ExportLimits,
    pub(super) client: String,
    pub(super) slots: Slots,
    pub(super) recv: RecvBuffer,
    /// A write whose payload is arriving.
    pub(super) receiving: Option<u16>,
    /// Bytes of a refused write's payload still to drop.
    pub(super) discard_bytes: u64,
    /// The parser stopped at a request it cannot take yet.
    pub(super) stalled: bool,
    /// Requests the paused volume refused, in order.
    pub(super) waiting: VecDeque<u16>,
    /// Encoded replies, in the order they go out.
    pub(super) replies: VecDeque<u16>,
    /// Bytes of the first reply already sent.
    pub(super) sent_of_first: usize,
    pub(super) completions: Vec<Completion>,
    pub(super) extents: Vec<BlockDescriptor>,
    pub(super) ending: Option<Ending>,
}

/// Serves a connection that entered the transmission phase until it ends.
pub(crate) fn serve(mut transport: Transport, negotiated: Negotiated) {
    let Negotiated {
        attachment,
        limits,
        client,
    } = negotiated;
    let export = attachment.export().clone();
    let name = export.config.name.clone();
    if let Err(e) = transport.set_nonblocking() {
        log::warn!("nbd: export {name}: client {client}: {e}");
        transport.close();
        return;
    }
    let queue = match VolumeQueue::new(
        export.config.volume.clone(),
        attachment.queue_index,
        INFLIGHT_MAX as u32,
        1,
    ) {
        Ok(q) => q,
        Err(e) => {
            log::error!("nbd: export {name}: client {client}: {e}");
            transport.close();
            return;
        }
    };
    let resume = register_resume_waker(&export, &queue);
    let mut session = Session {
        transport,
        queue,
        attachment,
        limits,
        client,
        slots: Slots::new(),
        recv: RecvBuffer::new(),
        receiving: None,
        discard_bytes: 0,
        stalled: false,
        waiting: VecDeque::with_capacity(INFLIGHT_MAX),
        replies: VecDeque::with_capacity(INFLIGHT_MAX),
        sent_of_first: 0,
        completions: Vec::with_capacity(INFLIGHT_MAX),
        extents: Vec::with_capacity(DESCRIPTORS_MAX),
        ending: None,
    };
    log::info!(
        "nbd: export {name}: client {} connected ({})",
        session.client,
        if session.transport.is_tls() {
            "TLS"
        } else {
            "plain"
        }
    );
    session.run();
    session.finish();
    drop(resume);
}

/// The volume's resume wakes the queue's eventfd, which the loop polls.
fn register_resume_waker(export: &Export, queue: &VolumeQueue) -> Option<ResumeWakerRegistration> {
    let eventfd = queue.notify_fd().try_clone_to_owned().ok()?;
    Some(export.config.volume.register_resume_waker(eventfd))
}

impl Session {
    pub(super) fn export(&self) -> &Arc<Export> {
        self.attachment.export()
    }

    fn run(&mut self) {
        let mut window = PollWindow::new(POLL_WINDOW_MAX);
        let mut idle_since = Instant::now();
        loop {
            let mut progressed = self.retry_waiting();
            progressed |= self.receive();
            self.commit();
            progressed |= self.complete();
            progressed |= self.send();
            if self.done() {
                return;
            }
            if progressed {
                idle_since = Instant::now();
                continue;
            }
            if idle_since.elapsed() < window.current() {
                std::hint::spin_loop();
                continue;
            }
            if !window.current().is_zero() {
                window.on_window_expired();
            }
            window.on_sleep(Instant::now());
            self.sleep();
            window.on_wake(Instant::now());
            idle_since = Instant::now();
        }
    }

    fn done(&self) -> bool {
        match &self.ending {
            None => false,
            Some(Ending::Abort(_)) => true,
            Some(Ending::Disconnect | Ending::InputClosed) => self.slots.busy() == 0,
        }
    }

    pub(super) fn end(&mut self, ending: Ending) {
        if !matches!(self.ending, Some(Ending::Abort(_))) {
            self.ending = Some(ending);
        }
    }

    pub(super) fn wants_input(&self) -> bool {
        self.ending.is_none()
            && !self.stalled
            && self.waiting.is_empty()
            && (self.receiving.is_some() || !self.recv.is_full())
    }

    fn commit(&mut self) {
        if let Err(e) = self.queue.commit() {
            log::error!(
                "nbd: export {}: io_uring submit failed: {e}",
                self.export().config.name
            );
        }
    }

    /// Runs a taken request: block status at once, everything else through the engine.
    pub(super) fn start(&mut self, index: u16) {
        let command = self.slots.slot(index).command;
        if command.writes() && self.export().is_fenced() {
            self.reply(index, NBD_EPERM);
            return;
        }
        if let Command::BlockStatus {
            offset_bytes,
            len_bytes,
            req_one,
        } = command
        {
            let max = if req_one { 1 } else { DESCRIPTORS_MAX };
            let backing = self.export().config.volume.backing();
            let block = u64::from(self.limits.block_bytes);
            extents(
                &backing,
                offset_bytes,
                len_bytes,
                block,
                max,
                &mut self.extents,
            );
            let slot = self.slots.get(index);
            slot.set_block_status(&self.extents);
            self.replies.push_back(index);
            return;
        }
        self.submit(index);
    }

    /// Hands a slot's engine operation (its command, or the flush after a FUA change) to
    /// the queue, or parks it while the volume is paused.
    fn submit(&mut self, index: u16) {
        let slot = self.slots.get(index);
        let iovec = libc::iovec {
            iov_base: slot.buf.as_mut_ptr().cast(),
            iov_len: slot.len,
        };
        let iovecs = std::slice::from_ref(&iovec);
        let op = if slot.state == State::Flushing {
            BlockOp::Flush
        } else {
            match slot.command {
                Command::Read { offset_bytes, .. } => BlockOp::Read {
                    offset_bytes,
                    iovecs,
                },
                Command::Write { offset_bytes, .. } => BlockOp::Write {
                    offset_bytes,
                    iovecs,
                },
                Command::Trim {
                    offset_bytes,
                    len_bytes,
                    ..
                } => BlockOp::Discard {
                    offset_bytes,
                    len_bytes: u64::from(len_bytes),
                },
                Command::WriteZeroes {
                    offset_bytes,
                    len_bytes,
                    no_hole,
                    ..
                } => BlockOp::WriteZeroes {
                    offset_bytes,
                    len_bytes: u64::from(len_bytes),
                    unmap: !no_hole,
                },
                Command::Flush | Command::BlockStatus { .. } | Command::Disconnect => {
                    BlockOp::Flush
                }
            }
        };
        // SAFETY: the iovec points into the slot's buffer, `slot.len` bytes long. The
        // buffer is neither resized, read nor freed until the completion tagged `index`
        // has been reaped: the slot stays Submitted or Flushing until then, and only
        // `complete` moves it on.
        let submitted = unsafe { self.queue.submit(op, u64::from(index)) };
        match submitted {
            Ok(()) => {
                if slot.state != State::Flushing {
                    slot.state = State::Submitted;
                }
            }
            Err(Rejected::Paused | Rejected::Full) => self.waiting.push_back(index),
        }
    }

    /// Submits the requests a pause held back, in order, once the volume runs again.
    fn retry_waiting(&mut self) -> bool {
        let mut progressed = false;
        while let Some(index) = self.waiting.pop_front() {
            if self.export().config.volume.is_paused() {
                self.waiting.push_front(index);
                break;
            }
            let parked = self.waiting.len();
            self.submit(index);
            if self.waiting.len() > parked {
                // Paused again between the check and the submission: back to the front.
                if let Some(again) = self.waiting.pop_back() {
                    self.waiting.push_front(again);
                }
                break;
            }
            progressed = true;
        }
        progressed
    }

    /// Turns completed engine operations into replies (or FUA flushes).
    fn complete(&mut self) -> bool {
        self.queue.reap(&mut self.completions);
        if self.completions.is_empty() {
            return false;
        }
        let mut completions = std::mem::take(&mut self.completions);
        let mut flushes = false;
        for completion in completions.drain(..) {
            let Ok(index) = u16::try_from(completion.tag) else {
                continue;
            };
            let slot = self.slots.slot(index);
            let (command, state) = (slot.command, slot.state);
            let fua = matches!(
                command,
                Command::Write { fua: true, .. }
                    | Command::Trim { fua: true, .. }
                    | Command::WriteZeroes { fua: true, .. }
            );
            match completion.result {
                Ok(_) if fua && state == State::Submitted => {
                    self.slots.get(index).state = State::Flushing;
                    self.submit(index);
                    flushes = true;
                }
                Ok(_) => self.reply(index, 0),
                Err(failure) => {
                    log::debug!(
                        "nbd: export {}: client {}: {command:?} failed: {failure}",
                        self.export().config.name,
                        self.client,
                    );
                    self.reply(index, wire_error(failure, &command));
                }
            }
        }
        self.completions = completions;
        if flushes {
            self.commit();
        }
        true
    }

    pub(super) fn reply(&mut self, index: u16, error: u32) {
        self.slots
            .get(index)
            .set_reply(error, self.limits.structured_replies);
        self.replies.push_back(index);
    }

    /// Sends ready replies until none is left or the socket is full.
    fn send(&mut self) -> bool {
        let mut progressed = false;
        while !self.replies.is_empty() && !matches!(self.ending, Some(Ending::Abort(_))) {
            let mut parts = [IoSlice::new(&[]); IOV_BATCH];
            let (count, offered) =
                gather(&self.slots, &self.replies, self.sent_of_first, &mut parts);
            match self.transport.send(&parts[..count]) {
                Ok(sent) => {
                    progressed = true;
                    self.advance(sent);
                    if sent < offered {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.end(Ending::Abort(format!("send: {e}"))),
            }
        }
        if self.transport.has_pending_output() {
            match self.transport.flush_tls() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => self.end(Ending::Abort(format!("send: {e}"))),
            }
        }
        progressed
    }

    /// Frees the replies `sent` more bytes completed.
    fn advance(&mut self, sent: usize) {
        let mut sent = sent + self.sent_of_first;
        while let Some(&index) = self.replies.front() {
            let bytes = self.slots.slot(index).reply_bytes();
            if sent < bytes {
                self.sent_of_first = sent;
                return;
            }
            sent -= bytes;
            self.replies.pop_front();
            self.slots.release(index);
        }
        self.sent_of_first = 0;
    }

    /// Sleeps until the socket or the queue's eventfd has something (or a bound passes).
    fn sleep(&mut self) {
        let mut events = 0;
        if self.wants_input() {
            events |= libc::POLLIN;
        }
        if !self.replies.is_empty() || self.transport.has_pending_output() {
            events |= libc::POLLOUT;
        }
        let mut fds = [
            libc::pollfd {
                fd: self.transport.socket().as_raw_fd(),
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: self.queue.notify_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll(2) on two pollfds that live on this stack frame for the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, SLEEP_MS_MAX) };
        if ready > 0 && fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            // Shut down (a fence, the server stopping) or reset: nothing more will come,
            // and a reply may never leave.
            if fds[0].revents & libc::POLLERR != 0 || self.replies.is_empty() {
                self.end(Ending::Abort("the connection was closed".into()));
            } else {
                self.end(Ending::InputClosed);
            }
        }
        self.queue.clear_notification();
    }

    /// Waits for the engine to finish what is in flight, then closes the connection.
    fn finish(&mut self) {
        let name = self.export().config.name.clone();
        if !self.queue.drain(&mut self.completions, DRAIN_TIMEOUT) {
            log::error!(
                "nbd: export {name}: client {}: requests still in flight after {DRAIN_TIMEOUT:?}",
                self.client
            );
        }
        self.transport.close();
        match &self.ending {
            Some(Ending::Abort(reason)) => {
                log::info!(
                    "nbd: export {name}: client {} dropped: {reason}",
                    self.client
                )
            }
            _ => log::info!("nbd: export {name}: client {} disconnected", self.client),
        }
    }
}

/// Fills `parts` with the replies to send, skipping the `skip` bytes of the first that
/// are already sent; returns the parts used and their bytes.
fn gather<'a>(
    slots: &'a Slots,
    replies: &VecDeque<u16>,
    mut skip: usize,
    parts: &mut [IoSlice<'a>; IOV_BATCH],
) -> (usize, usize) {
    let (mut count, mut bytes) = (0, 0);
    for &index in replies {
        if count + 2 > IOV_BATCH {
            break;
        }
        let (head, data) = slots.slot(index).reply();
        for part in [head, data] {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            parts[count] = IoSlice::new(&part[skip..]);
            bytes += part.len() - skip;
            skip = 0;
            count += 1;
        }
    }
    (count, bytes)
}
