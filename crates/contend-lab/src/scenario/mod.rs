//! The lab's scenarios: each sets up its tables, runs one operation under a chosen strategy, and
//! checks its invariants afterwards. This module holds the seam ([`Scenario`]) and the registry.
//!
//! Scenario files (one per scenario) implement [`Scenario`]; the runner in `crate::runner`
//! knows nothing of their tables.

pub mod booking;
mod claim;
pub mod get_or_create;
pub mod order;
pub mod queue;
pub mod transfer;
pub mod withdraw;

use std::sync::Arc;

use contend::strategy::Strategy;
use contend::strategy::{advisory, pessimistic, serializable};
use contend::{
    Attempted, Backend, BoxFuture, ConflictKind, Db, Error, RowLock, Session, Tx, TxOptions,
};

/// Every scenario, in the order the lab runs them (`withdraw` first: it tells the story).
pub fn registry() -> Vec<Arc<dyn Scenario>> {
    vec![
        Arc::new(withdraw::Withdraw::new()),
        Arc::new(transfer::Transfer::new()),
        Arc::new(order::Order::new()),
        Arc::new(booking::Booking::new()),
        Arc::new(get_or_create::GetOrCreate::new()),
        Arc::new(queue::Queue::new()),
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

/// A business "no" (insufficient funds, sold out, seat taken): returned from a transaction body
/// as [`Error::Aborted`] so that the transaction rolls back and the operation counts as refused.
#[derive(Debug)]
pub(crate) struct Refusal(pub &'static str);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Refusal {}

/// The error a transaction body returns to refuse.
pub(crate) fn refuse(why: &'static str) -> Error {
    Error::aborted(Refusal(why))
}

/// Whether `err` is a [`Refusal`].
pub(crate) fn is_refusal(err: &Error) -> bool {
    matches!(err, Error::Aborted(e) if e.is::<Refusal>())
}

/// The outcome of a body result: `Ok` succeeded, a [`Refusal`] refused, anything else an error.
pub(crate) fn outcome_of<T>(result: &contend::Result<T>) -> Outcome {
    match result {
        Ok(_) => Outcome::Succeeded,
        Err(e) if is_refusal(e) => Outcome::Refused,
        Err(e) => Outcome::Error(e.to_string()),
    }
}

/// The report of one operation run through [`Db::run`].
pub(crate) fn report<T>(run: Attempted<T>) -> OpReport {
    OpReport {
        outcome: outcome_of(&run.result),
        attempts: run.attempts,
        conflicts: run.conflicts,
        fenced_rejections: 0,
    }
}

/// The report of one operation that ran without a transaction (autocommit statements).
pub(crate) fn report_plain<T>(result: contend::Result<T>) -> OpReport {
    let conflicts = result
        .as_ref()
        .err()
        .and_then(Error::conflict)
        .into_iter()
        .collect();
    OpReport {
        outcome: outcome_of(&result),
        attempts: 1,
        conflicts,
        fenced_rejections: 0,
    }
}

/// The pause between reading and writing in every read-decide-write of every strategy: a yield to
/// the scheduler, which lets other workers read the same row. It widens the race window of the
/// unsafe baseline to what a real handler (which does some work) has, and costs the safe
/// strategies the same.
pub(crate) async fn think() {
    tokio::task::yield_now().await;
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
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(db.pool())
        .await?)
}

/// `SELECT` one `BIGINT` (autocommit).
pub(crate) async fn scalar(db: &Db, sql: &str) -> contend::Result<i64> {
    Ok(db.query_scalar(sql).fetch_one(db.pool()).await?)
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

/// How a scenario's read-decide-write is guarded by the strategies [`guarded`] runs.
pub(crate) struct Guard<'a> {
    /// The keys the operation touches: advisory locks (taken in sorted order) and the Redis
    /// locks with their fences (see [`fenced::run`]).
    pub keys: &'a [String],
    /// The row lock the read takes under `pessimistic`.
    pub row_lock: RowLock,
    /// Transaction options (retries) of the lock-taking strategies.
    pub lock_options: TxOptions,
}

/// Runs a read-decide-write `body` under `ctx.strategy`, for the strategies that share its shape:
/// `pessimistic` (the read appends the row-lock clause `body` is given), `serializable`,
/// `advisory` (transaction-scoped advisory locks on `guard.keys` first) and the Redis ones
/// ([`fenced::run`]). The other strategies differ per scenario, which runs them itself; handed
/// one of those, this reports an error. Every transaction but the fenced one runs on `session`.
pub(crate) async fn guarded<T, F>(
    ctx: &Ctx,
    session: &mut Session,
    guard: &Guard<'_>,
    body: F,
) -> OpReport
where
    T: Send + 'static,
    F: for<'c> Fn(&'c mut Tx, &'static str) -> BoxFuture<'c, contend::Result<T>>
        + Clone
        + Send
        + Sync
        + 'static,
{
    match ctx.strategy {
        Strategy::Pessimistic => {
            let lock = match pessimistic::lock_clause(ctx.db.backend(), guard.row_lock) {
                Ok(lock) => lock,
                Err(e) => return report_plain::<()>(Err(e)),
            };
            report(session.run(&guard.lock_options, |tx| body(tx, lock)).await)
        }
        Strategy::Serializable => report(
            session
                .run(&serializable::options(), |tx| body(tx, ""))
                .await,
        ),
        Strategy::Advisory => {
            let mut keys = guard.keys.to_vec();
            keys.sort();
            keys.dedup();
            let run = session
                .run(&guard.lock_options, |tx| {
                    let keys = keys.clone();
                    let body = body.clone();
                    Box::pin(async move {
                        for k in &keys {
                            advisory::lock_xact(tx, k, None).await?;
                        }
                        body(tx, "").await
                    })
                })
                .await;
            report(run)
        }
        Strategy::Redis | Strategy::RedisSpin | Strategy::Redlock => fenced::report_of(
            fenced::run(ctx, guard.keys, &guard.lock_options, move |tx| body(tx, "")).await,
        ),
        other => report_plain::<()>(Err(Error::aborted(format!(
            "no implementation of strategy {other}"
        )))),
    }
}

/// The `redis`, `redis-spin` and `redlock` strategies: a distributed lock from [`Ctx::locks`]
/// around the read-decide-write, and [`contend::fencing`] as the safety net in the database.
///
/// Every operation takes the locks on its keys in sorted order, then runs one transaction that
/// first calls [`contend::fencing::fence`] for each key (the key is the fence resource, the
/// grant's token the fencing token), and only then reads, decides and writes. A holder whose lock
/// expired while it was paused carries an older token than the next holder: its fence fails with
/// [`Error::StaleFencingToken`], the transaction rolls back, and the operation counts one fenced
/// rejection (and an error). Fencing first also means the reads happen under the fence row's
/// lock, so they see every earlier holder's committed writes.
///
/// The spin baseline (`redis-spin`) has no fencing token: its grants carry 0, which the fence
/// accepts on a resource no real token has written (every run has resources of its own), so it
/// goes through the same transaction but a stale spin holder is not caught.
pub(crate) mod fenced {
    use contend::fencing::{self, FencingToken};
    use contend::{Attempted, BoxFuture, Error, Tx, TxOptions};

    use super::{Ctx, HeldLock, OpReport, report};

    /// Creates the fence table when `ctx.strategy` is a lock-based one (call from setup).
    pub(crate) async fn setup(ctx: &Ctx) -> anyhow::Result<()> {
        if ctx.strategy.needs_redis() {
            fencing::ensure_schema(&ctx.db).await?;
        }
        Ok(())
    }

    /// Deletes this run's fence rows (`resources`, the run's lock keys) when `ctx.strategy` is
    /// a lock-based one (call from teardown). The fence table itself stays: other runs and
    /// other programs share it.
    pub(crate) async fn teardown(ctx: &Ctx, resources: &[String]) -> anyhow::Result<()> {
        if !ctx.strategy.needs_redis() {
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
            q.execute(ctx.db.pool()).await?;
        }
        Ok(())
    }

    /// The report of a fenced operation: as [`report`], plus one fenced rejection when the
    /// transaction was refused for a stale token.
    pub(crate) fn report_of<T>(run: Attempted<T>) -> OpReport {
        let stale = matches!(run.result, Err(Error::StaleFencingToken { .. }));
        let mut rep = report(run);
        rep.fenced_rejections = u32::from(stale);
        rep
    }

    /// Takes the locks on `keys` one by one in sorted order (so that two operations needing the
    /// same keys cannot deadlock), then runs `body` in a transaction (with `options`, retried as
    /// they say) that fences every key with its grant's token first; releases the locks after
    /// the transaction ended. When a lock is not acquired, no transaction runs (0 attempts).
    pub(crate) async fn run<T, F>(
        ctx: &Ctx,
        keys: &[String],
        options: &TxOptions,
        body: F,
    ) -> Attempted<T>
    where
        T: Send,
        F: for<'c> FnMut(&'c mut Tx) -> BoxFuture<'c, contend::Result<T>> + Clone + Send + 'static,
    {
        let Some(locks) = ctx.locks.as_ref() else {
            return not_run(Error::aborted(format!(
                "strategy {} needs a Redis lock service (--redis-url / --redlock-urls)",
                ctx.strategy
            )));
        };
        let mut order: Vec<String> = keys.to_vec();
        order.sort();
        order.dedup();
        let mut held: Vec<(String, Box<dyn HeldLock>)> = Vec::with_capacity(order.len());
        let mut failed = None;
        for key in order {
            match locks.lock(&key).await {
                Ok(h) => held.push((key, h)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let run = match failed {
            Some(e) => not_run(e),
            None => {
                let fences: Vec<(String, FencingToken)> = held
                    .iter()
                    .map(|(key, h)| (key.clone(), FencingToken::new(h.fencing_token())))
                    .collect();
                ctx.db
                    .run(options, move |tx| {
                        let fences = fences.clone();
                        let mut body = body.clone();
                        Box::pin(async move {
                            for (resource, token) in &fences {
                                fencing::fence(tx, resource, *token).await?;
                            }
                            body(tx).await
                        })
                    })
                    .await
            }
        };
        for (_, h) in held.into_iter().rev() {
            if let Err(e) = h.release().await {
                // A failed release only delays the next holder until the lock's lease ends.
                tracing::debug!(error = %e, "lock release failed");
            }
        }
        run
    }

    fn not_run<T>(error: Error) -> Attempted<T> {
        Attempted {
            result: Err(error),
            attempts: 0,
            conflicts: Vec::new(),
        }
    }
}

#[cfg(test)]
mod lock_tests;
#[cfg(test)]
mod tests;
