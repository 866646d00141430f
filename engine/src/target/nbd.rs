//! An NBD client as a migration target: fixed-newstyle handshake with `NBD_OPT_GO` (asking
//! for the export's size constraints, [`super::nbd_sizes`]), then
//! READ/WRITE/FLUSH/TRIM/WRITE_ZEROES with simple replies over one connection.
//!
//! Many threads issue requests at once: each registers a handle, sends its request under
//! the send lock, and waits for its reply, which one reader thread matches by handle.
//! When the connection breaks (or a reply does not come within `request_timeout`), every
//! waiting and later request fails with [`TargetError::Disconnected`].

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use super::nbd_sizes::BlockSizes;
use super::nbd_sizes::{NBD_INFO_BLOCK_SIZE, REQUEST_ALIGN_BYTES};
use super::{NbdAddress, Target, TargetError};

pub(crate) const NBD_INIT_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub(crate) const NBD_OPTS_MAGIC: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub(crate) const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub(crate) const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub(crate) const NBD_OPT_GO: u32 = 7;
pub(crate) const NBD_REP_ACK: u32 = 1;
pub(crate) const NBD_REP_INFO: u32 = 3;
pub(crate) const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub(crate) const NBD_INFO_EXPORT: u16 = 0;
/// The longest option reply we accept (a server's error message, an info block).
pub(crate) const OPTION_REPLY_BYTES_MAX: u32 = 64 * 1024;

pub(crate) const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub(crate) const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

pub(crate) const NBD_CMD_READ: u16 = 0;
pub(crate) const NBD_CMD_WRITE: u16 = 1;
pub(crate) const NBD_CMD_DISC: u16 = 2;
pub(crate) const NBD_CMD_FLUSH: u16 = 3;
pub(crate) const NBD_CMD_TRIM: u16 = 4;
pub(crate) const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// How long a request waits for its reply before the connection is declared lost.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

pub(crate) const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub(crate) const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub(crate) const NBD_CMD_FLAG_FUA: u16 = 1 << 0;

/// The connection, over TCP or a unix socket.
pub(crate) enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    /// Connects to `address` (TCP with `TCP_NODELAY`); a TCP connect gives up after `timeout`.
    pub(crate) fn connect(address: &NbdAddress, timeout: Duration) -> std::io::Result<Self> {
        match address {
            NbdAddress::Tcp { host, port } => {
                let mut last = None;
                for addr in std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), *port))? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(stream) => {
                            stream.set_nodelay(true)?;
                            return Ok(Self::Tcp(stream));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "host has no address")
                }))
            }
            NbdAddress::Unix { socket } => Ok(Self::Unix(UnixStream::connect(socket)?)),
        }
    }

    /// Bounds every blocking read and write (the handshake), or lifts the bound (`None`).
    pub(crate) fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_timeouts(timeout, timeout)
    }

    /// Bounds blocking reads and writes separately (`None`: no bound).
    pub(crate) fn set_timeouts(
        &self,
        read: Option<Duration>,
        write: Option<Duration>,
    ) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Self::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }

    pub(crate) fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_nonblocking(on),
            Self::Unix(s) => s.set_nonblocking(on),
        }
    }

    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
        }
    }

    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
            Self::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a reply carries back to its waiting request: read data, or the server's errno.
type Reply = Result<Vec<u8>, ReplyFailure>;

enum ReplyFailure {
    Errno(u32),
    Lost(String),
}

struct Waiter {
    read_len: usize,
    tx: SyncSender<Reply>,
}

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
}

/// What `NBD_OPT_GO` told about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExportInfo {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    pub block_sizes: BlockSizes,
}

/// An NBD export opened for a mirror.
pub struct NbdTarget {
    name: String,
    size_bytes: u64,
    transmission_flags: u16,
    block_sizes: BlockSizes,
    send: Mutex<Conn>,
    /// The same socket outside the send lock, to shut it down while a sender is blocked.
    control: Conn,
    pending: Arc<Mutex<Pending>>,
    next_handle: AtomicU64,
    reader: Mutex<Option<JoinHandle<()>>>,
    request_timeout: Duration,
}

impl NbdTarget {
    /// Connects to `address`, negotiates `export` with `NBD_OPT_GO`, and starts the reply reader.
    /// A read-only export is refused (a migration must write to it), and so is one whose
    /// minimum block size exceeds a sector.
    pub fn connect(
        address: &NbdAddress,
        export: &str,
        request_timeout: Duration,
    ) -> Result<Self, TargetError> {
        Self::connect_with(address, export, request_timeout, false, REQUEST_ALIGN_BYTES)
    }

