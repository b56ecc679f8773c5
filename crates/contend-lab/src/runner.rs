//! The runner: for every scenario x strategy x worker count, set up, fire the operations from W
//! concurrent workers, measure, check the invariants, and collect a [`RunReport`].
//!
//! The load loop is kept lean, because the lab is benchmarked against `pgbench`: each worker
//! takes operation numbers from one shared atomic counter and records into its own histogram and
//! counters; nothing is shared or locked per operation, and results are merged after the run.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use contend::strategy::Strategy;
use contend::{BoxFuture, ConflictKind, Db};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinSet;

use crate::config::LabConfig;
use crate::lockstats::{CountingLock, LockCounters};
use crate::report::{LabReport, Latency, LockStats, RunReport, SkippedRun, verdict};
use crate::scenario::{Ctx, KeyLock, OpReport, Outcome, Scenario, Totals};

/// Counts the commands a set of Redis servers has executed (`INFO commandstats`).
pub trait CommandCounter: Send + Sync {
    /// Commands executed so far, summed over the servers (`INFO` not counted).
    fn total(&self) -> BoxFuture<'_, anyhow::Result<u64>>;
}

/// A distributed-lock service for one strategy, and how to count what it sends.
#[derive(Clone)]
pub struct LockService {
    /// The lock.
    pub lock: Arc<dyn KeyLock>,
    /// Its servers' command counter, if it can be read.
    pub commands: Option<Arc<dyn CommandCounter>>,
}

/// For each lock-based strategy: its lock service, or why it cannot run.
pub type LockServices = HashMap<Strategy, Result<LockService, String>>;

/// Distinct error messages kept per run.
const MAX_ERROR_SAMPLES: usize = 5;

/// Runs the lab described by `config` over `scenarios` (already filtered and ordered), with the
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
    let (db, _tempdir) = connect(config.database_url.as_deref(), max_workers).await?;
    let backend = db.backend();
    let mut report = LabReport::default();

    // Plan: skip what cannot run, once per scenario x strategy.
    let mut planned: Vec<(Arc<dyn Scenario>, Strategy, Option<LockService>)> = Vec::new();
    for scenario in scenarios {
        for &strategy in &config.strategies {
            let skip = |reason: String| SkippedRun {
                scenario: scenario.name().to_string(),
                strategy: strategy.to_string(),
                backend: backend.name().to_string(),
                reason,
            };
            if let Err(reason) = strategy.supported_on(backend) {
                report.skipped.push(skip(reason.to_string()));
                continue;
            }
            if let Err(reason) = scenario.supports(strategy, backend) {
                report.skipped.push(skip(reason));
                continue;
            }
            let lock = if strategy.needs_redis() {
                match locks.get(&strategy) {
                    Some(Ok(service)) => Some(service.clone()),
                    Some(Err(reason)) => {
                        report.skipped.push(skip(reason.clone()));
                        continue;
                    }
                    None => {
                        report.skipped.push(skip(missing_redis_reason(strategy)));
                        continue;
                    }
                }
            } else {
                None
            };
            planned.push((scenario.clone(), strategy, lock));
        }
    }

    let total = planned.len() * config.workers.len() * config.repeat as usize;
    let progress = progress_bar(config.progress, total as u64);
    for (scenario, strategy, lock) in &planned {
        for &workers in &config.workers {
            for repeat in 0..config.repeat {
                progress.set_message(format!(
                    "{}/{} on {}, {workers} workers",
                    scenario.name(),
                    strategy,
                    backend.name()
                ));
                let mut run = run_one(
                    config,
                    &db,
                    scenario.clone(),
                    *strategy,
                    workers,
                    lock.as_ref(),
                )
                .await;
                if config.repeat > 1 {
                    run.repeat = Some(repeat);
                }
                report.runs.push(run);
                progress.inc(1);
            }
        }
    }
    progress.finish_and_clear();
    db.pool().close().await;
    Ok(report)
}

/// Why a Redis strategy without a configured lock service is skipped.
pub fn missing_redis_reason(strategy: Strategy) -> String {
    match strategy {
        Strategy::Redlock => "needs --redlock-urls (or REDLOCK_URLS)".into(),
        _ => "needs --redis-url (or REDIS_URL)".into(),
    }
}

