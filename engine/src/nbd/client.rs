//! A blocking NBD client that many threads use at once over one connection: the handshake
//! (with `NBD_OPT_STARTTLS` when it has TLS credentials, then `NBD_OPT_GO` asking for the
//! export's size constraints, [`super::sizes`]), then READ/WRITE/FLUSH/TRIM/WRITE_ZEROES
//! with simple replies.
//!
//! Each request registers a cookie, sends its header (and payload) under the send lock, and
//! waits for its reply, which one reader thread matches by cookie. Writes can also be
//! pipelined ([`NbdClient::send_writes`]): a batch goes out in one send, and each write's
//! callback runs on the reader thread when its reply comes, so a caller keeps many writes
//! in flight without a thread waiting on each. When the connection breaks (or a reply does
//! not come within the request timeout), every waiting and later request fails with
//! [`ClientError::Disconnected`]. Requests larger than the export takes
//! are split; a range not aligned to its minimum block size is refused before it is sent.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::connection::Connection;
use super::handshake::handshake;
use super::protocol::{
    command_name, RequestHeader, SimpleReply, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLUSH, NBD_CMD_READ,
    NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, SIMPLE_REPLY_BYTES,
};
use super::sizes::{BlockSizes, REQUEST_ALIGN_BYTES};
use super::tls_stream::ClientTls;
use super::ExportUri;
use crate::tls::TlsCredentials;
/// The reply reader only reads replies from its connection (TLS included).
const READER_SYSCALLS: crate::confine::Allowlist = crate::confine::Allowlist {
    kind: "nbd-client-reader",
    groups: &[crate::confine::RUNTIME, crate::confine::NET_CLIENT],
    extra: &[],
};

/// How long a request waits for its reply before the connection is declared lost.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Why a client operation failed. The caller names the export in its own messages.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect: {source}")]
    Connect {
        #[source]
        source: std::io::Error,
    },
    #[error("NBD handshake failed: {reason}")]
    Handshake { reason: String },
    /// The export cannot be used as asked (read-only, block sizes), or a range is not
    /// aligned to what it takes.
    #[error("{reason}")]
    Unusable { reason: String },
    #[error("the NBD connection is lost: {reason}")]
    Disconnected { reason: String },
    #[error("the server refused {op} at offset {offset_bytes}: NBD error {errno}")]
    Refused {
        op: &'static str,
        offset_bytes: u64,
        errno: u32,
    },
}

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bounds the connect, the handshake, and the wait for each reply.
    pub request_timeout: Duration,
    /// Accepts a read-only export (a client that only reads); otherwise one is refused.
    pub accept_read_only: bool,
    /// What every request will be whole multiples of (a power of two, at least a sector);
    /// an export whose minimum block size is larger is refused.
    pub request_block_bytes: u64,
    /// The credentials to connect with: with them the connection uses TLS whatever the
    /// URI's scheme; without them an `nbds://` URI is refused.
    pub tls: Option<Arc<TlsCredentials>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            accept_read_only: false,
            request_block_bytes: REQUEST_ALIGN_BYTES,
            tls: None,
        }
    }
}

/// What a reply carries back to its waiting request: read data, or the server's errno.
type Reply = Result<Vec<u8>, ReplyFailure>;

enum ReplyFailure {
    Errno(u32),
    Lost(String),
}

/// What runs when a pipelined write has ended: on the reader thread when its reply comes,
/// or on the thread that finds the connection lost.
pub type WriteDone = Box<dyn FnOnce(Result<(), ClientError>) + Send>;

/// A write to send without waiting for it ([`NbdClient::send_writes`]).
pub struct PipelinedWrite<'a> {
    pub offset_bytes: u64,
    pub data: &'a [u8],
    pub done: WriteDone,
}

struct Waiter {
    read_len: usize,
    to: ReplyTo,
}

/// Where a reply goes.
enum ReplyTo {
    /// A thread waiting in [`NbdClient::request`] (its own deadline).
    Waiting(SyncSender<Reply>),
    /// A pipelined write: its callback, and when it was sent (for
    /// [`NbdClient::expire_overdue`]).
    Call {
        done: WriteDone,
        offset_bytes: u64,
        sent_at: Instant,
    },
}

