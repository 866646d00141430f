//! The control protocol's framing, shared by the daemon that serves it and every client of
//! it (the `ferry` command line, another daemon's [`PeerLink`](super::link::PeerLink)):
//! one JSON object per line, each way, in order (see `docs/control.md`).
//!
//! - request: `{"command": NAME, "arguments": {...}, "id": ID}` (`arguments` and `id` may
//!   be left out);
//! - reply: `{"return": VALUE, "id": ID}` or `{"error": {"class": C, "desc": D}, "id": ID}`,
//!   the `id` echoed when the request had one. An error about the connection itself (too
//!   many connections, a client not allowed in, a request line too long) has no `id`, and
//!   the daemon closes the connection after it.
//!
//! Reading is bounded: a line longer than its maximum is an error, never an allocation the
//! peer chooses, and every wait for bytes can have a deadline.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod request;
pub use request::{
    parse_request, Request, RequestError, ARGUMENTS_BYTES_MAX, COMMAND_BYTES_MAX, ID_BYTES_MAX,
};

/// The longest request line a daemon accepts; a longer one closes the connection.
pub const REQUEST_BYTES_MAX: usize = 1 << 20;

/// A daemon's bounds on a control connection, so that a client that connects and says
/// nothing, trickles a request or never reads its replies cannot hold one of the
/// connection slots for ever: the TLS handshake (TCP only), the wait for the next request,
/// a request from its first byte on, and the write of each reply.
pub const TCP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Error classes of replies the framing and the listeners produce (commands add their own).
pub mod class {
    /// Bad JSON, a missing command, a request line too long.
    pub const GENERIC: &str = "GenericError";
    /// Too many connections at once.
    pub const BUSY: &str = "Busy";
    /// The client's certificate is not in `--tls-authz`.
    pub const ACCESS_DENIED: &str = "AccessDenied";
    /// Plaintext sent to a listener that speaks TLS only.
    pub const TLS_REQUIRED: &str = "TlsRequired";
}

/// A request line, newline included.
pub fn request_line(command: &str, arguments: &Value, id: Option<u64>) -> String {
    let mut request = json!({ "command": command, "arguments": arguments });
    if let Some(id) = id {
        request["id"] = json!(id);
    }
    let mut line = request.to_string();
    line.push('\n');
    line
}

/// An error reply's JSON text (no newline), with the request's `id` when there is one.
pub fn error_reply(class: &str, desc: &str, id: Option<&Value>) -> String {
    let mut reply = json!({ "error": { "class": class, "desc": desc } });
    if let Some(id) = id {
        reply["id"] = id.clone();
    }
    reply.to_string()
}

/// The daemon's answer to a request that it refused: a class for programs and a one-line
/// description for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    pub class: String,
    pub desc: String,
}

/// A reply line read apart: its `id`, and the value or the daemon's error.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub id: Option<Value>,
    pub outcome: Result<Value, RemoteError>,
}

/// Reads a reply line; the error says what is wrong with it (for "invalid reply" messages).
pub fn parse_reply(line: &str) -> Result<Reply, String> {
    let mut value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let Some(object) = value.as_object_mut() else {
        return Err("not a JSON object".into());
    };
    let id = object.remove("id");
    if let Some(value) = object.remove("return") {
        return Ok(Reply {
            id,
            outcome: Ok(value),
        });
    }
    let Some(error) = object.get("error") else {
        return Err("neither \"return\" nor \"error\" in it".into());
    };
    let text = |field: &str| error.get(field).and_then(Value::as_str).map(str::to_string);
    match (text("class"), text("desc")) {
        (Some(class), Some(desc)) => Ok(Reply {
            id,
            outcome: Err(RemoteError { class, desc }),
        }),
        _ => Err("an \"error\" without \"class\" and \"desc\"".into()),
    }
}

/// The `id` of a reply line, read without building the rest of it (a large reply the
/// caller parses into its own types). `Err` when the line is not a JSON object.
pub fn reply_id(line: &str) -> Result<Option<Value>, String> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        id: Option<Value>,
    }
    serde_json::from_str::<Envelope>(line)
        .map(|envelope| envelope.id)
        .map_err(|e| format!("not a JSON object ({e})"))
}

/// A stream whose reads can be given a timeout (a socket, or a TLS stream over one).
pub trait TimedRead: Read {
    /// Sets the socket's read timeout (`None`: wait for ever).
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimedRead for std::os::unix::net::UnixStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, timeout)
    }
}

