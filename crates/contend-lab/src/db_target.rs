//! The in-process target: the lab's [`Scenario`]s run on a database (and, for the lock-based
//! strategies, a distributed-lock service), driven by the [runner].

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use contend::batch::BatchStats;
use contend::strategy::{Executor, Strategy};
use contend::{BoxFuture, Db, RetryPolicy, Session, TxOptions};

use crate::config::LabConfig;
use crate::lockstats::{CountingLock, LockCounters};
use crate::report::{BatchReport, LabReport, RunReport};
use crate::runner::{self, RunSpec, SetupError, Target, TargetRun};
use crate::scenario::{Ctx, Invariant, OpReport, Scenario, Totals};

/// Counts the commands a set of Redis servers has executed (`INFO commandstats`).
pub trait CommandCounter: Send + Sync {
    /// Commands executed so far, summed over the servers (`INFO` not counted).
    fn total(&self) -> BoxFuture<'_, anyhow::Result<u64>>;
}

/// A distributed-lock service for one strategy, and how to count what it sends.
#[derive(Clone)]
pub struct LockService {
    /// The lock (for the lab, a [`contend_redis::RedisLocks`]).
    pub lock: Arc<dyn contend::lock::LockService>,
    /// Its servers' command counter, if it can be read.
    pub commands: Option<Arc<dyn CommandCounter>>,
}

/// For each lock-based strategy: its lock service, or why it cannot run.
pub type LockServices = HashMap<Strategy, Result<LockService, String>>;

/// Why a Redis strategy without a configured lock service is skipped.
pub fn missing_redis_reason(strategy: Strategy) -> String {
    match strategy {
        Strategy::Redlock => "needs --redlock-urls (or REDLOCK_URLS)".into(),
        Strategy::Etcd => "needs --etcd-urls (or ETCD_URLS)".into(),
        _ => "needs --redis-url (or REDIS_URL)".into(),
    }
}

/// Runs the lab described by `config` over `scenarios` (already filtered and ordered) on the
/// database of `config.database_url` (a temporary SQLite file when there is none), with the
/// lock services in `locks`, reporting progress on stderr when `config.progress` is set.
///
/// # Errors
/// The database cannot be reached or the temporary SQLite file cannot be made. Failures inside a
/// run (setup, check, operations) are reported in that run, not returned.
///
/// # Cancel safety
/// Dropping the future stops the workers of the current run (they are aborted with it) and
/// removes the temporary SQLite file; the tables of the interrupted run stay behind.
pub async fn run_lab(
    config: &LabConfig,
    scenarios: &[Arc<dyn Scenario>],
    locks: &LockServices,
) -> anyhow::Result<LabReport> {
    let max_workers = config.workers.iter().copied().max().unwrap_or(1);
    let mut target = DbTarget::connect(config.database_url.as_deref(), max_workers, locks).await?;
    if config.allow_unsafe_on_cluster {
        target.allow_unsafe_on_cluster();
    }
    let report = runner::run(config, &target, scenarios).await;
    target.db.close().await;
    report
}

/// The lab's scenarios on one database: the [`Target`] of `contend lab` without `--target`.
pub struct DbTarget {
    db: Db,
    backend: &'static str,
    locks: LockServices,
    /// The one strategy executor of every run, with the counting lock services.
    executor: Executor,
    /// The counting wrapper of each lock service the executor has.
    counting: HashMap<Strategy, Arc<CountingLock>>,
    /// Whether strategies that cannot be safe on the cluster run (as unsafe baselines).
    allow_unsafe_on_cluster: bool,
    /// The temporary SQLite file's folder, removed on drop.
    _tempdir: Option<tempfile::TempDir>,
}