    /// As [`connect`](Self::connect); `read_only_ok` accepts a read-only export (a volume's
    /// source reader); `request_block_bytes` is what every request will be whole multiples
    /// of (a power of two, at least a sector), and an export whose minimum block size is
    /// larger is refused.
    pub fn connect_with(
        address: &NbdAddress,
        export: &str,
        request_timeout: Duration,
        read_only_ok: bool,
        request_block_bytes: u64,
    ) -> Result<Self, TargetError> {
        let name = super::TargetSpec::Nbd {
            address: address.clone(),
            export: export.to_string(),
        }
        .to_string();
        let connect_err = |source| TargetError::Connect {
            target: name.clone(),
            source,
        };
        let mut conn = Conn::connect(address, request_timeout).map_err(connect_err)?;
        let info = handshake(&mut conn, export, request_timeout).map_err(|reason| {
            TargetError::Handshake {
                target: name.clone(),
                reason,
            }
        })?;
        let unusable = if info.transmission_flags & NBD_FLAG_READ_ONLY != 0 && !read_only_ok {
            Err("the export is read-only".to_string())
        } else {
            info.block_sizes.check_usable(request_block_bytes)
        };
        if let Err(reason) = unusable {
            disconnect(&conn);
            return Err(TargetError::Unusable {
                target: name,
                reason,
            });
        }
        log::info!("{name}: {} bytes, {}", info.size_bytes, info.block_sizes);
        // Replies may be far apart (the reader waits as long as it must: each request has its
        // own deadline), but a send that cannot go out within a request's time means a server
        // that stopped reading; without a bound it would block with the send lock held, and
        // every other sender (guest writes being mirrored among them) behind it.
        conn.set_timeouts(None, Some(request_timeout))
            .map_err(connect_err)?;
        let reader_conn = conn.try_clone().map_err(connect_err)?;
        let control = conn.try_clone().map_err(connect_err)?;
        let pending = Arc::new(Mutex::new(Pending::default()));
        let reader_pending = pending.clone();
        let reader = std::thread::Builder::new()
            .name("ferry-nbd-reader".into())
            .spawn(move || read_replies(reader_conn, &reader_pending))
            .map_err(connect_err)?;
        Ok(Self {
            name,
            size_bytes: info.size_bytes,
            transmission_flags: info.transmission_flags,
            block_sizes: info.block_sizes,
            send: Mutex::new(conn),
            control,
            pending,
            next_handle: AtomicU64::new(1),
            reader: Mutex::new(Some(reader)),
            request_timeout,
        })
    }

