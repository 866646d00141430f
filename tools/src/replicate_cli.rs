//! `ferry replicate ...`: the DR side of replication groups on a running daemon, through its
//! control socket or its TCP control listener: status and promotion.

use serde_json::{json, Value};

use crate::control_client::ControlArgs;

/// The `ferry replicate` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ReplicateCommand {
    /// Show the replication groups received by the daemon.
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
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: ReplicateCommand) -> anyhow::Result<()> {
    match command {
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
                println!(
                    "group {} ({}): {}, durable {}, applied {}, lag {} records, {:.1} s since the last record",
                    g["group"].as_str().unwrap_or("?"),
                    g["role"].as_str().unwrap_or("?"),
                    g["state"].as_str().unwrap_or("?"),
                    g["durable-seq"],
                    g["applied-seq"],
                    g["lag-records"],
                    g["seconds-since-last-record"].as_f64().unwrap_or(0.0),
                );
                if let Some(error) = g["last-error"].as_str() {
                    println!("  last stream refused: {error}");
                }
            }
            Ok(())
        }
        ReplicateCommand::Promote {
            control,
            group,
            at,
            json,
        } => {
            let reply = control
                .client()?
                .request("replicate-promote", json!({ "group": group, "at": at }))?;
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
