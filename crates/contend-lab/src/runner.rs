//! The runner: for every scenario x strategy x worker count of a [`Target`], set up, fire the
//! operations from W concurrent workers, measure, read the invariants back, and collect a
//! [`RunReport`] with its verdict.
//!
//! # The seam
//! A [`Target`] is where the load goes, and [`TargetRun`] is one run on it: setup, one
//! operation (reported as the scenarios report theirs, an [`OpReport`]), what the target
//! measures itself after the load, and the invariants read back. Two targets implement it:
//! [`crate::db_target::DbTarget`] (the scenarios in process, on a database) and
//! [`crate::http_target::HttpTarget`] (running service instances over HTTP). The worker loop,
//! the tally (`WorkerStats`), the report filling and the verdicts exist here only.
//!
//! The load loop is kept lean, because the lab is benchmarked against `pgbench`: each worker
//! takes operation numbers from one shared atomic counter and records into its own histogram and
//! counters; nothing is shared or locked per operation, and results are merged after the run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use contend::ConflictKind;
use contend::strategy::Strategy;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinSet;

use crate::config::LabConfig;
use crate::report::{LabReport, Latency, LockStats, RunReport, SkippedRun, add_sample};
use crate::scenario::{Invariant, OpReport, Outcome, Totals};

/// Where the lab's load goes: a database driven in process, or running service instances.
///
/// The runner asks it, per scenario x strategy, whether the combination can run
/// ([`Target::supports`]), then per run to set one up ([`Target::setup`]); the run
/// ([`TargetRun`]) does the rest.
pub trait Target: Send + Sync {
    /// A scenario as this target runs it.
    type Scenario: Send + Sync;
    /// One run on this target, shared by the run's workers.
    type Run: TargetRun;

    /// The backend column of the reports (`postgres`, or `http(postgres)` over HTTP).
    fn backend(&self) -> &str;

    /// The scenario's name in reports.
    fn scenario_name(scenario: &Self::Scenario) -> &'static str;

    /// `Ok` when `scenario` can run under `strategy` here as far as the lab knows before any
    /// setup, or why the combination is skipped.
    fn supports(&self, scenario: &Self::Scenario, strategy: Strategy) -> Result<(), String>;

    /// Whether `strategy` is expected to keep the invariants on this target (a violation then
    /// fails the lab).
    fn expected_safe(&self, strategy: Strategy) -> bool;

    /// Whether runs of `strategy` report distributed-lock statistics (the default: none do).
    fn reports_locks(&self, _strategy: Strategy) -> bool {
        false
    }

    /// Sets up one run of `scenario`: its data, sized for `spec.operations`, and whatever must
    /// be read before the load starts (counters to compare after it).
    ///
    /// # Cancel safety
    /// Dropping the future leaves what it created so far behind (tables, accounts).
    fn setup(
        &self,
        scenario: &Self::Scenario,
        spec: RunSpec,
    ) -> impl Future<Output = Result<Self::Run, SetupError>> + Send;
}

/// What [`Target::setup`] is asked to set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSpec {
    /// The strategy every operation of the run uses.
    pub strategy: Strategy,
    /// Concurrent workers.
    pub workers: usize,
    /// Planned operations in all (the data is sized from it).
    pub operations: u64,
}

/// Why [`Target::setup`] produced no run.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The target cannot run this scenario under this strategy (a server that does not offer
    /// it): the combination is skipped, its remaining worker counts and repeats too.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// This run could not be set up: it is reported as a failed run and the lab goes on.
    #[error("setup failed: {0:#}")]
    Failed(anyhow::Error),
    /// The lab cannot go on (e.g. a server that does not let the lab choose the strategy): it
    /// stops with this error.
    #[error("{0:#}")]
    Fatal(anyhow::Error),
}

impl SetupError {
    /// A [`SetupError::Failed`] from any error.
    pub fn failed(error: impl Into<anyhow::Error>) -> SetupError {
        SetupError::Failed(error.into())
    }
}

