//! A small QMP client (QEMU Machine Protocol, line-delimited JSON on a unix socket) for tests:
//! connect to `-qmp unix:PATH,server=on,wait=off`, run commands, drive a live migration.

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Bound on one QMP reply (QEMU answers at once; TCG guests only slow the guest, not QMP).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Poll interval of `query-migrate` and of the socket's appearance.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// One QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (waiting up to `timeout` for QEMU to create the socket), reads the greeting
    /// and leaves capabilities negotiation (`qmp_capabilities`).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| format!("connect QMP {}", path.display()))
                }
                Err(_) => std::thread::sleep(POLL_INTERVAL),
            }
        };
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .context("set QMP read timeout")?;
        let writer = stream.try_clone().context("clone QMP stream")?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value; a QMP error becomes an `Err`.
    /// Events that arrive meanwhile are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").with_context(|| format!("send QMP {command}"))?;
        loop {
            let message = self.read_message()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                bail!("QMP {command} failed: {error}");
            }
        }
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("read QMP message")?;
        if n == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&line).with_context(|| format!("parse QMP message {line:?}"))
    }

    /// Starts an outgoing migration to `uri` (e.g. `unix:/tmp/x/mig.sock`).
    pub fn migrate(&mut self, uri: &str) -> Result<()> {
        self.execute("migrate", json!({"uri": uri})).map(|_| ())
    }

    /// Polls `query-migrate` until the migration completed (returns the last status object)
    /// or failed / was cancelled / ran past `timeout` (an error).
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.execute("query-migrate", json!({}))?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(info),
                Some(status @ ("failed" | "cancelled")) => {
                    bail!("migration {status}: {info}")
                }
                _ if Instant::now() >= deadline => {
                    bail!("migration not completed after {timeout:?}: {info}")
                }
                _ => std::thread::sleep(POLL_INTERVAL),
            }
        }
    }
}
