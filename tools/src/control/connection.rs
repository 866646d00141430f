//! One control connection's requests, over any stream (the unix socket, or TLS over TCP):
//! read a line within its bounds, run it, write the reply, until the client leaves, says
//! nothing for too long, stops reading its replies, breaks the framing, or turns the
//! connection into a replication stream (`replicate-stream`).

use std::io::Write;

use ferry_engine::peer::control_protocol::{
    class, error_reply, LineDeadlines, LineError, LineReader, TimedRead, REQUEST_BYTES_MAX,
};

use serde_json::Value;

use super::{handle_line, Caller, ControlError};
use crate::daemon::Daemon;

/// Serves requests on `stream` until it ends. `deadlines` bound the wait for each request
/// and each request's arrival; the caller bounds each reply's write (the socket's write
/// timeout), so that a client that never reads is closed too.
pub fn serve_connection<S: TimedRead + Write>(
    stream: &mut S,
    daemon: &Daemon,
    caller: &Caller,
    deadlines: LineDeadlines,
) {
    let mut reader = LineReader::new(REQUEST_BYTES_MAX);
    loop {
        let line = match reader.read_line(stream, deadlines) {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(LineError::TooLong { bytes_max }) => {
                let desc = format!("request too long (at most {bytes_max} bytes a line)");
                let _ = reply(stream, &error_reply(class::GENERIC, &desc, None));
                return;
            }
            Err(LineError::NotUtf8) => {
                let desc = "a request line that is not UTF-8";
                let _ = reply(stream, &error_reply(class::GENERIC, desc, None));
                return;
            }
            Err(LineError::TimedOut(bound)) => {
                log::debug!("control: {caller}: closed after {bound:?} without a whole request");
                return;
            }
            Err(e) => {
                log::debug!("control: {caller}: {e}");
                return;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        if let Some(arguments) = stream_request(&line) {
            let result = if reader.buffered_bytes() > 0 {
                Err(ControlError::bad_argument(
                    "replicate-stream: frames sent before the reply",
                ))
            } else {
                daemon.replicate_stream(caller, &arguments, stream)
            };
            if let Err(e) = result {
                let _ = reply(stream, &error_reply(e.class, &e.desc, None));
            }
            return;
        }
        let answer = handle_line(daemon, caller, &line);
        if reply(stream, &answer).is_err() {
            return;
        }
    }
}

/// The arguments of a `replicate-stream` request, which hands the connection over to the
/// replication receiver.
fn stream_request(line: &str) -> Option<Value> {
    let request: Value = serde_json::from_str(line).ok()?;
    if request.get("command").and_then(Value::as_str) != Some("replicate-stream") {
        return None;
    }
    Some(request.get("arguments").cloned().unwrap_or(Value::Null))
}

/// Writes one reply line and pushes it out (a TLS stream holds written bytes until then).
pub fn reply<S: Write>(stream: &mut S, text: &str) -> std::io::Result<()> {
    let mut line = String::with_capacity(text.len() + 1);
    line.push_str(text);
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    stream.flush()
}