impl Waiter {
    /// Hands the reply to whoever waits for it. Call without the pending lock held: a
    /// callback may use the client.
    fn deliver(self, reply: Reply) {
        match self.to {
            ReplyTo::Waiting(tx) => {
                let _ = tx.try_send(reply);
            }
            ReplyTo::Call {
                done, offset_bytes, ..
            } => done(reply.map(drop).map_err(|failure| match failure {
                ReplyFailure::Errno(errno) => ClientError::Refused {
                    op: command_name(NBD_CMD_WRITE),
                    offset_bytes,
                    errno,
                },
                ReplyFailure::Lost(reason) => ClientError::Disconnected { reason },
            })),
        }
    }
}

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
}

/// An NBD export opened for blocking requests from many threads.
pub struct NbdClient {
    size_bytes: u64,
    transmission_flags: u16,
    block_sizes: BlockSizes,
    send: Mutex<Connection>,
    /// The same socket outside the send lock, to shut it down while a sender is blocked.
    control: Connection,
    pending: Arc<Mutex<Pending>>,
    next_cookie: AtomicU64,
    reader: Mutex<Option<JoinHandle<()>>>,
    request_timeout: Duration,
}

impl NbdClient {
    /// Connects to `uri`, upgrades to TLS when `options` has credentials, negotiates its
    /// export with `NBD_OPT_GO`, refuses what `options` cannot use (see [`ClientOptions`]),
    /// and starts the reply reader.
    pub fn connect(uri: &ExportUri, options: &ClientOptions) -> Result<Self, ClientError> {
        let timeout = options.request_timeout;
        let connect_err = |source| ClientError::Connect { source };
        let tls = ClientTls::for_uri(uri, options.tls.as_deref())
            .map_err(|reason| ClientError::Unusable { reason })?;
        let conn = Connection::connect(&uri.address, timeout).map_err(connect_err)?;
        let (conn, info) = handshake(conn, &uri.export, timeout, tls.as_ref())
            .map_err(|reason| ClientError::Handshake { reason })?;
        let unusable =
            if info.transmission_flags & NBD_FLAG_READ_ONLY != 0 && !options.accept_read_only {
                Err("the export is read-only".to_string())
            } else {
                info.block_sizes.check_usable(options.request_block_bytes)
            };
        if let Err(reason) = unusable {
            conn.disconnect();
            return Err(ClientError::Unusable { reason });
        }
        log::info!("{uri}: {} bytes, {}", info.size_bytes, info.block_sizes);
        // Replies may be far apart (the reader waits as long as it must: each request has its
        // own deadline), but a send that cannot go out within a request's time means a server
        // that stopped reading; without a bound it would block with the send lock held, and
        // every other sender behind it.
        conn.set_timeouts(None, Some(timeout))
            .map_err(connect_err)?;
        let reader_conn = conn.try_clone().map_err(connect_err)?;
        let control = conn.try_clone().map_err(connect_err)?;
        let pending = Arc::new(Mutex::new(Pending::default()));
        let reader_pending = pending.clone();
        let reader = std::thread::Builder::new()
            .name("ferry-nbd-reader".into())
            .spawn(move || {
                crate::confine::enter(&READER_SYSCALLS);
                read_replies(reader_conn, &reader_pending)
            })
            .map_err(connect_err)?;
        Ok(Self {
            size_bytes: info.size_bytes,
            transmission_flags: info.transmission_flags,
            block_sizes: info.block_sizes,
            send: Mutex::new(conn),
            control,
            pending,
            next_cookie: AtomicU64::new(1),
            reader: Mutex::new(Some(reader)),
            request_timeout: timeout,
        })
    }

