//! `ferry migrate ...`: start, watch, cut over and cancel live migrations of a running daemon.

/// The `ferry migrate` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum MigrateCommand {
    /// Show migration jobs.
    Status {
        #[arg(long)]
        control: std::path::PathBuf,
    },
}

pub fn run(_cmd: MigrateCommand) -> anyhow::Result<()> {
    anyhow::bail!("ferry migrate is not implemented yet")
}
