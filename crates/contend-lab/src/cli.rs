//! `contend lab`: arguments and entry point.

use std::process::ExitCode;

/// Arguments of `contend lab`.
#[derive(Debug, clap::Args)]
pub struct LabArgs {
    /// Database to run against (default: embedded SQLite in a temporary file).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
}

/// Runs the lab.
pub async fn run(_args: LabArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the lab is being built")
}
