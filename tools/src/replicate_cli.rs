//! `ferry replicate ...`: replication groups on a running daemon, through its control socket
//! or its TCP control listener: start, stop, pause, resume and set-speed on the primary,
//! status on either side, promotion on the DR side.

use serde_json::{json, Value};

use crate::control_client::ControlArgs;

/// The `ferry replicate` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ReplicateCommand {
    /// Replicate running volumes of this daemon to another ferry, as one group.
    Start {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long = "volume", required = true)]
        volumes: Vec<String>,
        /// The DR daemon: ferry://HOST:PORT (its TCP control listener).
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "default")]
        group: String,
        /// Where the DR daemon keeps the replicas ({name}.img) and the group's log
        /// ({group}.dr).
        #[arg(long, default_value = "/var/lib/ferry")]
        path_prefix: String,
        /// Where the DR daemon puts the replicas' vhost-user sockets ({name}.sock).
        #[arg(long, default_value = "/run/ferry")]
        socket_prefix: String,
        /// async: guest writes complete at once and reach the DR site later; sync: a guest
        /// write completes once the DR site holds it durably (until the DR site stops
        /// answering for --sync-timeout, then the group degrades to async).
        #[arg(long, default_value = "async", value_parser = ["async", "sync"])]
        mode: String,
        /// Seconds a sync write waits for the DR site before the group degrades to async.
        #[arg(long, default_value_t = 5.0)]
        sync_timeout: f64,
        /// The bound on an async group's lag: a time (`2s`, `500ms`) or a size of records
        /// not acknowledged (`64M`, at least 4M); may be given twice, one of each.
        #[arg(long)]
        max_lag: Vec<String>,
        /// Past --max-lag: degrade (stop shipping records, track changes in a bitmap, resync
        /// once the DR site catches up) or throttle (delay the guests' write completions,
        /// more the further past the bound).
        #[arg(long, default_value = "degrade", value_parser = ["degrade", "throttle"])]
        on_lag: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop replicating a group from this daemon.
    Stop {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        group: String,
    },
    /// Pause a group replicated from this daemon: it tracks changes in its bitmap and ships
    /// no new records until resumed.
    Pause {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        group: String,
    },
    /// Resume a paused group: it resyncs from its bitmap, then streams again.
    Resume {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        group: String,
    },
    /// Limit the speed of a group's initial copy and resyncs (bytes per second: 50M, or 0
    /// for no limit).
    SetSpeed {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        group: String,
        #[arg(long)]
        speed: String,
    },
    /// Show the replication groups of the daemon (replicated from it, or received by it).
    Status {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        group: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Fail over: roll a group's replicas to a point of the DR log and serve them.
    Promote {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        group: String,
        /// latest, seq:N or mark:LABEL.
        #[arg(long, default_value = "latest")]
        at: String,
        /// Promote even at a point inside a bitmap resync, where the replicas may mix older
        /// and newer contents of different ranges.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: ReplicateCommand) -> anyhow::Result<()> {
    match command {
        ReplicateCommand::Start {
            control,
            volumes,
            to,
            group,
            path_prefix,
            socket_prefix,
            mode,
            sync_timeout,
            max_lag,
            on_lag,
            json,
        } => {
            if !(sync_timeout.is_finite() && sync_timeout > 0.0 && sync_timeout <= 3600.0) {
                anyhow::bail!("--sync-timeout: seconds, more than 0 and at most 3600");
            }
            let mut args = json!({
                "group": group, "volumes": volumes, "to": to,
                "path-prefix": path_prefix, "socket-prefix": socket_prefix,
                "mode": mode, "sync-timeout-ms": (sync_timeout * 1000.0).ceil() as u64,
                "on-lag": on_lag,
            });
            for text in &max_lag {
                match parse_max_lag(text).map_err(|e| anyhow::anyhow!("--max-lag: {e}"))? {
                    MaxLag::Millis(ms) => args["max-lag-ms"] = json!(ms),
                    MaxLag::Bytes(bytes) => args["max-lag-bytes"] = json!(bytes),
                }
            }
            let reply = control.client()?.request("replicate-start", args)?;
            if json {
                println!("{reply}");
            } else {
                println!(
                    "group {group}: replicating {} to {to} ({mode})",
                    volumes.join(", ")
                );
            }
            Ok(())
        }
        ReplicateCommand::Pause { control, group } => {
            control
                .client()?
                .request("replicate-pause", json!({ "group": group }))?;
            println!("group {group}: paused (changes tracked in its bitmap)");
            Ok(())
        }
        ReplicateCommand::Resume { control, group } => {
            control
                .client()?
                .request("replicate-resume", json!({ "group": group }))?;
            println!("group {group}: resumed");
            Ok(())
        }
        ReplicateCommand::SetSpeed {
            control,
            group,
            speed,
        } => {
            let bytes_per_s = ferry_engine::units::parse_size(&speed)
                .map_err(|e| anyhow::anyhow!("--speed: {e}"))?;
            control.client()?.request(
                "replicate-set-speed",
                json!({ "group": group, "bytes-per-s": bytes_per_s }),
            )?;
            println!("group {group}: copy and resync speed {bytes_per_s} bytes/s (0: no limit)");
            Ok(())
        }
        ReplicateCommand::Stop { control, group } => {
            control
                .client()?
                .request("replicate-stop", json!({ "group": group }))?;
            println!("group {group}: replication stopped");
            Ok(())
        }
        ReplicateCommand::Status {
            control,
            group,
            json,
        } => {
            let args = group.map_or_else(|| json!({}), |g| json!({ "group": g }));
            let reply = control.client()?.request("replicate-status", args)?;
            let groups = match reply {
                Value::Array(groups) => groups,
                one => vec![one],
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&groups)?);
                return Ok(());
            }
            for g in &groups {
                print_group(g);
            }
            Ok(())
        }
        ReplicateCommand::Promote {
            control,
            group,
            at,
            force,
            json,
        } => {
            let reply = control.client()?.request(
                "replicate-promote",
                json!({ "group": group, "at": at, "force": force }),
            )?;
            if json {
                println!("{reply}");
            } else {
                println!(
                    "group {group} promoted: its replicas equal the primary after record {}",
                    reply["seq"]
                );
            }
            Ok(())
        }
    }
}

