//! `contend faults`: the flags, the plan of phases, and the entry point.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use contend::strategy::Strategy;

use super::report::{self, FaultReport};
use super::run::{Phase, RedisUrls, run_phase};
use super::service::{ServicePhase, run_instance_kill};
use super::{Fault, RunRow};

/// Arguments of `contend faults`.
#[derive(Debug, Clone, clap::Args)]
pub struct FaultArgs {
    /// PostgreSQL URL (its server is restarted, its connections killed: a throwaway server).
    #[arg(long)]
    pub pg_url: Option<String>,
    /// MariaDB/MySQL URL (a throwaway server, as for --pg-url).
    #[arg(long)]
    pub mysql_url: Option<String>,
    /// Redis URL of the `redis` and `redis-spin` strategies (the node `redis-restart` restarts).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Comma-separated Redis URLs of the `redlock` strategy.
    #[arg(long, value_delimiter = ',')]
    pub redlock_urls: Vec<String>,
    /// Shell command that restarts the PostgreSQL server (e.g. `scripts/services restart pg`).
    #[arg(long)]
    pub restart_pg: Option<String>,
    /// Shell command that restarts the MariaDB server.
    #[arg(long)]
    pub restart_mysql: Option<String>,
    /// Shell command that kills and restarts the Redis node of --redis-url.
    #[arg(long)]
    pub restart_redis: Option<String>,
    /// Faults to inject: kill-connections, latency, db-restart, redis-restart, lock-freeze,
    /// instance-kill (default: every one whose servers and commands are given).
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<String>,
    /// Strategies (default: none, mutex, atomic, pessimistic, optimistic, serializable; without
    /// --quick also advisory and batched; redis and redlock under redis-restart, redis,
    /// redis-spin and redlock under lock-freeze, atomic behind the instances of instance-kill).
    #[arg(long, value_delimiter = ',')]
    pub strategy: Vec<String>,
    /// The small size CI runs (3 s per phase, 8 workers per strategy).
    #[arg(long)]
    pub quick: bool,
    /// Workers per strategy, split over two instances (default 8 quick, 16 otherwise).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Seconds of load per phase (default 3 quick, 8 otherwise).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also write the report as one self-contained HTML page to this file (the verdict table,
    /// and per phase a timeline of acknowledged operations with the injections marked).
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// The `contend` binary whose `serve` the instance-kill phase runs and that holds the
    /// lock of lock-freeze (default: this one).
    #[arg(long)]
    pub contend_bin: Option<PathBuf>,
    /// Internal (lock-freeze): run as the lock holder under this strategy, then exit.
    #[arg(long, hide = true)]
    pub hold_lock: Option<String>,
    /// Internal (lock-freeze): the holder's tables.
    #[arg(long, hide = true, default_value = "")]
    pub hold_tag: String,
    /// Internal (lock-freeze): the holder's operation id.
    #[arg(long, hide = true, default_value_t = 0)]
    pub hold_op: u64,
}

/// A phase of the plan.
#[derive(Debug, Clone)]
pub enum Planned {
    /// Workers on the database through the lab's executor.
    Db(Phase),
    /// Clients of two `contend serve` instances.
    Service(ServicePhase),
}

impl Planned {
    fn name(&self) -> &'static str {
        match self {
            Planned::Db(p) => p.fault.name(),
            Planned::Service(_) => "instance-kill",
        }
    }

    fn url(&self) -> &str {
        match self {
            Planned::Db(p) => &p.url,
            Planned::Service(p) => &p.url,
        }
    }
}

const FAULTS: [&str; 6] = [
    "kill-connections",
    "latency",
    "db-restart",
    "redis-restart",
    "lock-freeze",
    "instance-kill",
];

