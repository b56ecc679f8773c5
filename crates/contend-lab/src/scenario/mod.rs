//! The lab's scenarios: each sets up its tables, runs one operation under a chosen strategy, and
//! checks its invariants afterwards. This module holds the seam ([`Scenario`]) and the registry.
//!
//! Scenario files (one per scenario) implement [`Scenario`]; the runner in `crate::runner`
//! knows nothing of their tables. A scenario writes its operation once, as a
//! [`contend::strategy::Operation`] (keys, read, decide-and-write, the conditional-SQL form for
//! `atomic`), and `execute` runs it with the lab's one [`Executor`] under the run's strategy:
//! no scenario dispatches on the strategy itself.

pub mod append;
pub mod booking;
mod claim;
pub mod get_or_create;
pub mod order;
pub mod queue;
pub mod transfer;
pub mod withdraw;

use std::sync::Arc;

use contend::strategy::{Executor, Operation, Strategy};
use contend::{Backend, BoxFuture, ConflictKind, Db, Error, Session, TxError};

/// Every scenario, in the order the lab runs them (`withdraw` first: it tells the story).
pub fn registry() -> Vec<Arc<dyn Scenario>> {
    vec![
        Arc::new(withdraw::Withdraw::new()),
        Arc::new(transfer::Transfer::new()),
        Arc::new(order::Order::new()),
        Arc::new(booking::Booking::new()),
        Arc::new(get_or_create::GetOrCreate::new()),
        Arc::new(queue::Queue::new()),
        Arc::new(append::Append::new()),
    ]
}

/// The scenario called `name`, if there is one.
pub fn by_name(name: &str) -> Option<Arc<dyn Scenario>> {
    registry().into_iter().find(|s| s.name() == name)
}

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
    /// The lab's one strategy executor (built once per lab run, with the lock services of
    /// `redis`, `redis-spin` and `redlock`): every scenario runs its operation with it.
    pub executor: Executor,
    /// A short unique name for this run, to prefix tables or keys with if needed.
    pub run_id: String,
    /// The run's history recorder, for a scenario that records one
    /// ([`Scenario::records_history`]); `None` for the others.
    pub history: Option<Arc<crate::history::Recorder>>,
}

/// What happened to one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It did what it was asked.
    Succeeded,
    /// A business "no": insufficient funds, sold out, seat taken, no job left.
    Refused,
    /// It gave up under contention: its conflicts outlasted the retry budget, or a lock was
    /// not acquired within the wait ([`contend::Error::is_contention`]). Nothing was written
    /// and nothing is wrong; it is counted apart from errors.
    GaveUp(String),
    /// It failed: an unexpected database error, a stale fencing token, an unreachable server.
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
    /// Operations that gave up under contention (rolled back, nothing written).
    pub gave_up: u64,
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

    /// Whether this scenario records each operation's history into `ctx.history` and checks it
    /// (the runner then makes a recorder per run). The default: no.
    fn records_history(&self) -> bool {
        false
    }

    /// Creates (or recreates) its tables and data, sized for `ctx.operations`.
    fn setup<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>>;

    /// Runs operation number `seq` (0-based, over all workers) from worker `worker` on the
    /// worker's own held connection (`session`), as a pgbench client keeps its connection: sqlx's
    /// pool spends a round trip testing every connection given back to it, which would otherwise
    /// be measured as part of each operation. A scenario that does not use the session ignores
    /// it (a session connects only when first used).
    fn op_in_session<'a>(
        &'a self,
        ctx: &'a Ctx,
        session: &'a mut Session,
        worker: usize,
        seq: u64,
    ) -> BoxFuture<'a, OpReport>;

    /// [`Scenario::op_in_session`] on a session of its own (used once, so its connection goes
    /// back to the pool afterwards).
    fn op<'a>(&'a self, ctx: &'a Ctx, worker: usize, seq: u64) -> BoxFuture<'a, OpReport> {
        Box::pin(async move {
            let mut session = ctx.db.session();
            self.op_in_session(ctx, &mut session, worker, seq).await
        })
    }

    /// Checks the invariants after the run.
    fn check<'a>(
        &'a self,
        ctx: &'a Ctx,
        totals: &'a Totals,
    ) -> BoxFuture<'a, anyhow::Result<Vec<Invariant>>>;

    /// Drops what [`Scenario::setup`] created (called after [`Scenario::check`]; the default
    /// does nothing).
    fn teardown<'a>(&'a self, _ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

