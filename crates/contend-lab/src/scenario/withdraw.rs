//! `withdraw`: the hot row. One account with balance B; every operation withdraws 1 unless the
//! balance is 0 (then it is refused). B is half the planned operations, so about half are
//! refused. Lost updates show up as a final balance above `B - successes`.
//!
//! Invariants: the final balance equals `B - successful withdrawals`; it is never negative;
//! successful withdrawals never exceed B.

use contend::strategy::atomic::Counter;
use contend::strategy::{Operation, Strategy, optimistic};
use contend::{Backend, BoxFuture, Db, Error, Session, Tx};
use sqlx::AnyConnection;

use super::fenced;
use super::{
    Ctx, Invariant, LabError, OpReport, Scenario, Totals, base_support, drop_tables, engine,
    execute, invariant, sql_for, table_name, think,
};

/// The account's id.
const ACCOUNT: i64 = 1;

/// The hot-row withdrawal scenario.
#[derive(Debug, Default)]
pub struct Withdraw;

impl Withdraw {
    /// The scenario.
    pub fn new() -> Self {
        Withdraw
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

async fn read_balance(db: &Db, t: &str) -> contend::Result<i64> {
    let sql = format!("SELECT balance FROM {t} WHERE id = ?");
    super::fetch_scalar(db, db.query_scalar(&sql).bind(ACCOUNT)).await
}

/// One withdrawal of 1 from the account of `table`: read balance and version, decide in Rust,
/// write the new balance (checking the version under `optimistic`); as one conditional
/// `UPDATE` under `atomic`.
struct WithdrawOne {
    table: String,
    backend: Backend,
}

impl Operation for WithdrawOne {
    /// Balance and version.
    type State = (i64, i64);
    type Output = ();
    type Error = LabError;

    fn keys(&self) -> Vec<String> {
        vec![lock_key(&self.table)]
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, Result<(i64, i64), LabError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT balance, version FROM {} WHERE id = ?{lock}",
                self.table
            );
            let row = sqlx::query_as(sql_for(self.backend, &sql))
                .bind(ACCOUNT)
                .fetch_one(conn)
                .await?;
            think().await;
            Ok(row)
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        &(balance, version): &'c (i64, i64),
        checked: bool,
    ) -> BoxFuture<'c, Result<(), LabError>> {
        Box::pin(async move {
            if balance < 1 {
                return Err(LabError::Refused("insufficient funds"));
            }
            let t = &self.table;
            if checked {
                let sql = format!(
                    "UPDATE {t} SET balance = ?, version = version + 1 WHERE id = ? AND version = ?"
                );
                let done = tx
                    .query(&sql)
                    .bind(balance - 1)
                    .bind(ACCOUNT)
                    .bind(version)
                    .execute(tx.conn())
                    .await?;
                optimistic::check(done.rows_affected())?;
            } else {
                let sql = format!("UPDATE {t} SET balance = ? WHERE id = ?");
                tx.query(&sql)
                    .bind(balance - 1)
                    .bind(ACCOUNT)
                    .execute(tx.conn())
                    .await?;
            }
            Ok(())
        })
    }

    /// `batched`: the withdrawals of one batch are decided one after the other on the balance
    /// read once, and written once ([`WithdrawOne::write_state`]).
    fn apply(&self, (balance, version): &mut (i64, i64)) -> Option<Result<(), LabError>> {
        if *balance < 1 {
            return Some(Err(LabError::Refused("insufficient funds")));
        }
        *balance -= 1;
        *version += 1;
        Some(Ok(()))
    }

    fn write_state<'c>(
        &'c self,
        tx: &'c mut Tx,
        &(balance, version): &'c (i64, i64),
    ) -> Option<BoxFuture<'c, Result<(), LabError>>> {
        Some(Box::pin(async move {
            let sql = format!(
                "UPDATE {} SET balance = ?, version = ? WHERE id = ?",
                self.table
            );
            tx.query(&sql)
                .bind(balance)
                .bind(version)
                .bind(ACCOUNT)
                .execute(tx.conn())
                .await?;
            Ok(())
        }))
    }

    fn atomic_statement<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
    ) -> Option<BoxFuture<'c, Result<(), LabError>>> {
        Some(Box::pin(async move {
            let counter = Counter::new(&self.table, "id", "balance").map_err(Error::aborted)?;
            let done = sqlx::query(sql_for(self.backend, &counter.sub_sql()))
                .bind(1_i64)
                .bind(ACCOUNT)
                .bind(1_i64)
                .execute(conn)
                .await?;
            match done.rows_affected() {
                0 => Err(LabError::Refused("insufficient funds")),
                _ => Ok(()),
            }
        }))
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
            let insert = format!("INSERT INTO {t} (id, balance, version) VALUES (?, ?, 0)");
            super::exec(db, db.query(&insert).bind(ACCOUNT).bind(b)).await?;
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
        Box::pin(async move {
            let op = WithdrawOne {
                table: table(ctx),
                backend: ctx.db.backend(),
            };
            execute(ctx, session, op).await.1
        })
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
