//! A link to another ferry daemon's control protocol: its TCP listener with mutual TLS (the
//! daemon's own client certificate), or a unix socket. Calls are request/reply lines with an
//! id; connecting, the handshake and every reply have deadlines, and a reply's size is
//! bounded. A peer that disappears, answers garbage or presents the wrong certificate fails
//! the call with a reason naming the peer, and the connection is dropped (the next call
//! connects afresh).
//!
//! One connection is kept between calls (calls on one link take turns), and reused only
//! while it has been idle less than [`LinkOptions::reuse_idle_max`], which stays below the
//! daemons' idle bound so that a reused connection is not one the peer is closing.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use serde_json::Value;

use super::address::ControlAddress;
use super::control_protocol::{
    parse_reply, reply_id, request_line, LineDeadlines, LineError, LineReader, RemoteError,
    IDLE_TIMEOUT,
};
use super::transport::{describe_io_error, ClientStream, TransportError};
use crate::tls::TlsCredentials;

/// The bounds of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkOptions {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// From a request sent to its whole reply (`None`: wait as long as the peer takes,
    /// for a local unix socket whose daemon is known to be there).
    pub reply_timeout: Option<Duration>,
    /// The longest reply line accepted.
    pub reply_bytes_max: usize,
    /// A connection idle longer than this is not reused.
    pub reuse_idle_max: Duration,
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            reply_timeout: Some(Duration::from_secs(30)),
            reply_bytes_max: 16 << 20,
            reuse_idle_max: IDLE_TIMEOUT.saturating_sub(Duration::from_secs(30)),
        }
    }
}

/// Why a call failed. Each starts with the link's name (e.g. `peer hostb`); the daemon's
/// own refusal keeps its class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The link cannot be set up (credentials without a client pair, ...).
    #[error("{peer}: {reason}")]
    Setup { peer: String, reason: String },
    #[error("{peer}: {source}")]
    Transport {
        peer: String,
        #[source]
        source: TransportError,
    },
    #[error("{peer}: no reply to {command} within {timeout:?}")]
    Timeout {
        peer: String,
        command: String,
        timeout: Duration,
    },
    #[error("{peer}: connection lost during {command}: {reason}")]
    Lost {
        peer: String,
        command: String,
        reason: String,
    },
    #[error("{peer}: invalid reply to {command}: {reason}")]
    Garbage {
        peer: String,
        command: String,
        reason: String,
    },
    /// The daemon answered with an error.
    #[error("{peer}: {command}: {class}: {desc}")]
    Refused {
        peer: String,
        command: String,
        class: String,
        desc: String,
    },
}

/// An open connection and what has been read of it.
struct Connection {
    stream: ClientStream,
    reader: LineReader,
    idle_since: Instant,
}

struct LinkState {
    connection: Option<Connection>,
    next_id: u64,
}

/// A link to one daemon. Shared between threads (`Arc<PeerLink>`): calls take turns on its
/// one connection.
pub struct PeerLink {
    name: String,
    address: ControlAddress,
    tls: Option<Arc<ClientConfig>>,
    options: LinkOptions,
    state: Mutex<LinkState>,
}

const _: () = {
    const fn shared_between_threads<T: Send + Sync>() {}
    shared_between_threads::<PeerLink>();
};

