//! `queue`: a job table used as a work queue. Each operation claims the oldest pending job,
//! processes it (records it in a `processed` table) and marks it done, in one transaction; no
//! job left means refused. Half as many jobs as operations, so the queue drains.
//!
//! `pessimistic` is the textbook form: `SELECT ... ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED`
//! hands each worker a different job without waiting (SQLite: one writer at a time). `atomic`
//! claims with a conditional `UPDATE ... WHERE status = 0` and moves on to the next job when it
//! lost the race.
//!
//! Invariants: no job processed twice; every job processed (the queue drained); a job is done
//! exactly when it was processed.

use contend::strategy::Strategy;
use contend::strategy::mutex::KeyedMutex;
use contend::strategy::optimistic;
use contend::{Backend, BoxFuture, Db, RetryPolicy, RowLock, Session, Tx, TxOptions};

use super::{
    Ctx, Guard, Invariant, OpReport, Scenario, Totals, base_support, drop_tables, engine, fenced,
    guarded, invariant, op_on_own_session, refuse, report, report_plain, scalar, table_name, think,
};

const EMPTY: &str = "no job left";

/// The queue scenario.
#[derive(Debug, Default)]
pub struct Queue {
    mutex: KeyedMutex,
}

impl Queue {
    /// The scenario.
    pub fn new() -> Self {
        Queue::default()
    }

    fn jobs(operations: u64) -> i64 {
        i64::try_from(operations / 2).unwrap_or(i64::MAX).max(1)
    }
}

fn tables(ctx: &Ctx) -> (String, String) {
    (table_name(ctx, "queue_job"), table_name(ctx, "queue_done"))
}

fn lock_options() -> TxOptions {
    TxOptions::new().retry(RetryPolicy::new().max_attempts(30))
}

/// Marks `job` done by `worker` and records its processing.
async fn process_tx(
    tx: &mut Tx,
    jobs: &str,
    done: &str,
    job: i64,
    worker: i64,
) -> contend::Result<()> {
    tx.query(&format!(
        "UPDATE {jobs} SET status = 1, worker = ? WHERE id = ?"
    ))
    .bind(worker)
    .bind(job)
    .execute(tx.conn())
    .await?;
    tx.query(&format!("INSERT INTO {done} (job, worker) VALUES (?, ?)"))
        .bind(job)
        .bind(worker)
        .execute(tx.conn())
        .await?;
    Ok(())
}

/// The oldest pending job and its version, the query ending with `lock`.
async fn next_job(tx: &mut Tx, jobs: &str, lock: &str) -> contend::Result<Option<(i64, i64)>> {
    let sql = format!("SELECT id, version FROM {jobs} WHERE status = 0 ORDER BY id LIMIT 1{lock}");
    let sql = tx.backend().sql(&sql).into_owned();
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_optional(tx.conn())
        .await?)
}

/// Claim by reading (autocommit), deciding, then writing in separate statements.
async fn unlocked(db: &Db, jobs: &str, done: &str, worker: i64) -> contend::Result<()> {
    let sql = format!("SELECT id FROM {jobs} WHERE status = 0 ORDER BY id LIMIT 1");
    let job: Option<i64> = db.query_scalar(&sql).fetch_optional(db.pool()).await?;
    think().await;
    let Some(job) = job else {
        return Err(refuse(EMPTY));
    };
    db.query(&format!(
        "UPDATE {jobs} SET status = 1, worker = ? WHERE id = ?"
    ))
    .bind(worker)
    .bind(job)
    .execute(db.pool())
    .await?;
    db.query(&format!("INSERT INTO {done} (job, worker) VALUES (?, ?)"))
        .bind(job)
        .bind(worker)
        .execute(db.pool())
        .await?;
    Ok(())
}

