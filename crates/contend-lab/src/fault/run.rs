//! The run loop: one phase per fault x backend. Every strategy of the phase runs at the same
//! time on tables of its own, as two instances (two executors with their own connection pools,
//! in-process mutexes and lock clients, as two service processes would have), under the same
//! fault; then the ledger and the books are read back and each run is accounted
//! ([`super::ledger::account`]).
//!
//! A worker runs the lab's `transfer` plan through the lab's executor. When an attempt gets no
//! answer, the worker does what a careful client does: it reconnects, looks the operation's id
//! up in the ledger, and tries again (same id) only if it is absent.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use contend::strategy::{Executor, Strategy};
use contend::{Backend, Db, Error};
use contend_redis::{LockClient, LockOptions, RedisLocks, Redlock, SpinLock};
use tokio::task::JoinSet;

use super::books::{Books, accounts_of};
use super::freeze;
use super::inject::{self, FaultLog, Window};
use super::ledger::{self, Answer, Counts, OpRecord, Tracker};
use super::proxy::DelayProxy;
use super::timeline::Timeline;
use super::{Fault, RunRow, database_name};
use crate::db_target::lab_executor;
use crate::scenario::transfer::apply_result;
use crate::scenario::{Ctx, LabError};

/// Redis namespace of the suite's locks.
pub const NAMESPACE: &str = "contend-faults";

/// The lock servers of the lock strategies: Redis, and etcd.
#[derive(Debug, Clone, Default)]
pub struct RedisUrls {
    /// The single node of `redis` and `redis-spin`.
    pub single: Option<String>,
    /// The nodes of `redlock`.
    pub redlock: Vec<String>,
    /// The etcd members of `etcd`.
    pub etcd: Vec<String>,
}

/// One phase: a fault, a database, the strategies that run under it.
#[derive(Debug, Clone)]
pub struct Phase {
    /// The fault.
    pub fault: Fault,
    /// The database URL (the real server; the latency fault puts its proxy in front), or the
    /// nodes of a Galera cluster, comma-separated (the workers' connections are spread over
    /// them, `contend::nodes`).
    pub url: String,
    /// The strategies, all run at once.
    pub strategies: Vec<Strategy>,
    /// Workers per strategy, split over two instances.
    pub workers: usize,
    /// How long operations are started.
    pub duration: Duration,
    /// How long after that a worker may still retry the operation it has in hand.
    pub grace: Duration,
    /// The Redis servers.
    pub redis: RedisUrls,
    /// A shell command that must succeed before the phase starts: it returns once the
    /// database is up (a cluster started in the background).
    pub ready: Option<String>,
}

/// How long one attempt may take before the client gives up on its answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause after an attempt that definitely failed for want of a server.
const BACKOFF: Duration = Duration::from_millis(50);

/// The lock options of the suite: leases far longer than an operation, waits bounded so that a
/// Redis node that is down fails operations rather than stalling them.
fn lock_options() -> LockOptions {
    LockOptions::new()
        .lease(Duration::from_secs(5))
        .wait(Duration::from_secs(5))
}

/// One instance's executor: the lab's, with lock clients of its own for the Redis and etcd
/// strategies. On a cluster it also runs the strategies the cluster makes unsafe (`mutex`, the
/// baseline that must break there).
async fn instance_executor(
    strategy: Strategy,
    redis: &RedisUrls,
    cluster: bool,
) -> anyhow::Result<Executor> {
    let mut executor = lab_executor()
        .lock_wait(Duration::from_secs(5))
        .allow_unsafe_on_cluster(cluster);
    let single = || async {
        let url = redis
            .single
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("`{strategy}` needs --redis-url"))?;
        anyhow::Ok(
            LockClient::builder(url)
                .namespace(NAMESPACE)
                .connect()
                .await?,
        )
    };
    match strategy {
        Strategy::Redis => {
            let lock = RedisLocks::single(single().await?, lock_options());
            executor = executor.lock_service(strategy, Arc::new(lock));
        }
        Strategy::RedisSpin => {
            let spin = SpinLock::new(&single().await?).retry_interval(Duration::from_millis(10));
            let lock = RedisLocks::spin(spin, lock_options());
            executor = executor.lock_service(strategy, Arc::new(lock));
        }
        Strategy::Redlock => {
            anyhow::ensure!(!redis.redlock.is_empty(), "`redlock` needs --redlock-urls");
            let quorum = Redlock::builder(&redis.redlock)
                .namespace(NAMESPACE)
                .connect()
                .await?;
            let lock = RedisLocks::redlock(quorum, lock_options());
            executor = executor.lock_service(strategy, Arc::new(lock));
        }
        Strategy::Etcd => {
            executor = executor.lock_service(strategy, etcd_locks(&redis.etcd).await?);
        }
        _ => {}
    }
    Ok(executor)
}

