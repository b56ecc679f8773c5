//! Scenario tests: for each scenario, the unsafe baseline breaks an invariant under concurrent
//! load, and every safe strategy keeps all invariants over repeated runs, on SQLite always and on
//! PostgreSQL/MariaDB when `CONTEND_PG_URL` / `CONTEND_MYSQL_URL` are set, and on PostgreSQL
//! through pgbouncer (transaction pooling) when `CONTEND_PGBOUNCER_URL` is set.
//!
//! A small driver stands in for the lab runner: W tasks take operation numbers from a shared
//! counter, then the scenario checks its invariants.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use contend::strategy::{Executor, Strategy};
use contend::{Backend, Db};

use contend::lock::LockService;

use super::{Ctx, Invariant, Outcome, Scenario, Totals};

/// A database for `backend`, or `None` (after printing "skipped: ...") when its server is not
/// configured. Panics when it is not configured and servers are required
/// (`contend_test_support::servers_required`).
pub(crate) async fn open(backend: Backend) -> Option<(Db, Option<tempfile::TempDir>)> {
    open_on(backend, false).await
}

/// [`open`], or with `pgbouncer` the PostgreSQL behind `CONTEND_PGBOUNCER_URL` (transaction
/// pooling), with contend's pooler setting (`?pgbouncer=true`).
pub(crate) async fn open_on(
    backend: Backend,
    pgbouncer: bool,
) -> Option<(Db, Option<tempfile::TempDir>)> {
    let (url, dir) = match backend {
        Backend::Postgres if pgbouncer => {
            let url = contend_test_support::env_url("CONTEND_PGBOUNCER_URL")?;
            let sep = if url.contains('?') { '&' } else { '?' };
            (format!("{url}{sep}pgbouncer=true"), None)
        }
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temporary folder");
            let url = format!("sqlite:{}", dir.path().join("lab.db").display());
            (url, Some(dir))
        }
        _ => {
            let var = if backend == Backend::Postgres {
                "CONTEND_PG_URL"
            } else {
                "CONTEND_MYSQL_URL"
            };
            (contend_test_support::env_url(var)?, None)
        }
    };
    // SQLite has one writer at a time: with more connections than that, writers collide and
    // wait in SQLite's busy handler, whose sleeps (up to 100 ms each) would make the runs slow
    // for nothing. A few connections keep the waiting in the pool's queue; the unsafe
    // baseline still interleaves reads and writes (each statement takes its own connection).
    let connections = if backend == Backend::Sqlite { 4 } else { 24 };
    let db = Db::builder(&url)
        .max_connections(connections)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {backend}: {e}"));
    Some((db, dir))
}

/// The result of one driven run.
pub(crate) struct Driven {
    pub totals: Totals,
    pub invariants: Vec<Invariant>,
    pub errors: Vec<String>,
    pub fenced_rejections: u64,
}

impl Driven {
    pub fn violations(&self) -> u64 {
        self.invariants
            .iter()
            .map(|i| if i.ok { 0 } else { i.violations.max(1) })
            .sum()
    }

    pub fn describe(&self) -> String {
        let inv: Vec<String> = self
            .invariants
            .iter()
            .map(|i| format!("{}={} ({})", i.name, i.ok, i.detail))
            .collect();
        format!(
            "succeeded {} refused {} errors {} fenced {} [{}] first errors {:?}",
            self.totals.succeeded,
            self.totals.refused,
            self.totals.errors,
            self.fenced_rejections,
            inv.join("; "),
            self.errors.iter().take(3).collect::<Vec<_>>()
        )
    }
}

/// Runs `operations` operations of `scenario` under `strategy` with `workers` tasks.
pub(crate) async fn drive(
    scenario: Arc<dyn Scenario>,
    db: &Db,
    strategy: Strategy,
    workers: usize,
    operations: u64,
) -> Driven {
    drive_with(scenario, db, strategy, None, workers, operations).await
}

/// The lab's executor, with `lock` as the lock service of `strategy` when given.
pub(crate) fn executor(strategy: Strategy, lock: Option<Arc<dyn LockService>>) -> Executor {
    let executor = crate::db_target::lab_executor();
    match lock {
        Some(lock) => executor.lock_service(strategy, lock),
        None => executor,
    }
}

/// [`drive`] with a lock service for the lock-based strategies.
pub(crate) async fn drive_with(
    scenario: Arc<dyn Scenario>,
    db: &Db,
    strategy: Strategy,
    lock: Option<Arc<dyn LockService>>,
    workers: usize,
    operations: u64,
) -> Driven {
    let ctx = Arc::new(Ctx {
        db: db.clone(),
        strategy,
        workers,
        operations,
        executor: executor(strategy, lock),
        run_id: format!("t{:08x}", rand::random::<u32>()),
        history: scenario
            .records_history()
            .then(|| Arc::new(crate::history::Recorder::new(workers))),
    });
    scenario.setup(&ctx).await.expect("setup");
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let (scenario, ctx, next) = (scenario.clone(), ctx.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut totals = Totals::default();
            let mut errors = Vec::new();
            let mut fenced = 0u64;
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= operations {
                    break;
                }
                let report = scenario.op(&ctx, worker, seq).await;
                fenced += u64::from(report.fenced_rejections);
                match report.outcome {
                    Outcome::Succeeded => totals.succeeded += 1,
                    Outcome::Refused => totals.refused += 1,
                    Outcome::GaveUp(e) => {
                        totals.gave_up += 1;
                        errors.push(format!("gave up (contention): {e}"));
                    }
                    Outcome::Error(e) => {
                        totals.errors += 1;
                        errors.push(e);
                    }
                }
            }
            (totals, errors, fenced)
        }));
    }
    let mut totals = Totals::default();
    let mut errors = Vec::new();
    let mut fenced_rejections = 0;
    for t in tasks {
        let (t, e, f) = t.await.expect("worker panicked");
        totals.succeeded += t.succeeded;
        totals.refused += t.refused;
        totals.errors += t.errors;
        totals.gave_up += t.gave_up;
        errors.extend(e);
        fenced_rejections += f;
    }
    let invariants = scenario.check(&ctx, &totals).await.expect("check");
    scenario.teardown(&ctx).await.expect("teardown");
    Driven {
        totals,
        invariants,
        errors,
        fenced_rejections,
    }
}

