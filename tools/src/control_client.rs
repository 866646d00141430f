//! The client side of the control protocol for the `ferry` subcommands: a daemon's unix
//! control socket, or its TCP listener at `ferry://HOST:PORT` with mutual TLS
//! (`--tls-creds DIR`), through the engine's [`PeerLink`]. Errors are one line: the
//! daemon's refusal as `COMMAND: CLASS: DESC`, anything else naming the address.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ferry_engine::peer::link::{LinkOptions, PeerError, PeerLink};
use ferry_engine::peer::transport::TransportError;
use ferry_engine::peer::ControlAddress;
use ferry_engine::tls::TlsCredentials;
use serde_json::Value;

/// How long the command line waits for a daemon's reply over TCP: long enough for any
/// command, short enough that a dead network does not hang a script. Over the unix socket
/// it waits as long as the daemon takes, as a local process it is known to be running.
const TCP_REPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest reply accepted (a page of `journal-retrieve` at its largest fits well).
const REPLY_BYTES_MAX: usize = 256 << 20;

/// Where a subcommand finds the daemon (`--control`, `--tls-creds`).
#[derive(clap::Args, Debug, Clone)]
pub struct ControlArgs {
    /// The daemon's control socket, or ferry://HOST:PORT for its TCP control listener.
    #[arg(long, value_name = "PATH|ferry://HOST:PORT")]
    pub control: ControlAddress,
    /// TLS credentials for ferry:// (ca-cert.pem, client-cert.pem, client-key.pem: QEMU's
    /// x509 layout).
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
}

impl ControlArgs {
    /// A client for the daemon; nothing is connected until the first request.
    pub fn client(&self) -> anyhow::Result<ControlClient> {
        let credentials = match (&self.control, &self.tls_creds) {
            (ControlAddress::Tcp { .. }, Some(dir)) => Some(TlsCredentials::load(dir)?),
            (ControlAddress::Tcp { .. }, None) => anyhow::bail!(
                "--control {} is a TCP control listener, which speaks TLS only: give --tls-creds DIR",
                self.control
            ),
            // The unix socket is local: no TLS on it.
            (ControlAddress::Unix(_), _) => None,
        };
        let options = LinkOptions {
            reply_timeout: self.control.is_tcp().then_some(TCP_REPLY_TIMEOUT),
            reply_bytes_max: REPLY_BYTES_MAX,
            ..LinkOptions::default()
        };
        let name = self.control.to_string();
        let link = PeerLink::new(&name, self.control.clone(), credentials.as_ref(), options)
            .map_err(|e| cli_error(&self.control, e))?;
        Ok(ControlClient { link })
    }
}

/// A connection to one daemon, reused by the requests of one subcommand.
pub struct ControlClient {
    link: PeerLink,
}

impl ControlClient {
    /// Sends one request and returns the `return` value, or the daemon's error as an error.
    pub fn request(&self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        self.link
            .call(command, &arguments)
            .map_err(|e| cli_error(self.link.address(), e))
    }

    /// Sends one request and returns the reply line as the daemon wrote it (for replies that
    /// are parsed into typed structures instead of a JSON value).
    pub fn exchange(&self, command: &str, arguments: Value) -> anyhow::Result<String> {
        self.link
            .call_line(command, &arguments)
            .map_err(|e| cli_error(self.link.address(), e))
    }
}

/// A link's error as the command line says it.
fn cli_error(address: &ControlAddress, e: PeerError) -> anyhow::Error {
    match e {
        PeerError::Refused {
            command,
            class,
            desc,
            ..
        } => anyhow::anyhow!("{command}: {class}: {desc}"),
        PeerError::Transport {
            source: TransportError::Connect { reason, .. },
            ..
        } if !address.is_tcp() => {
            anyhow::anyhow!("cannot connect to control socket {address}: {reason}")
        }
        PeerError::Transport { source, .. } => anyhow::Error::new(source),
        other => anyhow::Error::new(other),
    }
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
    anyhow::anyhow!("{command}: {class}: {desc}")
}

/// Options of `ferry query`.
#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The command, e.g. `query-volumes`.
    pub command: String,
    /// Arguments as a JSON object.
    #[arg(long, default_value = "{}")]
    pub arguments: String,
}

pub fn run_query(args: QueryArgs) -> anyhow::Result<()> {
    let arguments: Value =
        serde_json::from_str(&args.arguments).context("--arguments is not JSON")?;
    let value = args.control.client()?.request(&args.command, arguments)?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}