/// The workers' etcd locks: the lease and wait of [`lock_options`].
#[cfg(feature = "etcd")]
async fn etcd_locks(urls: &[String]) -> anyhow::Result<Arc<dyn contend::lock::LockService>> {
    anyhow::ensure!(!urls.is_empty(), "`etcd` needs --etcd-urls");
    let locks = contend_etcd::EtcdLocks::builder(urls)
        .namespace(NAMESPACE)
        .lease_ttl(Duration::from_secs(5))
        .wait(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(Arc::new(locks))
}

#[cfg(not(feature = "etcd"))]
async fn etcd_locks(_urls: &[String]) -> anyhow::Result<Arc<dyn contend::lock::LockService>> {
    anyhow::bail!(crate::lockstats::NO_ETCD)
}

/// What one attempt's result tells the client.
pub fn classify(result: &Result<(), LabError>) -> Answer {
    match result {
        Ok(()) => Answer::Ok,
        Err(LabError::Refused(_)) => Answer::Refused,
        Err(LabError::Db(e)) => classify_error(e),
    }
}

/// A short name for what an attempt met, for the report's error counts.
fn error_kind(e: &LabError) -> String {
    match e {
        LabError::Refused(why) => format!("refused: {why}"),
        LabError::Db(e) => match e {
            Error::Connect { .. } => "cannot connect".into(),
            Error::Unavailable(_) => "no connection".into(),
            Error::LockService(_) => "lock service down".into(),
            Error::LockNotAcquired { .. } => "lock not acquired".into(),
            Error::Conflict { kind, .. } => format!("conflict: {kind}"),
            Error::StaleFencingToken { .. } => "stale fencing token".into(),
            Error::Database(sqlx::Error::Database(db)) => {
                format!("database error {}", db.code().unwrap_or_default())
            }
            Error::Database(_) => "connection lost".into(),
            Error::TransactionBroken(_) => "transaction broken".into(),
            other => other.to_string().chars().take(40).collect(),
        },
    }
}

/// Connection-level failures are unknown (the commit may have happened); errors that came
/// before anything was sent, or that the server answered by rolling back, are definite.
fn classify_error(e: &Error) -> Answer {
    match e {
        Error::Connect { .. }
        | Error::Unavailable(_)
        | Error::LockService(_)
        | Error::LockNotAcquired { .. } => Answer::Transient,
        Error::Conflict { .. }
        | Error::StaleFencingToken { .. }
        | Error::Unsupported { .. }
        | Error::InvalidUrl { .. }
        | Error::NestedTransaction
        | Error::Aborted(_) => Answer::Rejected,
        Error::Database(sqlx::Error::Database(db)) => {
            let code = db.code().unwrap_or_default();
            // 08: connection exception; 57P0x: the server is shutting down or terminated the
            // connection; 70100: MariaDB's "connection was killed" / "query interrupted".
            if code.starts_with("08") || code.starts_with("57P") || code == "70100" {
                Answer::Unknown
            } else {
                Answer::Rejected
            }
        }
        _ => Answer::Unknown,
    }
}

/// One worker: operations until `end`, each retried as a careful client would until it is
/// settled or `give_up` passes.
async fn worker(
    ctx: Ctx,
    books: Books,
    ids: Arc<AtomicU64>,
    in_flight: Arc<AtomicU64>,
    end: Instant,
    give_up: Instant,
) -> (Vec<OpRecord>, BTreeMap<String, u64>) {
    let db = ctx.db.clone();
    let mut session = db.session();
    let mut out = Vec::new();
    let mut errors = BTreeMap::new();
    while Instant::now() < end {
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let mut op = Tracker::new(id);
        while !op.settled() && Instant::now() < give_up {
            if op.pending_unknown() {
                // The last answer was lost: was it applied?
                match tokio::time::timeout(Duration::from_secs(2), books.applied(&db, id)).await {
                    Ok(Ok(found)) => {
                        op.looked_up(found, Instant::now());
                        if found {
                            break;
                        }
                    }
                    _ => {
                        tokio::time::sleep(BACKOFF).await;
                        continue;
                    }
                }
            }
            let started = Instant::now();
            in_flight.fetch_add(1, Ordering::Relaxed);
            let attempt = apply_result(&ctx, &mut session, books.plan(id));
            let answer = match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
                Ok((result, _)) => {
                    if let Err(e) = &result {
                        *errors.entry(error_kind(e)).or_insert(0) += 1;
                    }
                    classify(&result)
                }
                // Given up waiting: the attempt's connection is closed with the future.
                Err(_) => {
                    *errors.entry("timeout".to_string()).or_insert(0) += 1;
                    Answer::Unknown
                }
            };
            in_flight.fetch_sub(1, Ordering::Relaxed);
            op.answer(answer, started, Instant::now());
            match answer {
                Answer::Unknown => session = db.session(),
                Answer::Transient => tokio::time::sleep(BACKOFF).await,
                _ => {}
            }
        }
        out.push(op.finish());
    }
    (out, errors)
}