    /// Sends one request and waits for its reply; returns the data of a read.
    fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset_bytes: u64,
        len_bytes: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, TargetError> {
        let op = command_name(cmd);
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let rx = self.register(
            handle,
            if cmd == NBD_CMD_READ {
                len_bytes as usize
            } else {
                0
            },
        )?;
        let header = request_header(cmd, flags, handle, offset_bytes, len_bytes);
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
            ReplyFailure::Errno(errno) => TargetError::Refused {
                target: self.name.clone(),
                op,
                offset_bytes,
                errno,
            },
            ReplyFailure::Lost(reason) => TargetError::Disconnected {
                target: self.name.clone(),
                reason,
            },
        })
    }

    fn register(&self, handle: u64, read_len: usize) -> Result<Receiver<Reply>, TargetError> {
        let (tx, rx) = sync_channel(1);
        let mut pending = self
            .pending
            .lock()
            .map_err(|_| self.lost("state lock poisoned"))?;
        if let Some(reason) = &pending.dead {
            return Err(self.lost(reason));
        }
        pending.waiters.insert(handle, Waiter { read_len, tx });
        Ok(rx)
    }

    fn lost(&self, reason: &str) -> TargetError {
        TargetError::Disconnected {
            target: self.name.clone(),
            reason: reason.to_string(),
        }
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
    /// handshake committed ferry to it); none of ferry's is: they are whole sectors.
    fn split(
        &self,
        op: u16,
        offset_bytes: u64,
        len_bytes: u64,
        piece_bytes_max: u64,
        mut f: impl FnMut(u64, u64) -> Result<(), TargetError>,
    ) -> Result<(), TargetError> {
        if !self.block_sizes.is_aligned(offset_bytes, len_bytes) {
            return Err(TargetError::Unusable {
                target: self.name.clone(),
                reason: format!(
                    "{} of {len_bytes} bytes at offset {offset_bytes} is not aligned to the \
                     export's minimum block size of {} bytes",
                    command_name(op),
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

impl Target for NbdTarget {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn write_at(&self, offset_bytes: u64, data: &[u8]) -> Result<(), TargetError> {
        let max = self.block_sizes.request_bytes_max();
        self.split(
            NBD_CMD_WRITE,
            offset_bytes,
            data.len() as u64,
            max,
            |off, n| {
                let start = (off - offset_bytes) as usize;
                let piece = &data[start..start + n as usize];
                self.request(NBD_CMD_WRITE, 0, off, n as u32, piece)
                    .map(drop)
            },
        )
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn close(&self) {
        self.kill("the target was closed".into());
    }

    fn block_sizes(&self) -> Option<BlockSizes> {
        Some(self.block_sizes)
    }

    fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
    ) -> Result<(), TargetError> {
        let flags = self.transmission_flags;
        if flags & NBD_FLAG_SEND_WRITE_ZEROES == 0 {
            let max = self.block_sizes.request_bytes_max();
            let zeros = vec![0u8; max.min(len_bytes) as usize];
            return self.split(NBD_CMD_WRITE, offset_bytes, len_bytes, max, |off, n| {
                self.request(NBD_CMD_WRITE, 0, off, n as u32, &zeros[..n as usize])
                    .map(drop)
            });
        }
        let cmd_flags = if unmap { 0 } else { NBD_CMD_FLAG_NO_HOLE };
        let max = self.block_sizes.effect_bytes_max();
        self.split(
            NBD_CMD_WRITE_ZEROES,
            offset_bytes,
            len_bytes,
            max,
            |off, n| {
                self.request(NBD_CMD_WRITE_ZEROES, cmd_flags, off, n as u32, &[])
                    .map(drop)
            },
        )
    }

    fn read_at(&self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), TargetError> {
        let len = buf.len() as u64;
        let max = self.block_sizes.request_bytes_max();
        self.split(NBD_CMD_READ, offset_bytes, len, max, |off, n| {
            let data = self.request(NBD_CMD_READ, 0, off, n as u32, &[])?;
            let start = (off - offset_bytes) as usize;
            buf[start..start + n as usize].copy_from_slice(&data);
            Ok(())
        })
    }

    fn flush(&self) -> Result<(), TargetError> {
        if self.transmission_flags & NBD_FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(NBD_CMD_FLUSH, 0, 0, 0, &[]).map(drop)
    }
}

impl NbdTarget {
    /// True once the connection is lost (every request fails from then on).
    pub fn is_dead(&self) -> bool {
        self.pending
            .lock()
            .map(|p| p.dead.is_some())
            .unwrap_or(true)
    }

    /// Tells the server that a range is no longer needed (NBD_CMD_TRIM); a no-op when the
    /// server does not take trims. The range's contents are undefined afterwards.
    pub fn trim(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), TargetError> {
        if self.transmission_flags & NBD_FLAG_SEND_TRIM == 0 {
            return Ok(());
        }
        let max = self.block_sizes.effect_bytes_max();
        self.split(NBD_CMD_TRIM, offset_bytes, len_bytes, max, |off, n| {
            self.request(NBD_CMD_TRIM, 0, off, n as u32, &[]).map(drop)
        })
    }
}

impl Drop for NbdTarget {
    fn drop(&mut self) {
        let header = request_header(NBD_CMD_DISC, 0, 0, 0, 0);
        if let Ok(mut conn) = self.send.lock() {
            let _ = conn.write_all(&header);
            conn.shutdown();
        }
        if let Ok(mut reader) = self.reader.lock() {
            if let Some(handle) = reader.take() {
                let _ = handle.join();
            }
        }
    }
}

/// The 28 bytes of a request: magic, command flags, type, handle, offset, length (big-endian).
pub(crate) fn request_header(
    cmd: u16,
    flags: u16,
    handle: u64,
    offset_bytes: u64,
    len_bytes: u32,
) -> [u8; 28] {
    let mut header = [0u8; 28];
    header[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&cmd.to_be_bytes());
    header[8..16].copy_from_slice(&handle.to_be_bytes());
    header[16..24].copy_from_slice(&offset_bytes.to_be_bytes());
    header[24..28].copy_from_slice(&len_bytes.to_be_bytes());
    header
}

fn command_name(cmd: u16) -> &'static str {
    match cmd {
        NBD_CMD_READ => "read",
        NBD_CMD_WRITE => "write",
        NBD_CMD_FLUSH => "flush",
        NBD_CMD_TRIM => "trim",
        NBD_CMD_WRITE_ZEROES => "write-zeroes",
        _ => "request",
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
        let _ = waiter.tx.try_send(Err(ReplyFailure::Lost(reason.clone())));
    }
}

/// The reader thread: matches simple replies to waiting requests until the connection ends.
fn read_replies(mut conn: Conn, pending: &Mutex<Pending>) {
    let reason = loop {
        let mut header = [0u8; 16];
        if let Err(e) = conn.read_exact(&mut header) {
            break format!("reading a reply: {e}");
        }
        let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        if magic != NBD_SIMPLE_REPLY_MAGIC {
            break format!("bad reply magic {magic:#x}");
        }
        let errno = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let mut handle_bytes = [0u8; 8];
        handle_bytes.copy_from_slice(&header[8..16]);
        let handle = u64::from_be_bytes(handle_bytes);
        let waiter = match pending.lock() {
            Ok(mut p) => p.waiters.remove(&handle),
            Err(_) => break "state lock poisoned".to_string(),
        };
        let Some(waiter) = waiter else {
            break format!("reply for unknown handle {handle}");
        };
        if errno != 0 {
            let _ = waiter.tx.try_send(Err(ReplyFailure::Errno(errno)));
            continue;
        }
        let mut data = vec![0u8; waiter.read_len];
        if let Err(e) = conn.read_exact(&mut data) {
            let _ = waiter
                .tx
                .try_send(Err(ReplyFailure::Lost(format!("reading data: {e}"))));
            break format!("reading read data: {e}");
        }
        let _ = waiter.tx.try_send(Ok(data));
    };
    fail_all(pending, reason);
    conn.shutdown();
}

/// The fixed-newstyle handshake up to the transmission phase, all of it within `timeout`
/// (each read and write is bounded by what is left, so a server that trickles replies
/// cannot hold it longer); returns what the server told about the export. Leaves the
/// socket's timeouts set: the caller sets its own.
///
/// `NBD_OPT_GO` asks for `NBD_INFO_BLOCK_SIZE`, which commits the client to the size
/// constraints the server sends: a caller that cannot honour them (see
/// [`BlockSizes::check_usable`]) must end the session ([`disconnect`]) without a request.
pub(crate) fn handshake(
    conn: &mut Conn,
    export: &str,
    timeout: Duration,
) -> Result<ExportInfo, String> {
    let deadline = std::time::Instant::now() + timeout;
    let bound = |conn: &Conn| -> Result<(), String> {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!("the handshake took longer than {timeout:?}"));
        }
        conn.set_timeout(Some(left))
            .map_err(|e| format!("setting a socket timeout: {e}"))
    };
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    bound(conn)?;
    let mut greeting = [0u8; 18];
    conn.read_exact(&mut greeting).map_err(|e| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            // A server at its connection limit accepts and then says nothing.
            format!(
                "no greeting from the server ({e}): it may be at its connection limit \
                 (qemu-nbd serves one client unless started with -e N; ferry needs one \
                 connection per volume queue plus one for a migration job)"
            )
        } else {
            io("reading the greeting", e)
        }
    })?;
    if be_u64(&greeting[0..8]) != NBD_INIT_MAGIC || be_u64(&greeting[8..16]) != NBD_OPTS_MAGIC {
        return Err("not a newstyle NBD server (bad magic)".into());
    }
    let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if server_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err("the server does not speak fixed newstyle".into());
    }
    let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if server_flags & NBD_FLAG_NO_ZEROES != 0 {
        client_flags |= NBD_FLAG_C_NO_ZEROES;
    }
    let name = export.as_bytes();
    // NBD_OPT_GO data: name length, name, then the information requests (count, types).
    let info_requests = [NBD_INFO_BLOCK_SIZE];
    let data_len = 4 + name.len() + 2 + 2 * info_requests.len();
    let data_len = u32::try_from(data_len).map_err(|_| "the export name is too long")?;
    let mut msg = Vec::with_capacity(20 + data_len as usize);
    msg.extend_from_slice(&client_flags.to_be_bytes());
    msg.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
    msg.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    msg.extend_from_slice(&data_len.to_be_bytes());
    msg.extend_from_slice(&(name.len() as u32).to_be_bytes());
    msg.extend_from_slice(name);
    msg.extend_from_slice(&(info_requests.len() as u16).to_be_bytes());
    for info in info_requests {
        msg.extend_from_slice(&info.to_be_bytes());
    }
    bound(conn)?;
    conn.write_all(&msg)
        .map_err(|e| io("sending NBD_OPT_GO", e))?;
    read_go_replies(conn, &bound)
}