impl TimedRead for std::net::TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
}

/// How long a line may take: until its first byte arrives (`first_byte`, a daemon's idle
/// bound between requests, a client's wait for a reply) and, from that byte on, until its
/// end (`whole_line`). `None`: no bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineDeadlines {
    pub first_byte: Option<Duration>,
    pub whole_line: Option<Duration>,
}

/// Why no line was read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("a line longer than {bytes_max} bytes")]
    TooLong { bytes_max: usize },
    #[error("a line that is not UTF-8")]
    NotUtf8,
    #[error("the connection closed in the middle of a line")]
    Truncated,
    #[error("nothing arrived within {0:?}")]
    TimedOut(Duration),
    #[error("{0}")]
    Io(#[source] io::Error),
}

/// Bytes to read from the stream at a time.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Reads newline-terminated lines from a stream, each at most `bytes_max` long. Bytes past
/// a line (a peer that sends several requests at once) are kept for the next one.
#[derive(Debug)]
pub struct LineReader {
    buffer: Vec<u8>,
    /// Bytes of `buffer` already searched for a newline.
    scanned: usize,
    bytes_max: usize,
}

impl LineReader {
    pub fn new(bytes_max: usize) -> Self {
        Self {
            buffer: Vec::new(),
            scanned: 0,
            bytes_max,
        }
    }

    /// Bytes read past the last line returned (a connection that changes protocol after a
    /// request refuses a peer that did not wait for the reply).
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len()
    }

    /// The next line, without its newline; `Ok(None)` at the end of the stream between
    /// lines.
    pub fn read_line<S: TimedRead>(
        &mut self,
        source: &mut S,
        deadlines: LineDeadlines,
    ) -> Result<Option<String>, LineError> {
        let mut deadline = deadlines.first_byte.map(|d| (Instant::now() + d, d));
        if !self.buffer.is_empty() {
            deadline = deadlines.whole_line.map(|d| (Instant::now() + d, d));
        }
        loop {
            if let Some(line) = self.take_line()? {
                return Ok(Some(line));
            }
            if let Some((at, bound)) = deadline {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(LineError::TimedOut(bound));
                }
                source.set_read_timeout(Some(left)).map_err(LineError::Io)?;
            } else if deadlines != LineDeadlines::default() {
                source.set_read_timeout(None).map_err(LineError::Io)?;
            }
            let was_empty = self.buffer.is_empty();
            match self.fill(source) {
                Ok(0) if self.buffer.is_empty() => return Ok(None),
                Ok(0) => return Err(LineError::Truncated),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {
                    let bound = deadline.map_or(Duration::ZERO, |(_, bound)| bound);
                    return Err(LineError::TimedOut(bound));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LineError::Io(e)),
            }
            if was_empty {
                deadline = deadlines.whole_line.map(|d| (Instant::now() + d, d));
            }
        }
    }

    /// A complete line from the buffer, if one is there.
    fn take_line(&mut self) -> Result<Option<String>, LineError> {
        let newline = self.buffer[self.scanned..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|at| self.scanned + at);
        let Some(end) = newline else {
            self.scanned = self.buffer.len();
            if self.buffer.len() > self.bytes_max {
                return Err(LineError::TooLong {
                    bytes_max: self.bytes_max,
                });
            }
            return Ok(None);
        };
        if end > self.bytes_max {
            return Err(LineError::TooLong {
                bytes_max: self.bytes_max,
            });
        }
        let rest = self.buffer.split_off(end + 1);
        let mut line = std::mem::replace(&mut self.buffer, rest);
        line.truncate(end);
        self.scanned = 0;
        String::from_utf8(line)
            .map(Some)
            .map_err(|_| LineError::NotUtf8)
    }

    /// Reads once into the buffer, never past one byte more than a line may hold.
    fn fill<S: Read>(&mut self, source: &mut S) -> io::Result<usize> {
        let room = (self.bytes_max + 1).saturating_sub(self.buffer.len());
        let chunk = room.clamp(1, READ_CHUNK_BYTES);
        let start = self.buffer.len();
        self.buffer.resize(start + chunk, 0);
        let result = source.read(&mut self.buffer[start..]);
        self.buffer.truncate(start + *result.as_ref().unwrap_or(&0));
        result
    }
}

/// A socket read timeout shows as `WouldBlock` (`EAGAIN`) or `TimedOut`.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests;