    /// The server allows several connections to the export (`NBD_FLAG_CAN_MULTI_CONN`).
    pub fn can_multi_conn(&self) -> bool {
        self.transmission_flags & NBD_FLAG_CAN_MULTI_CONN != 0
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The size constraints the server advertised (or the protocol's defaults).
    pub fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }

    /// True once the connection is lost (every request fails from then on).
    pub fn is_dead(&self) -> bool {
        self.pending
            .lock()
            .map(|p| p.dead.is_some())
            .unwrap_or(true)
    }

    /// Lets go of the connection once nothing will use it again (servers limit their
    /// clients); later requests fail, with `reason`.
    pub fn close(&self, reason: &str) {
        self.kill(reason.to_string());
    }

    /// Writes `data` at `offset_bytes`, in pieces of at most the export's maximum payload.
    pub fn write_at(&self, offset_bytes: u64, data: &[u8]) -> Result<(), ClientError> {
        let max = self.block_sizes.request_bytes_max();
        let len = data.len() as u64;
        self.split(NBD_CMD_WRITE, offset_bytes, len, max, |off, n| {
            let start = (off - offset_bytes) as usize;
            let piece = &data[start..start + n as usize];
            self.request(NBD_CMD_WRITE, 0, off, n as u32, piece)
                .map(drop)
        })
    }

    /// Makes the range read back as zeros (`NBD_CMD_WRITE_ZEROES`, with `NO_HOLE` unless
    /// `unmap`; zeros written when the server has no write-zeroes).
    pub fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
    ) -> Result<(), ClientError> {
        if self.transmission_flags & NBD_FLAG_SEND_WRITE_ZEROES == 0 {
            let max = self.block_sizes.request_bytes_max();
            let zeros = vec![0u8; max.min(len_bytes) as usize];
            return self.split(NBD_CMD_WRITE, offset_bytes, len_bytes, max, |off, n| {
                self.request(NBD_CMD_WRITE, 0, off, n as u32, &zeros[..n as usize])
                    .map(drop)
            });
        }
        let flags = if unmap { 0 } else { NBD_CMD_FLAG_NO_HOLE };
        let max = self.block_sizes.effect_bytes_max();
        self.split(
            NBD_CMD_WRITE_ZEROES,
            offset_bytes,
            len_bytes,
            max,
            |off, n| {
                self.request(NBD_CMD_WRITE_ZEROES, flags, off, n as u32, &[])
                    .map(drop)
            },
        )
    }

    /// Reads `buf.len()` bytes at `offset_bytes`.
    pub fn read_at(&self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let len = buf.len() as u64;
        let max = self.block_sizes.request_bytes_max();
        self.split(NBD_CMD_READ, offset_bytes, len, max, |off, n| {
            let data = self.request(NBD_CMD_READ, 0, off, n as u32, &[])?;
            let start = (off - offset_bytes) as usize;
            buf[start..start + n as usize].copy_from_slice(&data);
            Ok(())
        })
    }

    /// Makes every completed write durable (`NBD_CMD_FLUSH`); a no-op when the server
    /// takes no flushes.
    pub fn flush(&self) -> Result<(), ClientError> {
        if self.transmission_flags & NBD_FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(NBD_CMD_FLUSH, 0, 0, 0, &[]).map(drop)
    }

    /// Tells the server that a range is no longer needed (NBD_CMD_TRIM); a no-op when the
    /// server does not take trims. The range's contents are undefined afterwards.
    pub fn trim(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), ClientError> {
        if self.transmission_flags & NBD_FLAG_SEND_TRIM == 0 {
            return Ok(());
        }
        let max = self.block_sizes.effect_bytes_max();
        self.split(NBD_CMD_TRIM, offset_bytes, len_bytes, max, |off, n| {
            self.request(NBD_CMD_TRIM, 0, off, n as u32, &[]).map(drop)
        })
    }