/// The strategies of `scenario` that run on `backend` without Redis, baseline excluded.
pub(crate) fn safe_strategies(scenario: &dyn Scenario, backend: Backend) -> Vec<Strategy> {
    Strategy::ALL
        .into_iter()
        .filter(|s| s.expected_safe() && !s.needs_lock_service())
        .filter(|s| scenario.supports(*s, backend).is_ok())
        .collect()
}

/// The baseline breaks an invariant (at least once in `tries` runs: a race is a race), and
/// every safe strategy keeps all invariants with no errors in each of `repeats` runs.
pub(crate) async fn prove(
    scenario: Arc<dyn Scenario>,
    backend: Backend,
    workers: usize,
    operations: u64,
    repeats: usize,
) {
    prove_on(scenario, backend, false, workers, operations, repeats).await;
}

/// [`prove`], through pgbouncer when `pgbouncer` (see [`open_on`]).
pub(crate) async fn prove_on(
    scenario: Arc<dyn Scenario>,
    backend: Backend,
    pgbouncer: bool,
    workers: usize,
    operations: u64,
    repeats: usize,
) {
    let Some((db, _dir)) = open_on(backend, pgbouncer).await else {
        return;
    };
    if scenario.supports(Strategy::None, backend).is_ok() {
        let mut broke = false;
        let mut last = String::new();
        for _ in 0..3 {
            let run = drive(scenario.clone(), &db, Strategy::None, workers, operations).await;
            last = run.describe();
            if run.violations() > 0 {
                broke = true;
                break;
            }
        }
        assert!(
            broke,
            "{} on {backend}: the unsafe baseline kept every invariant in 3 runs: {last}",
            scenario.name()
        );
    }
    for strategy in safe_strategies(scenario.as_ref(), backend) {
        for _ in 0..repeats {
            let run = drive(scenario.clone(), &db, strategy, workers, operations).await;
            assert_eq!(
                run.violations(),
                0,
                "{} / {strategy} on {backend} broke an invariant: {}",
                scenario.name(),
                run.describe()
            );
            assert_eq!(
                run.totals.errors,
                0,
                "{} / {strategy} on {backend} had errors: {}",
                scenario.name(),
                run.describe()
            );
        }
    }
    db.pool().close().await;
}

macro_rules! prove_on_backends {
    ($name:ident, $scenario:expr, $workers:expr, $ops:expr, $repeats:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                prove(
                    Arc::new($scenario),
                    Backend::Sqlite,
                    $workers,
                    $ops,
                    $repeats,
                )
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                prove(
                    Arc::new($scenario),
                    Backend::Postgres,
                    $workers,
                    $ops,
                    $repeats,
                )
                .await;
            }

            /// PostgreSQL through pgbouncer in transaction pooling mode.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pgbouncer() {
                prove_on(
                    Arc::new($scenario),
                    Backend::Postgres,
                    true,
                    $workers,
                    $ops,
                    $repeats,
                )
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                prove(
                    Arc::new($scenario),
                    Backend::MySql,
                    $workers,
                    $ops,
                    $repeats,
                )
                .await;
            }
        }
    };
}

use super::append::Append;
use super::booking::Booking;
use super::get_or_create::GetOrCreate;
use super::order::Order;
use super::queue::Queue;
use super::transfer::Transfer;
use super::withdraw::Withdraw;

/// Workers of every scenario test. 16 tasks on a 2-core machine keep many operations in their
/// read-decide-write at once.
pub(crate) const WORKERS: usize = 16;
/// Operations of every scenario test run: enough for the baseline to break every time we
/// measured (40 runs of 40 per scenario and backend, on 2 cores, at least 4 violations each),
/// small enough that the module stays within a few seconds per backend.
pub(crate) const OPERATIONS: u64 = 60;
/// Runs of each safe strategy.
const REPEATS: usize = 2;

prove_on_backends!(withdraw, Withdraw::new(), WORKERS, OPERATIONS, REPEATS);
prove_on_backends!(transfer, Transfer::new(), WORKERS, OPERATIONS, REPEATS);
prove_on_backends!(order, Order::new(), WORKERS, OPERATIONS, REPEATS);
prove_on_backends!(booking, Booking::new(), WORKERS, OPERATIONS, REPEATS);
prove_on_backends!(
    get_or_create,
    GetOrCreate::new(),
    WORKERS,
    OPERATIONS,
    REPEATS
);
prove_on_backends!(queue, Queue::new(), WORKERS, OPERATIONS, REPEATS);
prove_on_backends!(append, Append::new(), WORKERS, OPERATIONS, REPEATS);

#[test]
fn registry_names_are_unique() {
    let names: Vec<&str> = super::registry().iter().map(|s| s.name()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(names.len(), sorted.len());
    assert_eq!(names[0], "withdraw");
}
