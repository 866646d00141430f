//! The client side of the control socket: send one JSON request, read one JSON reply.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{anyhow, Context};
use serde_json::{json, Value};

/// Options of `ferry query`.
#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// The daemon's control socket.
    #[arg(long)]
    pub control: std::path::PathBuf,
    /// The command, e.g. `query-volumes`.
    pub command: String,
    /// Arguments as a JSON object.
    #[arg(long, default_value = "{}")]
    pub arguments: String,
}

/// Sends one request and returns the `return` value, or the daemon's error as an error.
pub fn request(control: &Path, command: &str, arguments: Value) -> anyhow::Result<Value> {
    let reply = exchange(control, command, arguments)?;
    let reply: Value = serde_json::from_str(&reply).context("daemon sent invalid JSON")?;
    match reply.get("return") {
        Some(value) => Ok(value.clone()),
        None => Err(daemon_error(command, &reply)),
    }
}

/// Sends one request and returns the reply line as the daemon wrote it (for replies that
/// are parsed into typed structures instead of a JSON value).
pub fn exchange(control: &Path, command: &str, arguments: Value) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(control)
        .with_context(|| format!("cannot connect to control socket {}", control.display()))?;
    let mut line = json!({ "command": command, "arguments": arguments }).to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .context("cannot send request")?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("cannot read reply")?;
    anyhow::ensure!(
        !reply.is_empty(),
        "the daemon closed the control socket without replying"
    );
    Ok(reply)
}

/// The daemon's `error` reply as an error: `COMMAND: CLASS: DESC`.
pub fn daemon_error(command: &str, reply: &Value) -> anyhow::Error {
    let class = reply
        .pointer("/error/class")
        .and_then(Value::as_str)
        .unwrap_or("Error");
    let desc = reply
        .pointer("/error/desc")
        .and_then(Value::as_str)
        .unwrap_or("unknown error");
    anyhow!("{command}: {class}: {desc}")
}

pub fn run_query(args: QueryArgs) -> anyhow::Result<()> {
    let arguments: Value =
        serde_json::from_str(&args.arguments).context("--arguments is not JSON")?;
    let value = request(&args.control, &args.command, arguments)?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}
