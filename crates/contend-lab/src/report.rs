//! The lab's results: one [`RunReport`] per run, the JSON document other tools read (schema of
//! the strategies issue), the table people read, each run's verdict and the exit status.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, CellAlignment, Color, ColumnConstraint, ContentArrangement, Table};
use serde::Serialize;

use crate::cpu::CpuPlacement;
use crate::history::HistoryReport;
use crate::scenario::Invariant;

/// Latency percentiles of a run, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest operation.
    pub max: f64,
}

/// How the `batched` strategy combined the operations of a run ([`contend::batch`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BatchReport {
    /// Transactions that committed a batch.
    pub commits: u64,
    /// Operations those batches decided.
    pub operations: u64,
    /// `operations / commits`: how many operations one commit served on average.
    pub ops_per_commit: f64,
    /// The most operations one committed transaction held (over the executor's life).
    pub largest: u64,
    /// Batch attempts run again after a conflict or failure.
    pub retries: u64,
    /// Batches split into their operations.
    pub splits: u64,
}

/// What a distributed-lock strategy cost (`redis`, `redis-spin`, `redlock`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LockStats {
    /// Locks granted.
    pub acquisitions: u64,
    /// Commands the Redis servers executed during the run (from `INFO commandstats`, summed
    /// over the nodes; `INFO` itself not counted; other clients of the same servers count
    /// too), or for `etcd` the requests the lab's etcd client sent (each try, watch and
    /// keepalive; `contend_etcd::EtcdLocks::requests`).
    pub redis_commands: u64,
    /// `redis_commands / acquisitions`.
    pub commands_per_acquisition: f64,
    /// Median time from a release to the grant of a waiter that was already waiting.
    pub handoff_p50_ms: f64,
    /// Writes refused because they carried a stale fencing token.
    pub fenced_rejections: u64,
}

/// The result of one run: one scenario, one strategy, one backend, one worker count.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Scenario name.
    pub scenario: String,
    /// Strategy name.
    pub strategy: String,
    /// Backend name (`sqlite`, `postgres`, `mysql`).
    pub backend: String,
    /// Concurrent workers.
    pub workers: usize,
    /// Operations completed.
    pub operations: u64,
    /// Operations that succeeded.
    pub succeeded: u64,
    /// Operations refused for a business reason.
    pub refused: u64,
    /// Transaction attempts beyond the first, over all operations.
    pub retries: u64,
    /// Conflicts met, by kind (`serialization`, `deadlock`, `lock_timeout`, `busy`, `version`).
    pub conflicts: BTreeMap<String, u64>,
    /// Operations that failed.
    pub errors: u64,
    /// Operations that gave up under contention: their conflicts outlasted the retry budget (a
    /// time limit), or a lock was not acquired within its wait. Rolled back, nothing written;
    /// counted apart from `errors` and judged by their own rule (see [`LabReport::exit_code`]).
    pub gave_up: u64,
    /// Wall time of the load phase, in seconds.
    pub duration_s: f64,
    /// `operations / duration_s`.
    pub throughput_ops_s: f64,
    /// Per-operation latency.
    pub latency_ms: Latency,
    /// Invariant violations found after the run.
    pub violations: u64,
    /// Whether the strategy claims to keep the invariants.
    pub expected_safe: bool,
    /// Every invariant checked, with what was measured.
    pub invariants: Vec<Invariant>,
    /// Lock costs, for lock-based strategies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockStats>,
    /// How operations were combined, for `batched`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchReport>,
    /// The checked history, for a scenario that records one (`append`): operations, anomalies
    /// found (also counted in `violations`) and their kinds, the check's time, witnesses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryReport>,
    /// The run's verdict, as in the table.
    pub verdict: String,
    /// Which repetition this is (0-based; present with `--repeat` above 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat: Option<u32>,
    /// A few distinct error messages, when there were errors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_samples: Vec<String>,
    /// Whether this run fails the lab (exit status 1).
    #[serde(skip)]
    pub failed: bool,
    /// When the load phase started, in seconds since the lab started (the timeline of the HTML
    /// page). Not in the JSON document, whose schema is fixed.
    #[serde(skip)]
    pub started_s: f64,
    /// What happened during the run, at offsets from its start: faults injected, violations
    /// found (the HTML page marks them on its timeline). Not in the JSON document.
    #[serde(skip)]
    pub events: Vec<RunEvent>,
}

/// Something that happened during a run, for the timeline of the HTML page.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEvent {
    /// Seconds since the run's load phase started.
    pub at_s: f64,
    /// What kind of event.
    pub kind: EventKind,
    /// What happened, in a few words (e.g. `pg_terminate_backend`, `balance: final 3, expected 0`).
    pub label: String,
}

/// The kinds of [`RunEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A fault injected into the run (a killed connection, a restarted server).
    Fault,
    /// An invariant found broken. The lab checks invariants after the load, so its violations
    /// sit at the end of their run; a history checker may place them earlier.
    Violation,
}