/// One run on a [`Target`], from the end of its setup to its invariants.
pub trait TargetRun: Send + Sync + 'static {
    /// What one worker keeps from one operation to the next (a held connection, a pause).
    type Worker: Send;

    /// The state of worker `index`, made in the worker's task before its first operation.
    fn worker(&self, index: usize) -> Self::Worker;

    /// Runs operation number `seq` (0-based, over all workers) from worker `index`.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the operation as the target's own cancellation does (a
    /// database transaction rolls back, an HTTP request is dropped).
    fn op<'a>(
        &'a self,
        worker: &'a mut Self::Worker,
        index: usize,
        seq: u64,
    ) -> impl Future<Output = OpReport> + Send + 'a;

    /// Runs after each operation has been recorded and before the worker's next one, outside the
    /// measured time (the default does nothing). The HTTP target pauses here after a 503.
    ///
    /// # Cancel safety
    /// Cancellation-safe in the default; an implementation's pause may simply be cut short.
    fn between_ops(&self, _worker: &mut Self::Worker) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// After the load, with the tally already in `report`: fills in what the target measures
    /// itself (lock statistics, retries and conflicts counted by the servers). The default
    /// changes nothing.
    ///
    /// # Cancel safety
    /// Dropping the future leaves `report` as the tally filled it, or partly updated.
    fn after_load(&self, _report: &mut RunReport) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Reads the invariants back after the load.
    ///
    /// # Cancel safety
    /// Reads only; dropping the future changes nothing.
    fn check<'a>(
        &'a self,
        totals: &'a Totals,
    ) -> impl Future<Output = anyhow::Result<Vec<Invariant>>> + Send + 'a;

    /// Drops what the setup created, after the check (the default keeps everything).
    ///
    /// # Cancel safety
    /// Dropping the future may leave part of the run's data behind.
    fn teardown(&self) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }

    /// The report of the run's checked history, for a run that recorded one (asked after the
    /// check; the default: none).
    fn history(&self) -> Option<crate::history::HistoryReport> {
        None
    }

    /// Why the run fails whatever its invariants say (the HTTP target: answers that were 500),
    /// asked after the check.
    fn failure(&self) -> Option<String> {
        None
    }
}

/// Runs every scenario x strategy x worker count (x repeat) of `config` over `scenarios`
/// (already selected and ordered) on `target`, reporting progress on stderr when
/// `config.progress` is set.
///
/// # Errors
/// Only a [`SetupError::Fatal`]. Failures inside a run (setup, check, operations) are reported
/// in that run, not returned.
///
/// # Cancel safety
/// Dropping the future aborts the workers of the current run (they are spawned into a
/// [`JoinSet`] dropped with it); what the interrupted run set up stays behind.
pub async fn run<T: Target>(
    config: &LabConfig,
    target: &T,
    scenarios: &[T::Scenario],
) -> anyhow::Result<LabReport> {
    let backend = target.backend();
    let lab_started = Instant::now();
    let mut report = LabReport::default();
    let skipped = |scenario: &T::Scenario, strategy: Strategy, reason: String| SkippedRun {
        scenario: T::scenario_name(scenario).to_string(),
        strategy: strategy.to_string(),
        backend: backend.to_string(),
        reason,
    };

    // Plan: skip what cannot run, once per scenario x strategy.
    let mut planned: Vec<(&T::Scenario, Strategy)> = Vec::new();
    for scenario in scenarios {
        for &strategy in &config.strategies {
            match target.supports(scenario, strategy) {
                Ok(()) => planned.push((scenario, strategy)),
                Err(reason) => report.skipped.push(skipped(scenario, strategy, reason)),
            }
        }
    }

    let runs_per_plan = config.workers.len() as u64 * u64::from(config.repeat);
    let progress = progress_bar(config.progress, planned.len() as u64 * runs_per_plan);
    for (scenario, strategy) in planned {
        let mut done = 0;
        'workers: for &workers in &config.workers {
            for repeat in 0..config.repeat {
                progress.set_message(format!(
                    "{}/{strategy} on {backend}, {workers} workers",
                    T::scenario_name(scenario)
                ));
                match run_one(config, target, scenario, strategy, workers, lab_started).await? {
                    Ran::Report(mut run) => {
                        if config.repeat > 1 {
                            run.repeat = Some(repeat);
                        }
                        report.runs.push(*run);
                    }
                    Ran::Unsupported(reason) => {
                        report.skipped.push(skipped(scenario, strategy, reason));
                        progress.inc(runs_per_plan - done);
                        break 'workers;
                    }
                }
                done += 1;
                progress.inc(1);
            }
        }
    }
    progress.finish_and_clear();
    Ok(report)
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

/// What one run came to.
enum Ran {
    /// It ran (or failed): its report.
    Report(Box<RunReport>),
    /// The target refused the combination at setup.
    Unsupported(String),
}