async fn read_decide_write(
    tx: &mut Tx,
    jobs: &str,
    done: &str,
    worker: i64,
    lock: &str,
) -> contend::Result<()> {
    let job = next_job(tx, jobs, lock).await?;
    think().await;
    let Some((job, _)) = job else {
        return Err(refuse(EMPTY));
    };
    process_tx(tx, jobs, done, job, worker).await
}

/// Claim with a conditional UPDATE; a lost race moves on to the next pending job.
async fn atomic_claim(tx: &mut Tx, jobs: &str, done: &str, worker: i64) -> contend::Result<()> {
    let mut after = 0_i64;
    loop {
        let sql = format!("SELECT id FROM {jobs} WHERE status = 0 AND id > ? ORDER BY id LIMIT 1");
        let job: Option<i64> = tx
            .query_scalar(&sql)
            .bind(after)
            .fetch_optional(tx.conn())
            .await?;
        think().await;
        let Some(job) = job else {
            return Err(refuse(EMPTY));
        };
        let claimed = tx
            .query(&format!(
                "UPDATE {jobs} SET status = 1, worker = ? WHERE id = ? AND status = 0"
            ))
            .bind(worker)
            .bind(job)
            .execute(tx.conn())
            .await?;
        if claimed.rows_affected() == 1 {
            tx.query(&format!("INSERT INTO {done} (job, worker) VALUES (?, ?)"))
                .bind(job)
                .bind(worker)
                .execute(tx.conn())
                .await?;
            return Ok(());
        }
        after = job;
    }
}

async fn versioned(tx: &mut Tx, jobs: &str, done: &str, worker: i64) -> contend::Result<()> {
    let job = next_job(tx, jobs, "").await?;
    think().await;
    let Some((job, version)) = job else {
        return Err(refuse(EMPTY));
    };
    let claimed = tx
        .query(&format!(
            "UPDATE {jobs} SET status = 1, worker = ?, version = version + 1 WHERE id = ? AND version = ?"
        ))
        .bind(worker)
        .bind(job)
        .bind(version)
        .execute(tx.conn())
        .await?;
    optimistic::check(claimed.rows_affected())?;
    tx.query(&format!("INSERT INTO {done} (job, worker) VALUES (?, ?)"))
        .bind(job)
        .bind(worker)
        .execute(tx.conn())
        .await?;
    Ok(())
}

impl Queue {
    async fn run_op(&self, ctx: &Ctx, session: &mut Session, worker: i64) -> OpReport {
        let db = &ctx.db;
        let (jobs, done) = tables(ctx);
        match ctx.strategy {
            Strategy::None => report_plain(unlocked(db, &jobs, &done, worker).await),
            Strategy::Mutex => {
                let _guard = self.mutex.lock(&jobs).await;
                report_plain(unlocked(db, &jobs, &done, worker).await)
            }
            Strategy::Atomic => report(
                session
                    .run(&lock_options(), |tx| {
                        let (j, d) = (jobs.clone(), done.clone());
                        Box::pin(async move { atomic_claim(tx, &j, &d, worker).await })
                    })
                    .await,
            ),
            Strategy::Optimistic => report(
                session
                    .run(&optimistic::options(), |tx| {
                        let (j, d) = (jobs.clone(), done.clone());
                        Box::pin(async move { versioned(tx, &j, &d, worker).await })
                    })
                    .await,
            ),
            _ => {
                // One lock for the whole queue: every worker wants the oldest pending job.
                let keys = [jobs.clone()];
                let guard = Guard {
                    keys: &keys,
                    row_lock: RowLock::UpdateSkipLocked,
                    lock_options: lock_options(),
                };
                guarded(ctx, session, &guard, move |tx, lock| {
                    let (j, d) = (jobs.clone(), done.clone());
                    Box::pin(async move { read_decide_write(tx, &j, &d, worker, lock).await })
                })
                .await
            }
        }
    }
}