fn progress_bar(enabled: bool, total: u64) -> ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Connects to `url`, or makes a temporary SQLite file (returned so that it lives as long as
/// the database handle).
async fn connect(
    url: Option<&str>,
    max_workers: usize,
) -> anyhow::Result<(Db, Option<tempfile::TempDir>)> {
    let connections = u32::try_from(max_workers + 2).unwrap_or(u32::MAX);
    // No ping before each pooled use: pgbench sends none, and it would double the round trips
    // of a one-statement operation. A dead connection shows up as that operation's error.
    let builder = |url: &str| {
        Db::builder(url)
            .max_connections(connections)
            .test_before_acquire(false)
    };
    match url {
        Some(url) => {
            let db = builder(url).connect().await?;
            Ok((db, None))
        }
        None => {
            let dir = tempfile::Builder::new()
                .prefix("contend-lab-")
                .tempdir()
                .context("cannot create a temporary folder for the SQLite database")?;
            let path = dir.path().join("lab.db");
            let url = format!("sqlite:{}", path.display());
            let db = builder(&url).connect().await?;
            Ok((db, Some(dir)))
        }
    }
}

/// Opens `n` pooled connections before the load starts, so that connecting is not measured.
async fn warm_pool(db: &Db, n: usize) {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match db.acquire().await {
            Ok(conn) => held.push(conn),
            Err(_) => break,
        }
    }
}

/// What one worker saw, and (merged) what all workers of a run saw: the tally of the database
/// runner and of the HTTP target.
pub(crate) struct WorkerStats {
    latency_us: Histogram<u64>,
    pub(crate) succeeded: u64,
    pub(crate) refused: u64,
    pub(crate) errors: u64,
    retries: u64,
    conflicts: BTreeMap<ConflictKind, u64>,
    fenced_rejections: u64,
    error_samples: Vec<String>,
}

impl WorkerStats {
    pub(crate) fn new() -> Self {
        WorkerStats {
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid histogram bounds"),
            succeeded: 0,
            refused: 0,
            errors: 0,
            retries: 0,
            conflicts: BTreeMap::new(),
            fenced_rejections: 0,
            error_samples: Vec::new(),
        }
    }

    #[inline]
    pub(crate) fn record(&mut self, elapsed: Duration, op: OpReport) {
        self.latency_us
            .saturating_record((elapsed.as_micros() as u64).max(1));
        match op.outcome {
            Outcome::Succeeded => self.succeeded += 1,
            Outcome::Refused => self.refused += 1,
            Outcome::Error(message) => {
                self.errors += 1;
                add_sample(&mut self.error_samples, message);
            }
        }
        self.retries += u64::from(op.attempts.saturating_sub(1));
        for kind in op.conflicts {
            *self.conflicts.entry(kind).or_default() += 1;
        }
        self.fenced_rejections += u64::from(op.fenced_rejections);
    }

    pub(crate) fn merge(&mut self, other: WorkerStats) {
        let _ = self.latency_us.add(&other.latency_us);
        self.succeeded += other.succeeded;
        self.refused += other.refused;
        self.errors += other.errors;
        self.retries += other.retries;
        for (kind, n) in other.conflicts {
            *self.conflicts.entry(kind).or_default() += n;
        }
        self.fenced_rejections += other.fenced_rejections;
        for e in other.error_samples {
            add_sample(&mut self.error_samples, e);
        }
    }

    /// A failure outside any operation (a worker task that died): one more error.
    pub(crate) fn add_error(&mut self, message: String) {
        self.errors += 1;
        add_sample(&mut self.error_samples, message);
    }

    /// Writes the counts, retries, conflicts, throughput over `elapsed`, latency and error
    /// samples into `report`.
    pub(crate) fn fill(self, report: &mut RunReport, elapsed: Duration) {
        let operations = self.succeeded + self.refused + self.errors;
        report.operations = operations;
        report.succeeded = self.succeeded;
        report.refused = self.refused;
        report.errors = self.errors;
        report.retries = self.retries;
        report.conflicts = self
            .conflicts
            .iter()
            .map(|(k, n)| (k.as_str().to_string(), *n))
            .collect();
        report.duration_s = elapsed.as_secs_f64();
        report.throughput_ops_s = if elapsed.is_zero() {
            0.0
        } else {
            operations as f64 / elapsed.as_secs_f64()
        };
        report.latency_ms = latency(&self.latency_us);
        report.error_samples = self.error_samples;
    }
}

fn add_sample(samples: &mut Vec<String>, message: String) {
    if samples.len() < MAX_ERROR_SAMPLES && !samples.contains(&message) {
        samples.push(message);
    }
}

/// The load loop of one worker.
async fn worker(
    scenario: Arc<dyn Scenario>,
    ctx: Arc<Ctx>,
    index: usize,
    next: Arc<AtomicU64>,
    limit: u64,
    deadline: Option<Instant>,
) -> WorkerStats {
    let mut stats = WorkerStats::new();
    let mut session = ctx.db.session();
    loop {
        let seq = next.fetch_add(1, Ordering::Relaxed);
        if seq >= limit {
            break;
        }
        let started = Instant::now();
        if deadline.is_some_and(|d| started >= d) {
            break;
        }
        let op = scenario.op_in_session(&ctx, &mut session, index, seq).await;
        stats.record(started.elapsed(), op);
    }
    stats
}

