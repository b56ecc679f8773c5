//! `contend anomalies`: arguments and entry point.

use std::process::ExitCode;

/// Arguments of `contend anomalies`.
#[derive(Debug, clap::Args)]
pub struct AnomaliesArgs {
    /// Database to test (default: embedded SQLite in a temporary file).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
}

/// Runs the suite.
pub async fn run(_args: AnomaliesArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the anomaly suite is being built (issue 6)")
}
