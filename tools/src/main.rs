//! The `ferry` command-line program: dispatches to one module per subcommand.

mod bench;
mod control;
mod control_client;
mod daemon;
mod handoff;
mod identity;
mod incoming;
mod journal_cli;
mod landlock_paths;
mod logging;
mod metrics;
mod migrate_cli;
mod migration_recovery;
mod nbd_serve;
mod replica_groups;
mod replicate_cli;
mod replication_copy;
mod replication_primary;
mod seccomp;
mod serve;
mod served_volume;
mod systemd_notify;
mod volume_claims;
mod volume_spec;

use clap::{Parser, Subcommand};

/// ferry: a vhost-user-blk storage daemon with live migration and write journaling.
#[derive(Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
    /// The log on stderr: text, or one JSON object per line for log shippers (time, level,
    /// target, module, thread, message, fields). RUST_LOG filters it (default: info).
    #[arg(long, value_enum, global = true, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Export volumes to QEMU as vhost-user-blk devices (with no arguments: the demo disk).
    Serve(serve::ServeArgs),
    /// Send one request to a running daemon's control socket and print the reply.
    Query(control_client::QueryArgs),
    /// Live volume migration jobs of a running daemon.
    #[command(subcommand)]
    Migrate(migrate_cli::MigrateCommand),
    /// The write journal: control of a running daemon, and offline tools on media.
    #[command(subcommand)]
    Journal(journal_cli::JournalCommand),
    /// Replication groups received by a running daemon (the DR site): status, promotion.
    #[command(subcommand)]
    Replicate(replicate_cli::ReplicateCommand),
    /// Load generator: a real vhost-user-blk client measuring any backend.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        None => serve::run(serve::ServeArgs::default()),
        Some(Command::Serve(args)) => serve::run(args),
        Some(Command::Query(args)) => control_client::run_query(args),
        Some(Command::Migrate(cmd)) => migrate_cli::run(cmd),
        Some(Command::Journal(cmd)) => journal_cli::run(cmd),
        Some(Command::Replicate(cmd)) => replicate_cli::run(cmd),
        Some(Command::Bench(args)) => bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("ferry: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, each cause once: errors whose message already
/// ends with their source's (the engine's do) are not followed by it again.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}