/// One run: setup, load, check.
async fn run_one(
    config: &LabConfig,
    db: &Db,
    scenario: Arc<dyn Scenario>,
    strategy: Strategy,
    workers: usize,
    lock: Option<&LockService>,
) -> RunReport {
    let counting = lock.map(|l| Arc::new(CountingLock::new(l.lock.clone())));
    let ctx = Arc::new(Ctx {
        db: db.clone(),
        strategy,
        workers,
        operations: config.load.sizing(),
        locks: counting.clone().map(|c| c as Arc<dyn KeyLock>),
        run_id: format!("lab{:08x}", rand::random::<u32>()),
    });
    let mut report = RunReport::empty(
        scenario.name(),
        &strategy.to_string(),
        db.backend().name(),
        workers,
        strategy.expected_safe(),
        counting.is_some().then(LockStats::default),
    );

    if let Err(e) = scenario.setup(&ctx).await {
        return failed(report, format!("setup failed: {e:#}"));
    }
    warm_pool(db, workers).await;

    let commands_before = match lock.and_then(|l| l.commands.clone()) {
        Some(counter) => counter.total().await.ok().map(|n| (counter, n)),
        None => None,
    };

    let next = Arc::new(AtomicU64::new(0));
    let limit = config.load.operations.unwrap_or(u64::MAX);
    let started = Instant::now();
    let deadline = config.load.duration.map(|d| started + d);
    let mut set = JoinSet::new();
    for index in 0..workers {
        set.spawn(worker(
            scenario.clone(),
            ctx.clone(),
            index,
            next.clone(),
            limit,
            deadline,
        ));
    }
    let mut stats = WorkerStats::new();
    let mut panics = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(s) => stats.merge(s),
            Err(e) => panics.push(format!("worker failed: {e}")),
        }
    }
    let elapsed = started.elapsed();

    let redis_commands = match commands_before {
        Some((counter, before)) => counter
            .total()
            .await
            .ok()
            .map(|after| after.saturating_sub(before)),
        None => None,
    };

    let totals = Totals {
        succeeded: stats.succeeded,
        refused: stats.refused,
        errors: stats.errors,
    };
    let invariants = scenario.check(&ctx, &totals).await;
    if let Err(e) = scenario.teardown(&ctx).await {
        tracing::warn!(scenario = scenario.name(), error = %format!("{e:#}"), "teardown failed");
    }

    let fenced_rejections = stats.fenced_rejections;
    stats.fill(&mut report, elapsed);
    report.errors += panics.len() as u64;
    for p in panics {
        add_sample(&mut report.error_samples, p);
    }
    if let (Some(lock_stats), Some(counting)) = (report.lock.as_mut(), counting.as_ref()) {
        fill_lock_stats(
            lock_stats,
            &counting.counters(),
            redis_commands,
            fenced_rejections,
        );
    }
    match invariants {
        Ok(invariants) => {
            report.violations = invariants
                .iter()
                .map(|i| if i.ok { 0 } else { i.violations.max(1) })
                .sum();
            report.invariants = invariants;
            let (text, fails) = verdict(
                report.expected_safe,
                report.violations,
                report.errors,
                workers,
            );
            report.verdict = text;
            report.failed = fails;
            report
        }
        Err(e) => failed(report, format!("check failed: {e:#}")),
    }
}

fn fill_lock_stats(
    out: &mut LockStats,
    counters: &LockCounters,
    redis_commands: Option<u64>,
    fenced_rejections: u64,
) {
    out.acquisitions = counters.acquisitions();
    out.redis_commands = redis_commands.unwrap_or(0);
    out.commands_per_acquisition = if out.acquisitions == 0 {
        0.0
    } else {
        out.redis_commands as f64 / out.acquisitions as f64
    };
    out.handoff_p50_ms = counters.handoff_p50_ms();
    out.fenced_rejections = fenced_rejections;
}

fn latency(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    }
}

/// Marks a run that could not be set up or checked: it fails the lab whatever the strategy.
pub(crate) fn failed(mut report: RunReport, message: String) -> RunReport {
    report.errors += 1;
    report.verdict = format!(
        "FAILED: {}",
        message.split(':').next().unwrap_or("run failed")
    );
    add_sample(&mut report.error_samples, message);
    report.failed = true;
    report
}