    /// Sends one request and waits for its reply; returns the data of a read.
    fn request(
        &self,
        command: u16,
        flags: u16,
        offset_bytes: u64,
        len_bytes: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let op = command_name(command);
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let read_len = if command == NBD_CMD_READ {
            len_bytes as usize
        } else {
            0
        };
        let rx = self.register(cookie, read_len)?;
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset_bytes,
            len_bytes,
        }
        .encode();
        let sent = match self.send.lock() {
            Ok(mut conn) => conn
                .write_all(&header)
                .and_then(|()| conn.write_all(payload)),
            Err(_) => Err(std::io::Error::other("send lock poisoned")),
        };
        if let Err(e) = sent {
            self.kill(format!("sending {op}: {e}"));
        }
        let reply = match rx.recv_timeout(self.request_timeout) {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Timeout) => {
                self.kill(format!(
                    "no reply to {op} within {:?}",
                    self.request_timeout
                ));
                Err(ReplyFailure::Lost(format!("no reply to {op}")))
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(ReplyFailure::Lost("reply reader stopped".into()))
            }
        };
        reply.map_err(|failure| match failure {
            ReplyFailure::Errno(errno) => ClientError::Refused {
                op,
                offset_bytes,
                errno,
            },
            ReplyFailure::Lost(reason) => ClientError::Disconnected { reason },
        })
    }

    /// Sends `writes` (drained) as one batch, in one send, without waiting: each one's
    /// `done` runs once its reply comes (on the reader thread) or the connection is lost.
    /// A write the export cannot take in one request (past its maximum payload, or not
    /// aligned to its minimum block size) is written as [`write_at`](Self::write_at) would,
    /// waiting, and its `done` runs here.
    pub fn send_writes(&self, writes: &mut Vec<PipelinedWrite<'_>>) {
        let max = self.block_sizes.request_bytes_max();
        let mut batch = Vec::new();
        let mut registered: Vec<(u64, Waiter)> = Vec::with_capacity(writes.len());
        let sent_at = Instant::now();
        for write in writes.drain(..) {
            let len = write.data.len() as u64;
            if len > max || len == 0 || !self.block_sizes.is_aligned(write.offset_bytes, len) {
                let result = self.write_at(write.offset_bytes, write.data);
                (write.done)(result);
                continue;
            }
            let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
            let header = RequestHeader {
                flags: 0,
                command: NBD_CMD_WRITE,
                cookie,
                offset_bytes: write.offset_bytes,
                len_bytes: len as u32,
            }
            .encode();
            batch.extend_from_slice(&header);
            batch.extend_from_slice(write.data);
            let to = ReplyTo::Call {
                done: write.done,
                offset_bytes: write.offset_bytes,
                sent_at,
            };
            registered.push((cookie, Waiter { read_len: 0, to }));
        }
        let requests = registered.len();
        if requests == 0 {
            return;
        }
        let refused = match self.pending.lock() {
            Ok(mut pending) => match &pending.dead {
                Some(reason) => Some(reason.clone()),
                None => {
                    pending.waiters.extend(registered.drain(..));
                    None
                }
            },
            Err(_) => Some("state lock poisoned".to_string()),
        };
        if let Some(reason) = refused {
            for (_, waiter) in registered {
                waiter.deliver(Err(ReplyFailure::Lost(reason.clone())));
            }
            return;
        }
        let sent = match self.send.lock() {
            Ok(mut conn) => conn.write_all(&batch),
            Err(_) => Err(std::io::Error::other("send lock poisoned")),
        };
        if let Err(e) = sent {
            self.kill(format!("sending {requests} pipelined WRITE requests: {e}"));
        }
    }

    /// Declares the connection lost when a pipelined write has waited longer than the
    /// request timeout for its reply (a waiting request watches its own deadline; a
    /// pipelined one has nobody waiting, so its sender calls this now and then).
    pub fn expire_overdue(&self) {
        let overdue = match self.pending.lock() {
            Ok(pending) => pending.waiters.values().any(|w| match &w.to {
                ReplyTo::Call { sent_at, .. } => sent_at.elapsed() > self.request_timeout,
                ReplyTo::Waiting(_) => false,
            }),
            Err(_) => false,
        };
        if overdue {
            self.kill(format!(
                "no reply to a pipelined WRITE within {:?}",
                self.request_timeout
            ));
        }
    }

    fn register(&self, cookie: u64, read_len: usize) -> Result<Receiver<Reply>, ClientError> {
        let (tx, rx) = sync_channel(1);
        let mut pending = self
            .pending
            .lock()
            .map_err(|_| lost("state lock poisoned"))?;
        if let Some(reason) = &pending.dead {
            return Err(lost(reason));
        }
        let to = ReplyTo::Waiting(tx);
        pending.waiters.insert(cookie, Waiter { read_len, to });
        Ok(rx)
    }

    /// Declares the connection dead: fails every waiter, wakes the reader and any sender
    /// blocked on the socket (not taking the send lock, which such a sender holds).
    fn kill(&self, reason: String) {
        fail_all(&self.pending, reason);
        self.control.shutdown();
    }

    /// Runs `f` over `len_bytes` from `offset_bytes` in pieces of at most `piece_bytes_max`
    /// (a multiple of the minimum block size, so every piece stays aligned). A range not
    /// aligned to the export's minimum block size is refused before anything is sent (the
    /// handshake committed the client to it).
    fn split(
        &self,
        command: u16,
        offset_bytes: u64,
        len_bytes: u64,
        piece_bytes_max: u64,
        mut f: impl FnMut(u64, u64) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        if !self.block_sizes.is_aligned(offset_bytes, len_bytes) {
            return Err(ClientError::Unusable {
                reason: format!(
                    "{} of {len_bytes} bytes at offset {offset_bytes} is not aligned to the \
                     export's minimum block size of {} bytes",
                    command_name(command),
                    self.block_sizes.block_bytes_min
                ),
            });
        }
        let mut done = 0;
        while done < len_bytes {
            let n = (len_bytes - done).min(piece_bytes_max);
            f(offset_bytes + done, n)?;
            done += n;
        }
        Ok(())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let header = RequestHeader::DISCONNECT.encode();
        if let Ok(mut conn) = self.send.lock() {
            let _ = conn.write_all(&header);
            conn.shutdown();
        }
        if let Ok(mut reader) = self.reader.lock() {
            // The last owner may be a pipelined write's callback, run by the reader itself:
            // it ends on its own once the socket is shut down.
            let handle = reader.take();
            if let Some(handle) = handle.filter(|h| h.thread().id() != std::thread::current().id())
            {
                let _ = handle.join();
            }
        }
    }
}

