//! The `contend` command: a thin layer that parses arguments and hands each subcommand to the
//! crate that implements it (`contend-lab`, `contend-anomalies`, `contend-service`).
//!
//! Exit status: 0 success; 1 a check failed (a safe strategy showed a violation); 2 bad usage or
//! an error that stopped the run.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// contend: handle concurrent requests correctly, and prove it under load.
#[derive(Debug, Parser)]
#[command(name = "contend", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fire concurrent requests at every strategy and backend, check invariants, report speed.
    Lab(contend_lab::cli::LabArgs),
    /// Inject faults during load (killed connections, latency, database and Redis restarts, a
    /// frozen lock holder, killed service instances) and check every acknowledged operation
    /// against the final state (`scripts/faults` runs it).
    Faults(contend_lab::fault::cli::FaultArgs),
    /// Run the isolation-anomaly suite against a database at every isolation level.
    Anomalies(contend_anomalies::cli::AnomaliesArgs),
    /// Run the reference HTTP service (bank, shop, booking).
    Serve(contend_service::cli::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Before the runtime starts its threads: they keep to the CPU chosen here.
    if let Command::Lab(args) = &cli.command {
        contend_lab::cpu::place(args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("contend: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Lab(args) => contend_lab::cli::run(args).await,
            Command::Faults(args) => contend_lab::fault::cli::run(args).await,
            Command::Anomalies(args) => contend_anomalies::cli::run(args).await,
            Command::Serve(args) => contend_service::cli::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("contend: {e:#}");
            ExitCode::from(2)
        }
    }
}