/// One strategy's run inside a phase.
struct Run {
    strategy: Strategy,
    books: Books,
    workers: JoinSet<(Vec<OpRecord>, BTreeMap<String, u64>)>,
}

/// A database for the workers of one instance.
async fn worker_db(url: &str, workers: usize) -> anyhow::Result<Db> {
    Ok(Db::builder(url)
        .max_connections(workers as u32 + 2)
        .acquire_timeout(Duration::from_secs(3))
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?)
}

/// The URL with its host and port replaced by `addr`.
pub(crate) fn through(url: &str, addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut u = reqwest::Url::parse(url)?;
    u.set_host(Some(&addr.ip().to_string()))
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    u.set_port(Some(addr.port()))
        .map_err(|()| anyhow::anyhow!("{url}: cannot set a port"))?;
    Ok(u.to_string())
}

/// The server address of a database URL.
pub(crate) async fn server_addr(url: &str) -> anyhow::Result<std::net::SocketAddr> {
    let u = reqwest::Url::parse(url)?;
    let host = u
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("{url}: no host"))?;
    let port = u
        .port()
        .or_else(|| match Backend::from_url(url).ok()? {
            Backend::Postgres => Some(5432),
            Backend::MySql => Some(3306),
            _ => None,
        })
        .ok_or_else(|| anyhow::anyhow!("{url}: no port"))?;
    tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{url}: {host} does not resolve"))
}

