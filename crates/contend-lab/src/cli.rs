//! `contend lab`: the command-line flags, their validation into a [`LabConfig`], and the entry
//! point that runs the lab and prints the table or the JSON document.
//!
//! Exit status: 0 when every strategy expected to be safe was; 1 when one showed a violation or
//! unexpected errors; 3 when none did but operations of safe strategies gave up under
//! contention (their retry budget ran out, [`LabReport::exit_code`]); 2 (an `Err` from [`run`])
//! for bad flags or an error that stopped the lab.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use crate::config::{self, ConfigError, LabConfig, Load};
use crate::cpu::Cpus;
use crate::db_target::{self, LockServices};
use crate::report::LabReport;
use crate::scenario::Scenario;

/// Arguments of `contend lab`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LabArgs {
    /// Database to run against [default: embedded SQLite in a temporary file]; or the nodes of
    /// one Galera cluster, comma separated (workers are spread over them round robin).
    #[arg(long, env = "DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,

    /// On a cluster, run the strategies that cannot be safe there (`advisory`, `serializable`,
    /// `mutex` on Galera) instead of skipping them with the reason, to show how they fail; they are
    /// then judged as unsafe baselines.
    #[arg(long)]
    pub allow_unsafe_on_cluster: bool,

    /// Scenarios to run, comma separated, or `all` [default: all]: withdraw, transfer, order,
    /// booking, get_or_create, queue, append (records every operation's history and checks it
    /// for isolation anomalies: G0, G1a, G1b, G1c, G-single, G2; each counts as a violation).
    #[arg(long, value_name = "LIST")]
    pub scenario: Option<String>,

    /// Strategies to run, comma separated, or `all` [default: all].
    #[arg(long, value_name = "LIST")]
    pub strategy: Option<String>,

    /// Concurrent workers per run, comma separated, e.g. 1,8,32,64 [default: 16].
    #[arg(long, value_name = "LIST")]
    pub workers: Option<String>,

    /// Operations per run, all workers together [default: 1000 unless --duration is given].
    #[arg(long, value_name = "N")]
    pub operations: Option<u64>,

    /// Time per run, e.g. 500ms, 10s, 2m (with --operations: whichever comes first).
    #[arg(long, value_name = "TIME")]
    pub duration: Option<String>,

    /// Runs of each combination [default: 1].
    #[arg(long, value_name = "N")]
    pub repeat: Option<u32>,

    /// Redis server for the `redis` and `redis-spin` strategies.
    #[arg(long, env = "REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,

    /// Redis servers for the `redlock` strategy, comma separated (an odd number, e.g. 5).
    #[arg(long, env = "REDLOCK_URLS", value_name = "URLS")]
    pub redlock_urls: Option<String>,

    /// etcd client URLs for the `etcd` strategy, comma separated (the members of one cluster,
    /// e.g. http://127.0.0.1:2379,http://127.0.0.1:22379,http://127.0.0.1:32379).
    #[arg(long, env = "ETCD_URLS", value_name = "URLS")]
    pub etcd_urls: Option<String>,

    /// Write the JSON document to stdout instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Also write the JSON document to FILE.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Also write a self-contained HTML page to FILE: throughput and p99 against workers per
    /// strategy, where strategies cross, a timeline of the runs, and the table.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,

    /// Print the full table (every column, about 230 characters wide) instead of the compact one
    /// that fits 120 columns.
    #[arg(long)]
    pub wide: bool,

    /// Do not show the progress bar.
    #[arg(long)]
    pub no_progress: bool,

    /// Drive running service instances over HTTP instead of a database, round robin: base URLs,
    /// comma separated, e.g. http://127.0.0.1:8081,http://127.0.0.1:8082 (scenarios transfer,
    /// order, withdraw; --database-url and the Redis flags are then the servers' business).
    #[arg(long, env = "CONTEND_TARGETS", value_name = "URLS")]
    pub target: Option<String>,

    /// The servers' admin token, for --target.
    #[arg(
        long,
        env = "CONTEND_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// CPUs to run on: `auto` keeps to one CPU on embedded SQLite (one write at a time: hopping
    /// between CPUs costs more than it gives) and uses every CPU otherwise; `one`; `all`.
    #[arg(long, value_enum, default_value_t = Cpus::Auto, value_name = "WHICH")]
    pub cpus: Cpus,
}