/// A `--max-lag`: a time or a size.
#[derive(Debug, PartialEq, Eq)]
enum MaxLag {
    Millis(u64),
    Bytes(u64),
}

/// `2s`, `0.5s`, `500ms` (a time) or `64M`, `1G`, `4194304` (a size).
fn parse_max_lag(text: &str) -> Result<MaxLag, String> {
    let t = text.trim();
    let seconds = if let Some(ms) = t.strip_suffix("ms") {
        ms.parse::<f64>().ok().map(|ms| ms / 1000.0)
    } else if let Some(s) = t.strip_suffix('s') {
        s.parse::<f64>().ok()
    } else {
        None
    };
    if let Some(seconds) = seconds {
        if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
            return Err(format!("{text:?}: a time more than 0 and at most 3600 s"));
        }
        return Ok(MaxLag::Millis(((seconds * 1000.0).ceil() as u64).max(1)));
    }
    ferry_engine::units::parse_size(t)
        .map(MaxLag::Bytes)
        .map_err(|e| format!("{e} (a time like 2s or 500ms, or a size like 64M)"))
}

fn print_group(g: &Value) {
    let name = g["group"].as_str().unwrap_or("?");
    let state = g["state"].as_str().unwrap_or("?");
    if g["role"] == "primary" {
        println!(
            "group {name} (primary, to {}): {state}, numbered {}, shipped {}, acknowledged {}, applied {}; lag {} records, {} bytes, {:.1} s; link {:.1} MiB/s",
            g["to"].as_str().unwrap_or("?"),
            g["numbered-seq"],
            g["shipped-seq"],
            g["acknowledged-seq"],
            g["applied-seq"],
            g["lag-records"],
            g["lag-bytes"],
            g["lag-seconds"].as_f64().unwrap_or(0.0),
            g["link-bytes-per-s"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
        );
        let bound: Vec<String> = [
            g["max-lag-seconds"].as_f64().map(|s| format!("{s} s")),
            g["max-lag-bytes"].as_u64().map(|b| format!("{b} bytes")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !bound.is_empty() {
            println!(
                "  max lag {} ({}); throttle delay {:.1} ms, {} writes throttled",
                bound.join(", "),
                g["on-lag"].as_str().unwrap_or("?"),
                g["throttle-delay-ms"].as_f64().unwrap_or(0.0),
                g["throttled-writes"],
            );
        }
        if g["resyncs"].as_u64() > Some(0) {
            println!(
                "  {} resyncs sent {} bytes for {} bytes marked changed",
                g["resyncs"], g["resync-bytes"], g["resync-changed-bytes"]
            );
        }
        if let Some(reason) = g["degraded-reason"].as_str() {
            println!(
                "  degraded: {reason} ({} bytes marked changed)",
                g["dirty-bytes"]
            );
        }
        if let Some(sync) = g["sync-state"].as_str() {
            println!(
                "  sync: {sync}, {} writes waiting for the DR site",
                g["sync-held-writes"]
            );
            if let Some(reason) = g["sync-degraded-reason"].as_str() {
                println!("  sync degraded to async: {reason}");
            }
        }
    } else {
        println!(
            "group {name} (DR): {state}, durable {}, applied {}, lag {} records, {:.1} s since the last record",
            g["durable-seq"],
            g["applied-seq"],
            g["lag-records"],
            g["seconds-since-last-record"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(error) = g["last-error"].as_str() {
        println!("  last error: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_max_lag, MaxLag};

    #[test]
    fn max_lag_is_a_time_or_a_size() {
        assert_eq!(parse_max_lag("2s"), Ok(MaxLag::Millis(2000)));
        assert_eq!(parse_max_lag("0.5s"), Ok(MaxLag::Millis(500)));
        assert_eq!(parse_max_lag("250ms"), Ok(MaxLag::Millis(250)));
        assert_eq!(parse_max_lag("64M"), Ok(MaxLag::Bytes(64 << 20)));
        assert_eq!(parse_max_lag("4194304"), Ok(MaxLag::Bytes(4 << 20)));
        assert!(parse_max_lag("0s").is_err());
        assert!(parse_max_lag("-1s").is_err());
        assert!(parse_max_lag("2 hours").is_err());
    }
}
