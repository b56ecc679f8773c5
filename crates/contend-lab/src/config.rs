//! [`LabConfig`]: the lab's settings, validated before any work starts (the command line's
//! raw strings become typed values here, and every mistake becomes one clear message).

use std::fmt;
use std::time::Duration;

use contend::Backend;
use contend::strategy::Strategy;

/// Operations per run when neither `--operations` nor `--duration` is given.
pub const DEFAULT_OPERATIONS: u64 = 1000;

/// Worker counts when `--workers` is not given: one worker (the cost of each strategy without
/// contention) would double the runs, so the default is a single contended level that shows
/// every race.
pub const DEFAULT_WORKERS: &[usize] = &[16];

/// The operations scenarios size their data for when a run is limited by `--duration` alone.
pub const DURATION_SIZING_OPERATIONS: u64 = 10_000;

/// Largest accepted worker count (each worker may hold a database connection).
pub const MAX_WORKERS: usize = 1024;

/// A bad command-line value: the message names the flag, the value and what is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// When a run stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Stop after this many operations (all workers together).
    pub operations: Option<u64>,
    /// Stop after this much time.
    pub duration: Option<Duration>,
}

impl Load {
    /// The operation count scenarios size their data for.
    pub fn sizing(&self) -> u64 {
        self.operations.unwrap_or(DURATION_SIZING_OPERATIONS)
    }
}

/// The lab's validated settings.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// The database URL (or the nodes of one Galera cluster, comma separated); `None` means a
    /// temporary SQLite file made (and removed) by the lab.
    pub database_url: Option<String>,
    /// Run strategies that cannot be safe on the database's cluster, as unsafe baselines,
    /// instead of skipping them (`--allow-unsafe-on-cluster`).
    pub allow_unsafe_on_cluster: bool,
    /// Scenario names to run, in order (empty: all that exist).
    pub scenarios: Vec<String>,
    /// Strategies to run, in order.
    pub strategies: Vec<Strategy>,
    /// Worker counts to run each combination with, in order.
    pub workers: Vec<usize>,
    /// When each run stops.
    pub load: Load,
    /// How many times each combination runs.
    pub repeat: u32,
    /// Single Redis node for `redis` and `redis-spin`.
    pub redis_url: Option<String>,
    /// Redis nodes for `redlock`.
    pub redlock_urls: Vec<String>,
    /// etcd members for `etcd`.
    pub etcd_urls: Vec<String>,
    /// Write the JSON document to stdout instead of the table.
    pub json: bool,
    /// Also write the JSON document to this file.
    pub output: Option<std::path::PathBuf>,
    /// Also write the HTML page ([`crate::html`]) to this file.
    pub html: Option<std::path::PathBuf>,
    /// Print the full table (every column) instead of the compact one.
    pub wide: bool,
    /// Show a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
}

impl Default for LabConfig {
    /// The default `contend lab`: temporary SQLite, every scenario and strategy, default load.
    fn default() -> Self {
        LabConfig {
            database_url: None,
            allow_unsafe_on_cluster: false,
            scenarios: Vec::new(),
            strategies: Strategy::ALL.to_vec(),
            workers: DEFAULT_WORKERS.to_vec(),
            load: Load {
                operations: Some(DEFAULT_OPERATIONS),
                duration: None,
            },
            repeat: 1,
            redis_url: None,
            redlock_urls: Vec::new(),
            etcd_urls: Vec::new(),
            json: false,
            output: None,
            html: None,
            wide: false,
            progress: true,
        }
    }
}

/// Splits a comma-separated list, dropping empty items and surrounding blanks.
pub fn split_list(s: &str) -> Vec<&str> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .collect()
}

