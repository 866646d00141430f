//! `ferry migrate ...`: start, watch, cut over, cancel and throttle live migrations of a
//! running daemon, through its control socket or its TCP control listener.

use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use crate::control_client::{ControlArgs, ControlClient};

/// The `ferry migrate` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum MigrateCommand {
    /// Start copying and mirroring volumes to a target.
    Start {
        #[command(flatten)]
        control: ControlArgs,
        /// A volume to migrate; several volumes are merged into one target (or, to another
        /// host, move together: all in sync before any is activated there).
        #[arg(long = "volume", required = true)]
        volumes: Vec<String>,
        /// PATH (file or block device), nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH,
        /// or over TLS nbds://HOST:PORT/EXPORT or nbds+unix:///EXPORT?socket=PATH; or
        /// ferry://HOST:PORT[/NAME], another host's ferry daemon, to which the volumes move
        /// with their VM (see docs/migration.md).
        #[arg(long)]
        target: String,
        /// With a ferry:// target: the image on the destination host ({name}: the volume's
        /// name there; default /var/lib/ferry/{name}.img).
        #[arg(long)]
        path: Option<String>,
        /// With a ferry:// target: the vhost-user socket on the destination host (default
        /// /run/ferry/{name}.sock).
        #[arg(long)]
        socket: Option<String>,
        /// TLS credentials for an NBD target, in QEMU's x509 layout (ca-cert.pem,
        /// client-cert.pem, client-key.pem), a directory the daemon reads (on its host): the
        /// job's connections use TLS (an nbd:// target's too). Default for nbds:// targets:
        /// the daemon's own --tls-creds. (--tls-creds is the control connection's.)
        #[arg(long, value_name = "DIR")]
        target_tls_creds: Option<std::path::PathBuf>,
        /// active: guest writes complete on both sides (always converges);
        /// background: writes mark a dirty bitmap the copier drains.
        #[arg(long, default_value = "active")]
        mode: String,
        /// Copy speed limit in bytes/s (K, M, G suffixes); default unlimited.
        #[arg(long)]
        max_speed: Option<String>,
        /// Cut over by itself as soon as the target is in sync.
        #[arg(long)]
        auto_cutover: bool,
        /// Testing: hold each copy this long between reading and writing it, so that guest
        /// writes race copies.
        #[arg(long, value_name = "MS")]
        copy_hold_ms: Option<u64>,
        /// How often the job file beside the first volume's image is rewritten (default
        /// 1000): after a crash, what was written since the last rewrite is copied again.
        #[arg(long, value_name = "MS")]
        persist_interval_ms: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Resume a migration that a restart of the daemon interrupted (see `status`): only
    /// what was not copied yet is copied, and after a crash what was written since the job
    /// file's last rewrite.
    Resume {
        #[command(flatten)]
        control: ControlArgs,
        /// A volume of the interrupted job (needed when there are several).
        #[arg(long)]
        volume: Option<String>,
        /// How often the job file is rewritten from now on (default 1000).
        #[arg(long, value_name = "MS")]
        persist_interval_ms: Option<u64>,
        /// Follow the job with a live progress bar (JSON lines with --json) until it ends.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    /// Give up a migration that a restart interrupted: its job file is removed.
    Discard {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        volume: Option<String>,
    },
    /// Show migration jobs.
    Status {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        job: Option<u64>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Follow the job with a live progress bar until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Switch a ready job's volumes over to the target.
    Cutover {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        job: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Stop a job before cutover; the guest stays on its source.
    Cancel {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        job: Option<u64>,
    },
    /// Change a job's speed limit (bytes/s; 0 removes the limit).
    SetSpeed {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        job: Option<u64>,
        /// Testing: also change the copy hold (see `start --copy-hold-ms`).
        #[arg(long, value_name = "MS")]
        copy_hold_ms: Option<u64>,
        speed: String,
    },
}

fn with_job(mut args: Value, job: Option<u64>) -> Value {
    if let Some(id) = job {
        args["job"] = json!(id);
    }
    args
}

/// `--target-tls-creds` as the daemon is to read it: made absolute when the daemon runs
/// beside this command (its unix control socket; it has its own working directory), and
/// sent as given to a daemon reached over `ferry://`, on whose host the path is.
fn target_creds_path(
    control: &ControlArgs,
    dir: std::path::PathBuf,
) -> anyhow::Result<std::path::PathBuf> {
    if control.control.is_tcp() {
        return Ok(dir);
    }
    std::path::absolute(&dir).with_context(|| format!("--target-tls-creds {}", dir.display()))
}

pub fn run(cmd: MigrateCommand) -> anyhow::Result<()> {
    match cmd {
        MigrateCommand::Start {
            control,
            volumes,
            target,
            path,
            socket,
            target_tls_creds,
            mode,
            max_speed,
            auto_cutover,
            copy_hold_ms,
            persist_interval_ms,
            json,
        } => {
            let mut args = json!({ "volumes": volumes, "target": target, "mode": mode, "auto-cutover": auto_cutover });
            if let Some(dir) = target_tls_creds {
                args["tls-creds"] = json!(target_creds_path(&control, dir)?);
            }
            if let Some(ms) = copy_hold_ms {
                args["copy-hold-ms"] = json!(ms);
            }
            if let Some(ms) = persist_interval_ms {
                args["persist-interval-ms"] = json!(ms);
            }
            for (key, value) in [("path", path), ("socket", socket)] {
                if let Some(value) = value {
                    args[key] = json!(value);
                }
            }
            if let Some(speed) = max_speed {
                args["max-speed"] =
                    json!(crate::volume_spec::parse_size(&speed).map_err(anyhow::Error::msg)?);
            }
            let reply = control.client()?.request("migrate-start", args)?;
            if json {
                println!("{reply}");
            } else {
                println!("migration job {} started", reply["job"]);
            }
            Ok(())
        }
        MigrateCommand::Resume {
            control,
            volume,
            persist_interval_ms,
            watch,
            json,
        } => {
            let mut args = json!({});
            if let Some(volume) = volume {
                args["volume"] = json!(volume);
            }
            if let Some(ms) = persist_interval_ms {
                args["persist-interval-ms"] = json!(ms);
            }
            let client = control.client()?;
            let reply = client.request("migrate-resume", args)?;
            if json {
                println!("{reply}");
            } else {
                println!(
                    "migration job {} resumed{}: {} to copy",
                    reply["job"],
                    if reply["crashed"] == json!(true) {
                        " after a crash"
                    } else {
                        ""
                    },
                    human(reply["total_bytes"].as_u64().unwrap_or(0))
                );
            }
            if watch {
                return watch_job(&client, reply["job"].as_u64(), json);
            }
            Ok(())
        }
        MigrateCommand::Discard { control, volume } => {
            let mut args = json!({});
            if let Some(volume) = volume {
                args["volume"] = json!(volume);
            }
            let reply = control.client()?.request("migrate-discard", args)?;
            match reply["job"].as_u64() {
                Some(id) => println!("interrupted migration job {id} discarded"),
                None => println!("broken job file removed"),
            }
            Ok(())
        }
        MigrateCommand::Status {
            control,
            job,
            json,
            watch,
        } => {
            let client = control.client()?;
            if watch {
                return watch_job(&client, job, json);
            }
            print_statuses(&client, job, json)
        }
        MigrateCommand::Cutover { control, job, json } => {
            let report = control
                .client()?
                .request("migrate-cutover", with_job(json!({}), job))?;
            print_cutover(&report, json);
            Ok(())
        }
        MigrateCommand::Cancel { control, job } => {
            let reply = control
                .client()?
                .request("migrate-cancel", with_job(json!({}), job))?;
            println!("migration job {} cancelled", reply["job"]);
            Ok(())
        }
        MigrateCommand::SetSpeed {
            control,
            job,
            copy_hold_ms,
            speed,
        } => {
            let bytes = crate::volume_spec::parse_size(&speed).map_err(anyhow::Error::msg)?;
            let mut args = json!({ "speed": bytes });
            if let Some(ms) = copy_hold_ms {
                args["copy-hold-ms"] = json!(ms);
            }
            control
                .client()?
                .request("migrate-set-speed", with_job(args, job))?;
            println!("speed limit set to {bytes} bytes/s");
            Ok(())
        }
    }
}

/// `migrate status`: one line per job, or the list as JSON.
fn print_statuses(client: &ControlClient, job: Option<u64>, json: bool) -> anyhow::Result<()> {
    let statuses = select(client.request("query-migrations", json!({}))?, job)?;
    if json {
        println!("{}", Value::Array(statuses));
    } else if statuses.is_empty() {
        println!("no migration jobs");
    } else {
        for status in &statuses {
            println!("{}", describe(status));
        }
    }
    Ok(())
}

fn print_cutover(report: &Value, json: bool) {
    if json {
        println!("{report}");
    } else {
        println!(
            "cut over: guest I/O held for {} µs{}",
            report["pause_us"],
            if report["switched"] == json!(false) {
                " (NBD target in sync; the volume stays on its source)"
            } else {
                ""
            }
        );
    }
}

fn select(all: Value, job: Option<u64>) -> anyhow::Result<Vec<Value>> {
    let Value::Array(list) = all else {
        anyhow::bail!("daemon sent an unexpected reply")
    };
    Ok(match job {
        Some(id) => list.into_iter().filter(|s| s["id"] == json!(id)).collect(),
        None => list,
    })
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "cancelled")
}

/// One line about a job, for a person.
fn describe(s: &Value) -> String {
    let total = s["total_bytes"].as_u64().unwrap_or(0);
    let copied = s["copied_bytes"].as_u64().unwrap_or(0);
    let percent = if total > 0 {
        copied as f64 * 100.0 / total as f64
    } else {
        100.0
    };
    let mut line = format!(
        "job {} {} {:?} -> {}: {} / {} ({percent:.1}%), dirty {}, {}/s, ETA {}",
        s["id"],
        s["state"].as_str().unwrap_or("?"),
        s["volumes"]
            .as_array()
            .map(|v| v
                .iter()
                .filter_map(|x| x["name"].as_str())
                .collect::<Vec<_>>())
            .unwrap_or_default(),
        s["target"].as_str().unwrap_or("?"),
        human(copied),
        human(total),
        human(s["dirty_bytes"].as_u64().unwrap_or(0)),
        human(s["rate_bytes_per_s"].as_u64().unwrap_or(0)),
        s["eta_s"]
            .as_u64()
            .map(|e| format!("{e} s"))
            .unwrap_or_else(|| "-".into()),
    );
    if let Some(pause) = s["cutover_pause_us"].as_u64() {
        line.push_str(&format!(", cutover pause {pause} µs"));
    }
    let sizes = &s["target_block_sizes"];
    if let (Some(min), Some(max)) = (
        sizes["block_bytes_min"].as_u64(),
        sizes["payload_bytes_max"].as_u64(),
    ) {
        let max = if max == u64::from(u32::MAX) {
            "unlimited".to_string()
        } else {
            human(max)
        };
        line.push_str(&format!(
            ", NBD block {min} B, max payload {max}{}",
            if sizes["advertised"] == json!(false) {
                " (defaults)"
            } else {
                ""
            }
        ));
    }
    let cross = &s["cross-host"];
    if cross.is_object() {
        line.push_str(&format!(
            ", destination {} volume {} {}{}",
            cross["peer"].as_str().unwrap_or("?"),
            cross["remote-volume"].as_str().unwrap_or("?"),
            cross["incoming"]["state"].as_str().unwrap_or("unknown"),
            if cross["handed-off"] == json!(true) {
                ", handed off"
            } else {
                ""
            }
        ));
    }
    if let Some(e) = s["error"].as_str() {
        line.push_str(&format!(", error: {e}"));
    }
    if s["state"] == json!("interrupted") {
        line.push_str(if s["crashed"] == json!(true) {
            " (by a crash; ferry migrate resume)"
        } else {
            " (by a shutdown; ferry migrate resume)"
        });
    }
    line
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Follows one job until it ends: a progress bar for a person, JSON lines with `--json`.
fn watch_job(control: &ControlClient, job: Option<u64>, json_out: bool) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    if json_out {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    loop {
        let statuses = select(control.request("query-migrations", json!({}))?, job)?;
        let Some(status) = statuses.into_iter().last() else {
            anyhow::bail!("no such migration job");
        };
        let state = status["state"].as_str().unwrap_or("?").to_string();
        if json_out {
            println!("{status}");
        }
        bar.set_length(status["total_bytes"].as_u64().unwrap_or(0));
        bar.set_position(status["copied_bytes"].as_u64().unwrap_or(0));
        bar.set_prefix(format!("job {} {state}", status["id"]));
        bar.set_message(format!(
            "dirty {} {}/s",
            human(status["dirty_bytes"].as_u64().unwrap_or(0)),
            human(status["rate_bytes_per_s"].as_u64().unwrap_or(0))
        ));
        if is_terminal(&state) {
            bar.finish();
            if !json_out {
                println!("{}", describe(&status));
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_show_an_nbd_targets_block_sizes() {
        let mut s = json!({
            "id": 1, "state": "copying", "volumes": [{"name": "v"}], "target": "nbd://h/e",
            "total_bytes": 4096, "copied_bytes": 1024, "dirty_bytes": 0, "rate_bytes_per_s": 0,
            "target_block_sizes": {"block_bytes_min": 512, "block_bytes_preferred": 4096,
                                   "payload_bytes_max": 1048576, "advertised": true},
        });
        let line = describe(&s);
        assert!(
            line.contains("NBD block 512 B, max payload 1.0 MiB"),
            "{line}"
        );
        assert!(!line.contains("defaults"), "{line}");
        s["target_block_sizes"]["advertised"] = json!(false);
        s["target_block_sizes"]["payload_bytes_max"] = json!(u32::MAX);
        assert!(describe(&s).contains("max payload unlimited (defaults)"));
        s["target_block_sizes"] = Value::Null;
        assert!(
            !describe(&s).contains("NBD"),
            "file targets have no block sizes"
        );
    }
}
