//! The lab's scenarios: each sets up its tables, runs one operation under a chosen strategy, and
//! checks its invariants afterwards. This module holds the seam ([`Scenario`]) and the registry.
//!
//! Scenario files (one per scenario) implement [`Scenario`]; the runner in `crate::runner`
//! knows nothing of their tables.

use std::sync::Arc;

use contend::strategy::Strategy;
use contend::{Backend, BoxFuture, ConflictKind, Db};

/// Everything a scenario needs for one run.
#[derive(Clone)]
pub struct Ctx {
    /// The database under test.
    pub db: Db,
    /// The strategy every operation of this run uses.
    pub strategy: Strategy,
    /// Concurrent workers.
    pub workers: usize,
    /// Planned operations in all (the scenario sizes its data from it).
    pub operations: u64,
    /// Distributed locks, for `redis`, `redis-spin` and `redlock` (None otherwise).
    pub locks: Option<Arc<dyn KeyLock>>,
    /// A short unique name for this run, to prefix tables or keys with if needed.
    pub run_id: String,
}

/// A distributed lock service, as the lab needs it (implemented over `contend-redis`).
pub trait KeyLock: Send + Sync {
    /// Acquires the lock on `key`, waiting as the implementation does.
    fn lock<'a>(&'a self, key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>>;
}

/// A held distributed lock.
pub trait HeldLock: Send {
    /// The fencing token of this grant (strictly increasing per key).
    fn fencing_token(&self) -> u64;
    /// Releases the lock.
    fn release(self: Box<Self>) -> BoxFuture<'static, contend::Result<()>>;
}

/// What happened to one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It did what it was asked.
    Succeeded,
    /// A business "no": insufficient funds, sold out, seat taken, no job left.
    Refused,
    /// It failed: retries exhausted, an unexpected database error, a lock not acquired.
    Error(String),
}

/// The report of one operation.
#[derive(Debug, Clone)]
pub struct OpReport {
    /// What happened.
    pub outcome: Outcome,
    /// Transaction attempts (1 when no retry was needed; 0 when no transaction ran).
    pub attempts: u32,
    /// Conflicts met on the way (each one caused a retry, or ended the operation).
    pub conflicts: Vec<ConflictKind>,
    /// Writes refused because they carried a stale fencing token.
    pub fenced_rejections: u32,
}

impl OpReport {
    /// An operation with the given outcome and no retries.
    pub fn new(outcome: Outcome) -> Self {
        OpReport {
            outcome,
            attempts: 1,
            conflicts: Vec::new(),
            fenced_rejections: 0,
        }
    }
}

/// Totals of a run, handed to [`Scenario::check`].
#[derive(Debug, Clone, Default)]
pub struct Totals {
    /// Operations that succeeded.
    pub succeeded: u64,
    /// Operations refused for a business reason.
    pub refused: u64,
    /// Operations that failed.
    pub errors: u64,
}

/// The result of one invariant check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Invariant {
    /// Short name, e.g. `balance_conserved`.
    pub name: String,
    /// Whether it held.
    pub ok: bool,
    /// What was measured, in words and numbers.
    pub detail: String,
    /// How many violations (0 when ok).
    #[serde(skip)]
    pub violations: u64,
}

/// A lab scenario.
pub trait Scenario: Send + Sync + 'static {
    /// Its name on the command line and in reports (`withdraw`, `transfer`, ...).
    fn name(&self) -> &'static str;

    /// `Ok` if this scenario can run `strategy` on `backend`, or the reason it is skipped.
    fn supports(&self, strategy: Strategy, backend: Backend) -> Result<(), String>;

    /// Creates (or recreates) its tables and data, sized for `ctx.operations`.
    fn setup<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>>;

    /// Runs operation number `seq` (0-based, over all workers) from worker `worker`.
    fn op<'a>(&'a self, ctx: &'a Ctx, worker: usize, seq: u64) -> BoxFuture<'a, OpReport>;

    /// Checks the invariants after the run.
    fn check<'a>(&'a self, ctx: &'a Ctx, totals: &'a Totals)
    -> BoxFuture<'a, anyhow::Result<Vec<Invariant>>>;
}
