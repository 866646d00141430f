//! `ferry journal ...`: control of a running daemon's journal and offline tools on media.

/// The `ferry journal` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum JournalCommand {
    /// Check media: checksums, sequence gaps, torn tail.
    Verify { media: Vec<std::path::PathBuf> },
}

pub fn run(_cmd: JournalCommand) -> anyhow::Result<()> {
    anyhow::bail!("ferry journal is not implemented yet")
}
