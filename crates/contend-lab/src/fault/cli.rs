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
use crate::cli::print_out;

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
    /// Comma-separated client URLs of an etcd cluster: the `etcd` strategy under lock-freeze
    /// (needs a build with the `etcd` feature).
    #[arg(long, value_delimiter = ',')]
    pub etcd_urls: Vec<String>,
    /// The nodes of a MariaDB Galera cluster, comma-separated `mysql://` URLs (throwaway
    /// servers): kill-connections, latency and node-restart on them.
    #[arg(long)]
    pub galera_urls: Option<String>,
    /// Shell command that restarts the PostgreSQL server (e.g. `scripts/services restart pg`).
    #[arg(long)]
    pub restart_pg: Option<String>,
    /// Shell command that restarts the MariaDB server.
    #[arg(long)]
    pub restart_mysql: Option<String>,
    /// Shell command that kills and restarts the Redis node of --redis-url.
    #[arg(long)]
    pub restart_redis: Option<String>,
    /// Shell command that restarts one Galera node and returns once it has rejoined; `{node}`
    /// in it is replaced by the node's number in --galera-urls (1-based; the last node is
    /// restarted), e.g. `scripts/services restart galera:{node}`.
    #[arg(long)]
    pub restart_galera: Option<String>,
    /// Shell command run before the first Galera phase, which must succeed: it returns once the
    /// cluster is up (scripts/faults starts the cluster in the background, and the Galera
    /// phases run after the others).
    #[arg(long)]
    pub galera_ready: Option<String>,
    /// Faults to inject: kill-connections, latency, db-restart, node-restart, redis-restart,
    /// lock-freeze, instance-kill (default: every one whose servers and commands are given).
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<String>,
    /// Strategies (default: none, mutex, atomic, pessimistic, optimistic, serializable; without
    /// --quick also advisory and batched; on Galera the same without serializable and
    /// advisory, which it refuses; redis and redlock under redis-restart, redis, redis-spin,
    /// redlock and etcd under lock-freeze, atomic behind the instances of instance-kill).
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

const FAULTS: [&str; 7] = [
    "kill-connections",
    "latency",
    "db-restart",
    "node-restart",
    "redis-restart",
    "lock-freeze",
    "instance-kill",
];