/// Reads option replies to `NBD_OPT_GO` until the final ACK or an error; `bound` sets the
/// socket's timeout to what is left of the handshake before each reply. Information types
/// other than `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE` are ignored, as the protocol asks;
/// without `NBD_INFO_BLOCK_SIZE` the protocol's default constraints apply.
fn read_go_replies(
    conn: &mut Conn,
    bound: &dyn Fn(&Conn) -> Result<(), String>,
) -> Result<ExportInfo, String> {
    let mut export: Option<(u64, u16)> = None;
    let mut block_sizes = BlockSizes::DEFAULT;
    loop {
        bound(conn)?;
        let mut head = [0u8; 20];
        conn.read_exact(&mut head)
            .map_err(|e| format!("reading an option reply: {e}"))?;
        if be_u64(&head[0..8]) != NBD_REP_MAGIC {
            return Err("bad option reply magic".into());
        }
        let reply_type = be_u32(&head[12..16]);
        let len = be_u32(&head[16..20]);
        if len > OPTION_REPLY_BYTES_MAX {
            return Err(format!("option reply of {len} bytes is too long"));
        }
        let mut data = vec![0u8; len as usize];
        conn.read_exact(&mut data)
            .map_err(|e| format!("reading an option reply: {e}"))?;
        if reply_type & NBD_REP_FLAG_ERROR != 0 {
            return Err(format!(
                "the server refused the export (reply {reply_type:#x}): {}",
                server_text(&data)
            ));
        }
        match reply_type {
            NBD_REP_INFO
                if data.len() >= 12
                    && u16::from_be_bytes([data[0], data[1]]) == NBD_INFO_EXPORT =>
            {
                export = Some((
                    be_u64(&data[2..10]),
                    u16::from_be_bytes([data[10], data[11]]),
                ));
            }
            NBD_REP_INFO
                if data.len() >= 2
                    && u16::from_be_bytes([data[0], data[1]]) == NBD_INFO_BLOCK_SIZE =>
            {
                block_sizes = BlockSizes::parse(&data)?;
            }
            NBD_REP_INFO => {}
            NBD_REP_ACK => {
                let (size_bytes, transmission_flags) =
                    export.ok_or_else(|| "the server sent no export information".to_string())?;
                return Ok(ExportInfo {
                    size_bytes,
                    transmission_flags,
                    block_sizes,
                });
            }
            other => return Err(format!("unexpected option reply {other}")),
        }
    }
}

