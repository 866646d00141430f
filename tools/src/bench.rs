//! `ferry bench`: a load generator that is a real vhost-user-blk client (through libblkio).

/// Options of `ferry bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The vhost-user socket of the backend to measure.
    #[arg(long)]
    pub socket: std::path::PathBuf,
}

pub fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("ferry bench is not implemented yet")
}
