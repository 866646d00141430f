//! Accepting control connections: on the unix control socket, and on the TCP control
//! listener, where every client completes a TLS 1.3 handshake with a certificate the CA
//! signed and passes `--tls-authz` before its first request is read. Each listener serves a
//! bounded number of connections at once, each on its own thread, within the same time
//! bounds on both listeners.

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::peer::control_protocol::{
    class, error_reply, LineDeadlines, IDLE_TIMEOUT, REQUEST_TIMEOUT, TCP_HANDSHAKE_TIMEOUT,
};
use ferry_engine::peer::transport::{accept_tls, AcceptError, ServerTlsStream};
use ferry_engine::tls::TlsAuthz;
use rustls::ServerConfig;

use super::connection::{reply, serve_connection};
use super::Caller;
use crate::daemon::Daemon;

/// Connections one listener serves at once.
const CONNECTIONS_MAX: usize = 64;

/// How long a refused client's unread bytes are drained after the refusal is sent: closing
/// a TCP socket with bytes unread sends a reset, which can destroy the refusal before the
/// client reads it.
const LINGER: Duration = Duration::from_secs(1);
/// Bytes drained from a refused client at most.
const LINGER_BYTES_MAX: usize = 1 << 20;

/// The bounds on every control connection's requests, on both listeners: a client that
/// says nothing, or trickles a request, is closed.
const CONNECTION_DEADLINES: LineDeadlines = LineDeadlines {
    first_byte: Some(IDLE_TIMEOUT),
    whole_line: Some(REQUEST_TIMEOUT),
};

/// How long a listener waits after a failed accept that may repeat at once (out of file
/// descriptors or memory), so that it does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The connections a listener serves now.
#[derive(Default)]
struct Slots {
    active: AtomicUsize,
}

/// One connection's place among a listener's [`CONNECTIONS_MAX`]; freed when dropped.
struct Slot(Arc<Slots>);

impl Slots {
    fn take(slots: &Arc<Self>) -> Option<Slot> {
        let taken = slots
            .active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < CONNECTIONS_MAX).then_some(n + 1)
            });
        taken.ok().map(|_| Slot(slots.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn pause_after_accept_error(e: &std::io::Error) {
    let lasting = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if lasting {
        log::warn!("control: cannot accept a connection: {e}");
        std::thread::sleep(ACCEPT_ERROR_PAUSE);
    }
}

fn spawn_connection(run: impl FnOnce() + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("ferry-control".into())
        .spawn(run);
    if let Err(e) = spawned {
        log::error!("cannot start a control connection thread: {e}");
    }
}

/// Accepts control connections on the unix socket `listener` for as long as it is open.
pub fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    ferry_engine::confine::enter(&crate::seccomp::CONTROL_SYSCALLS);
    let slots = Arc::new(Slots::default());
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                pause_after_accept_error(&e);
                continue;
            }
        };
        let Some(slot) = Slots::take(&slots) else {
            // Never blocks the accept loop: the refusal fits an empty socket buffer, and a
            // client that cannot take it is closed all the same.
            let busy = error_reply(class::BUSY, "too many control connections", None);
            if stream.set_nonblocking(true).is_ok() {
                let _ = reply(&mut stream, &busy);
            }
            continue;
        };
        let daemon = daemon.clone();
        spawn_connection(move || {
            let _slot = slot;
            if let Err(e) = stream.set_write_timeout(Some(REQUEST_TIMEOUT)) {
                log::warn!("control: {e}");
                return;
            }
            // SO_PEERCRED names the peer as it connected: a check no message can fake.
            if let Err(reason) = crate::identity::control_peer_allowed(&stream) {
                refuse(&mut stream, &reason);
                return;
            }
            serve_connection(&mut stream, &daemon, &Caller::Local, CONNECTION_DEADLINES);
        });
    }
}

/// Answers a peer the control socket does not serve: its first request is read (bounded in
/// size and time, so that the client sees the refusal instead of a broken pipe), then
/// answered with `AccessDenied`, and the connection closed.
fn refuse(stream: &mut UnixStream, reason: &str) {
    log::warn!("control: connection refused: {reason}");
    let mut request = [0u8; 4096];
    if stream.set_read_timeout(Some(REFUSAL_READ_TIMEOUT)).is_ok() {
        let _ = stream.read(&mut request);
    }
    let refused = error_reply(class::ACCESS_DENIED, &format!("refused: {reason}"), None);
    let _ = reply(stream, &refused);
}