impl DbTarget {
    /// Connects to `url` with a pool of `max_workers + 2` connections (per node, for the nodes of
    /// a Galera cluster, over which the workers' sessions are spread round robin), or makes a
    /// temporary SQLite file (removed when the target is dropped) when `url` is `None`.
    ///
    /// # Errors
    /// The database cannot be reached or the temporary file cannot be made.
    ///
    /// # Cancel safety
    /// Dropping the future drops the half-made pool and removes the temporary file.
    pub async fn connect(
        url: Option<&str>,
        max_workers: usize,
        locks: &LockServices,
    ) -> anyhow::Result<DbTarget> {
        let connections = u32::try_from(max_workers + 2).unwrap_or(u32::MAX);
        // No ping before each pooled use: pgbench sends none, and it would double the round trips
        // of a one-statement operation. A dead connection shows up as that operation's error.
        let builder = |url: &str| {
            Db::builder(url)
                .max_connections(connections)
                .test_before_acquire(false)
        };
        let (db, tempdir) = match url {
            Some(url) => (builder(url).connect().await?, None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("contend-lab-")
                    .tempdir()
                    .context("cannot create a temporary folder for the SQLite database")?;
                let url = format!("sqlite:{}", dir.path().join("lab.db").display());
                (builder(&url).connect().await?, Some(dir))
            }
        };
        let (executor, counting) = executor(locks);
        Ok(DbTarget {
            backend: if db.cluster().is_galera() {
                "galera"
            } else {
                db.backend().name()
            },
            db,
            locks: locks.clone(),
            executor,
            counting,
            allow_unsafe_on_cluster: false,
            _tempdir: tempdir,
        })
    }

    /// Runs the strategies that cannot be safe on the database's cluster instead of skipping
    /// them, judged as unsafe baselines (`--allow-unsafe-on-cluster`).
    pub fn allow_unsafe_on_cluster(&mut self) {
        self.allow_unsafe_on_cluster = true;
        self.executor = self.executor.clone().allow_unsafe_on_cluster(true);
    }

    /// The database under test.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Opens `n` pooled connections before the load starts, so that connecting is not measured.
    async fn warm_pool(&self, n: usize) {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            match self.db.acquire().await {
                Ok(conn) => held.push(conn),
                Err(_) => break,
            }
        }
    }
}

/// The lab's strategy executor, without lock services: locks waited for as long as the Redis
/// locks wait ([`crate::lockstats::WAIT`]), transactions retried on any conflict for up to twice
/// that (a time budget, no attempt limit: [`contend::retry`]), so that an attempt whose lock
/// wait ran out is still retried once its rollback has released what it held.
pub fn lab_executor() -> Executor {
    Executor::new()
        .lock_wait(crate::lockstats::WAIT)
        .options(TxOptions::new().retry(RetryPolicy::new().max_elapsed(2 * crate::lockstats::WAIT)))
}

/// [`lab_executor`] with every configured lock service behind a [`CountingLock`].
fn executor(locks: &LockServices) -> (Executor, HashMap<Strategy, Arc<CountingLock>>) {
    let mut executor = lab_executor();
    let mut counting = HashMap::new();
    for (strategy, service) in locks {
        if let Ok(service) = service {
            let counted = Arc::new(CountingLock::new(service.lock.clone()));
            executor = executor.lock_service(*strategy, counted.clone());
            counting.insert(*strategy, counted);
        }
    }
    (executor, counting)
}

impl Target for DbTarget {
    type Scenario = Arc<dyn Scenario>;
    type Run = DbRun;

    fn backend(&self) -> &str {
        self.backend
    }

