//! The control protocol (line-delimited JSON, see `docs/control.md`), served on the unix
//! control socket and on the TCP control listener (mutual TLS only).
//!
//! Each line is one request `{"command": NAME, "arguments": {...}}`; each reply is one
//! line, `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`. [`listener`]
//! accepts connections (TLS and the allow-list for TCP), [`connection`] runs one
//! connection's requests, and commands are looked up by name in [`commands`].

pub mod commands;
pub mod connection;
pub mod journal_commands;
pub mod listener;
pub mod migrate_commands;

use std::fmt;
use std::net::SocketAddr;

use ferry_engine::peer::control_protocol::{self, class};
use ferry_engine::tls::PeerIdentity;
use serde_json::json;

use crate::daemon::Daemon;

pub use listener::{serve, serve_tcp};

/// Who sent a request: a local process on the unix socket, or a client of the TCP
/// listener known by its verified certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Local,
    Remote {
        address: SocketAddr,
        identity: PeerIdentity,
    },
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local => write!(f, "the control socket"),
            Self::Remote { address, identity } => {
                write!(f, "{} at {address}", identity.display_name())
            }
        }
    }
}

/// An error reply: a class for programs and a one-line description for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlError {
    pub class: &'static str,
    pub desc: String,
}

impl ControlError {
    pub fn new(class: &'static str, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }

    pub fn bad_argument(desc: impl Into<String>) -> Self {
        Self::new("InvalidParameter", desc)
    }
}

/// Parses and executes one request line, returning the reply line's JSON text.
pub fn handle_line(daemon: &Daemon, caller: &Caller, line: &str) -> String {
    let request = match control_protocol::parse_request(line) {
        Ok(request) => request,
        Err(e) => return control_protocol::error_reply(class::GENERIC, &e.to_string(), None),
    };
    let (command, id) = (request.command.as_str(), request.id.as_ref());
    if let Caller::Remote { .. } = caller {
        log::debug!("control: {caller}: {command}");
    }
    match commands::dispatch(daemon, caller, command, &request.arguments) {
        Ok(commands::Reply::Value(value)) => {
            let mut answer = json!({ "return": value });
            if let Some(id) = id {
                answer["id"] = id.clone();
            }
            answer.to_string()
        }
        // The same object, its `return` value already JSON text.
        Ok(commands::Reply::Text(text)) => match id {
            Some(id) => format!("{{\"return\":{text},\"id\":{id}}}"),
            None => format!("{{\"return\":{text}}}"),
        },
        Err(e) => control_protocol::error_reply(e.class, &e.desc, id),
    }
}