// ---- helpers shared by the scenario files ----

/// The error of a scenario operation: a business "no" (insufficient funds, sold out, seat
/// taken), or a database error (conflicts recognised for retry).
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A business refusal: the transaction rolls back and the operation counts as refused.
    #[error("{0}")]
    Refused(&'static str),
    /// Anything else: a database error, a lock not acquired, a stale fencing token.
    #[error(transparent)]
    Db(#[from] Error),
}

impl From<sqlx::Error> for LabError {
    fn from(e: sqlx::Error) -> Self {
        LabError::Db(e.into())
    }
}

impl TxError for LabError {
    fn conflict(&self) -> Option<ConflictKind> {
        match self {
            LabError::Db(e) => e.conflict(),
            LabError::Refused(_) => None,
        }
    }
}

/// Runs `op` under `ctx.strategy` with the lab's executor on `session`, and reports it:
/// attempts and conflicts as the executor counted them, a [`LabError::Refused`] as refused, a
/// write refused for a stale fencing token as one fenced rejection.
pub(crate) async fn execute<O>(
    ctx: &Ctx,
    session: &mut Session,
    op: O,
) -> (Result<O::Output, LabError>, OpReport)
where
    O: Operation<Error = LabError>,
{
    let done = ctx.executor.run(ctx.strategy, session, Arc::new(op)).await;
    let mut conflicts = done.conflicts;
    let outcome = match &done.result {
        Ok(_) => Outcome::Succeeded,
        Err(LabError::Refused(_)) => Outcome::Refused,
        Err(e) => {
            // No transaction ran (the read of `none`/`mutex`, a lock not acquired): the error's
            // own conflict is the only one met.
            if done.attempts == 0 {
                conflicts.extend(e.conflict());
            }
            match e {
                LabError::Db(db) if db.is_contention() => Outcome::GaveUp(e.to_string()),
                _ => Outcome::Error(e.to_string()),
            }
        }
    };
    let report = OpReport {
        outcome,
        attempts: done.attempts,
        conflicts,
        fenced_rejections: u32::from(done.fenced),
    };
    (done.result, report)
}

/// The pause between reading and writing in every read-decide-write of every strategy: a yield to
/// the scheduler, which lets other workers read the same row. It widens the race window of the
/// unsafe baseline to what a real handler (which does some work) has, and costs the safe
/// strategies the same.
pub(crate) async fn think() {
    tokio::task::yield_now().await;
}

/// `sql` with its `?` placeholders written as `backend` wants, for `sqlx::query*` on the bare
/// connection an [`Operation::read`] gets.
pub(crate) fn sql_for(backend: Backend, sql: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(backend.sql(sql).into_owned())
}

/// A table name for this run: `lab_<base>_<run id>`, sanitized to a plain identifier that fits
/// every backend's 63-character limit.
pub(crate) fn table_name(ctx: &Ctx, base: &str) -> String {
    let run: String = ctx
        .run_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let mut name = format!("lab_{base}_{run}");
    name.truncate(63);
    name
}

/// `CREATE TABLE` options: InnoDB on MariaDB (row locks, transactions), nothing elsewhere.
pub(crate) fn engine(backend: Backend) -> &'static str {
    if backend == Backend::MySql {
        " ENGINE=InnoDB"
    } else {
        ""
    }
}

/// An expression that turns `SUM(...)` into a `BIGINT` on every backend (PostgreSQL sums
/// `BIGINT` into `NUMERIC`, MariaDB into `DECIMAL`, which the Any driver cannot decode).
pub(crate) fn sum_bigint(backend: Backend, expr: &str) -> String {
    match backend {
        Backend::Postgres => format!("CAST(COALESCE(SUM({expr}), 0) AS BIGINT)"),
        Backend::MySql => format!("CAST(COALESCE(SUM({expr}), 0) AS SIGNED)"),
        _ => format!("COALESCE(SUM({expr}), 0)"),
    }
}