impl RunReport {
    /// The report of a run that has not started yet: no operations, no verdict, with the
    /// expected safety and (for the lock-based strategies) empty lock statistics as given.
    pub(crate) fn empty(
        scenario: &str,
        strategy: &str,
        backend: &str,
        workers: usize,
        expected_safe: bool,
        lock: Option<LockStats>,
    ) -> RunReport {
        RunReport {
            scenario: scenario.to_string(),
            strategy: strategy.to_string(),
            backend: backend.to_string(),
            workers,
            operations: 0,
            succeeded: 0,
            refused: 0,
            retries: 0,
            conflicts: BTreeMap::new(),
            errors: 0,
            gave_up: 0,
            duration_s: 0.0,
            throughput_ops_s: 0.0,
            latency_ms: Latency::default(),
            violations: 0,
            expected_safe,
            invariants: Vec::new(),
            lock,
            batch: None,
            history: None,
            verdict: String::new(),
            repeat: None,
            error_samples: Vec::new(),
            failed: false,
            started_s: 0.0,
            events: Vec::new(),
        }
    }
}

impl RunReport {
    /// Marks a run that could not be set up or checked: one more error, the message among the
    /// samples, and a `FAILED: ...` verdict (its first clause) that fails the lab whatever the
    /// strategy.
    pub(crate) fn fail(mut self, message: String) -> RunReport {
        self.errors += 1;
        self.verdict = format!(
            "FAILED: {}",
            message.split(':').next().unwrap_or("run failed")
        );
        add_sample(&mut self.error_samples, message);
        self.failed = true;
        self
    }

    /// Records the invariants read back after the load and gives the run its [`verdict`];
    /// `failure` (e.g. answers that were 500) fails the run whatever the invariants say.
    pub(crate) fn judge(
        mut self,
        invariants: Vec<Invariant>,
        failure: Option<String>,
    ) -> RunReport {
        self.violations = invariants
            .iter()
            .map(|i| if i.ok { 0 } else { i.violations.max(1) })
            .sum();
        let end = self.duration_s;
        self.events
            .extend(invariants.iter().filter(|i| !i.ok).map(|i| RunEvent {
                at_s: end,
                kind: EventKind::Violation,
                label: format!("{}: {}", i.name, i.detail),
            }));
        self.invariants = invariants;
        (self.verdict, self.failed) = verdict(
            self.expected_safe,
            self.violations,
            self.errors,
            self.workers,
        );
        if let Some(why) = failure {
            self.verdict = format!("FAILED: {why}");
            self.failed = true;
        }
        self
    }
}

/// Distinct error messages kept per run.
const MAX_ERROR_SAMPLES: usize = 5;

/// Adds `message` to `samples` unless it is there already or there are enough.
pub(crate) fn add_sample(samples: &mut Vec<String>, message: String) {
    if samples.len() < MAX_ERROR_SAMPLES && !samples.contains(&message) {
        samples.push(message);
    }
}

/// The widest the compact table ([`LabReport::render_compact`]) gets, in terminal columns.
pub const COMPACT_WIDTH: u16 = 120;

/// The colour of a run's verdict in the tables: red when it fails the lab, green when a safe
/// strategy held, yellow when the baseline broke (as expected).
/// The columns of the full table (`--wide`), in order.
pub(crate) const WIDE_COLUMNS: [&str; 16] = [
    "scenario",
    "strategy",
    "backend",
    "workers",
    "ops",
    "succeeded",
    "refused",
    "retries",
    "conflicts",
    "errors",
    "gave up",
    "ops/s",
    "p50 ms",
    "p99 ms",
    "violations",
    "verdict",
];

impl RunReport {
    /// The anomalies of the run's checked history (`3`), or `-` when it recorded none.
    pub(crate) fn anomalies_text(&self) -> String {
        self.history
            .as_ref()
            .map_or_else(|| "-".to_string(), |h| h.anomalies.to_string())
    }

