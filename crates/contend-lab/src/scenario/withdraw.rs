//! `withdraw`: the hot row. One account with balance B; every operation withdraws 1 unless the
//! balance is 0 (then it is refused). B is half the planned operations, so about half are
//! refused. Lost updates show up as a final balance above `B - successes`.
//!
//! Invariants: the final balance equals `B - successful withdrawals`; it is never negative;
//! successful withdrawals never exceed B.

use contend::strategy::Strategy;
use contend::strategy::atomic::Counter;
use contend::strategy::mutex::KeyedMutex;
use contend::strategy::optimistic;
use contend::{Backend, BoxFuture, Db, Error, RetryPolicy, RowLock, Session, Tx, TxOptions};

use super::fenced;
use super::{
    Ctx, Guard, Invariant, OpReport, Scenario, Totals, base_support, drop_tables, engine, guarded,
    invariant, refuse, report, report_plain, table_name, think,
};

/// The account's id.
const ACCOUNT: i64 = 1;

/// The hot-row withdrawal scenario.
#[derive(Debug, Default)]
pub struct Withdraw {
    mutex: KeyedMutex,
}

impl Withdraw {
    /// The scenario.
    pub fn new() -> Self {
        Withdraw::default()
    }

    /// The starting balance for `operations` planned withdrawals: half of them, at least 1.
    pub fn starting_balance(operations: u64) -> i64 {
        i64::try_from(operations / 2).unwrap_or(i64::MAX).max(1)
    }
}

fn table(ctx: &Ctx) -> String {
    table_name(ctx, "withdraw")
}

/// The account's lock key (and fence resource) for the lock-based strategies.
fn lock_key(t: &str) -> String {
    format!("{t}:{ACCOUNT}")
}

/// The retry policy of the locking strategies: deadlocks and busy errors only happen under
/// pathological load here, but are retried like any conflict.
fn lock_options() -> TxOptions {
    TxOptions::new().retry(RetryPolicy::new().max_attempts(20))
}

async fn read_balance(db: &Db, t: &str) -> contend::Result<i64> {
    let sql = format!("SELECT balance FROM {t} WHERE id = ?");
    Ok(db
        .query_scalar(&sql)
        .bind(ACCOUNT)
        .fetch_one(db.pool())
        .await?)
}

/// Read, decide in Rust, write in a separate autocommit statement: the lost update.
async fn unlocked(session: &mut Session, t: &str) -> contend::Result<()> {
    let read = session
        .db()
        .query_scalar::<i64>(&format!("SELECT balance FROM {t} WHERE id = ?"))
        .bind(ACCOUNT);
    let balance = session
        .autocommit(|conn| {
            Box::pin(async move { Ok::<_, contend::Error>(read.fetch_one(conn).await?) })
        })
        .await?;
    think().await;
    if balance < 1 {
        return Err(refuse("insufficient funds"));
    }
    let write = session
        .db()
        .query(&format!("UPDATE {t} SET balance = ? WHERE id = ?"))
        .bind(balance - 1)
        .bind(ACCOUNT);
    session
        .autocommit(|conn| Box::pin(async move { Ok(write.execute(conn).await.map(drop)?) }))
        .await
}

/// The read-decide-write inside a transaction, reading with `lock` appended (`""` for none).
async fn in_tx(tx: &mut Tx, t: &str, lock: &str) -> contend::Result<()> {
    let sql = format!("SELECT balance FROM {t} WHERE id = ?{lock}");
    let balance: i64 = tx
        .query_scalar(&sql)
        .bind(ACCOUNT)
        .fetch_one(tx.conn())
        .await?;
    think().await;
    if balance < 1 {
        return Err(refuse("insufficient funds"));
    }
    let sql = format!("UPDATE {t} SET balance = ? WHERE id = ?");
    tx.query(&sql)
        .bind(balance - 1)
        .bind(ACCOUNT)
        .execute(tx.conn())
        .await?;
    Ok(())
}