/// Runs `sql` (with `?` placeholders) and returns its rows as pairs of `BIGINT`s.
pub(crate) async fn pairs(db: &Db, sql: &str) -> contend::Result<Vec<(i64, i64)>> {
    let sql = db.backend().sql(sql).into_owned();
    let q = sqlx::query_as(sqlx::AssertSqlSafe(sql));
    db.session()
        .autocommit(|c| Box::pin(async move { Ok(q.fetch_all(c).await?) }))
        .await
}

/// `SELECT` one `BIGINT` (autocommit).
pub(crate) async fn scalar(db: &Db, sql: &str) -> contend::Result<i64> {
    fetch_scalar(db, db.query_scalar(sql)).await
}

/// Fetches the one value of `q` (autocommit). Statements outside the workers' operations go
/// through [`contend::Session::autocommit`] rather than the pool, so that behind a transaction
/// pooler (pgbouncer) they run inside a transaction, the only place where the pooler keeps a
/// statement's prepare and execute on one server connection.
pub(crate) async fn fetch_scalar(
    db: &Db,
    q: sqlx::query::QueryScalar<'static, sqlx::Any, i64, sqlx::any::AnyArguments>,
) -> contend::Result<i64> {
    db.session()
        .autocommit(|c| Box::pin(async move { Ok(q.fetch_one(c).await?) }))
        .await
}

/// Runs the write `q` (autocommit, as [`fetch_scalar`]; on SQLite in the writer's turn, as every
/// write of the lab, [`contend::Session::write_autocommit`]) and returns the rows it affected.
pub(crate) async fn exec(
    db: &Db,
    q: sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>,
) -> contend::Result<u64> {
    db.session()
        .write_autocommit(|c| Box::pin(async move { Ok(q.execute(c).await?.rows_affected()) }))
        .await
}

/// Drops `tables` if they exist.
pub(crate) async fn drop_tables(db: &Db, tables: &[String]) -> anyhow::Result<()> {
    for t in tables {
        db.execute_script(&format!("DROP TABLE IF EXISTS {t}"))
            .await?;
    }
    Ok(())
}

/// Whether `strategy` can run on `backend` at all (the enum's own rule).
pub(crate) fn base_support(strategy: Strategy, backend: Backend) -> Result<(), String> {
    strategy.supported_on(backend).map_err(str::to_string)
}

/// An invariant that holds when `violations` is 0.
pub(crate) fn invariant(name: &str, violations: u64, detail: String) -> Invariant {
    Invariant {
        name: name.to_string(),
        ok: violations == 0,
        detail,
        violations,
    }
}

/// The fence table of the lock-service strategies (`redis`, `redis-spin`, `redlock`, `etcd`): the
/// executor fences every key with its grant's token ([`contend::fencing::fence`]) in the
/// operation's transaction; scenarios create the table in setup and remove their rows in
/// teardown.
pub(crate) mod fenced {
    use contend::fencing;

    use super::Ctx;

    /// Creates the fence table when `ctx.strategy` is a lock-based one (call from setup).
    pub(crate) async fn setup(ctx: &Ctx) -> anyhow::Result<()> {
        if ctx.strategy.needs_lock_service() {
            fencing::ensure_schema(&ctx.db).await?;
        }
        Ok(())
    }

    /// Deletes this run's fence rows (`resources`, the run's lock keys) when `ctx.strategy` is
    /// a lock-based one (call from teardown). The fence table itself stays: other runs and
    /// other programs share it.
    pub(crate) async fn teardown(ctx: &Ctx, resources: &[String]) -> anyhow::Result<()> {
        if !ctx.strategy.needs_lock_service() {
            return Ok(());
        }
        for chunk in resources.chunks(100) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!(
                "DELETE FROM {} WHERE resource IN ({marks})",
                fencing::FENCE_TABLE
            );
            let mut q = ctx.db.query(&sql);
            for r in chunk {
                q = q.bind(r.clone());
            }
            super::exec(&ctx.db, q).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod lock_tests;
#[cfg(test)]
mod tests;