impl LabArgs {
    /// Validates the flags into a [`LabConfig`], given the scenario names that exist.
    ///
    /// ```
    /// use contend_lab::cli::LabArgs;
    /// let args = LabArgs { workers: Some("1,8".into()), ..LabArgs::default() };
    /// let config = args.into_config(&["withdraw"]).unwrap();
    /// assert_eq!(config.workers, vec![1, 8]);
    /// let bad = LabArgs { workers: Some("0".into()), ..LabArgs::default() };
    /// assert!(bad.into_config(&["withdraw"]).is_err());
    /// ```
    ///
    /// # Errors
    /// The first bad value, with the flag's name and what is expected.
    pub fn into_config(self, known_scenarios: &[&str]) -> Result<LabConfig, ConfigError> {
        let mut config = LabConfig::default();
        if let Some(url) = self.database_url.filter(|u| !u.trim().is_empty()) {
            config::check_database_url(&url)?;
            config.database_url = Some(url);
        }
        if let Some(s) = &self.scenario {
            config.scenarios = config::parse_scenarios(s, known_scenarios)?;
        }
        if let Some(s) = &self.strategy {
            config.strategies = config::parse_strategies(s)?;
        }
        if let Some(w) = &self.workers {
            config.workers = config::parse_workers(w)?;
        }
        if self.operations == Some(0) {
            return Err(ConfigError("--operations: must be at least 1".to_string()));
        }
        let duration = self
            .duration
            .as_deref()
            .map(config::parse_duration)
            .transpose()?;
        config.load = match (self.operations, duration) {
            (None, None) => config.load,
            (operations, duration) => Load {
                operations,
                duration,
            },
        };
        if let Some(repeat) = self.repeat {
            if !(1..=1000).contains(&repeat) {
                return Err(ConfigError(format!(
                    "--repeat: {repeat} is out of range (1 to 1000)"
                )));
            }
            config.repeat = repeat;
        }
        if let Some(url) = self.redis_url.filter(|u| !u.trim().is_empty()) {
            config::check_redis_url("--redis-url", url.trim())?;
            config.redis_url = Some(url.trim().to_string());
        }
        if let Some(urls) = self.redlock_urls.filter(|u| !u.trim().is_empty()) {
            let urls: Vec<String> = config::split_list(&urls)
                .into_iter()
                .map(String::from)
                .collect();
            for url in &urls {
                config::check_redis_url("--redlock-urls", url)?;
            }
            if urls.len().is_multiple_of(2) {
                return Err(ConfigError(format!(
                    "--redlock-urls: {} servers given; Redlock needs an odd number (e.g. 3 or 5)",
                    urls.len()
                )));
            }
            config.redlock_urls = urls;
        }
        if let Some(urls) = self.etcd_urls.filter(|u| !u.trim().is_empty()) {
            let urls: Vec<String> = config::split_list(&urls)
                .into_iter()
                .map(String::from)
                .collect();
            for url in &urls {
                config::check_etcd_url(url)?;
            }
            config.etcd_urls = urls;
        }
        config.json = self.json;
        // Checked before the run, not found unwritable after it (with --target, after it wrote
        // to the servers).
        for (flag, path) in [("--output", &self.output), ("--html", &self.html)] {
            if let Some(path) = path {
                config::check_output_file(flag, path)?;
            }
        }
        config.output = self.output;
        config.html = self.html;
        config.wide = self.wide;
        config.allow_unsafe_on_cluster = self.allow_unsafe_on_cluster;
        config.progress = !self.no_progress && !self.json;
        Ok(config)
    }
}