    fn scenario_name(scenario: &Arc<dyn Scenario>) -> &'static str {
        scenario.name()
    }

    fn supports(&self, scenario: &Arc<dyn Scenario>, strategy: Strategy) -> Result<(), String> {
        let backend = self.db.backend();
        strategy.supported_on(backend).map_err(str::to_string)?;
        if !self.allow_unsafe_on_cluster
            && let Some(reason) = self.db.cluster().unsafe_strategy(strategy)
        {
            let refused = contend::Error::UnsafeOnCluster {
                strategy,
                cluster: self.db.cluster().to_string(),
                reason,
            };
            return Err(format!(
                "refused: {refused} (--allow-unsafe-on-cluster runs it)"
            ));
        }
        scenario.supports(strategy, backend)?;
        if strategy.needs_lock_service() {
            match self.locks.get(&strategy) {
                Some(Ok(_)) => {}
                Some(Err(reason)) => return Err(reason.clone()),
                None => return Err(missing_redis_reason(strategy)),
            }
        }
        Ok(())
    }

    fn expected_safe(&self, strategy: Strategy) -> bool {
        strategy.expected_safe() && self.db.cluster().unsafe_strategy(strategy).is_none()
    }

    fn reports_locks(&self, strategy: Strategy) -> bool {
        strategy.needs_lock_service()
    }

    async fn setup(
        &self,
        scenario: &Arc<dyn Scenario>,
        spec: RunSpec,
    ) -> Result<DbRun, SetupError> {
        let service = match self.locks.get(&spec.strategy) {
            Some(Ok(service)) if spec.strategy.needs_lock_service() => Some(service.clone()),
            _ => None,
        };
        let counters = match self.counting.get(&spec.strategy) {
            Some(counting) if spec.strategy.needs_lock_service() => Some(counting.start_run()),
            _ => None,
        };
        let ctx = Ctx {
            db: self.db.clone(),
            strategy: spec.strategy,
            workers: spec.workers,
            operations: spec.operations,
            executor: self.executor.clone(),
            run_id: format!("lab{:08x}", rand::random::<u32>()),
            history: scenario
                .records_history()
                .then(|| Arc::new(crate::history::Recorder::new(spec.workers))),
        };
        scenario.setup(&ctx).await.map_err(SetupError::Failed)?;
        // On a cluster, the data written on the first node is applied everywhere before the
        // workers read it on theirs.
        self.db.catch_up().await.map_err(SetupError::failed)?;
        self.warm_pool(spec.workers).await;
        let commands = match service.and_then(|s| s.commands) {
            Some(counter) => counter.total().await.ok().map(|n| (counter, n)),
            None => None,
        };
        let batch_before =
            (spec.strategy == Strategy::Batched).then(|| self.executor.batch_stats());
        Ok(DbRun {
            scenario: scenario.clone(),
            ctx,
            counters,
            commands,
            batch_before,
        })
    }
}

/// One run of a [`Scenario`] on a [`DbTarget`]; each worker holds a [`Session`] of its own.
pub struct DbRun {
    scenario: Arc<dyn Scenario>,
    ctx: Ctx,
    /// The run's lock counters (lock-based strategies).
    counters: Option<Arc<LockCounters>>,
    /// The Redis command counter and its total before the load.
    commands: Option<(Arc<dyn CommandCounter>, u64)>,
    /// The executor's batch counters before the load (`batched`).
    batch_before: Option<BatchStats>,
}

impl TargetRun for DbRun {
    /// The worker's own held connection, as a pgbench client keeps its connection (see
    /// [`Scenario::op_in_session`]).
    type Worker = Session;

    fn worker(&self, _index: usize) -> Session {
        self.ctx.db.session()
    }

    fn op<'a>(
        &'a self,
        session: &'a mut Session,
        index: usize,
        seq: u64,
    ) -> impl Future<Output = OpReport> + Send + 'a {
        self.scenario.op_in_session(&self.ctx, session, index, seq)
    }

    async fn after_load(&self, report: &mut RunReport) {
        if let Some(before) = &self.batch_before {
            let after = self.ctx.executor.batch_stats();
            let commits = after.commits - before.commits;
            let operations = after.operations - before.operations;
            report.batch = Some(BatchReport {
                commits,
                operations,
                ops_per_commit: if commits == 0 {
                    0.0
                } else {
                    operations as f64 / commits as f64
                },
                largest: after.largest,
                retries: after.retries - before.retries,
                splits: after.splits - before.splits,
            });
        }
        let (Some(out), Some(counters)) = (report.lock.as_mut(), self.counters.as_ref()) else {
            return;
        };
        let redis_commands = match &self.commands {
            Some((counter, before)) => counter
                .total()
                .await
                .map(|after| after.saturating_sub(*before))
                .unwrap_or(0),
            None => 0,
        };
        out.acquisitions = counters.acquisitions();
        out.redis_commands = redis_commands;
        out.commands_per_acquisition = if out.acquisitions == 0 {
            0.0
        } else {
            out.redis_commands as f64 / out.acquisitions as f64
        };
        out.handoff_p50_ms = counters.handoff_p50_ms();
    }

    async fn check(&self, totals: &Totals) -> anyhow::Result<Vec<Invariant>> {
        // On a cluster, the checks read the first node: wait until it has applied what the
        // workers committed on the others.
        self.ctx.db.catch_up().await?;
        self.scenario.check(&self.ctx, totals).await
    }

    fn teardown(&self) -> impl Future<Output = anyhow::Result<()>> + Send {
        self.scenario.teardown(&self.ctx)
    }

    fn history(&self) -> Option<crate::history::HistoryReport> {
        self.ctx.history.as_ref()?.report()
    }
}
