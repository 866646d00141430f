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
