//! Not built yet.

#[derive(clap::Subcommand)]
pub enum VosCommand {
    /// Walk through versioned updates, reads at old epochs, punch and aggregation.
    Demo,
}

pub fn run(_c: VosCommand) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
