//! `contend serve`: arguments and entry point.

use std::process::ExitCode;

/// Arguments of `contend serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Database URL (default: an embedded SQLite file).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
}

/// Runs the service until SIGTERM.
pub async fn run(_args: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the service is being built (issue 5)")
}
