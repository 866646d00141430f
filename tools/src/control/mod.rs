//! The control socket: a unix socket speaking line-delimited JSON (see `docs/control.md`).
//!
//! Each line is one request `{"command": NAME, "arguments": {...}}`; each reply is one
//! line, `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`. Connections are
//! served on their own threads; commands are looked up by name in [`commands`].

pub mod commands;
pub mod journal_commands;
pub mod migrate_commands;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::daemon::Daemon;

/// The longest request line accepted; a longer one closes the connection.
const REQUEST_BYTES_MAX: usize = 1 << 20;
/// Connections served at once.
const CONNECTIONS_MAX: usize = 64;

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

/// Accepts control connections on `listener` forever.
pub fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if active.load(std::sync::atomic::Ordering::SeqCst) >= CONNECTIONS_MAX {
            let _ = reply(
                &stream,
                &error_reply(&ControlError::new("Busy", "too many control connections"))
                    .to_string(),
            );
            continue;
        }
        let daemon = daemon.clone();
        let active = active.clone();
        active.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("ferry-control".into())
            .spawn(move || {
                serve_connection(stream, &daemon);
                active.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            log::error!("cannot start a control connection thread: {e}");
        }
    }
}

fn serve_connection(stream: UnixStream, daemon: &Daemon) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(REQUEST_BYTES_MAX as u64)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() >= REQUEST_BYTES_MAX {
            let _ = reply(
                &stream,
                &error_reply(&ControlError::new("GenericError", "request too long")).to_string(),
            );
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let answer = handle_line(daemon, &line);
        if reply(&stream, &answer).is_err() {
            return;
        }
    }
}

/// Parses and executes one request line, returning the reply line's JSON text.
pub fn handle_line(daemon: &Daemon, line: &str) -> String {
    let request: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return error_reply(&ControlError::new(
                "GenericError",
                format!("invalid JSON: {e}"),
            ))
            .to_string()
        }
    };
    let Some(command) = request.get("command").and_then(Value::as_str) else {
        return error_reply(&ControlError::new("GenericError", "missing \"command\"")).to_string();
    };
    let arguments = request
        .get("arguments")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let id = request.get("id");
    match commands::dispatch(daemon, command, &arguments) {
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
        Err(e) => {
            let mut answer = error_reply(&e);
            if let Some(id) = id {
                answer["id"] = id.clone();
            }
            answer.to_string()
        }
    }
}

fn error_reply(e: &ControlError) -> Value {
    json!({ "error": { "class": e.class, "desc": e.desc } })
}

fn reply(mut stream: &UnixStream, text: &str) -> std::io::Result<()> {
    let mut line = String::with_capacity(text.len() + 1);
    line.push_str(text);
    line.push('\n');
    stream.write_all(line.as_bytes())
}
