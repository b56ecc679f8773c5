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
use contend::{Backend, BoxFuture, Session};

use super::claim::{AtomicClaim, Claims, fill};
use super::{
    Ctx, Invariant, OpReport, Scenario, Totals, base_support, drop_tables, engine, fenced,
    invariant, scalar, table_name,
};

/// The queue scenario.
#[derive(Debug, Default)]
pub struct Queue;

impl Queue {
    /// The scenario.
    pub fn new() -> Self {
        Queue
    }

    fn jobs(operations: u64) -> i64 {
        i64::try_from(operations / 2).unwrap_or(i64::MAX).max(1)
    }
}

fn tables(ctx: &Ctx) -> (String, String) {
    (table_name(ctx, "queue_job"), table_name(ctx, "queue_done"))
}

/// Jobs are claimed by marking them done (`status` 0 pending, 1 done) with their worker, and
/// recorded as processed; under `atomic` a conditional `UPDATE` decides.
static JOBS: Claims = Claims {
    free: "status = 0",
    claim: "status = 1, worker = ?",
    item_column: "job",
    claimant_column: "worker",
    none_left: "no job left",
    atomic: AtomicClaim::ConditionalUpdate,
};

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
            fill(db, &jobs, Queue::jobs(ctx.operations), |i| {
                format!("({i}, 0, 0, 0)")
            })
            .await?;
            fenced::setup(ctx).await
        })
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
        let (jobs, done) = tables(ctx);
        Box::pin(JOBS.run_op(ctx, session, jobs, done, worker))
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