/// The scenarios of `config`, in its order (all of `registry` when it names none).
///
/// # Errors
/// A name that is not in `registry` (cannot happen after [`LabArgs::into_config`]).
pub fn select_scenarios(
    config: &LabConfig,
    registry: &[Arc<dyn Scenario>],
) -> anyhow::Result<Vec<Arc<dyn Scenario>>> {
    if config.scenarios.is_empty() {
        return Ok(registry.to_vec());
    }
    config
        .scenarios
        .iter()
        .map(|name| {
            registry
                .iter()
                .find(|s| s.name() == name)
                .cloned()
                .with_context(|| format!("unknown scenario `{name}`"))
        })
        .collect()
}

/// Runs the lab with the scenarios the lab has.
///
/// # Errors
/// Bad flags, an unreachable database or Redis, an unwritable `--output` file: the command
/// exits with status 2.
///
/// # Cancel safety
/// As [`db_target::run_lab`]: dropping it stops the current run's workers.
pub async fn run(args: LabArgs) -> anyhow::Result<ExitCode> {
    if args.target.as_deref().is_some_and(|t| !t.trim().is_empty()) {
        return crate::http_target::run(args).await;
    }
    run_with(args, crate::scenario::registry()).await
}

/// Runs the lab over the scenarios in `registry`: validates the flags, connects the lock
/// services, runs, writes the table and/or JSON, and returns the exit status.
///
/// # Errors
/// As [`run`].
///
/// # Cancel safety
/// As [`run`].
pub async fn run_with(args: LabArgs, registry: Vec<Arc<dyn Scenario>>) -> anyhow::Result<ExitCode> {
    if registry.is_empty() {
        anyhow::bail!("this build of the lab has no scenarios");
    }
    let names: Vec<&str> = registry.iter().map(|s| s.name()).collect();
    let config = args.into_config(&names)?;
    let mut report = run_config(&config, &registry).await?;
    report.cpus = crate::cpu::placed().cloned();
    emit(&config, &report)?;
    Ok(ExitCode::from(report.exit_code()))
}

/// Runs a validated configuration: connects the lock services it names, then the runs.
///
/// # Errors
/// An unreachable database or Redis.
///
/// # Cancel safety
/// As [`db_target::run_lab`].
pub async fn run_config(
    config: &LabConfig,
    registry: &[Arc<dyn Scenario>],
) -> anyhow::Result<LabReport> {
    let scenarios = select_scenarios(config, registry)?;
    let locks: LockServices = crate::lockstats::lock_services(config).await?;
    db_target::run_lab(config, &scenarios, &locks).await
}

/// Writes the report where `config` says: the table (compact, or full with `--wide`) or JSON
/// on stdout, JSON to `--output`, the HTML page to `--html`.
///
/// # Errors
/// An output file cannot be written.
pub fn emit(config: &LabConfig, report: &LabReport) -> anyhow::Result<()> {
    let json = report
        .to_json()
        .context("cannot encode the report as JSON")?;
    if let Some(path) = &config.output {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    if let Some(path) = &config.html {
        std::fs::write(path, crate::html::render(report))
            .with_context(|| format!("cannot write the HTML page to {}", path.display()))?;
    }
    let text = if config.json {
        format!("{json}\n")
    } else if config.wide {
        report.render()
    } else {
        report.render_compact()
    };
    print_out(&mut std::io::stdout().lock(), &text)
}

/// Writes `text` to `out` (stdout): a reader that went away (`contend lab | head`) is not an
/// error, and not a panic as with `println!`, so the files and the exit status still follow.
pub(crate) fn print_out(out: &mut impl Write, text: &str) -> anyhow::Result<()> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose reader went away, as stdout piped into `head` that exited.
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_stdout_is_not_an_error() {
        assert!(print_out(&mut ClosedPipe, "table\n").is_ok());
        let mut buf = Vec::new();
        print_out(&mut buf, "table\n").unwrap();
        assert_eq!(buf, b"table\n");
    }
}