impl PeerLink {
    /// A link to the daemon at `address`, called `name` in errors and logs (`peer hostb`,
    /// or the address itself for the command line). A TCP address
    /// needs `credentials` with a client pair; nothing is connected until the first call.
    pub fn new(
        name: &str,
        address: ControlAddress,
        credentials: Option<&TlsCredentials>,
        options: LinkOptions,
    ) -> Result<Self, PeerError> {
        let setup = |reason: String| PeerError::Setup {
            peer: name.to_string(),
            reason,
        };
        let tls = match (&address, credentials) {
            (ControlAddress::Tcp { .. }, None) => {
                return Err(setup(format!(
                    "{address} is a TCP control listener, which speaks TLS only: TLS credentials are needed (--tls-creds DIR)"
                )))
            }
            (ControlAddress::Tcp { .. }, Some(credentials)) => {
                Some(credentials.client_config().map_err(|e| setup(e.to_string()))?)
            }
            (ControlAddress::Unix(_), _) => None,
        };
        Ok(Self {
            name: name.to_string(),
            address,
            tls,
            options,
            state: Mutex::new(LinkState {
                connection: None,
                next_id: 1,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn address(&self) -> &ControlAddress {
        &self.address
    }

    /// Runs `command` on the peer and returns its `return` value.
    pub fn call(&self, command: &str, arguments: &Value) -> Result<Value, PeerError> {
        let line = self.call_line(command, arguments)?;
        let reply = parse_reply(&line).map_err(|reason| self.garbage(command, reason))?;
        reply.outcome.map_err(|e| self.refused(command, e))
    }

    /// Runs `command` and returns the reply line as the peer wrote it, its id checked, for
    /// replies the caller reads into its own types. An error reply is still a reply: the
    /// caller finds it in the line.
    pub fn call_line(&self, command: &str, arguments: &Value) -> Result<String, PeerError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let id = state.next_id;
        state.next_id += 1;
        let stale = state
            .connection
            .as_ref()
            .is_some_and(|c| c.idle_since.elapsed() > self.options.reuse_idle_max);
        if stale {
            state.connection = None;
        }
        let connection = match state.connection.take() {
            Some(connection) => connection,
            None => self.connect()?,
        };
        let (connection, line) = self.exchange(connection, command, arguments, id)?;
        match reply_id(&line).map_err(|reason| self.garbage(command, reason))? {
            Some(got) if got != id => {
                return Err(self.garbage(command, format!("id {got} answers request {id}")))
            }
            Some(_) => state.connection = Some(connection),
            // An error about the connection itself (no id): the daemon closes it after.
            None => {}
        }
        Ok(line)
    }

    fn connect(&self) -> Result<Connection, PeerError> {
        let stream = ClientStream::connect(
            &self.address,
            self.tls.as_ref(),
            self.options.connect_timeout,
            self.options.handshake_timeout,
        )
        .map_err(|source| PeerError::Transport {
            peer: self.name.clone(),
            source,
        })?;
        Ok(Connection {
            stream,
            reader: LineReader::new(self.options.reply_bytes_max),
            idle_since: Instant::now(),
        })
    }

    /// Sends one request and reads its reply line; the connection is dropped on any error.
    fn exchange(
        &self,
        mut connection: Connection,
        command: &str,
        arguments: &Value,
        id: u64,
    ) -> Result<(Connection, String), PeerError> {
        let request = request_line(command, arguments, Some(id));
        let lost = |reason: String| PeerError::Lost {
            peer: self.name.clone(),
            command: command.to_string(),
            reason,
        };
        connection
            .stream
            .set_write_timeout(self.options.reply_timeout)
            .map_err(|e| lost(e.to_string()))?;
        connection
            .stream
            .write_all(request.as_bytes())
            .and_then(|()| connection.stream.flush())
            .map_err(|e| lost(describe_io_error(&e)))?;
        let deadlines = LineDeadlines {
            first_byte: self.options.reply_timeout,
            whole_line: self.options.reply_timeout,
        };
        let line = match connection
            .reader
            .read_line(&mut connection.stream, deadlines)
        {
            Ok(Some(line)) => line,
            Ok(None) => return Err(lost("the peer closed the connection".into())),
            Err(LineError::TimedOut(timeout)) => {
                return Err(PeerError::Timeout {
                    peer: self.name.clone(),
                    command: command.to_string(),
                    timeout,
                })
            }
            Err(LineError::Io(e)) => return Err(lost(describe_io_error(&e))),
            Err(LineError::Truncated) => return Err(lost(LineError::Truncated.to_string())),
            Err(e @ (LineError::TooLong { .. } | LineError::NotUtf8)) => {
                return Err(self.garbage(command, e.to_string()))
            }
        };
        connection.idle_since = Instant::now();
        Ok((connection, line))
    }

    fn garbage(&self, command: &str, reason: String) -> PeerError {
        PeerError::Garbage {
            peer: self.name.clone(),
            command: command.to_string(),
            reason,
        }
    }

    fn refused(&self, command: &str, e: RemoteError) -> PeerError {
        PeerError::Refused {
            peer: self.name.clone(),
            command: command.to_string(),
            class: e.class,
            desc: e.desc,
        }
    }
}

#[cfg(test)]
mod tests;
