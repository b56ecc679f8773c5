//! Faults during load: `contend faults` (called by `scripts/faults`, which brings up throwaway
//! servers). Each phase runs every chosen strategy at once, as two instances sharing the
//! database, while one fault is injected; then each run is accounted from the final state.
//!
//! - [`ledger`]: what clients were told vs what the ledger holds: acknowledged, failed,
//!   unknown, lost, duplicated; recovery times.
//! - [`books`]: the workload's tables: the lab's transfer with the operation id in the ledger.
//! - [`freeze`]: the `lock-freeze` fault: a lock holder in a process of its own, frozen
//!   (SIGSTOP) past its lease and resumed.
//! - [`proxy`]: the delaying TCP proxy (latency on the database link).
//! - [`inject`]: the injectors and what each observed.
//! - [`run`]: the phases, the workers (careful clients that look an operation up after a lost
//!   answer before trying it again).
//! - [`service`]: the `instance-kill` phase: two `contend serve` instances, one killed with
//!   SIGKILL at a time, clients retrying with and without idempotency keys.
//! - [`report`]: the table, the JSON document and the exit status.
//! - [`timeline`]: each run over time (acknowledgements per bucket, injections, convicted
//!   operations), for the page ([`crate::html::faults`]).
//! - [`cli`]: the `contend faults` flags.

pub mod books;
pub mod cli;
pub mod freeze;
pub mod inject;
pub mod ledger;
pub mod proxy;
pub mod report;
pub mod run;
pub mod service;
pub mod timeline;

use std::collections::BTreeMap;
use std::time::Duration;

use contend::Backend;

use serde::Serialize;

/// A fault the suite injects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Every other client connection of the database terminated by the server, repeatedly.
    KillConnections {
        /// Time between two rounds of kills.
        every: Duration,
    },
    /// Latency added to the database link by a delaying proxy, from a quarter of the run on.
    Latency {
        /// Delay per chunk, each way.
        delay: Duration,
    },
    /// The database server restarted once, a quarter of the way through the run.
    DbRestart {
        /// The shell command that restarts it.
        command: String,
    },
    /// A Redis node killed and restarted once, a quarter of the way through the run.
    RedisRestart {
        /// The node (its run id tells that it really restarted).
        url: String,
        /// The shell command that kills and restarts it.
        command: String,
    },
    /// A separate process holding Redis or etcd locks on two accounts frozen (SIGSTOP) past its
    /// lease, then resumed (SIGCONT), once per lock strategy of the phase.
    LockFreeze {
        /// The `contend` binary that runs the holder.
        bin: std::path::PathBuf,
    },
    /// One node of a Galera cluster stopped and started again (it rejoins by state transfer),
    /// a quarter of the way through the run, while the workers use every node.
    NodeRestart {
        /// The node's URL (its start time and state tell that it restarted and rejoined).
        url: String,
        /// Its number in the list of nodes (1-based).
        node: usize,
        /// The shell command that restarts it.
        command: String,
    },
}

impl Fault {
    /// Its name in reports and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::KillConnections { .. } => "kill-connections",
            Fault::Latency { .. } => "latency",
            Fault::DbRestart { .. } => "db-restart",
            Fault::RedisRestart { .. } => "redis-restart",
            Fault::LockFreeze { .. } => "lock-freeze",
            Fault::NodeRestart { .. } => "node-restart",
        }
    }
}

/// The name of a phase's database in the report: `galera` for the nodes of a cluster (a
/// comma-separated list of URLs), else [`backend_name`].
pub fn database_name(url: &str, backend: Backend) -> &'static str {
    if contend::nodes::split_urls(url).len() > 1 {
        "galera"
    } else {
        backend_name(backend)
    }
}

/// The short name of a backend in the report (`postgres`, `mysql`, `sqlite`).
pub fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "postgres",
        Backend::MySql => "mysql",
        _ => "sqlite",
    }
}

/// One fault x strategy x backend.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    /// The fault's name.
    pub fault: String,
    /// The strategy.
    pub strategy: String,
    /// The backend.
    pub backend: String,
    /// Whether the strategy claims to stay correct across instances (all but `none` and
    /// `mutex`).
    pub expected_safe: bool,
    /// Operations the clients were told succeeded.
    pub acknowledged: u64,
    /// Operations the clients were told definitely failed.
    pub failed: u64,
    /// Operations whose outcome the clients never learnt.
    pub unknown: u64,
    /// Attempts that got no answer (resolved by a ledger lookup or not).
    pub no_answer: u64,
    /// Acknowledged operations missing from the final state.
    pub lost: u64,
    /// Operations applied more than once.
    pub duplicated: u64,
    /// Invariant violations of the final state (and failed operations that were applied).
    pub violations: u64,
    /// What the violations were.
    pub violation_details: Vec<String>,
    /// Seconds from the fault to the first success after it (the longest over the fault's
    /// injections); `null` where the fault has no such moment or nothing succeeded after it.
    pub recovery_s: Option<f64>,
    /// Whether operations succeeded again after every injection (always true for faults
    /// without a recovery time).
    pub recovered: bool,
    /// Instances the run's workers were split over.
    pub instances: usize,
    /// What the injector did and observed.
    pub injected: String,
    /// Whether the fault's effect was observed.
    pub fault_observed: bool,
    /// How many times it was injected.
    pub injections: u64,
    /// Operations in flight at each injection (all strategies of the phase together; for
    /// `instance-kill`, the requests open on the instance killed).
    pub in_flight: Vec<u64>,
    /// Attempts that did not succeed, by what they met (`stale fencing token`, `connection
    /// lost`, `HTTP 503`, ...).
    pub errors: BTreeMap<String, u64>,
    /// The run over time, for the page: acknowledged operations per bucket, the injections,
    /// when lost and duplicated operations were answered.
    pub timeline: timeline::Timeline,
}

impl RunRow {
    /// A row holding what was counted (`counts`), the recovery time and what the injector
    /// logged, over two instances; the caller fills in the rest (fault, strategy, backend,
    /// expectation, violations, recovered, errors) with struct-update syntax.
    pub(crate) fn measured(
        counts: &ledger::Counts,
        log: &inject::FaultLog,
        recovery: Option<Duration>,
    ) -> RunRow {
        RunRow {
            fault: String::new(),
            strategy: String::new(),
            backend: String::new(),
            expected_safe: false,
            acknowledged: counts.acknowledged,
            failed: counts.failed,
            unknown: counts.unknown,
            no_answer: counts.no_answer,
            lost: counts.lost,
            duplicated: counts.duplicated,
            violations: 0,
            violation_details: Vec::new(),
            recovery_s: recovery.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0),
            recovered: false,
            instances: 2,
            injected: log.effect.clone(),
            fault_observed: log.observed,
            injections: log.injected.len() as u64,
            in_flight: log.in_flight.clone(),
            errors: BTreeMap::new(),
            timeline: timeline::Timeline::default(),
        }
    }
}