    /// The conflicts by kind as `"3 deadlock, 1 busy"`, or `-` when there were none.
    pub(crate) fn conflicts_text(&self) -> String {
        if self.conflicts.is_empty() {
            return "-".to_string();
        }
        self.conflicts
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn row_color(r: &RunReport) -> Color {
    if r.failed {
        Color::Red
    } else if r.expected_safe {
        Color::Green
    } else if r.violations > 0 {
        Color::Yellow
    } else {
        Color::Reset
    }
}

/// The verdict of the compact table: the verdicts of [`verdict`] shortened (`SAFE` and the
/// bugs as they are; the unsafe baseline's `broke (expected)`, `held (1 worker)`, `held this
/// time`); any other verdict (`FAILED: ...`) unchanged.
///
/// ```
/// use contend_lab::report::{short_verdict, verdict};
/// assert_eq!(short_verdict(&verdict(false, 3, 0, 8).0), "broke (expected)");
/// assert_eq!(short_verdict("SAFE"), "SAFE");
/// assert_eq!(short_verdict("FAILED: setup failed"), "FAILED: setup failed");
/// ```
pub fn short_verdict(verdict: &str) -> &str {
    match verdict {
        "VIOLATION (unsafe baseline, expected)" => "broke (expected)",
        "no race at 1 worker (unsafe baseline)" => "held (1 worker)",
        "no violation this time (unsafe baseline)" => "held this time",
        other => other,
    }
}

/// `(key, value)` pairs grouped by key, the keys in the order first seen.
fn group_in_order<K: PartialEq, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Vec<(K, Vec<V>)> {
    let mut groups: Vec<(K, Vec<V>)> = Vec::new();
    for (key, value) in pairs {
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, values)) => values.push(value),
            None => groups.push((key, vec![value])),
        }
    }
    groups
}

/// A combination the lab did not run, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedRun {
    /// Scenario name.
    pub scenario: String,
    /// Strategy name.
    pub strategy: String,
    /// Backend name.
    pub backend: String,
    /// Why it was skipped.
    pub reason: String,
}

/// Everything the lab found: the JSON document `{"runs": [...], "skipped": [...]}`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LabReport {
    /// The runs, in the order they ran.
    pub runs: Vec<RunReport>,
    /// The combinations not run.
    pub skipped: Vec<SkippedRun>,
    /// The one CPU the lab kept to, when it did ([`crate::cpu`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<CpuPlacement>,
}

/// The verdict of a run, and whether it fails the lab.
///
/// ```
/// use contend_lab::report::verdict;
/// assert_eq!(verdict(true, 0, 0, 8), ("SAFE".to_string(), false));
/// assert_eq!(verdict(true, 3, 0, 8), ("VIOLATION (BUG)".to_string(), true));
/// assert_eq!(verdict(false, 3, 0, 8).1, false);
/// ```
pub fn verdict(
    expected_safe: bool,
    violations: u64,
    errors: u64,
    workers: usize,
) -> (String, bool) {
    match (expected_safe, violations > 0, errors > 0) {
        (true, false, false) => ("SAFE".into(), false),
        (true, true, _) => ("VIOLATION (BUG)".into(), true),
        (true, false, true) => ("ERRORS (BUG)".into(), true),
        (false, true, _) => ("VIOLATION (unsafe baseline, expected)".into(), false),
        (false, false, _) if workers <= 1 => {
            ("no race at 1 worker (unsafe baseline)".into(), false)
        }
        (false, false, _) => ("no violation this time (unsafe baseline)".into(), false),
    }
}

impl LabReport {
    /// Whether any run failed: a strategy expected to be safe showed a violation or errors.
    pub fn failed(&self) -> bool {
        self.runs.iter().any(|r| r.failed)
    }

