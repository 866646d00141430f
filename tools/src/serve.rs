//! `ferry serve`: parse volume specs and configuration, open volumes, serve them.

/// Options of `ferry serve`.
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {}

pub fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