/// Ends a session in the transmission phase: `NBD_CMD_DISC` (best effort, without blocking),
/// then shuts the connection down.
pub(crate) fn disconnect(conn: &Conn) {
    let header = request_header(NBD_CMD_DISC, 0, 0, 0, 0);
    // SAFETY: send(2) of a local 28-byte array on a descriptor `conn` keeps open.
    let _ = unsafe {
        libc::send(
            conn.raw_fd(),
            header.as_ptr().cast(),
            header.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    conn.shutdown();
}

/// A server's message as it may go into errors, logs and status: at most 4096 bytes (the
/// protocol's limit for strings), control characters escaped.
fn server_text(bytes: &[u8]) -> String {
    const SERVER_TEXT_BYTES_MAX: usize = 4096;
    let shown = &bytes[..bytes.len().min(SERVER_TEXT_BYTES_MAX)];
    let mut text: String = String::from_utf8_lossy(shown).escape_debug().collect();
    if bytes.len() > shown.len() {
        text.push_str("...");
    }
    text
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    //! Against a real `qemu-nbd` on a unix socket.
    use super::*;
    use ferry_test_support::nbd::{NbdAddr, NbdServer};
    use std::path::Path;

    fn serve(image: &Path, socket: &Path) -> anyhow::Result<NbdServer> {
        serve_shared(image, socket, 4)
    }

    /// `qemu-nbd` exporting `image` as `e` on `socket` to at most `clients` clients at once.
    fn serve_shared(image: &Path, socket: &Path, clients: u32) -> anyhow::Result<NbdServer> {
        NbdServer::qemu_nbd_clients(image, "e", &NbdAddr::Unix(socket.to_path_buf()), clients)
    }

    /// A server at its connection limit accepts the connection and says nothing: the
    /// error says so instead of only "Resource temporarily unavailable".
    #[test]
    fn a_server_at_its_connection_limit_is_named_as_such() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let (image, socket) = (dir.path().join("e.img"), dir.path().join("s"));
        std::fs::write(&image, vec![0u8; 1 << 20])?;
        let _server = serve_shared(&image, &socket, 1)?;
        let address = NbdAddress::Unix { socket };
        let first = NbdTarget::connect(&address, "e", REQUEST_TIMEOUT_DEFAULT)?;
        let second = NbdTarget::connect(&address, "e", Duration::from_millis(500));
        let Err(TargetError::Handshake { reason, .. }) = second else {
            return Err(format!("a second client was served: {:?}", second.is_ok()).into());
        };
        assert!(reason.contains("connection limit"), "{reason}");
        assert!(reason.contains("-e N"), "{reason}");
        drop(first);
        Ok(())
    }

    /// A server that keeps the handshake going with an option reply every 100 ms (an
    /// information block ferry does not use): the handshake still ends at its timeout.
    #[test]
    fn a_trickling_server_cannot_stretch_the_handshake() -> Result<(), Box<dyn std::error::Error>> {
        let (ours, mut server) = UnixStream::pair()?;
        std::thread::spawn(move || {
            let mut greeting = Vec::new();
            greeting.extend_from_slice(&NBD_INIT_MAGIC.to_be_bytes());
            greeting.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
            greeting.extend_from_slice(&NBD_FLAG_FIXED_NEWSTYLE.to_be_bytes());
            let mut reply = Vec::new();
            reply.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
            reply.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
            reply.extend_from_slice(&NBD_REP_INFO.to_be_bytes());
            reply.extend_from_slice(&2u32.to_be_bytes());
            reply.extend_from_slice(&99u16.to_be_bytes()); // an unknown info type
            if server.write_all(&greeting).is_err() {
                return;
            }
            while server.write_all(&reply).is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        // The server trickles for ever: only the handshake's own deadline ends it.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut conn = Conn::Unix(ours);
            let _ = done_tx.send(handshake(&mut conn, "e", Duration::from_secs(1)).is_err());
        });
        let failed = done_rx
            .recv_timeout(ferry_test_support::HANG_TIMEOUT)
            .map_err(|_| "the handshake outlasted its deadline")?;
        assert!(failed, "the handshake succeeded");
        Ok(())
    }

    /// What the fake server saw: the data of the client's `NBD_OPT_GO`, then every request
    /// as (command, offset, length).
    #[derive(Debug, Default)]
    struct FakeLog {
        go_data: Vec<u8>,
        requests: Vec<(u16, u64, u32)>,
    }

    /// An in-process NBD server for one client on `socket`: answers `NBD_OPT_GO` with an
    /// `NBD_INFO_EXPORT` for `size_bytes` (flush, trim and write-zeroes offered), then `infos`
    /// (the data of further `NBD_REP_INFO` replies), then an ACK; then serves every request
    /// with success (reads as zeros) until the client disconnects, logging what came.
    fn fake_server(
        socket: &std::path::Path,
        size_bytes: u64,
        infos: Vec<Vec<u8>>,
    ) -> std::io::Result<JoinHandle<std::io::Result<FakeLog>>> {
        let listener = std::os::unix::net::UnixListener::bind(socket)?;
        Ok(std::thread::spawn(move || {
            let (mut s, _) = listener.accept()?;
            let mut log = FakeLog::default();
            let mut greeting = NBD_INIT_MAGIC.to_be_bytes().to_vec();
            greeting.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
            greeting
                .extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
            s.write_all(&greeting)?;
            let mut head = [0u8; 4 + 16];
            s.read_exact(&mut head)?; // client flags, then the option's magic, type, length
            assert_eq!(be_u32(&head[12..16]), NBD_OPT_GO);
            log.go_data = vec![0u8; be_u32(&head[16..20]) as usize];
            s.read_exact(&mut log.go_data)?;
            let mut export = NBD_INFO_EXPORT.to_be_bytes().to_vec();
            export.extend_from_slice(&size_bytes.to_be_bytes());
            let flags: u16 =
                1 | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
            export.extend_from_slice(&flags.to_be_bytes());
            let replies = std::iter::once((NBD_REP_INFO, export))
                .chain(infos.into_iter().map(|info| (NBD_REP_INFO, info)))
                .chain(std::iter::once((NBD_REP_ACK, Vec::new())));
            for (reply_type, data) in replies {
                let mut reply = NBD_REP_MAGIC.to_be_bytes().to_vec();
                reply.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
                reply.extend_from_slice(&reply_type.to_be_bytes());
                reply.extend_from_slice(&(data.len() as u32).to_be_bytes());
                reply.extend_from_slice(&data);
                s.write_all(&reply)?;
            }
            loop {
                let mut request = [0u8; 28];
                if s.read_exact(&mut request).is_err() {
                    return Ok(log); // the client hung up
                }
                let cmd = u16::from_be_bytes([request[6], request[7]]);
                let (offset, len) = (be_u64(&request[16..24]), be_u32(&request[24..28]));
                log.requests.push((cmd, offset, len));
                if cmd == NBD_CMD_DISC {
                    return Ok(log);
                }
                if cmd == NBD_CMD_WRITE {
                    std::io::copy(&mut (&mut s).take(u64::from(len)), &mut std::io::sink())?;
                }
                let mut reply = NBD_SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                reply.extend_from_slice(&0u32.to_be_bytes());
                reply.extend_from_slice(&request[8..16]);
                if cmd == NBD_CMD_READ {
                    reply.resize(reply.len() + len as usize, 0);
                }
                s.write_all(&reply)?;
            }
        }))
    }

    fn block_size_info(min: u32, preferred: u32, max: u32) -> Vec<u8> {
        let mut info = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for word in [min, preferred, max] {
            info.extend_from_slice(&word.to_be_bytes());
        }
        info
    }

    fn served(
        server: JoinHandle<std::io::Result<FakeLog>>,
    ) -> Result<FakeLog, Box<dyn std::error::Error>> {
        Ok(server.join().map_err(|_| "the fake server panicked")??)
    }

    /// `NBD_OPT_GO` asks for `NBD_INFO_BLOCK_SIZE`; the advertised sizes are kept, reads and
    /// writes are split at the maximum payload, write-zeroes at 32 MiB.
    #[test]
    fn negotiates_block_sizes_and_splits_at_the_maximum_payload(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("s");
        let server = fake_server(&socket, 64 << 20, vec![block_size_info(512, 4096, 1 << 20)])?;
        let t = NbdTarget::connect(&NbdAddress::Unix { socket }, "e", REQUEST_TIMEOUT_DEFAULT)?;
        let sizes = t.block_sizes().ok_or("no block sizes")?;
        assert_eq!(
            (
                sizes.block_bytes_min,
                sizes.block_bytes_preferred,
                sizes.payload_bytes_max
            ),
            (512, 4096, 1 << 20)
        );
        assert!(sizes.advertised);
        t.write_at(4096, &vec![7u8; (3 << 20) + 512])?;
        let mut buf = vec![1u8; 2 << 20];
        t.read_at(1 << 20, &mut buf)?;
        assert!(buf.iter().all(|&b| b == 0));
        t.write_zeroes(0, 40 << 20, true)?;
        t.trim(0, 33 << 20)?;
        drop(t);
        let log = served(server)?;
        let mut go = 1u32.to_be_bytes().to_vec(); // name length, name, 1 request: BLOCK_SIZE
        go.extend_from_slice(b"e");
        go.extend_from_slice(&[0, 1, 0, 3]);
        assert_eq!(log.go_data, go);
        let mib = 1u32 << 20;
        assert_eq!(
            log.requests,
            vec![
                (NBD_CMD_WRITE, 4096, mib),
                (NBD_CMD_WRITE, 4096 + (1 << 20), mib),
                (NBD_CMD_WRITE, 4096 + (2 << 20), mib),
                (NBD_CMD_WRITE, 4096 + (3 << 20), 512),
                (NBD_CMD_READ, 1 << 20, mib),
                (NBD_CMD_READ, 2 << 20, mib),
                (NBD_CMD_WRITE_ZEROES, 0, 32 * mib),
                (NBD_CMD_WRITE_ZEROES, 32 << 20, 8 * mib),
                (NBD_CMD_TRIM, 0, 32 * mib),
                (NBD_CMD_TRIM, 32 << 20, mib),
                (NBD_CMD_DISC, 0, 0),
            ]
        );
        Ok(())
    }

    /// A server that sends no `NBD_INFO_BLOCK_SIZE`: the protocol's defaults (1, 4096,
    /// 32 MiB), so payloads are split at 32 MiB as before.
    #[test]
    fn a_server_without_block_sizes_gets_the_defaults() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("s");
        let server = fake_server(&socket, 64 << 20, vec![])?;
        let t = NbdTarget::connect(&NbdAddress::Unix { socket }, "e", REQUEST_TIMEOUT_DEFAULT)?;
        assert_eq!(t.block_sizes(), Some(BlockSizes::DEFAULT));
        t.write_at(0, &vec![7u8; 33 << 20])?;
        drop(t);
        let log = served(server)?;
        assert_eq!(
            log.requests,
            vec![
                (NBD_CMD_WRITE, 0, 32 << 20),
                (NBD_CMD_WRITE, 32 << 20, 1 << 20),
                (NBD_CMD_DISC, 0, 0),
            ]
        );
        Ok(())
    }

    /// A minimum block size above a sector is refused at connect with both sizes named; the
    /// session ends with NBD_CMD_DISC and no request (the client committed to the sizes).
    #[test]
    fn a_minimum_block_size_above_a_sector_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("s");
        let server = fake_server(&socket, 1 << 20, vec![block_size_info(4096, 4096, 1 << 20)])?;
        let address = NbdAddress::Unix { socket };
        let refused = NbdTarget::connect(&address, "e", REQUEST_TIMEOUT_DEFAULT);
        let Err(e @ TargetError::Unusable { .. }) = refused else {
            return Err(format!("not refused as unusable: {:?}", refused.err()).into());
        };
        assert_eq!(
            e.to_string(),
            format!(
                "target {}: the export's minimum block size is 4096 bytes; ferry's volumes \
                 take 512-byte requests",
                super::super::TargetSpec::Nbd {
                    address,
                    export: "e".into()
                }
            )
        );
        assert_eq!(served(server)?.requests, vec![(NBD_CMD_DISC, 0, 0)]);
        Ok(())
    }

    /// The same refusal for a volume on the export (`ferry serve --volume path=nbd://…`).
    #[test]
    fn a_volume_on_an_export_with_big_blocks_is_refused() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("s");
        let server = fake_server(&socket, 1 << 20, vec![block_size_info(4096, 4096, 1 << 20)])?;
        let address = NbdAddress::Unix {
            socket: socket.clone(),
        };
        let reason = crate::volume::NbdExport::probe(&address, "e", 512)
            .err()
            .ok_or("the export was accepted")?;
        assert_eq!(
            reason,
            format!(
                "nbd+unix:///e?socket={}: the export's minimum block size is 4096 bytes; \
                 ferry's volumes take 512-byte requests (serve it with \
                 logical-block-size=4096)",
                socket.display()
            )
        );
        assert_eq!(served(server)?.requests, vec![(NBD_CMD_DISC, 0, 0)]);
        // A volume of 4 KiB logical blocks takes it.
        std::fs::remove_file(&socket)?;
        let server = fake_server(&socket, 1 << 20, vec![block_size_info(4096, 4096, 1 << 20)])?;
        let export = crate::volume::NbdExport::probe(&address, "e", 4096)?;
        assert_eq!(export.block_sizes().block_bytes_min, 4096);
        served(server)?;
        Ok(())
    }

    /// Sizes against the protocol fail the handshake with the reason.
    #[test]
    fn invalid_block_sizes_fail_the_handshake() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("s");
        let _server = fake_server(&socket, 1 << 20, vec![block_size_info(512, 256, 1 << 20)])?;
        let outcome =
            NbdTarget::connect(&NbdAddress::Unix { socket }, "e", REQUEST_TIMEOUT_DEFAULT);
        let Err(TargetError::Handshake { reason, .. }) = outcome else {
            return Err(format!("not a handshake failure: {:?}", outcome.err()).into());
        };
        assert!(reason.contains("preferred block size 256"), "{reason}");
        Ok(())
    }

    /// A range not aligned to the minimum block size is refused before it is sent.
    #[test]
    fn an_unaligned_range_is_not_sent() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("s");
        let server = fake_server(&socket, 1 << 20, vec![block_size_info(512, 4096, 1 << 20)])?;
        let t = NbdTarget::connect(&NbdAddress::Unix { socket }, "e", REQUEST_TIMEOUT_DEFAULT)?;
        let unaligned = t.write_at(100, &[1u8; 512]);
        assert!(
            matches!(&unaligned, Err(TargetError::Unusable { reason, .. }) if reason.contains("not aligned")),
            "{unaligned:?}"
        );
        assert!(t.write_zeroes(512, 100, true).is_err());
        drop(t);
        assert_eq!(served(server)?.requests, vec![(NBD_CMD_DISC, 0, 0)]);
        Ok(())
    }

    #[test]
    fn server_text_is_bounded_and_escaped() {
        assert_eq!(server_text(b"no such export"), "no such export");
        assert_eq!(server_text(b"a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
        let long = server_text(&[b'x'; 10_000]);
        assert_eq!(long.len(), 4096 + 3);
    }

    /// A server that stops reading (here: SIGSTOPped) with writes queued behind a blocked
    /// send: every writer gets an error within a few request timeouts, none waits forever
    /// (a blocked send held the send lock with no bound, and the others queued behind it).
    #[test]
    fn a_server_that_stops_reading_fails_every_writer() -> Result<(), Box<dyn std::error::Error>> {
        use std::sync::mpsc::channel;
        let dir = tempfile::tempdir()?;
        let (image, socket) = (dir.path().join("e.img"), dir.path().join("s"));
        std::fs::write(&image, vec![0u8; 64 << 20])?;
        let server = serve(&image, &socket)?;
        let address = NbdAddress::Unix { socket };
        let t = Arc::new(NbdTarget::connect(&address, "e", Duration::from_secs(1))?);
        let pid = nix::unistd::Pid::from_raw(i32::try_from(server.daemon.pid())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
        let (done_tx, done_rx) = channel();
        for i in 0..4u64 {
            let (t, done_tx) = (t.clone(), done_tx.clone());
            std::thread::spawn(move || {
                let result = t.write_at(i * (16 << 20), &vec![1u8; 16 << 20]);
                let _ = done_tx.send(result.is_err());
            });
        }
        let mut failed = 0;
        for _ in 0..4 {
            match done_rx.recv_timeout(Duration::from_secs(20)) {
                Ok(true) => failed += 1,
                Ok(false) => {}
                Err(_) => break,
            }
        }
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
        assert_eq!(failed, 4, "writers still blocked (or succeeded) after 20 s");
        Ok(())
    }

    #[test]
    fn talks_to_qemu_nbd() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (image, socket) = (dir.path().join("e.img"), dir.path().join("s"));
        std::fs::write(&image, vec![0x55u8; 4 << 20])?;
        let server = serve(&image, &socket)?;
        let address = NbdAddress::Unix {
            socket: socket.clone(),
        };
        let refused = NbdTarget::connect(&address, "no-such-export", REQUEST_TIMEOUT_DEFAULT);
        assert!(matches!(refused, Err(TargetError::Handshake { .. })));
        let t = Arc::new(NbdTarget::connect(&address, "e", REQUEST_TIMEOUT_DEFAULT)?);
        assert_eq!(t.size_bytes(), 4 << 20);
        // qemu-nbd answers the NBD_INFO_BLOCK_SIZE request: a raw file takes any alignment.
        let sizes = t.block_sizes().ok_or("no block sizes")?;
        assert!(sizes.advertised, "{sizes}");
        assert_eq!(sizes.block_bytes_min, 1, "{sizes}");
        assert_eq!(sizes.payload_bytes_max, 32 << 20, "{sizes}");
        let writers: Vec<_> = (0..4u8)
            .map(|i| {
                let t = t.clone();
                std::thread::spawn(move || t.write_at(u64::from(i) << 20, &vec![i + 1; 1 << 20]))
            })
            .collect();
        for w in writers {
            w.join().map_err(|_| "writer panicked")??;
        }
        t.write_zeroes(4096, 8192, false)?;
        t.write_zeroes(3 << 20, 4096, true)?;
        t.flush()?;
        let mut buf = vec![0u8; 4 << 20];
        t.read_at(0, &mut buf)?;
        assert_eq!(buf[0], 1);
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert_eq!(buf[12288], 1);
        assert_eq!(buf[(2 << 20) + 7], 3);
        assert!(buf[3 << 20..(3 << 20) + 4096].iter().all(|&b| b == 0));
        assert_eq!(buf[(4 << 20) - 1], 4);
        let beyond = t.write_at(4 << 20, &[1u8; 512]);
        assert!(
            matches!(beyond, Err(TargetError::Refused { .. })),
            "{beyond:?}"
        );
        drop(server);
        let lost = t.write_at(0, &[9u8; 512]);
        assert!(
            matches!(lost, Err(TargetError::Disconnected { .. })),
            "{lost:?}"
        );
        assert_eq!(std::fs::read(&image)?[(1 << 20) + 1], 2);
        Ok(())
    }
}