/// One run: setup, load, measure, check, verdict. `lab_started` is when the lab began (the
/// run's start offset on the timeline is measured from it).
async fn run_one<T: Target>(
    config: &LabConfig,
    target: &T,
    scenario: &T::Scenario,
    strategy: Strategy,
    workers: usize,
    lab_started: Instant,
) -> anyhow::Result<Ran> {
    let mut report = RunReport::empty(
        T::scenario_name(scenario),
        &strategy.to_string(),
        target.backend(),
        workers,
        target.expected_safe(strategy),
        target.reports_locks(strategy).then(LockStats::default),
    );
    let spec = RunSpec {
        strategy,
        workers,
        operations: config.load.sizing(),
    };
    let run = match target.setup(scenario, spec).await {
        Ok(run) => Arc::new(run),
        Err(SetupError::Unsupported(reason)) => return Ok(Ran::Unsupported(reason)),
        Err(e @ SetupError::Failed(_)) => {
            report.started_s = lab_started.elapsed().as_secs_f64();
            return Ok(Ran::Report(Box::new(report.fail(e.to_string()))));
        }
        Err(SetupError::Fatal(e)) => return Err(e),
    };

    let next = Arc::new(AtomicU64::new(0));
    let limit = config.load.operations.unwrap_or(u64::MAX);
    let started = Instant::now();
    report.started_s = started.duration_since(lab_started).as_secs_f64();
    let deadline = config.load.duration.map(|d| started + d);
    let mut set = JoinSet::new();
    for index in 0..workers {
        set.spawn(worker(run.clone(), index, next.clone(), limit, deadline));
    }
    let mut stats = WorkerStats::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(s) => stats.merge(s),
            Err(e) => stats.add_error(format!("worker failed: {e}")),
        }
    }
    let elapsed = started.elapsed();

    let totals = stats.totals();
    stats.fill(&mut report, elapsed);
    run.after_load(&mut report).await;
    let invariants = run.check(&totals).await;
    report.history = run.history();
    if let Err(e) = run.teardown().await {
        tracing::warn!(
            scenario = T::scenario_name(scenario),
            error = %format!("{e:#}"),
            "teardown failed"
        );
    }
    let report = match invariants {
        Ok(invariants) => report.judge(invariants, run.failure()),
        Err(e) => report.fail(format!("check failed: {e:#}")),
    };
    Ok(Ran::Report(Box::new(report)))
}

/// The load loop of one worker.
async fn worker<R: TargetRun>(
    run: Arc<R>,
    index: usize,
    next: Arc<AtomicU64>,
    limit: u64,
    deadline: Option<Instant>,
) -> WorkerStats {
    let mut stats = WorkerStats::new();
    let mut state = run.worker(index);
    loop {
        let seq = next.fetch_add(1, Ordering::Relaxed);
        if seq >= limit {
            break;
        }
        let started = Instant::now();
        if deadline.is_some_and(|d| started >= d) {
            break;
        }
        let op = run.op(&mut state, index, seq).await;
        stats.record(started.elapsed(), op);
        run.between_ops(&mut state).await;
    }
    stats
}

/// What one worker saw, and (merged) what all workers of a run saw.
pub(crate) struct WorkerStats {
    latency_us: Histogram<u64>,
    succeeded: u64,
    refused: u64,
    errors: u64,
    gave_up: u64,
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
            gave_up: 0,
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
            Outcome::GaveUp(message) => {
                self.gave_up += 1;
                add_sample(
                    &mut self.error_samples,
                    format!("gave up (contention): {message}"),
                );
            }
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
        self.gave_up += other.gave_up;
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

    /// The totals handed to [`TargetRun::check`].
    pub(crate) fn totals(&self) -> Totals {
        Totals {
            succeeded: self.succeeded,
            refused: self.refused,
            errors: self.errors,
            gave_up: self.gave_up,
        }
    }

    /// Writes the counts, retries, conflicts, throughput over `elapsed`, latency, error samples
    /// and (when `report` has lock statistics) fenced rejections into `report`.
    pub(crate) fn fill(self, report: &mut RunReport, elapsed: Duration) {
        let operations = self.succeeded + self.refused + self.errors + self.gave_up;
        report.operations = operations;
        report.succeeded = self.succeeded;
        report.refused = self.refused;
        report.errors = self.errors;
        report.gave_up = self.gave_up;
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
        if let Some(lock) = report.lock.as_mut() {
            lock.fenced_rejections = self.fenced_rejections;
        }
    }
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