/// The phases `args` ask for, or why they cannot run.
pub fn plan(args: &FaultArgs) -> anyhow::Result<(Vec<Planned>, Vec<String>)> {
    let dbs: Vec<(&str, &String, Option<&String>)> = [
        ("pg", args.pg_url.as_ref(), args.restart_pg.as_ref()),
        (
            "mysql",
            args.mysql_url.as_ref(),
            args.restart_mysql.as_ref(),
        ),
    ]
    .into_iter()
    .filter_map(|(n, u, r)| u.map(|u| (n, u, r)))
    .collect();
    anyhow::ensure!(
        !dbs.is_empty(),
        "give --pg-url and/or --mysql-url (throwaway servers)"
    );
    for f in &args.faults {
        anyhow::ensure!(
            FAULTS.contains(&f.as_str()),
            "unknown fault `{f}` (expected one of: {})",
            FAULTS.join(", ")
        );
    }
    let explicit = !args.faults.is_empty();
    let wanted = |f: &str| !explicit || args.faults.iter().any(|x| x == f);
    let (workers, secs) = if args.quick { (8, 3.0) } else { (16, 8.0) };
    let workers = args.workers.unwrap_or(workers);
    anyhow::ensure!((2..=256).contains(&workers), "--workers must be 2..=256");
    let secs = args.duration.unwrap_or(secs);
    anyhow::ensure!(
        secs.is_finite() && (0.5..=600.0).contains(&secs),
        "--duration must be 0.5..=600 seconds"
    );
    let strategies: Vec<Strategy> = if args.strategy.is_empty() {
        let mut s = vec![
            Strategy::None,
            Strategy::Mutex,
            Strategy::Atomic,
            Strategy::Pessimistic,
            Strategy::Optimistic,
            Strategy::Serializable,
        ];
        if !args.quick {
            s.extend([Strategy::Advisory, Strategy::Batched]);
        }
        s
    } else {
        args.strategy
            .iter()
            .map(|s| s.parse::<Strategy>())
            .collect::<Result<_, _>>()?
    };
    let redis = RedisUrls {
        single: args.redis_url.clone(),
        redlock: args.redlock_urls.clone(),
    };
    if strategies.iter().any(|s| s.needs_redis())
        && redis.single.is_none()
        && redis.redlock.is_empty()
    {
        anyhow::bail!("the Redis strategies need --redis-url / --redlock-urls");
    }
    let phase = |fault: Fault, url: &String, strategies: Vec<Strategy>| Phase {
        fault,
        url: url.clone(),
        strategies,
        workers,
        duration: Duration::from_secs_f64(secs),
        grace: Duration::from_secs(15),
        redis: redis.clone(),
    };
    let mut phases = Vec::new();
    let mut skipped = Vec::new();
    let every = Duration::from_millis(if args.quick { 400 } else { 250 });
    for (_, url, _) in &dbs {
        if wanted("kill-connections") {
            phases.push(phase(
                Fault::KillConnections { every },
                url,
                strategies.clone(),
            ));
        }
    }
    for (_, url, _) in &dbs {
        if wanted("latency") {
            let delay = Duration::from_millis(5);
            phases.push(phase(Fault::Latency { delay }, url, strategies.clone()));
        }
    }
    for (name, url, restart) in &dbs {
        if !wanted("db-restart") {
            continue;
        }
        match restart {
            Some(command) => phases.push(phase(
                Fault::DbRestart {
                    command: (*command).clone(),
                },
                url,
                strategies.clone(),
            )),
            None if explicit => anyhow::bail!("db-restart on {name} needs --restart-{name}"),
            None => skipped.push(format!("db-restart on {name}: no --restart-{name}")),
        }
    }
    if wanted("redis-restart") {
        match (&args.redis_url, &args.restart_redis) {
            (Some(url), Some(command)) => {
                // The lock strategies and the baselines, on the first database.
                let mut s = vec![Strategy::None, Strategy::Mutex, Strategy::Redis];
                if !args.redlock_urls.is_empty() {
                    s.push(Strategy::Redlock);
                }
                phases.push(phase(
                    Fault::RedisRestart {
                        url: url.clone(),
                        command: command.clone(),
                    },
                    dbs[0].1,
                    s,
                ));
            }
            _ if explicit => anyhow::bail!("redis-restart needs --redis-url and --restart-redis"),
            _ => skipped.push("redis-restart: no --redis-url / --restart-redis".into()),
        }
    }
    let bin = match &args.contend_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("finding the contend binary")?,
    };
    if wanted("lock-freeze") {
        match &args.redis_url {
            Some(_) => {
                let mut s = vec![Strategy::Redis, Strategy::RedisSpin];
                if !args.redlock_urls.is_empty() {
                    s.push(Strategy::Redlock);
                }
                phases.push(phase(Fault::LockFreeze { bin: bin.clone() }, dbs[0].1, s));
            }
            None if explicit => anyhow::bail!("lock-freeze needs --redis-url"),
            None => skipped.push("lock-freeze: no --redis-url".into()),
        }
    }
    let mut planned: Vec<Planned> = phases.into_iter().map(Planned::Db).collect();
    if wanted("instance-kill") {
        planned.push(Planned::Service(ServicePhase {
            url: dbs[0].1.clone(),
            bin,
            strategy: Strategy::Atomic,
            // Twice the workers: more requests are open on an instance when it is killed.
            clients: workers * 2,
            // Twice as long: requests through the delayed link are slow, and the load after
            // the last kill shows the recovery.
            duration: Duration::from_secs_f64((secs * 2.0).max(4.0)),
            // Keys held by a killed instance stay in flight for their lease (120 s): clients
            // give up on those after this and report them unknown.
            grace: Duration::from_secs(3),
        }));
    }
    Ok((planned, skipped))
}

