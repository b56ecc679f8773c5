//! Shared by the lab's tests: server URLs from the environment, and a tiny hot-counter scenario
//! that lets the harness be tested apart from the real scenarios.

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use contend::fencing::FencingToken;
use contend::lock::{HeldLock, LockService};
use contend::strategy::{Operation, Strategy};
use contend::{Backend, BoxFuture, Error, Session, Tx};
use contend_lab::scenario::{Ctx, Invariant, OpReport, Outcome, Scenario, Totals};

/// Runs the lab with `args` and all its scenarios, as `contend lab` does.
pub async fn run_lab(args: contend_lab::cli::LabArgs) -> contend_lab::report::LabReport {
    let registry = contend_lab::scenario::registry();
    let names: Vec<&str> = registry.iter().map(|s| s.name()).collect();
    let config = args.into_config(&names).expect("valid flags");
    contend_lab::cli::run_config(&config, &registry)
        .await
        .expect("lab runs")
}

/// The URL in `var`, or `None` after printing why the test is skipped (panics instead when
/// servers are required: `contend_test_support::servers_required`).
pub fn server_url(var: &str) -> Option<String> {
    contend_test_support::env_url(var)
}

/// A hot counter row: every operation adds 1, run by the lab's executor. `none` reads, yields,
/// and writes back the value it read plus one (a lost update when another worker wrote in
/// between); `atomic` runs `UPDATE ... SET v = v + 1`; lock strategies take the lab's
/// distributed lock around the read-modify-write. Invariant: the final value equals the number
/// of successes.
///
/// `buggy_atomic` makes `atomic` do what `none` does: a safe strategy with a bug, which the lab
/// must catch and fail on.
#[derive(Default)]
pub struct Counter {
    /// Run `atomic` as an unsafe read-modify-write.
    pub buggy_atomic: bool,
}

fn table(ctx: &Ctx) -> String {
    format!("{}_counter", ctx.run_id)
}

impl Scenario for Counter {
    fn name(&self) -> &'static str {
        "counter"
    }

    fn supports(&self, strategy: Strategy, _backend: Backend) -> Result<(), String> {
        match strategy {
            Strategy::None | Strategy::Atomic | Strategy::Redis | Strategy::Redlock => Ok(()),
            other => Err(format!("the test counter has no `{other}` variant")),
        }
    }

    fn setup<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let t = table(ctx);
            ctx.db
                .execute_script(&format!(
                    "DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (id INTEGER PRIMARY KEY, v BIGINT NOT NULL); \
                     INSERT INTO {t} (id, v) VALUES (1, 0)"
                ))
                .await?;
            if ctx.strategy.needs_lock_service() {
                contend::fencing::ensure_schema(&ctx.db).await?;
            }
            Ok(())
        })
    }

    fn op_in_session<'a>(
        &'a self,
        ctx: &'a Ctx,
        session: &'a mut Session,
        _worker: usize,
        _seq: u64,
    ) -> BoxFuture<'a, OpReport> {
        Box::pin(async move {
            let op = Increment {
                table: table(ctx),
                backend: ctx.db.backend(),
            };
            let strategy = if self.buggy_atomic && ctx.strategy == Strategy::Atomic {
                Strategy::None
            } else {
                ctx.strategy
            };
            let done = ctx.executor.run(strategy, session, Arc::new(op)).await;
            match done.result {
                Ok(()) => OpReport::new(Outcome::Succeeded),
                Err(e) => OpReport::new(Outcome::Error(e.to_string())),
            }
        })
    }

    fn check<'a>(
        &'a self,
        ctx: &'a Ctx,
        totals: &'a Totals,
    ) -> BoxFuture<'a, anyhow::Result<Vec<Invariant>>> {
        Box::pin(async move {
            let t = table(ctx);
            let v: i64 = ctx
                .db
                .query_scalar(&format!("SELECT v FROM {t} WHERE id = 1"))
                .fetch_one(ctx.db.pool())
                .await?;
            ctx.db.execute_script(&format!("DROP TABLE {t}")).await?;
            let expected = totals.succeeded as i64;
            let lost = (expected - v).unsigned_abs();
            Ok(vec![Invariant {
                name: "counter_exact".into(),
                ok: lost == 0,
                detail: format!("counter {v}, successes {expected}"),
                violations: lost,
            }])
        })
    }
}

/// One increment of the counter: read, yield, write the value read plus one; `atomic`:
/// `v = v + 1` in the database.
struct Increment {
    table: String,
    backend: Backend,
}

impl Operation for Increment {
    type State = i64;
    type Output = ();
    type Error = Error;

    fn keys(&self) -> Vec<String> {
        vec![self.table.clone()]
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut sqlx::AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, Result<i64, Error>> {
        Box::pin(async move {
            let sql = format!("SELECT v FROM {} WHERE id = 1{lock}", self.table);
            let v = sqlx::query_scalar(sqlx::AssertSqlSafe(self.backend.sql(&sql).into_owned()))
                .fetch_one(conn)
                .await?;
            tokio::task::yield_now().await;
            Ok(v)
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        v: &'c i64,
        _checked: bool,
    ) -> BoxFuture<'c, Result<(), Error>> {
        Box::pin(async move {
            tx.query(&format!("UPDATE {} SET v = ? WHERE id = 1", self.table))
                .bind(v + 1)
                .execute(tx.conn())
                .await?;
            Ok(())
        })
    }

    fn atomic<'c>(&'c self, tx: &'c mut Tx) -> Option<BoxFuture<'c, Result<(), Error>>> {
        Some(Box::pin(async move {
            tx.query(&format!("UPDATE {} SET v = v + 1 WHERE id = 1", self.table))
                .execute(tx.conn())
                .await?;
            Ok(())
        }))
    }
}

/// An in-process stand-in for a distributed lock (one tokio mutex per process, a fencing counter),
/// so the runner's lock accounting can be tested without Redis.
#[derive(Default)]
pub struct LocalLock {
    mutex: Arc<tokio::sync::Mutex<()>>,
    tokens: AtomicU64,
}

struct LocalHeld {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    token: u64,
}

impl LockService for LocalLock {
    fn acquire<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        Box::pin(async move {
            let guard = self.mutex.clone().lock_owned().await;
            let token = self.tokens.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Box::new(LocalHeld {
                _guard: guard,
                token,
            }) as Box<dyn HeldLock>)
        })
    }
}

impl HeldLock for LocalHeld {
    fn fencing_token(&self) -> Option<FencingToken> {
        Some(FencingToken::new(self.token))
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, contend::Result<()>> {
        Box::pin(async move {
            drop(self);
            Ok(())
        })
    }
}