/// Optimistic: read balance and version, decide, write only if the version is unchanged.
async fn versioned(tx: &mut Tx, t: &str) -> contend::Result<()> {
    let sql = format!("SELECT balance, version FROM {t} WHERE id = ?");
    let (balance, version): (i64, i64) =
        sqlx::query_as(sqlx::AssertSqlSafe(tx.backend().sql(&sql).into_owned()))
            .bind(ACCOUNT)
            .fetch_one(tx.conn())
            .await?;
    think().await;
    if balance < 1 {
        return Err(refuse("insufficient funds"));
    }
    let sql =
        format!("UPDATE {t} SET balance = ?, version = version + 1 WHERE id = ? AND version = ?");
    let done = tx
        .query(&sql)
        .bind(balance - 1)
        .bind(ACCOUNT)
        .bind(version)
        .execute(tx.conn())
        .await?;
    optimistic::check(done.rows_affected())
}

impl Withdraw {
    async fn run_op(&self, ctx: &Ctx, session: &mut Session) -> OpReport {
        let t = table(ctx);
        match ctx.strategy {
            Strategy::None => report_plain(unlocked(session, &t).await),
            Strategy::Mutex => {
                let _guard = self.mutex.lock(&t).await;
                report_plain(unlocked(session, &t).await)
            }
            Strategy::Atomic => {
                let result = match Counter::new(&t, "id", "balance") {
                    Ok(counter) => counter.try_sub_in(session, ACCOUNT, 1).await,
                    Err(e) => Err(Error::aborted(e)),
                };
                report_plain(result.and_then(|applied| {
                    if applied {
                        Ok(())
                    } else {
                        Err(refuse("insufficient funds"))
                    }
                }))
            }
            Strategy::Optimistic => {
                let run = session
                    .run(&optimistic::options(), |tx| {
                        let t = t.clone();
                        Box::pin(async move { versioned(tx, &t).await })
                    })
                    .await;
                report(run)
            }
            _ => {
                let keys = [lock_key(&t)];
                let guard = Guard {
                    keys: &keys,
                    row_lock: RowLock::Update,
                    lock_options: lock_options(),
                };
                guarded(ctx, session, &guard, move |tx, lock| {
                    let t = t.clone();
                    Box::pin(async move { in_tx(tx, &t, lock).await })
                })
                .await
            }
        }
    }
}

impl Scenario for Withdraw {
    fn name(&self) -> &'static str {
        "withdraw"
    }

    fn supports(&self, strategy: Strategy, backend: Backend) -> Result<(), String> {
        base_support(strategy, backend)
    }

    fn setup<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let t = table(ctx);
            let db = &ctx.db;
            drop_tables(db, std::slice::from_ref(&t)).await?;
            db.execute_script(&format!(
                "CREATE TABLE {t} (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL, \
                 version BIGINT NOT NULL){}",
                engine(db.backend())
            ))
            .await?;
            let b = Withdraw::starting_balance(ctx.operations);
            db.query(&format!(
                "INSERT INTO {t} (id, balance, version) VALUES (?, ?, 0)"
            ))
            .bind(ACCOUNT)
            .bind(b)
            .execute(db.pool())
            .await?;
            fenced::setup(ctx).await
        })
    }

    fn op_in_session<'a>(
        &'a self,
        ctx: &'a Ctx,
        session: &'a mut Session,
        _worker: usize,
        _seq: u64,
    ) -> BoxFuture<'a, OpReport> {
        Box::pin(self.run_op(ctx, session))
    }

    fn check<'a>(
        &'a self,
        ctx: &'a Ctx,
        totals: &'a Totals,
    ) -> BoxFuture<'a, anyhow::Result<Vec<Invariant>>> {
        Box::pin(async move {
            let t = table(ctx);
            let start = Withdraw::starting_balance(ctx.operations);
            let balance = read_balance(&ctx.db, &t).await?;
            let succeeded = i64::try_from(totals.succeeded).unwrap_or(i64::MAX);
            let expected = start - succeeded;
            Ok(vec![
                invariant(
                    "balance_matches_successes",
                    balance.abs_diff(expected),
                    format!(
                        "final balance {balance}, start {start} - {succeeded} withdrawals = {expected} \
                         ({} lost updates)",
                        balance - expected
                    ),
                ),
                invariant(
                    "never_negative",
                    u64::from(balance < 0),
                    format!("final balance {balance}"),
                ),
                invariant(
                    "successes_within_balance",
                    succeeded.saturating_sub(start).max(0) as u64,
                    format!("{succeeded} successful withdrawals of a balance of {start}"),
                ),
            ])
        })
    }

    fn teardown<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let t = table(ctx);
            fenced::teardown(ctx, &[lock_key(&t)]).await?;
            drop_tables(&ctx.db, &[t]).await
        })
    }
}