/// Parses `--strategy none,atomic` (or `all`).
///
/// ```
/// use contend::strategy::Strategy;
/// let s = contend_lab::config::parse_strategies("none, atomic").unwrap();
/// assert_eq!(s, vec![Strategy::None, Strategy::Atomic]);
/// assert!(contend_lab::config::parse_strategies("bogus").is_err());
/// ```
///
/// # Errors
/// An unknown name, or an empty list.
pub fn parse_strategies(s: &str) -> Result<Vec<Strategy>, ConfigError> {
    let items = split_list(s);
    if items.is_empty() {
        return Err(bad(
            "--strategy: empty list (give names such as none,atomic, or all)",
        ));
    }
    if items.iter().any(|x| x.eq_ignore_ascii_case("all")) {
        return Ok(Strategy::ALL.to_vec());
    }
    let mut out = Vec::new();
    for item in items {
        let strategy = item
            .parse::<Strategy>()
            .map_err(|e| bad(format!("--strategy: {e}")))?;
        if !out.contains(&strategy) {
            out.push(strategy);
        }
    }
    Ok(out)
}

/// Parses `--workers 1,8,32`.
///
/// ```
/// assert_eq!(contend_lab::config::parse_workers("1, 8,32").unwrap(), vec![1, 8, 32]);
/// assert!(contend_lab::config::parse_workers("0").is_err());
/// assert!(contend_lab::config::parse_workers("eight").is_err());
/// ```
///
/// # Errors
/// A value that is not a whole number from 1 to [`MAX_WORKERS`], or an empty list.
pub fn parse_workers(s: &str) -> Result<Vec<usize>, ConfigError> {
    let items = split_list(s);
    if items.is_empty() {
        return Err(bad("--workers: empty list (give counts such as 1,8,32)"));
    }
    let mut out = Vec::new();
    for item in items {
        let n: usize = item.parse().map_err(|_| {
            bad(format!(
                "--workers: `{item}` is not a whole number (expected counts such as 1,8,32)"
            ))
        })?;
        if n == 0 || n > MAX_WORKERS {
            return Err(bad(format!(
                "--workers: {n} is out of range (1 to {MAX_WORKERS})"
            )));
        }
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

/// Parses a duration: `500ms`, `10s`, `1.5s`, `2m`, or a bare number of seconds.
///
/// ```
/// use std::time::Duration;
/// use contend_lab::config::parse_duration;
/// assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
/// assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
/// assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
/// assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
/// assert!(parse_duration("soon").is_err());
/// assert!(parse_duration("0s").is_err());
/// ```
///
/// # Errors
/// Anything else, a zero or negative duration, or more than a day.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let t = s.trim();
    let (number, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" | "sec" | "secs" => 1.0,
        "m" | "min" => 60.0,
        _ => {
            return Err(bad(format!(
                "--duration: unknown unit in `{s}` (expected e.g. 500ms, 10s, 2m)"
            )));
        }
    };
    let value: f64 = number.trim().parse().map_err(|_| {
        bad(format!(
            "--duration: `{s}` is not a duration (expected e.g. 500ms, 10s, 2m)"
        ))
    })?;
    let secs = value * scale;
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 {
        return Err(bad(format!(
            "--duration: `{s}` is out of range (more than 0, at most a day)"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Checks a Redis URL's scheme.
///
/// # Errors
/// An `--etcd-urls` entry that is not an etcd client URL (`http://host:port`).
pub fn check_etcd_url(url: &str) -> Result<(), ConfigError> {
    let ok = url.strip_prefix("http://").is_some_and(|rest| {
        rest.trim_end_matches('/')
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "--etcd-urls: `{url}` is not an etcd client URL (expected http://host:port)"
        )))
    }
}

/// Refuses an output file (`--output`, `--html`, `--json`) that cannot be written, before any
/// load is spent on a report that could not be kept: an empty path, a directory, or a file in a
/// directory that does not exist.
///
/// ```
/// use contend_lab::config::check_output_file;
/// assert!(check_output_file("--html", std::path::Path::new("report.html")).is_ok());
/// let e = check_output_file("--html", std::path::Path::new("/no/such/dir/r.html")).unwrap_err();
/// assert!(e.to_string().contains("--html: cannot write /no/such/dir/r.html: no directory"));
/// ```
///
/// # Errors
/// What is wrong with the path, naming `flag`.
pub fn check_output_file(flag: &str, path: &std::path::Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(bad(format!("{flag}: no file given")));
    }
    if path.is_dir() {
        return Err(bad(format!(
            "{flag}: cannot write {}: it is a directory",
            path.display()
        )));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(bad(format!(
            "{flag}: cannot write {}: no directory {}",
            path.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// A URL that does not start with `redis://`, `rediss://` or `redis+unix://`.
pub fn check_redis_url(flag: &str, url: &str) -> Result<(), ConfigError> {
    let ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
        .iter()
        .any(|p| url.starts_with(p));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "{flag}: `{}` is not a Redis URL (expected redis://host:port/db)",
            contend::backend::redact_url(url)
        )))
    }
}

/// Checks a database URL names a supported backend; a comma-separated list must name nodes of
/// one backend that can have several (MySQL/MariaDB: the nodes of a Galera cluster, confirmed
/// when the lab connects).
///
/// ```
/// use contend_lab::config::check_database_url;
/// assert!(check_database_url("mysql://root@127.0.0.1:1/app,mysql://root@127.0.0.1:2/app").is_ok());
/// assert!(check_database_url("postgres://h1/app,postgres://h2/app").is_err());
/// ```
///
/// # Errors
/// An unsupported scheme, backends mixed, or several URLs of a backend without clusters.
pub fn check_database_url(url: &str) -> Result<Backend, ConfigError> {
    let urls = contend::nodes::split_urls(url);
    contend::nodes::check_urls(&urls).map_err(|e| bad(format!("--database-url: {e}")))
}

/// Checks scenario names against those that exist (`all` means every one).
///
/// # Errors
/// An unknown name, or an empty list.
pub fn parse_scenarios(s: &str, known: &[&str]) -> Result<Vec<String>, ConfigError> {
    let items = split_list(s);
    if items.is_empty() {
        return Err(bad(
            "--scenario: empty list (give names such as withdraw, or all)",
        ));
    }
    if items.iter().any(|x| x.eq_ignore_ascii_case("all")) {
        return Ok(Vec::new());
    }
    let mut out: Vec<String> = Vec::new();
    for item in items {
        let name = item.to_ascii_lowercase().replace('-', "_");
        if !known.contains(&name.as_str()) {
            return Err(bad(format!(
                "--scenario: unknown scenario `{item}` (expected one of: {})",
                known.join(", ")
            )));
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_all_and_dedup() {
        assert_eq!(parse_strategies("all").unwrap().len(), Strategy::ALL.len());
        assert_eq!(
            parse_strategies("atomic,atomic,redis_spin").unwrap(),
            vec![Strategy::Atomic, Strategy::RedisSpin]
        );
        assert!(parse_strategies(" , ").is_err());
        let e = parse_strategies("atomic,optimstic").unwrap_err();
        assert!(e.0.contains("optimstic"), "{e}");
    }

    #[test]
    fn workers_range() {
        assert!(parse_workers("1025").is_err());
        assert!(parse_workers("-1").is_err());
        assert_eq!(parse_workers("64,8,64").unwrap(), vec![64, 8]);
    }

    #[test]
    fn durations() {
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(
            parse_duration(" 250 ms ").unwrap(),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn scenarios_known() {
        let known = ["withdraw", "get_or_create"];
        assert_eq!(
            parse_scenarios("get-or-create", &known).unwrap(),
            vec!["get_or_create".to_string()]
        );
        assert!(parse_scenarios("all", &known).unwrap().is_empty());
        assert!(
            parse_scenarios("nope", &known)
                .unwrap_err()
                .0
                .contains("withdraw")
        );
    }

    #[test]
    fn urls() {
        assert!(check_redis_url("--redis-url", "http://x").is_err());
        assert!(check_etcd_url("http://127.0.0.1:2379").is_ok());
        assert!(check_etcd_url("redis://127.0.0.1:2379").is_err());
        assert!(check_etcd_url("http://127.0.0.1").is_err());
        assert!(check_redis_url("--redis-url", "redis://127.0.0.1:6379/0").is_ok());
        assert!(check_database_url("oracle://x").is_err());
    }
}