fn lost(reason: &str) -> ClientError {
    ClientError::Disconnected {
        reason: reason.to_string(),
    }
}

fn fail_all(pending: &Mutex<Pending>, reason: String) {
    let waiters = match pending.lock() {
        Ok(mut p) => {
            if p.dead.is_none() {
                log::warn!("NBD connection lost: {reason}");
                p.dead = Some(reason.clone());
            }
            std::mem::take(&mut p.waiters)
        }
        Err(_) => return,
    };
    for (_, waiter) in waiters {
        waiter.deliver(Err(ReplyFailure::Lost(reason.clone())));
    }
}

/// The reader thread: matches simple replies to waiting requests until the connection ends.
fn read_replies(mut conn: Connection, pending: &Mutex<Pending>) {
    let reason = loop {
        let mut header = [0u8; SIMPLE_REPLY_BYTES];
        if let Err(e) = conn.read_exact(&mut header) {
            break format!("reading a reply: {e}");
        }
        let reply = match SimpleReply::decode(&header) {
            Ok(reply) => reply,
            Err(e) => break e.to_string(),
        };
        let waiter = match pending.lock() {
            Ok(mut p) => p.waiters.remove(&reply.cookie),
            Err(_) => break "state lock poisoned".to_string(),
        };
        let Some(waiter) = waiter else {
            break format!("reply for unknown handle {}", reply.cookie);
        };
        if reply.error != 0 {
            waiter.deliver(Err(ReplyFailure::Errno(reply.error)));
            continue;
        }
        let mut data = vec![0u8; waiter.read_len];
        if let Err(e) = conn.read_exact(&mut data) {
            waiter.deliver(Err(ReplyFailure::Lost(format!("reading data: {e}"))));
            break format!("reading read data: {e}");
        }
        waiter.deliver(Ok(data));
    };
    fail_all(pending, reason);
    conn.shutdown();
}