/// Runs one phase and accounts each strategy's run.
///
/// # Errors
/// The database cannot be reached before the load, or the books cannot be read back after it
/// (the rows of the phase are then missing from the report, and the error says why).
///
/// # Cancel safety
/// Not cancel-safe: a dropped phase may leave its tables and a restart command behind.
pub async fn run_phase(
    phase: &Phase,
    on_progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<Vec<RunRow>> {
    let backend = Backend::from_url(&phase.url)?;
    if let Some(command) = &phase.ready {
        let (ok, output) = inject::shell(command).await;
        anyhow::ensure!(ok, "`{command}` failed: the database is not up. {output}");
    }
    let nodes = contend::nodes::split_urls(&phase.url);
    let cluster = nodes.len() > 1;
    let admin = inject::admin(&phase.url).await?;
    // Latency: a proxy in front of each node.
    let mut proxies = Vec::new();
    if let Fault::Latency { .. } = phase.fault {
        for node in &nodes {
            proxies.push(DelayProxy::start(server_addr(node).await?).await?);
        }
    }
    let url = if proxies.is_empty() {
        phase.url.clone()
    } else {
        nodes
            .iter()
            .zip(&proxies)
            .map(|(node, p)| through(node, p.addr()))
            .collect::<anyhow::Result<Vec<_>>>()?
            .join(",")
    };

    let mut runs = Vec::new();
    for &strategy in &phase.strategies {
        let books = Books::new(&format!(
            "{}_{}_{}",
            phase.fault.name(),
            database_name(&phase.url, backend),
            strategy
        ));
        books.setup(&admin).await?;
        if strategy.needs_lock_service() {
            contend::fencing::ensure_schema(&admin).await?;
        }
        runs.push((strategy, books));
    }
    // Every node has the tables and opening balances before the load starts.
    admin.catch_up().await?;

    let in_flight = Arc::new(AtomicU64::new(0));
    let mut instances = Vec::new();
    for (strategy, books) in &runs {
        let per = phase.workers.div_ceil(2).max(1);
        let mut pair = Vec::new();
        for _ in 0..2 {
            let db = worker_db(&url, per).await?;
            let executor = instance_executor(*strategy, &phase.redis, cluster).await?;
            pair.push((db, executor));
        }
        instances.push((*strategy, books.clone(), pair, per));
    }

    on_progress(&format!(
        "{} on {}: {} strategies x {} workers for {:.1} s",
        phase.fault.name(),
        database_name(&phase.url, backend),
        runs.len(),
        phase.workers,
        phase.duration.as_secs_f64()
    ));
    let start = Instant::now();
    let end = start + phase.duration;
    let give_up = end + phase.grace;
    let window = Window {
        start,
        end,
        in_flight: in_flight.clone(),
    };
    let mut started = Vec::new();
    for (strategy, books, pair, per) in instances {
        let ids = Arc::new(AtomicU64::new(1));
        let mut workers = JoinSet::new();
        for w in 0..phase.workers {
            let (db, executor) = &pair[w % 2];
            let ctx = Ctx {
                db: db.clone(),
                strategy,
                workers: per,
                operations: 0,
                executor: executor.clone(),
                run_id: books.accounts.clone(),
                history: None,
            };
            workers.spawn(worker(
                ctx,
                books.clone(),
                ids.clone(),
                in_flight.clone(),
                end,
                give_up,
            ));
        }
        started.push(Run {
            strategy,
            books,
            workers,
        });
    }

    let targets: Vec<(Strategy, Books)> = started
        .iter()
        .map(|r| (r.strategy, r.books.clone()))
        .collect();
    let log = inject_fault(phase, &window, &proxies, &targets).await;
    let mut rows = Vec::new();
    let mut outcomes = Vec::new();
    for mut run in started {
        let mut records = Vec::new();
        let mut errors = BTreeMap::new();
        while let Some(done) = run.workers.join_next().await {
            let (ops, errs) = done?;
            records.extend(ops);
            for (k, n) in errs {
                *errors.entry(k).or_insert(0) += n;
            }
        }
        let mut row_extra = None;
        if let Some((_, frozen)) = log.holders.iter().find(|(s, _)| *s == run.strategy) {
            row_extra = Some(frozen_effect(frozen, &mut records));
        }
        outcomes.push((run.strategy, run.books, records, errors, row_extra));
    }
    drop(proxies);

    // The server may still be coming back (a cluster: every node back in it): wait for it
    // before reading the books, and on a cluster until every node has applied everything.
    let admin = settle(&phase.url).await?;
    admin.catch_up().await?;
    for (strategy, books, records, errors, frozen) in outcomes {
        let applied = books.applications(&admin).await?;
        let mut invariants = books.invariants(&admin).await?;
        if cluster {
            invariants.push(nodes_agree(&books, &nodes).await?);
        }
        let mut r = row(
            phase,
            backend,
            strategy,
            &records,
            &applied,
            &invariants,
            &log,
        );
        r.errors = errors;
        r.timeline = Timeline::build(start, phase.duration, &records, &applied, &log.injected);
        if let Some((late_writes, others, detail)) = frozen {
            // Unfenced, a frozen holder's write goes through: the spin lock is the baseline.
            r.expected_safe = strategy != Strategy::RedisSpin;
            r.violations += late_writes;
            r.fault_observed &= others > 0;
            r.violation_details
                .extend((late_writes > 0).then(|| detail.clone()));
            r.injected = format!("{}; {detail}", r.injected);
        }
        rows.push(r);
        books.drop(&admin).await?;
    }
    Ok(rows)
}

/// The injector of the phase's fault, next to the load.
async fn inject_fault(
    phase: &Phase,
    window: &Window,
    proxies: &[DelayProxy],
    runs: &[(Strategy, Books)],
) -> FaultLog {
    match &phase.fault {
        Fault::LockFreeze { bin } => {
            tokio::time::sleep_until(window.at(freeze::FREEZE_AT).into()).await;
            let mut log = FaultLog::default();
            log.in_flight.push(window.in_flight.load(Ordering::Relaxed));
            log.injected.push(Instant::now());
            let servers = freeze::LockServers {
                redis: phase.redis.single.as_deref(),
                redlock: &phase.redis.redlock,
                etcd: &phase.redis.etcd,
            };
            let holders =
                runs.iter()
                    .filter(|(s, _)| freeze::freezes(*s))
                    .map(|(s, books)| async move {
                        let frozen = freeze::freeze_holder(
                            bin,
                            *s,
                            &phase.url,
                            servers,
                            books,
                            freeze::HOLDER_OP,
                        )
                        .await
                        .map_err(|e| format!("{e:#}"));
                        (*s, frozen)
                    });
            log.holders = futures_util::future::join_all(holders).await;
            log.observed = log
                .holders
                .iter()
                .all(|(_, f)| f.as_ref().is_ok_and(|f| f.seen_stopped));
            log.effect = format!(
                "a separate `contend` process took the lock of two accounts (lease {} ms, etcd \
                 {} ms), was frozen with SIGSTOP before its write for {} ms (etcd {} ms) and \
                 resumed with SIGCONT; {}",
                freeze::HOLDER_LEASE.as_millis(),
                freeze::ETCD_HOLDER_LEASE.as_millis(),
                freeze::FREEZE.as_millis(),
                freeze::ETCD_FREEZE.as_millis(),
                log.holders
                    .iter()
                    .map(|(s, f)| match f {
                        Ok(f) => format!(
                            "{s}: tokens {}, {}seen stopped, then `{}`",
                            f.token,
                            if f.seen_stopped { "" } else { "NOT " },
                            f.said
                        ),
                        Err(e) => format!("{s}: {e}"),
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            log
        }
        Fault::KillConnections { every } => {
            inject::kill_connections(&phase.url, window, *every).await
        }
        Fault::Latency { delay } => inject::latency(proxies, window, *delay).await,
        Fault::DbRestart { command } => inject::restart_db(&phase.url, window, command).await,
        Fault::NodeRestart { url, node, command } => {
            inject::restart_node(url, *node, &phase.url, window, command).await
        }
        Fault::RedisRestart { url, command } => inject::restart_redis(url, window, command).await,
    }
}

/// A frozen holder's operation, added to its run's records; returns its late writes (1 when
/// its write was applied although other operations on its accounts committed after its lease
/// ran out and before it was resumed), how many such operations there were, and the story.
fn frozen_effect(
    frozen: &Result<freeze::Frozen, String>,
    records: &mut Vec<OpRecord>,
) -> (u64, u64, String) {
    let f = match frozen {
        Ok(f) => f,
        Err(e) => return (0, 0, format!("the holder failed: {e}")),
    };
    let (a, b) = accounts_of(f.op);
    let others = records
        .iter()
        .filter(|r| {
            let (x, y) = accounts_of(r.id);
            (x == a || x == b || y == a || y == b)
                && r.acked
                    .is_some_and(|(s, e)| s >= f.lease_over && e <= f.resumed)
        })
        .count() as u64;
    let mut op = Tracker::new(f.op);
    op.answer(f.answer, f.resumed, f.resumed);
    records.push(op.finish());
    let late = u64::from(f.answer == Answer::Ok && others > 0);
    let detail = format!(
        "{others} operations on the holder's accounts committed between its lease's end and its \
         resumption; its late write (tokens {}) was {}",
        f.token,
        if f.answer == Answer::Ok {
            "APPLIED (a double write under one lock)"
        } else {
            "rejected"
        }
    );
    (late, others, detail)
}

/// Whether every node of a cluster holds the same books as the first one (after
/// [`Db::catch_up`]): a node that rejoined by state transfer must have every committed
/// operation.
async fn nodes_agree(
    books: &Books,
    nodes: &[String],
) -> anyhow::Result<crate::scenario::Invariant> {
    let mut readings = Vec::new();
    for node in nodes {
        let db = inject::admin(node).await?;
        let applied = books.applications(&db).await?;
        let balances = books.balances(&db).await?;
        db.close().await;
        readings.push((applied, balances));
    }
    let differ: Vec<String> = nodes
        .iter()
        .zip(&readings)
        .skip(1)
        .filter(|(_, r)| **r != readings[0])
        .map(|(node, (applied, _))| {
            format!(
                "{} ({} operations, first node {})",
                contend::backend::redact_url(node),
                applied.len(),
                readings[0].0.len()
            )
        })
        .collect();
    Ok(crate::scenario::invariant(
        "nodes_agree",
        differ.len() as u64,
        if differ.is_empty() {
            format!("{} nodes hold the same ledger and balances", nodes.len())
        } else {
            format!("nodes that differ from the first: {}", differ.join(", "))
        },
    ))
}

/// A connection to the database once it answers again (30 s at most).
async fn settle(url: &str) -> anyhow::Result<Db> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match inject::admin(url).await {
            Ok(db) => match db
                .query_scalar::<i64>("SELECT 1")
                .fetch_one(db.pool())
                .await
            {
                Ok(_) => return Ok(db),
                Err(e) if Instant::now() >= end => return Err(e.into()),
                Err(_) => {}
            },
            Err(e) if Instant::now() >= end => return Err(e),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The report row of one run.
fn row(
    phase: &Phase,
    backend: Backend,
    strategy: Strategy,
    records: &[OpRecord],
    applied: &HashMap<u64, u64>,
    invariants: &[crate::scenario::Invariant],
    log: &FaultLog,
) -> RunRow {
    let counts: Counts = ledger::account(records, applied);
    let acked: Vec<(Instant, Instant)> = records.iter().filter_map(|r| r.acked).collect();
    let recovery = if log.recovers {
        ledger::recovery_after(&log.injected, &acked)
    } else {
        None
    };
    let mut details: Vec<String> = invariants
        .iter()
        .filter(|i| !i.ok)
        .map(|i| format!("{}: {}", i.name, i.detail))
        .collect();
    if counts.failed_but_applied > 0 {
        details.push(format!(
            "failed_but_applied: {} operations reported failed were applied",
            counts.failed_but_applied
        ));
    }
    if counts.unexpected > 0 {
        details.push(format!(
            "unexpected: {} ids no client sent",
            counts.unexpected
        ));
    }
    let violations = invariants.iter().map(|i| i.violations).sum::<u64>()
        + counts.failed_but_applied
        + counts.unexpected;
    RunRow {
        fault: phase.fault.name().to_string(),
        strategy: strategy.as_str().to_string(),
        backend: database_name(&phase.url, backend).to_string(),
        expected_safe: strategy.safe_across_processes(),
        violations,
        violation_details: details,
        recovered: !log.recovers || recovery.is_some(),
        ..RunRow::measured(&counts, log, recovery)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_url_keeps_everything_but_the_address() {
        let addr: std::net::SocketAddr = "127.0.0.1:40001".parse().unwrap();
        assert_eq!(
            through("postgres://postgres@127.0.0.1:5432/app", addr).unwrap(),
            "postgres://postgres@127.0.0.1:40001/app"
        );
        assert_eq!(
            through("mysql://root:pw@localhost/app?x=1", addr).unwrap(),
            "mysql://root:pw@127.0.0.1:40001/app?x=1"
        );
    }

    #[test]
    fn lost_connections_are_unknown_and_refusals_definite() {
        let io = LabError::Db(Error::Database(sqlx::Error::Io(std::io::Error::other(
            "reset",
        ))));
        assert_eq!(classify(&Err(io)), Answer::Unknown);
        assert_eq!(classify(&Err(LabError::Refused("no"))), Answer::Refused);
        let conflict = LabError::Db(Error::Conflict {
            kind: contend::ConflictKind::Deadlock,
            source: None,
        });
        assert_eq!(classify(&Err(conflict)), Answer::Rejected);
        let down = LabError::Db(Error::Unavailable(sqlx::Error::PoolTimedOut));
        assert_eq!(classify(&Err(down)), Answer::Transient);
        assert_eq!(classify(&Ok(())), Answer::Ok);
    }
}
