//! The client side of the control socket: send one JSON request, read one JSON reply.

/// Options of `ferry query`.
#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// The daemon's control socket.
    #[arg(long)]
    pub control: std::path::PathBuf,
    /// The command, e.g. `query-volumes`.
    pub command: String,
}

pub fn run_query(_args: QueryArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}

/// Sends one request (`{"command":..,"arguments":..}` plus a newline) to the control socket
/// and returns the reply's `return` value; an `error` reply becomes an error naming its class.
pub fn request(
    control: &std::path::Path,
    command: &str,
    arguments: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(control)
        .with_context(|| format!("cannot connect to the control socket {}", control.display()))?;
    let mut line =
        serde_json::to_string(&serde_json::json!({ "command": command, "arguments": arguments }))?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .context("cannot send the request")?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("cannot read the reply")?;
    anyhow::ensure!(
        !reply.is_empty(),
        "the daemon closed the control socket without replying"
    );
    let reply: serde_json::Value = serde_json::from_str(&reply).context("the reply is not JSON")?;
    if let Some(err) = reply.get("error") {
        let class = err.get("class").and_then(|c| c.as_str()).unwrap_or("Error");
        let desc = err
            .get("desc")
            .and_then(|d| d.as_str())
            .unwrap_or("(no description)");
        anyhow::bail!("{command}: {class}: {desc}");
    }
    reply
        .get("return")
        .cloned()
        .with_context(|| format!("{command}: the reply has neither return nor error"))
}