impl Scenario for Queue {
    fn name(&self) -> &'static str {
        "queue"
    }

    fn supports(&self, strategy: Strategy, backend: Backend) -> Result<(), String> {
        base_support(strategy, backend)
    }

    fn setup<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let (jobs, done) = tables(ctx);
            let db = &ctx.db;
            let engine = engine(db.backend());
            drop_tables(db, &[jobs.clone(), done.clone()]).await?;
            // status: 0 pending, 1 done.
            db.execute_script(&format!(
                "CREATE TABLE {jobs} (id BIGINT PRIMARY KEY, status BIGINT NOT NULL, \
                 worker BIGINT NOT NULL, version BIGINT NOT NULL){engine}"
            ))
            .await?;
            db.execute_script(&format!(
                "CREATE INDEX {jobs}_pending ON {jobs} (status, id)"
            ))
            .await?;
            db.execute_script(&format!(
                "CREATE TABLE {done} (job BIGINT NOT NULL, worker BIGINT NOT NULL){engine}"
            ))
            .await?;
            let n = Queue::jobs(ctx.operations);
            let mut id = 1;
            while id <= n {
                let end = (id + 499).min(n);
                let values: Vec<String> = (id..=end).map(|i| format!("({i}, 0, 0, 0)")).collect();
                db.execute_script(&format!("INSERT INTO {jobs} VALUES {}", values.join(", ")))
                    .await?;
                id = end + 1;
            }
            fenced::setup(ctx).await
        })
    }

    fn op<'a>(&'a self, ctx: &'a Ctx, worker: usize, seq: u64) -> BoxFuture<'a, OpReport> {
        op_on_own_session(self, ctx, worker, seq)
    }

    fn op_in_session<'a>(
        &'a self,
        ctx: &'a Ctx,
        session: &'a mut Session,
        worker: usize,
        seq: u64,
    ) -> BoxFuture<'a, OpReport> {
        let _ = seq;
        let worker = i64::try_from(worker).unwrap_or(i64::MAX - 1) + 1;
        Box::pin(self.run_op(ctx, session, worker))
    }

    fn check<'a>(
        &'a self,
        ctx: &'a Ctx,
        totals: &'a Totals,
    ) -> BoxFuture<'a, anyhow::Result<Vec<Invariant>>> {
        Box::pin(async move {
            let (jobs, done) = tables(ctx);
            let db = &ctx.db;
            let n = Queue::jobs(ctx.operations);
            let twice = scalar(
                db,
                &format!("SELECT COUNT(*) - COUNT(DISTINCT job) FROM {done}"),
            )
            .await?;
            let processed = scalar(db, &format!("SELECT COUNT(DISTINCT job) FROM {done}")).await?;
            let marked =
                scalar(db, &format!("SELECT COUNT(*) FROM {jobs} WHERE status = 1")).await?;
            let mismatched = scalar(
                db,
                &format!(
                    "SELECT COUNT(*) FROM {jobs} j WHERE (j.status = 1) <> \
                     EXISTS (SELECT 1 FROM {done} d WHERE d.job = j.id)"
                ),
            )
            .await?;
            // Every job is processed when at least as many operations ran as there were jobs
            // (an operation that errored may leave one behind: those show as errors anyway).
            let ran = i64::try_from(totals.succeeded + totals.refused + totals.errors)
                .unwrap_or(i64::MAX);
            let left = if ran >= n { n - processed } else { 0 };
            Ok(vec![
                invariant(
                    "processed_once",
                    twice as u64,
                    format!("{twice} extra processings of an already processed job"),
                ),
                invariant(
                    "queue_drained",
                    left.max(0) as u64,
                    format!("{processed} of {n} jobs processed, {marked} marked done"),
                ),
                invariant(
                    "done_iff_processed",
                    mismatched as u64,
                    format!("{mismatched} jobs whose status disagrees with the processed table"),
                ),
            ])
        })
    }

    fn teardown<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let (jobs, done) = tables(ctx);
            fenced::teardown(ctx, std::slice::from_ref(&jobs)).await?;
            drop_tables(&ctx.db, &[jobs, done]).await
        })
    }
}