/// Checks what the flags name before anything runs: each database URL is of its flag's backend,
/// the Redis URLs are Redis URLs, no command is empty, and `--contend-bin` is a file.
fn check_flags(args: &FaultArgs) -> anyhow::Result<()> {
    for (flag, url, backend, scheme) in [
        (
            "--pg-url",
            &args.pg_url,
            contend::Backend::Postgres,
            "postgres://",
        ),
        (
            "--mysql-url",
            &args.mysql_url,
            contend::Backend::MySql,
            "mysql:// or mariadb://",
        ),
    ] {
        if let Some(url) = url {
            anyhow::ensure!(
                contend::Backend::from_url(url).ok() == Some(backend)
                    && contend::nodes::split_urls(url).len() == 1,
                "{flag}: `{}` is not one {scheme} URL",
                contend::backend::redact_url(url)
            );
        }
    }
    if let Some(url) = &args.redis_url {
        crate::config::check_redis_url("--redis-url", url).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    for url in &args.redlock_urls {
        crate::config::check_redis_url("--redlock-urls", url)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    for (flag, command) in [
        ("--restart-pg", &args.restart_pg),
        ("--restart-mysql", &args.restart_mysql),
        ("--restart-redis", &args.restart_redis),
        ("--restart-galera", &args.restart_galera),
        ("--galera-ready", &args.galera_ready),
    ] {
        anyhow::ensure!(
            command.as_deref().is_none_or(|c| !c.trim().is_empty()),
            "{flag}: empty command (give a shell command, e.g. `scripts/services restart pg`)"
        );
    }
    if let Some(bin) = &args.contend_bin {
        anyhow::ensure!(
            bin.is_file(),
            "--contend-bin: no file {} (give the path of a contend binary)",
            bin.display()
        );
    }
    Ok(())
}

/// The phases `args` ask for, or why they cannot run.
pub fn plan(args: &FaultArgs) -> anyhow::Result<(Vec<Planned>, Vec<String>)> {
    check_flags(args)?;
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
    let galera = match &args.galera_urls {
        Some(list) => Some(galera_nodes(list)?),
        None => None,
    };
    let galera_url = galera.as_ref().map(|nodes| nodes.join(","));
    anyhow::ensure!(
        !dbs.is_empty() || galera.is_some(),
        "give --pg-url, --mysql-url and/or --galera-urls (throwaway servers)"
    );
    for url in &args.etcd_urls {
        crate::config::check_etcd_url(url).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    #[cfg(not(feature = "etcd"))]
    anyhow::ensure!(
        args.etcd_urls.is_empty(),
        "--etcd-urls: {}",
        crate::lockstats::NO_ETCD
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
        let mut chosen: Vec<Strategy> = Vec::new();
        for name in &args.strategy {
            let s = name.parse::<Strategy>()?;
            if !chosen.contains(&s) {
                chosen.push(s);
            }
        }
        chosen
    };
    let redis = RedisUrls {
        single: args.redis_url.clone(),
        redlock: args.redlock_urls.clone(),
        etcd: args.etcd_urls.clone(),
    };
    if strategies.iter().any(|s| s.needs_redis())
        && redis.single.is_none()
        && redis.redlock.is_empty()
    {
        anyhow::bail!("the Redis strategies need --redis-url / --redlock-urls");
    }
    if strategies.contains(&Strategy::Etcd) && redis.etcd.is_empty() {
        anyhow::bail!("the etcd strategy needs --etcd-urls");
    }
    let phase = |fault: Fault, url: &String, strategies: Vec<Strategy>| Phase {
        fault,
        url: url.clone(),
        strategies,
        workers,
        duration: Duration::from_secs_f64(secs),
        grace: Duration::from_secs(15),
        redis: redis.clone(),
        ready: None,
    };
    let mut phases = Vec::new();
    let mut skipped = Vec::new();
    // What Galera refuses (`Executor::check_db`) is left out there; `mutex` stays as the
    // baseline that breaks.
    let galera_strategies: Vec<Strategy> = strategies
        .iter()
        .copied()
        .filter(|s| !matches!(s, Strategy::Serializable | Strategy::Advisory))
        .collect();
    if galera.is_some() && galera_strategies.len() < strategies.len() {
        skipped.push(
            "serializable and advisory on galera: refused on a cluster (they order \
             transactions of one node only)"
                .into(),
        );
    }
    let every = Duration::from_millis(if args.quick { 400 } else { 250 });
    let delay = Duration::from_millis(5);
    if wanted("kill-connections") {
        for (_, url, _) in &dbs {
            phases.push(phase(
                Fault::KillConnections { every },
                url,
                strategies.clone(),
            ));
        }
    }
    if wanted("latency") {
        for (_, url, _) in &dbs {
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
    // The Galera phases come after the single servers' (the cluster may still be starting).
    let mut cluster_phases = Vec::new();
    if let Some(url) = &galera_url {
        if wanted("kill-connections") {
            cluster_phases.push(phase(
                Fault::KillConnections { every },
                url,
                galera_strategies.clone(),
            ));
        }
        if wanted("latency") {
            cluster_phases.push(phase(
                Fault::Latency { delay },
                url,
                galera_strategies.clone(),
            ));
        }
    }
    if wanted("node-restart") {
        match (&galera, &galera_url, &args.restart_galera) {
            (Some(nodes), Some(url), Some(command)) => {
                let node = nodes.len();
                cluster_phases.push(phase(
                    Fault::NodeRestart {
                        url: nodes[node - 1].clone(),
                        node,
                        command: command.replace("{node}", &node.to_string()),
                    },
                    url,
                    galera_strategies.clone(),
                ));
            }
            (None, ..) if explicit => anyhow::bail!("node-restart needs --galera-urls"),
            (Some(_), _, None) if explicit => {
                anyhow::bail!("node-restart needs --restart-galera")
            }
            (Some(_), _, None) => {
                skipped.push("node-restart on galera: no --restart-galera".into())
            }
            _ => {}
        }
    }
    for p in &mut cluster_phases {
        p.ready = args.galera_ready.clone();
    }
    // The faults below run on the first single server.
    let first = dbs.first().map(|(_, url, _)| *url);
    if wanted("redis-restart") {
        match (first, &args.redis_url, &args.restart_redis) {
            (Some(db), Some(url), Some(command)) => {
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
                    db,
                    s,
                ));
            }
            _ if explicit => anyhow::bail!(
                "redis-restart needs --pg-url or --mysql-url, --redis-url and --restart-redis"
            ),
            _ => skipped.push("redis-restart: no --redis-url / --restart-redis".into()),
        }
    }
    let bin = match &args.contend_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("finding the contend binary")?,
    };
    if wanted("lock-freeze") {
        let mut s = Vec::new();
        if args.redis_url.is_some() {
            s.extend([Strategy::Redis, Strategy::RedisSpin]);
        }
        if !args.redlock_urls.is_empty() {
            s.push(Strategy::Redlock);
        }
        if !args.etcd_urls.is_empty() {
            s.push(Strategy::Etcd);
        }
        match first {
            Some(db) if !s.is_empty() => {
                let mut p = phase(Fault::LockFreeze { bin: bin.clone() }, db, s);
                p.duration = p.duration.max(super::freeze::phase_duration(&p.strategies));
                phases.push(p);
            }
            _ if explicit => anyhow::bail!(
                "lock-freeze needs --pg-url or --mysql-url, and --redis-url or --etcd-urls"
            ),
            _ => skipped.push("lock-freeze: no --redis-url / --etcd-urls".into()),
        }
    }
    phases.extend(cluster_phases);
    let mut planned: Vec<Planned> = phases.into_iter().map(Planned::Db).collect();
    if wanted("instance-kill") {
        match first {
            Some(db) => planned.push(Planned::Service(ServicePhase {
                url: db.clone(),
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
            })),
            None if explicit => anyhow::bail!("instance-kill needs --pg-url or --mysql-url"),
            None => skipped.push("instance-kill: no --pg-url / --mysql-url".into()),
        }
    }
    Ok((planned, skipped))
}

/// The nodes of `--galera-urls`: at least two `mysql://` URLs.
fn galera_nodes(list: &str) -> anyhow::Result<Vec<String>> {
    let nodes = contend::nodes::split_urls(list);
    anyhow::ensure!(
        nodes.len() >= 2,
        "--galera-urls: give the nodes of one cluster, comma-separated (got {} URL)",
        nodes.len()
    );
    for node in &nodes {
        anyhow::ensure!(
            matches!(
                contend::Backend::from_url(node),
                Ok(contend::Backend::MySql)
            ),
            "--galera-urls: `{}` is not a mysql:// URL",
            contend::backend::redact_url(node)
        );
    }
    Ok(nodes)
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
        let servers = super::freeze::LockServers {
            redis: args.redis_url.as_deref(),
            redlock: &args.redlock_urls,
            etcd: &args.etcd_urls,
        };
        super::freeze::hold(
            strategy.parse()?,
            url,
            servers,
            &args.hold_tag,
            args.hold_op,
        )
        .await?;
        return Ok(ExitCode::SUCCESS);
    }
    let (phases, skipped) = plan(&args)?;
    for (flag, path) in [("--json", &args.json), ("--html", &args.html)] {
        if let Some(path) = path {
            crate::config::check_output_file(flag, path)?;
        }
    }
    // The single servers must answer now (the Galera nodes may still be starting, behind
    // --galera-ready): an unreachable one is a bad flag, not a failed phase.
    for (flag, url) in [("--pg-url", &args.pg_url), ("--mysql-url", &args.mysql_url)] {
        if let Some(url) = url {
            let db = contend::Db::builder(url)
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect()
                .await
                .with_context(|| flag.to_string())?;
            db.pool().close().await;
        }
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
    print_out(
        &mut std::io::stdout().lock(),
        &format!("{}\n", report::render(&report)),
    )?;
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
    use crate::config::check_output_file;
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

    const GALERA: &str =
        "mysql://root@127.0.0.1:1/app,mysql://root@127.0.0.1:2/app,mysql://root@127.0.0.1:3/app";

    #[test]
    fn the_galera_phases_come_last_without_what_galera_refuses() {
        let (phases, skipped) = plan(&parse(&[
            "--pg-url",
            "postgres://x@127.0.0.1:1/app",
            "--galera-urls",
            GALERA,
            "--restart-galera",
            "scripts/services restart galera:{node}",
            "--galera-ready",
            "true",
            "--quick",
        ]))
        .unwrap();
        let names: Vec<(&str, String)> = phases
            .iter()
            .map(|p| {
                (
                    p.name(),
                    crate::fault::database_name(p.url(), contend::Backend::MySql).into(),
                )
            })
            .collect();
        let expected = [
            ("kill-connections", "mysql"),
            ("latency", "mysql"),
            ("kill-connections", "galera"),
            ("latency", "galera"),
            ("node-restart", "galera"),
            ("instance-kill", "mysql"),
        ];
        let expected: Vec<(&str, String)> =
            expected.iter().map(|(f, d)| (*f, d.to_string())).collect();
        assert_eq!(names, expected);
        assert!(
            skipped
                .iter()
                .any(|s| s.contains("serializable and advisory")),
            "{skipped:?}"
        );
        for p in &phases[2..5] {
            let Planned::Db(p) = p else {
                panic!("a database phase")
            };
            assert_eq!(p.url, GALERA);
            assert_eq!(p.ready.as_deref(), Some("true"));
            assert_eq!(
                p.strategies,
                [
                    Strategy::None,
                    Strategy::Mutex,
                    Strategy::Atomic,
                    Strategy::Pessimistic,
                    Strategy::Optimistic
                ]
            );
        }
        let Planned::Db(restart) = &phases[4] else {
            panic!("a database phase")
        };
        assert_eq!(
            restart.fault,
            Fault::NodeRestart {
                url: "mysql://root@127.0.0.1:3/app".into(),
                node: 3,
                command: "scripts/services restart galera:3".into(),
            }
        );
        let Planned::Db(first) = &phases[0] else {
            panic!("a database phase")
        };
        assert!(first.ready.is_none() && first.strategies.contains(&Strategy::Serializable));

        // The cluster alone: the faults that need one server are skipped, saying so.
        let (phases, skipped) = plan(&parse(&["--galera-urls", GALERA])).unwrap();
        let names: Vec<&str> = phases.iter().map(Planned::name).collect();
        assert_eq!(names, ["kill-connections", "latency"]);
        assert!(
            skipped.iter().any(|s| s.contains("instance-kill")),
            "{skipped:?}"
        );
    }

    #[test]
    fn lock_freeze_runs_every_lock_given_long_enough_for_the_slowest() {
        let argv = [
            "--pg-url",
            "postgres://x@127.0.0.1:1/app",
            "--redis-url",
            "redis://127.0.0.1:2",
            "--etcd-urls",
            "http://127.0.0.1:3,http://127.0.0.1:4",
            "--faults",
            "lock-freeze",
            "--quick",
        ];
        let args = parse(&argv);
        assert_eq!(args.etcd_urls.len(), 2);
        let result = plan(&args);
        #[cfg(feature = "etcd")]
        {
            let (phases, _) = result.unwrap();
            let Planned::Db(p) = &phases[0] else {
                panic!("a database phase")
            };
            assert_eq!(
                p.strategies,
                [Strategy::Redis, Strategy::RedisSpin, Strategy::Etcd]
            );
            assert_eq!(p.redis.etcd, ["http://127.0.0.1:3", "http://127.0.0.1:4"]);
            assert_eq!(
                p.duration,
                super::super::freeze::phase_duration(&p.strategies)
            );
            assert!(p.duration > Duration::from_secs(6));
        }
        #[cfg(not(feature = "etcd"))]
        assert!(result.unwrap_err().to_string().contains("--features etcd"));
        // Without etcd the quick phase still outlasts the Redis holders' freeze.
        let (phases, _) = plan(&parse(
            &argv[..4]
                .iter()
                .chain(&argv[6..])
                .copied()
                .collect::<Vec<_>>(),
        ))
        .unwrap();
        let Planned::Db(p) = &phases[0] else {
            panic!("a database phase")
        };
        assert_eq!(p.strategies, [Strategy::Redis, Strategy::RedisSpin]);
        assert_eq!(p.duration, Duration::from_millis(4375));
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
        assert!(check_output_file("--html", &dir.path().join("faults.html")).is_ok());
        let missing = dir.path().join("no-such-dir").join("faults.html");
        assert!(
            check_output_file("--html", &missing)
                .unwrap_err()
                .to_string()
                .contains("no directory")
        );
        assert!(
            check_output_file("--html", dir.path())
                .unwrap_err()
                .to_string()
                .contains("is a directory")
        );
        assert!(parse(&["--html", "f.html"]).html.is_some());
        let one = "mysql://root@127.0.0.1:1/app";
        assert!(err(&["--galera-urls", one]).contains("--galera-urls"));
        let pgs = "postgres://x@127.0.0.1:1/app,postgres://x@127.0.0.1:2/app";
        assert!(err(&["--galera-urls", pgs]).contains("not a mysql:// URL"));
        assert!(
            err(&["--galera-urls", GALERA, "--faults", "node-restart"])
                .contains("--restart-galera")
        );
        assert!(err(&["--pg-url", pg, "--faults", "node-restart"]).contains("--galera-urls"));
        assert!(err(&["--pg-url", pg, "--etcd-urls", "redis://x:1"]).contains("etcd client URL"));
        assert!(
            err(&["--pg-url", pg, "--strategy", "etcd"]).contains("--etcd-urls"),
            "{}",
            err(&["--pg-url", pg, "--strategy", "etcd"])
        );
        // URLs of the wrong kind for their flag, empty commands, a missing binary: refused
        // before any phase runs (they used to run, or fail phase by phase with exit 1).
        let my = "mysql://root@127.0.0.1:1/app";
        for (argv, expected) in [
            (
                vec!["--pg-url", "garbage"],
                "--pg-url: `garbage` is not one postgres:// URL",
            ),
            (
                vec!["--pg-url", my],
                "--pg-url: `mysql://root@127.0.0.1:1/app` is not one",
            ),
            (
                vec!["--mysql-url", pg],
                "--mysql-url: `postgres://x@127.0.0.1:1/app` is not",
            ),
            (
                vec!["--pg-url", "postgres://a/x,postgres://b/x"],
                "is not one postgres://",
            ),
            (vec!["--pg-url", pg, "--redis-url", "nope"], "--redis-url"),
            (
                vec!["--pg-url", pg, "--redlock-urls", "redis://a:1,x"],
                "--redlock-urls",
            ),
            (
                vec!["--pg-url", pg, "--restart-pg", " "],
                "--restart-pg: empty command",
            ),
            (
                vec!["--pg-url", pg, "--restart-redis", ""],
                "--restart-redis: empty command",
            ),
            (
                vec!["--pg-url", pg, "--contend-bin", "/no/such/contend"],
                "--contend-bin: no file",
            ),
        ] {
            let e = err(&argv);
            assert!(e.contains(expected), "{argv:?}: {e}");
        }
        // A strategy named twice runs once.
        let (phases, _) = plan(&parse(&[
            "--pg-url",
            pg,
            "--faults",
            "latency",
            "--strategy",
            "atomic,atomic",
        ]))
        .unwrap();
        assert!(matches!(&phases[0], Planned::Db(p) if p.strategies == [Strategy::Atomic]));
    }

    #[tokio::test]
    async fn an_unreachable_database_is_refused_before_any_phase() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let url = format!("postgres://x@127.0.0.1:{port}/app");
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("faults.json");
        let args = parse(&[
            "--pg-url",
            &url,
            "--faults",
            "latency",
            "--json",
            json.to_str().unwrap(),
        ]);
        let e = format!("{:#}", run(args).await.unwrap_err());
        assert!(e.starts_with("--pg-url: "), "{e}");
        assert!(!json.exists(), "no report for a run that could not start");
    }
}