/// Refuses an output file whose directory does not exist, before minutes of load are spent
/// on a report that cannot be written.
fn writable(path: &std::path::Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    anyhow::ensure!(
        dir.is_dir(),
        "cannot write {}: no directory {}",
        path.display(),
        dir.display()
    );
    anyhow::ensure!(
        !path.is_dir(),
        "cannot write {}: it is a directory",
        path.display()
    );
    Ok(())
}

/// Runs `contend faults`: exit status 0 when every run passed, 1 when one failed (see
/// [`report`]); an `Err` (exit 2) for bad flags.
///
/// # Cancel safety
/// Not cancel-safe: a dropped run may leave tables and a restart command behind.
pub async fn run(args: FaultArgs) -> anyhow::Result<ExitCode> {
    if let Some(strategy) = &args.hold_lock {
        let url = args
            .pg_url
            .as_deref()
            .or(args.mysql_url.as_deref())
            .ok_or_else(|| anyhow::anyhow!("--hold-lock needs a database URL"))?;
        super::freeze::hold(
            strategy.parse()?,
            url,
            args.redis_url.as_deref(),
            &args.redlock_urls,
            &args.hold_tag,
            args.hold_op,
        )
        .await?;
        return Ok(ExitCode::SUCCESS);
    }
    let (phases, skipped) = plan(&args)?;
    for path in [&args.json, &args.html].into_iter().flatten() {
        writable(path)?;
    }
    for s in &skipped {
        eprintln!("[faults] skipped: {s}");
    }
    let t0 = Instant::now();
    let total = phases.len();
    let mut runs: Vec<RunRow> = Vec::new();
    let mut errors = Vec::new();
    for (i, phase) in phases.iter().enumerate() {
        let progress = |msg: &str| {
            eprintln!("[faults] {}/{total} {msg}", i + 1);
        };
        let started = Instant::now();
        let result = match phase {
            Planned::Db(p) => run_phase(p, &progress).await,
            Planned::Service(p) => run_instance_kill(p, &progress).await,
        };
        match result {
            Ok(rows) => {
                for r in &rows {
                    let v = report::verdict(r);
                    eprintln!(
                        "[faults]     {:<13} ack {:>6} failed {:>4} unknown {:>3} no-answer {:>4} lost {} dup {} viol {}  {:?}",
                        r.strategy,
                        r.acknowledged,
                        r.failed,
                        r.unknown,
                        r.no_answer,
                        r.lost,
                        r.duplicated,
                        r.violations,
                        v
                    );
                }
                eprintln!(
                    "[faults]     {} ({:.1} s)",
                    rows.first().map_or("", |r| r.injected.as_str()),
                    started.elapsed().as_secs_f64()
                );
                runs.extend(rows);
            }
            Err(e) => {
                let msg = format!("{} on {}: {e:#}", phase.name(), phase.url());
                eprintln!("[faults] ERROR {msg}");
                errors.push(msg);
            }
        }
    }
    let report = FaultReport { runs, errors };
    println!("{}", report::render(&report));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.html {
        std::fs::write(path, crate::html::faults::render(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let ok = report::passed(&report);
    // Repeated last, where a truncated log (a CI tail) still shows them.
    for r in report.runs.iter().filter(|r| report::verdict(r).fails()) {
        eprintln!(
            "[faults] {}: {} / {} / {} (ack {}, unknown {}, lost {}, dup {}, viol {})",
            report::verdict(r).label(),
            r.fault,
            r.backend,
            r.strategy,
            r.acknowledged,
            r.unknown,
            r.lost,
            r.duplicated,
            r.violations
        );
    }
    for e in &report.errors {
        eprintln!("[faults] ERROR {e}");
    }
    eprintln!(
        "[faults] {} in {:.1} s",
        if ok { "passed" } else { "FAILED" },
        t0.elapsed().as_secs_f64()
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: FaultArgs,
    }

    fn parse(argv: &[&str]) -> FaultArgs {
        Cmd::parse_from(std::iter::once("faults").chain(argv.iter().copied())).args
    }

    #[test]
    fn the_plan_follows_the_servers_and_commands_given() {
        let (phases, skipped) = plan(&parse(&[
            "--pg-url",
            "postgres://x@127.0.0.1:1/app",
            "--quick",
        ]))
        .unwrap();
        let names: Vec<&str> = phases.iter().map(Planned::name).collect();
        assert_eq!(names, ["kill-connections", "latency", "instance-kill"]);
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(phases.iter().all(|p| match p {
            Planned::Db(p) => p.workers == 8,
            Planned::Service(p) => p.clients == 16,
        }));

        let (phases, _) = plan(&parse(&[
            "--pg-url",
            "postgres://x@127.0.0.1:1/app",
            "--restart-pg",
            "true",
            "--redis-url",
            "redis://127.0.0.1:2",
            "--restart-redis",
            "true",
            "--faults",
            "db-restart,redis-restart,lock-freeze",
        ]))
        .unwrap();
        let names: Vec<&str> = phases.iter().map(Planned::name).collect();
        assert_eq!(names, ["db-restart", "redis-restart", "lock-freeze"]);
        assert!(matches!(&phases[1], Planned::Db(p) if p.strategies.contains(&Strategy::Redis)));
    }

    #[test]
    fn bad_flags_are_refused_with_the_reason() {
        let err = |argv: &[&str]| plan(&parse(argv)).unwrap_err().to_string();
        assert!(err(&[]).contains("--pg-url"));
        let pg = "postgres://x@127.0.0.1:1/app";
        assert!(err(&["--pg-url", pg, "--faults", "meteor"]).contains("unknown fault"));
        assert!(err(&["--pg-url", pg, "--faults", "db-restart"]).contains("--restart-pg"));
        assert!(err(&["--pg-url", pg, "--workers", "1"]).contains("--workers"));
        assert!(err(&["--pg-url", pg, "--duration", "0"]).contains("--duration"));
        assert!(err(&["--pg-url", pg, "--strategy", "bogus"]).contains("unknown strategy"));
        assert!(err(&["--pg-url", pg, "--strategy", "redis"]).contains("Redis"));
        let dir = tempfile::tempdir().unwrap();
        assert!(writable(&dir.path().join("faults.html")).is_ok());
        let missing = dir.path().join("no-such-dir").join("faults.html");
        assert!(
            writable(&missing)
                .unwrap_err()
                .to_string()
                .contains("no directory")
        );
        assert!(
            writable(dir.path())
                .unwrap_err()
                .to_string()
                .contains("is a directory")
        );
        assert!(parse(&["--html", "f.html"]).html.is_some());
    }
}