/// How long a refused peer's first request is waited for.
const REFUSAL_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// What the TCP listener checks its clients with.
pub struct TcpControl {
    /// TLS 1.3 with a client certificate the CA signed required.
    pub config: Arc<ServerConfig>,
    pub authz: TlsAuthz,
}

/// Accepts control connections on the TCP `listener`, TLS only. Beyond the connection
/// bound a client is disconnected at once, before any handshake costs the daemon work.
pub fn serve_tcp(listener: TcpListener, daemon: Arc<Daemon>, tls: Arc<TcpControl>) {
    ferry_engine::confine::enter(&crate::seccomp::CONTROL_SYSCALLS);
    let slots = Arc::new(Slots::default());
    for socket in listener.incoming() {
        let socket = match socket {
            Ok(socket) => socket,
            Err(e) => {
                pause_after_accept_error(&e);
                continue;
            }
        };
        let Some(slot) = Slots::take(&slots) else {
            log::warn!("control: too many TCP control connections, one refused");
            continue;
        };
        let (daemon, tls) = (daemon.clone(), tls.clone());
        spawn_connection(move || {
            let _slot = slot;
            serve_tls_client(socket, &daemon, &tls);
        });
    }
}

/// One TCP client: the handshake and the allow-list, then its requests, each phase bounded
/// in time.
fn serve_tls_client(socket: TcpStream, daemon: &Daemon, tls: &TcpControl) {
    let Ok(address) = socket.peer_addr() else {
        return;
    };
    // Small writes go at once: Nagle's algorithm would hold a second small write (a
    // replication stream's applied acknowledgment after its durable one) until the peer's
    // delayed ACK, some 40 ms, and a sync group's writes would wait that long.
    if let Err(e) = socket.set_nodelay(true) {
        log::debug!("control: TCP_NODELAY on {address}: {e}");
    }
    let raw = socket.try_clone();
    let (mut stream, identity) = match accept_tls(socket, tls.config.clone(), TCP_HANDSHAKE_TIMEOUT)
    {
        Ok(accepted) => accepted,
        Err(AcceptError::Plaintext) => {
            log::warn!("control: {address} sent plaintext to the TLS control listener");
            if let Ok(mut raw) = raw {
                refuse_plaintext(&mut raw);
            }
            return;
        }
        Err(AcceptError::Handshake(reason)) => {
            log::warn!("control: TLS handshake with {address} failed: {reason}");
            return;
        }
    };
    if let Err(e) = stream.sock.set_write_timeout(Some(REQUEST_TIMEOUT)) {
        log::warn!("control: {address}: {e}");
        return;
    }
    if let Err(reason) = tls.authz.check(&identity) {
        log::warn!("control: {address} refused: {reason}");
        let _ = reply(
            &mut stream,
            &error_reply(class::ACCESS_DENIED, &reason, None),
        );
        close(&mut stream, address);
        return;
    }
    let caller = Caller::Remote { address, identity };
    log::info!("control: {caller} connected");
    serve_connection(&mut stream, daemon, &caller, CONNECTION_DEADLINES);
    close(&mut stream, address);
}

/// Tells a plaintext client, in its own framing, that this listener speaks TLS only.
fn refuse_plaintext(socket: &mut TcpStream) {
    let _ = socket.set_write_timeout(Some(LINGER));
    let refusal = error_reply(
        class::TLS_REQUIRED,
        "this control listener speaks TLS only (ferry://HOST:PORT with --tls-creds DIR)",
        None,
    );
    let _ = reply(socket, &refusal);
    linger(socket);
}

/// Ends a TLS connection: close_notify, then the socket's end after the client's.
fn close(stream: &mut ServerTlsStream, address: SocketAddr) {
    stream.conn.send_close_notify();
    if let Err(e) = std::io::Write::flush(stream) {
        log::debug!("control: {address}: {e}");
    }
    linger(&mut stream.sock);
}

/// Half-closes the socket and reads what the client still sends (bounded in time and
/// bytes), so that the last reply arrives before the connection's end.
fn linger(socket: &mut TcpStream) {
    let _ = socket.shutdown(Shutdown::Write);
    let _ = socket.set_read_timeout(Some(LINGER));
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES_MAX {
        match socket.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}