    /// Operations of strategies expected to be safe that gave up under contention, over all
    /// runs (the unsafe baseline's do not count: nothing is promised of it).
    pub fn gave_up(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| r.expected_safe)
            .map(|r| r.gave_up)
            .sum()
    }

    /// The lab's exit status: 1 when a run failed ([`LabReport::failed`]: a safe strategy
    /// broke an invariant or hit errors), else 3 when operations of safe strategies gave up
    /// under contention ([`LabReport::gave_up`]: the strategy held, but the load outlasted its
    /// retry budget), else 0. (2 is for bad flags and runs that could not start.)
    ///
    /// ```
    /// let report = contend_lab::report::LabReport::default();
    /// assert_eq!(report.exit_code(), 0);
    /// ```
    pub fn exit_code(&self) -> u8 {
        if self.failed() {
            1
        } else if self.gave_up() > 0 {
            3
        } else {
            0
        }
    }

    /// The JSON document, pretty-printed.
    ///
    /// # Errors
    /// Never in practice (every field serializes); kept fallible for the serializer's sake.
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }

    /// The full table (all sixteen columns, `contend lab --wide`), then the lock table, the
    /// details, the skipped combinations, the legend and a one-paragraph summary.
    pub fn render(&self) -> String {
        let mut out = self.wide_table();
        self.render_rest(&mut out, false);
        out
    }

    /// As [`LabReport::render`], with the compact table that `contend lab` prints by default:
    /// at most [`COMPACT_WIDTH`] columns wide.
    pub fn render_compact(&self) -> String {
        let mut out = self.compact_table();
        self.render_rest(&mut out, true);
        out
    }

    /// The compact table: per backend (in the order the runs came), a `Backend: ...` line and a
    /// table of scenario, strategy, workers, ops/s, p50 and p99, ok/refused/errors, gave up,
    /// retries, violations and a short verdict ([`short_verdict`]). Only the verdict wraps, to keep it
    /// within [`COMPACT_WIDTH`] columns.
    fn compact_table(&self) -> String {
        let mut backends: Vec<&str> = Vec::new();
        for r in &self.runs {
            if !backends.contains(&r.backend.as_str()) {
                backends.push(&r.backend);
            }
        }
        let mut out = String::new();
        for backend in backends {
            let mut table = Table::new();
            let mut header = vec![
                "scenario",
                "strategy",
                "w",
                "ops/s",
                "p50 ms",
                "p99 ms",
                "ok/ref/err",
            ];
            let runs: Vec<&RunReport> = self.runs.iter().filter(|r| r.backend == backend).collect();
            // Operations that gave up under contention, shown when a run has some.
            let gave_up = runs.iter().any(|r| r.gave_up > 0);
            if gave_up {
                header.push("gave up");
            }
            header.extend(["retries", "viol"]);
            // Anomalies of checked histories (part of `viol`), shown when a run has one.
            let histories = runs.iter().any(|r| r.history.is_some());
            if histories {
                header.push("anom");
            }
            header.push("verdict");
            let columns = header.len();
            table
                .load_preset(UTF8_FULL_CONDENSED)
                .set_content_arrangement(ContentArrangement::Dynamic)
                .set_width(COMPACT_WIDTH)
                .set_header(header);
            for r in runs {
                let num = |s: String| Cell::new(s).set_alignment(CellAlignment::Right);
                let mut row = vec![
                    Cell::new(&r.scenario),
                    Cell::new(&r.strategy),
                    num(r.workers.to_string()),
                    num(format!("{:.0}", r.throughput_ops_s)),
                    num(format!("{:.2}", r.latency_ms.p50)),
                    num(format!("{:.2}", r.latency_ms.p99)),
                    num(format!("{}/{}/{}", r.succeeded, r.refused, r.errors)),
                ];
                if gave_up {
                    row.push(num(r.gave_up.to_string()));
                }
                row.push(num(r.retries.to_string()));
                row.push(num(r.violations.to_string()));
                if histories {
                    row.push(num(r.anomalies_text()));
                }
                row.push(Cell::new(short_verdict(&r.verdict)).fg(row_color(r)));
                table.add_row(row);
            }
            for column in table.column_iter_mut().take(columns - 1) {
                column.set_constraint(ColumnConstraint::ContentWidth);
            }
            if !out.is_empty() {
                out.push('\n');
            }
            let _ = writeln!(out, "Backend: {backend}");
            out.push_str(&table.to_string());
            out.push('\n');
        }
        out
    }

    /// The full table of [`LabReport::render`].
    fn wide_table(&self) -> String {
        let mut table = Table::new();
        let histories = self.runs.iter().any(|r| r.history.is_some());
        let mut header = WIDE_COLUMNS.to_vec();
        if histories {
            // Anomalies of checked histories (part of `violations`), before the verdict.
            header.insert(header.len() - 1, "anomalies");
        }
        table
            .load_preset(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header(header);
        for r in &self.runs {
            let conflicts = r.conflicts_text();
            let color = row_color(r);
            let num = |s: String| Cell::new(s).set_alignment(CellAlignment::Right);
            let mut row = vec![
                Cell::new(&r.scenario),
                Cell::new(&r.strategy),
                Cell::new(&r.backend),
                num(r.workers.to_string()),
                num(r.operations.to_string()),
                num(r.succeeded.to_string()),
                num(r.refused.to_string()),
                num(r.retries.to_string()),
                Cell::new(conflicts),
                num(r.errors.to_string()),
                num(r.gave_up.to_string()),
                num(format!("{:.0}", r.throughput_ops_s)),
                num(format!("{:.2}", r.latency_ms.p50)),
                num(format!("{:.2}", r.latency_ms.p99)),
                num(r.violations.to_string()),
                Cell::new(&r.verdict).fg(color),
            ];
            if histories {
                row.insert(row.len() - 1, num(r.anomalies_text()));
            }
            table.add_row(row);
        }
        let mut out = table.to_string();
        out.push('\n');
        out
    }

    /// What follows either table: locks, details, skipped, legend, summary.
    fn render_rest(&self, out: &mut String, compact: bool) {
        self.render_locks(out);
        self.render_batches(out);
        self.render_details(out);
        if !self.skipped.is_empty() {
            out.push_str("\nSkipped:\n");
            for line in self.skipped_lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        if let Some(cpus) = &self.cpus {
            let _ = writeln!(out, "\n{}", cpus.line());
        }
        out.push_str(LEGEND);
        if compact {
            out.push_str(COMPACT_LEGEND);
        }
        if self.runs.iter().any(|r| r.history.is_some()) {
            out.push_str(HISTORY_LEGEND);
        }
        out.push_str(&self.summary());
    }

    fn render_locks(&self, out: &mut String) {
        let rows = self.runs.iter().filter_map(|r| {
            let l = r.lock.as_ref()?;
            Some(vec![
                r.scenario.clone(),
                r.strategy.clone(),
                r.workers.to_string(),
                l.acquisitions.to_string(),
                l.redis_commands.to_string(),
                format!("{:.2}", l.commands_per_acquisition),
                format!("{:.3}", l.handoff_p50_ms),
                l.fenced_rejections.to_string(),
            ])
        });
        let header = [
            "acquisitions",
            "cmds",
            "cmds/acq",
            "handoff p50 ms",
            "fenced rejections",
        ];
        render_side_table(out, "Distributed locks:", &header, rows);
    }

    /// How `batched` runs combined their operations: commits, operations per commit.
    fn render_batches(&self, out: &mut String) {
        let rows = self.runs.iter().filter_map(|r| {
            let b = r.batch.as_ref()?;
            Some(vec![
                r.scenario.clone(),
                r.strategy.clone(),
                r.workers.to_string(),
                b.commits.to_string(),
                format!("{:.1}", b.ops_per_commit),
                b.retries.to_string(),
                b.splits.to_string(),
            ])
        });
        let header = ["commits", "ops/commit", "retries", "splits"];
        render_side_table(
            out,
            "Batches (one commit for several operations):",
            &header,
            rows,
        );
    }

    /// The skipped combinations, one line per reason: the strategies skipped for the same
    /// reason on the same scenarios share a line, and a set of scenarios that is every scenario
    /// of the report is written "every scenario" (the default lab skips each lock service on
    /// each of its seven scenarios: seven lines said the same thing).
    pub(crate) fn skipped_lines(&self) -> Vec<String> {
        // (backend, reason, strategy) -> scenarios, then (backend, reason, scenarios) ->
        // strategies, each in the order first seen.
        let by_strategy = group_in_order(self.skipped.iter().map(|s| {
            let key = (s.backend.as_str(), s.reason.as_str(), s.strategy.as_str());
            (key, s.scenario.as_str())
        }));
        let grouped = group_in_order(by_strategy.into_iter().map(
            |((backend, reason, strategy), scenarios)| ((backend, reason, scenarios), strategy),
        ));
        let mut every: Vec<&str> = Vec::new();
        for name in self
            .runs
            .iter()
            .map(|r| r.scenario.as_str())
            .chain(self.skipped.iter().map(|s| s.scenario.as_str()))
        {
            if !every.contains(&name) {
                every.push(name);
            }
        }
        grouped
            .into_iter()
            .map(|((backend, reason, scenarios), strategies)| {
                let strategies = strategies.join(", ");
                match scenarios.as_slice() {
                    [one] => format!("{one}/{strategies} on {backend}: {reason}"),
                    _ if scenarios.len() == every.len() => {
                        format!("{strategies} on {backend} (every scenario): {reason}")
                    }
                    _ => format!(
                        "{strategies} on {backend} ({}): {reason}",
                        scenarios.join(", ")
                    ),
                }
            })
            .collect()
    }

    /// Failed invariants and error samples, so a red row can be understood without `--json`.
    fn render_details(&self, out: &mut String) {
        let mut lines = String::new();
        for r in &self.runs {
            let head = format!("  {}/{}/{}w:", r.scenario, r.strategy, r.workers);
            for inv in r.invariants.iter().filter(|i| !i.ok) {
                let _ = writeln!(lines, "{head} {} violated: {}", inv.name, inv.detail);
            }
            if let Some(h) = r.history.as_ref().filter(|h| h.anomalies > 0) {
                let _ = writeln!(lines, "{head} history anomalies: {}", h.kinds_text());
                for w in &h.witnesses {
                    for line in w.lines() {
                        let _ = writeln!(lines, "    {line}");
                    }
                }
            }
            for e in &r.error_samples {
                let _ = writeln!(lines, "{head} error: {e}");
            }
        }
        if !lines.is_empty() {
            out.push_str("\nDetails:\n");
            out.push_str(&lines);
        }
    }

    /// One paragraph: what broke, what held, what failed, and the fastest safe strategy of each
    /// scenario.
    pub fn summary(&self) -> String {
        let unsafe_broken = self
            .runs
            .iter()
            .filter(|r| !r.expected_safe && r.violations > 0)
            .count();
        let unsafe_runs = self.runs.iter().filter(|r| !r.expected_safe).count();
        let safe_runs = self.runs.iter().filter(|r| r.expected_safe).count();
        let failed = self.runs.iter().filter(|r| r.failed).count();
        let mut out = format!(
            "\nSummary: the unsafe baseline broke an invariant in {unsafe_broken} of {unsafe_runs} runs; \
             {safe_runs} runs of safe strategies, {failed} of them failed."
        );
        let mut best: BTreeMap<&str, &RunReport> = BTreeMap::new();
        for r in self.runs.iter().filter(|r| r.expected_safe && !r.failed) {
            let e = best.entry(&r.scenario).or_insert(r);
            if r.throughput_ops_s > e.throughput_ops_s {
                *e = r;
            }
        }
        if !best.is_empty() {
            out.push_str("\nFastest safe strategy:");
            for (scenario, r) in best {
                let _ = write!(
                    out,
                    " {scenario}: {} ({:.0} ops/s at {} workers);",
                    r.strategy, r.throughput_ops_s, r.workers
                );
            }
            out.pop();
            out.push('.');
        }
        if failed > 0 {
            out.push_str("\nFAILED: a strategy expected to be safe broke an invariant or hit errors (see Details).");
        }
        let gave_up = self.gave_up();
        if gave_up > 0 {
            let _ = write!(
                out,
                "\nGAVE UP: {gave_up} operations of safe strategies gave up under contention (their retry budget ran out); exit status 3 unless something failed."
            );
        }
        out.push('\n');
        out
    }
}

const LEGEND: &str = "
How to read this:
  none         reads, decides in Rust, writes back: under concurrency two workers read the same
               value and one write is lost (money appears or vanishes). It is the baseline.
  every other  strategy must show 0 violations (SAFE); a violation or an error there is a bug
               and makes the lab exit with status 1.
  cost         ops/s and p99 show what safety costs; retries and conflicts are work thrown away
               (optimistic, serializable re-run the transaction); lock-based strategies queue on
               the hot row. succeeded + refused + errors + gave up = ops; refused is a business
               \"no\" (no money left).
  gave up      (contention) an operation whose conflicts outlasted its retry budget (a time
               limit, not a count) or whose lock wait ran out: rolled back, nothing written, not
               an error. Exit status: 1 when a safe strategy broke or hit errors, else 3 when
               operations of safe strategies gave up, else 0.
";

const COMPACT_LEGEND: &str = "  \
  columns      w = workers, ok/ref/err = succeeded/refused/errors, viol = violations; the baseline's
               verdicts: broke (expected), held this time, held (1 worker). --wide: every column.
";

/// A table of some runs' own statistics after the main one: `title`, then scenario, strategy,
/// workers and `columns`; nothing when there are no `rows`.
fn render_side_table(
    out: &mut String,
    title: &str,
    columns: &[&str],
    rows: impl Iterator<Item = Vec<String>>,
) {
    let mut table = Table::new();
    let mut header = vec!["scenario", "strategy", "workers"];
    header.extend_from_slice(columns);
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    for row in rows {
        table.add_row(row);
    }
    if table.row_count() == 0 {
        return;
    }
    out.push('\n');
    out.push_str(title);
    out.push('\n');
    out.push_str(&table.to_string());
    out.push('\n');
}
const HISTORY_LEGEND: &str = "  \
  anomalies    (anom) isolation anomalies in the run's recorded history (G0, G1a, G1b, G1c, G-single,
               G2, incompatible-order, lost-update), each also counted as a violation.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn run(strategy: &str, safe: bool, violations: u64, errors: u64) -> RunReport {
        let (verdict, failed) = verdict(safe, violations, errors, 8);
        RunReport {
            scenario: "withdraw".into(),
            strategy: strategy.into(),
            backend: "sqlite".into(),
            workers: 8,
            operations: 100,
            succeeded: 90,
            refused: 10 - errors,
            retries: 0,
            conflicts: BTreeMap::new(),
            errors,
            gave_up: 0,
            duration_s: 1.0,
            throughput_ops_s: 100.0,
            latency_ms: Latency::default(),
            violations,
            expected_safe: safe,
            invariants: vec![Invariant {
                name: "balance".into(),
                ok: violations == 0,
                detail: "final 3, expected 0".into(),
                violations,
            }],
            lock: None,
            batch: None,
            history: None,
            verdict,
            repeat: None,
            error_samples: vec![],
            failed,
            started_s: 0.0,
            events: vec![],
        }
    }

    #[test]
    fn failing_only_for_safe_strategies() {
        let mut report = LabReport::default();
        report.runs.push(run("none", false, 5, 0));
        report.runs.push(run("atomic", true, 0, 0));
        assert!(!report.failed());
        report.runs.push(run("optimistic", true, 0, 2));
        assert!(report.failed());
        let text = report.render();
        assert!(
            text.contains("VIOLATION (unsafe baseline, expected)"),
            "{text}"
        );
        assert!(
            text.contains("balance violated: final 3, expected 0"),
            "{text}"
        );
        assert!(text.contains("ERRORS (BUG)"), "{text}");
        assert!(text.contains("FAILED"), "{text}");
    }

    #[test]
    fn skipped_runs_share_a_line_per_reason() {
        let skip = |scenario: &str, strategy: &str, reason: &str| SkippedRun {
            scenario: scenario.into(),
            strategy: strategy.into(),
            backend: "sqlite".into(),
            reason: reason.into(),
        };
        let mut report = LabReport::default();
        let mut transfer = run("atomic", true, 0, 0);
        transfer.scenario = "transfer".into();
        report.runs.extend([run("atomic", true, 0, 0), transfer]);
        for scenario in ["withdraw", "transfer", "append"] {
            report
                .skipped
                .push(skip(scenario, "redis", "needs --redis-url"));
            report
                .skipped
                .push(skip(scenario, "redis-spin", "needs --redis-url"));
        }
        report
            .skipped
            .push(skip("append", "atomic", "no conditional statement"));
        report.skipped.push(skip("withdraw", "etcd", "no etcd"));
        report.skipped.push(skip("transfer", "etcd", "no etcd"));
        assert_eq!(
            report.skipped_lines(),
            [
                "redis, redis-spin on sqlite (every scenario): needs --redis-url",
                "append/atomic on sqlite: no conditional statement",
                "etcd on sqlite (withdraw, transfer): no etcd",
            ]
        );
        let text = report.render();
        assert!(
            text.contains("\nSkipped:\n  redis, redis-spin on sqlite"),
            "{text}"
        );
    }

    #[test]
    fn the_compact_table_shows_gave_up_only_when_something_gave_up() {
        let mut report = LabReport {
            runs: vec![run("pessimistic", true, 0, 0)],
            ..LabReport::default()
        };
        let header = |r: &LabReport| r.render_compact().lines().nth(2).unwrap_or("").to_string();
        assert!(!header(&report).contains("gave up"), "{}", header(&report));
        report.runs[0].gave_up = 3;
        assert!(header(&report).contains("gave up"), "{}", header(&report));
        assert!(
            report.render_compact().contains("┆       3 ┆"),
            "{}",
            report.render_compact()
        );
    }

    #[test]
    fn compact_table_fits_120_columns_and_wide_has_every_column() {
        let mut report = LabReport::default();
        // The widest cells a run is likely to have, all in one table.
        for (scenario, strategy, backend) in [
            ("get_or_create", "serializable", "http(postgres)"),
            ("get_or_create", "redis-spin", "http(postgres)"),
            ("withdraw", "redis-spin", "mysql"),
        ] {
            let mut r = run(strategy, true, 0, 0);
            r.scenario = scenario.into();
            r.backend = backend.into();
            r.workers = 1024;
            r.operations = 1_000_000;
            r.succeeded = 999_000;
            r.refused = 900;
            r.errors = 100;
            r.retries = 123_456;
            r.throughput_ops_s = 98_765.0;
            r.latency_ms.p50 = 1_234.56;
            r.latency_ms.p99 = 98_765.43;
            if strategy == "redis-spin" {
                r = r.judge(vec![], Some("3 answers were 500 (a service bug)".into()));
            }
            report.runs.push(r);
        }
        report.runs.push(run("none", false, 5, 0));
        report
            .runs
            .push(run("atomic", true, 0, 0).fail("setup failed: no table".into()));
        let compact = report.render_compact();
        println!("{compact}");
        let tables = compact.split("\nDetails:").next().unwrap_or_default();
        let table: Vec<&str> = tables.lines().collect();
        assert!(table.len() > 12, "{compact}");
        for line in &table {
            assert!(
                line.chars().count() <= usize::from(COMPACT_WIDTH),
                "{} columns: {line}\n{compact}",
                line.chars().count()
            );
        }
        // A table per backend, names and numbers unwrapped, the baseline's verdict shortened,
        // a failure's verdict wrapped but whole.
        for backend in ["http(postgres)", "mysql", "sqlite"] {
            assert_eq!(
                compact.matches(&format!("Backend: {backend}\n")).count(),
                1,
                "{compact}"
            );
        }
        for cell in [
            "get_or_create",
            "serializable",
            "999000/900/100",
            "98765.43",
            "broke (expected)",
            "FAILED: setup failed",
            "service bug)",
        ] {
            assert!(compact.contains(cell), "{cell}: {compact}");
        }
        assert!(compact.contains("--wide: every column"), "{compact}");
        assert!(!compact.contains("VIOLATION (unsafe baseline, expected)"));
        assert!(!table.iter().any(|l| l.contains("backend")), "{compact}");

        // --wide: today's full table, every column and the full verdicts.
        let wide = report.render();
        for column in WIDE_COLUMNS {
            assert!(
                wide.lines().nth(1).unwrap_or("").contains(column),
                "{column}: {wide}"
            );
        }
        assert!(
            wide.contains("VIOLATION (unsafe baseline, expected)"),
            "{wide}"
        );
        assert!(
            wide.lines()
                .any(|l| l.chars().count() > usize::from(COMPACT_WIDTH)),
            "the full table is the wide one"
        );
    }

    #[test]
    fn a_checked_history_adds_its_anomalies_to_the_tables_and_details() {
        let mut report = LabReport::default();
        let mut r = run("serializable", true, 0, 0);
        (r.scenario, r.backend, r.workers) =
            ("get_or_create".into(), "http(postgres)".into(), 1024);
        (r.succeeded, r.refused, r.errors, r.retries) = (999_000, 900, 100, 123_456);
        r.latency_ms.p99 = 98_765.43;
        report.runs.push(r);
        let mut none = run("none", false, 12_345, 0);
        (none.scenario, none.backend) = ("append".into(), "http(postgres)".into());
        none.history = Some(HistoryReport {
            operations: 301,
            ok: 301,
            anomalies: 1_234,
            kinds: BTreeMap::from([("G2".to_string(), 4), ("lost-update".to_string(), 1_230)]),
            witnesses: vec![
                "G2 cycle of 2 operations: op 3 -rw-> op 5 -rw-> op 3\n  op 3 (...)".into(),
            ],
            ..HistoryReport::default()
        });
        report.runs.push(none);
        let compact = report.render_compact();
        for line in compact.lines().take_while(|l| !l.starts_with("Details")) {
            assert!(
                line.chars().count() <= usize::from(COMPACT_WIDTH),
                "{line}\n{compact}"
            );
        }
        let header = compact
            .lines()
            .find(|l| l.contains("scenario"))
            .unwrap_or_default();
        assert!(
            header.contains("viol") && header.contains("anom"),
            "{compact}"
        );
        let row = compact
            .lines()
            .find(|l| l.contains("append"))
            .unwrap_or_default();
        assert!(row.contains("12345") && row.contains("1234"), "{row}");
        assert!(
            compact.contains("append/none/8w: history anomalies: 4 G2, 1230 lost-update"),
            "{compact}"
        );
        assert!(compact.contains("    G2 cycle of 2 operations: op 3 -rw-> op 5 -rw-> op 3"));
        let wide = report.render();
        assert!(
            wide.lines().nth(1).unwrap_or("").contains("anomalies"),
            "{wide}"
        );
        let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
        assert_eq!(json["runs"][1]["history"]["anomalies"], 1_234);
        assert_eq!(json["runs"][1]["history"]["kinds"]["G2"], 4);
        assert!(json["runs"][0].get("history").is_none());

        // Without a history, the tables are as before: no anomalies column.
        report.runs.pop();
        assert!(!report.render_compact().contains("anom"));
        assert!(!report.render().contains("anomalies"));
    }

    #[test]
    fn judging_and_failing_a_run() {
        let empty = || RunReport::empty("withdraw", "atomic", "postgres", 8, true, None);
        let held = Invariant {
            name: "balance".into(),
            ok: true,
            detail: String::new(),
            violations: 0,
        };
        let broken = Invariant {
            ok: false,
            violations: 0,
            ..held.clone()
        };
        let run = empty().judge(vec![held.clone()], None);
        assert_eq!((run.verdict.as_str(), run.failed), ("SAFE", false));
        // A failed invariant counts at least one violation.
        let mut loaded = empty();
        loaded.duration_s = 2.5;
        let run = loaded.judge(vec![held.clone(), broken], None);
        assert_eq!(run.violations, 1);
        // The violation is on the timeline, at the end of the load.
        assert_eq!(
            run.events,
            vec![RunEvent {
                at_s: 2.5,
                kind: EventKind::Violation,
                label: "balance: ".into(),
            }]
        );
        assert_eq!(
            (run.verdict.as_str(), run.failed),
            ("VIOLATION (BUG)", true)
        );
        // The target's own failure overrides a clean verdict.
        let run = empty().judge(
            vec![held],
            Some("3 answers were 500 (a service bug)".into()),
        );
        assert_eq!(run.verdict, "FAILED: 3 answers were 500 (a service bug)");
        assert!(run.failed);
        let run = empty().fail("setup failed: no table".into());
        assert_eq!(run.verdict, "FAILED: setup failed");
        assert_eq!((run.errors, run.failed), (1, true));
        assert_eq!(
            run.error_samples,
            vec!["setup failed: no table".to_string()]
        );
    }

    #[test]
    fn json_has_schema_fields() {
        let mut report = LabReport::default();
        report.runs.push(run("none", false, 5, 0));
        let v: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
        let r = &v["runs"][0];
        for key in [
            "scenario",
            "strategy",
            "backend",
            "workers",
            "operations",
            "succeeded",
            "refused",
            "retries",
            "conflicts",
            "errors",
            "gave_up",
            "duration_s",
            "throughput_ops_s",
            "latency_ms",
            "violations",
            "expected_safe",
            "invariants",
        ] {
            assert!(r.get(key).is_some(), "missing {key}");
        }
        assert!(r.get("lock").is_none());
        // The timeline's fields stay out of the document (its schema is fixed).
        assert!(r.get("started_s").is_none() && r.get("events").is_none());
        assert_eq!(r["invariants"][0]["ok"], false);
        assert!(v["skipped"].is_array());
    }
}
