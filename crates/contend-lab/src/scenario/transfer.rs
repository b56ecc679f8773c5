//! `transfer`: K accounts, transfers between pairs in both directions (A→B and B→A), each
//! recorded in a ledger. Lock order matters here: two transfers locking the same two rows in
//! opposite orders deadlock, so every strategy takes its locks in one canonical order.
//!
//! Invariants: total money conserved; no negative balance; each account's ledger sum equals its
//! balance.
//!
//! The module also holds the operation that moves amounts between rows (`Plan`, `apply`);
//! the `order` scenario uses it too.

use contend::strategy::atomic::Counter;
use contend::strategy::{Operation, Strategy, optimistic};
use contend::{Backend, BoxFuture, Error, Session, Tx};
use sqlx::AnyConnection;

use super::{
    Ctx, Invariant, LabError, OpReport, Scenario, Totals, base_support, drop_tables, engine,
    execute, fenced, invariant, pairs, scalar, sql_for, sum_bigint, table_name, think,
};

/// One change of one row: `column += delta` on row `id` of `table`. A negative delta is guarded:
/// the column must not go below zero, or the whole plan is refused with `why`.
#[derive(Debug, Clone)]
pub(crate) struct Move {
    pub table: String,
    pub column: &'static str,
    pub id: i64,
    pub delta: i64,
    pub why: &'static str,
}

impl Move {
    /// The row's lock key (mutex, advisory and Redis locks; also its fence resource).
    pub(crate) fn key(&self) -> String {
        row_key(&self.table, self.id)
    }
}

/// The lock key (and fence resource) of row `id` of `table`.
pub(crate) fn row_key(table: &str, id: i64) -> String {
    format!("{table}:{id}")
}

/// Moves applied together or not at all, and an `INSERT` (with `BIGINT` parameters) recording
/// them.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    moves: Vec<Move>,
    record_sql: String,
    record_values: Vec<i64>,
}

impl Plan {
    /// The moves are kept in canonical order (table, then id), the order every strategy locks
    /// and writes in.
    pub(crate) fn new(mut moves: Vec<Move>, record_sql: String, record_values: Vec<i64>) -> Self {
        moves.sort_by(|a, b| (&a.table, a.id).cmp(&(&b.table, b.id)));
        Plan {
            moves,
            record_sql,
            record_values,
        }
    }

    fn keys(&self) -> Vec<String> {
        self.moves.iter().map(Move::key).collect()
    }

    /// The new values, or the refusal, given the values read.
    fn decide(&self, values: &[(i64, i64)]) -> Result<Vec<i64>, LabError> {
        let mut out = Vec::with_capacity(values.len());
        for (m, (v, _)) in self.moves.iter().zip(values) {
            let new = v + m.delta;
            if m.delta < 0 && new < 0 {
                return Err(LabError::Refused(m.why));
            }
            out.push(new);
        }
        Ok(out)
    }

    async fn record(&self, tx: &mut Tx) -> Result<(), LabError> {
        let mut q = tx.query(&self.record_sql);
        for v in &self.record_values {
            q = q.bind(*v);
        }
        q.execute(tx.conn()).await?;
        Ok(())
    }
}

/// A [`Plan`] as an operation: read every row's value and version (in canonical order, with
/// the lock clause), decide, write each row (checking its version under `optimistic`) and the
/// record; under `atomic`, in-database arithmetic with a guarded subtraction per move.
struct ApplyPlan {
    plan: Plan,
    backend: Backend,
}

impl Operation for ApplyPlan {
    /// Each move's row: value and version.
    type State = Vec<(i64, i64)>;
    type Output = ();
    type Error = LabError;

    fn keys(&self) -> Vec<String> {
        self.plan.keys()
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, Result<Vec<(i64, i64)>, LabError>> {
        Box::pin(async move {
            let mut read = Vec::with_capacity(self.plan.moves.len());
            for m in &self.plan.moves {
                let sql = format!(
                    "SELECT {}, version FROM {} WHERE id = ?{lock}",
                    m.column, m.table
                );
                let row: (i64, i64) = sqlx::query_as(sql_for(self.backend, &sql))
                    .bind(m.id)
                    .fetch_one(&mut *conn)
                    .await?;
                read.push(row);
            }
            think().await;
            Ok(read)
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        read: &'c Vec<(i64, i64)>,
        checked: bool,
    ) -> BoxFuture<'c, Result<(), LabError>> {
        Box::pin(async move {
            let new = self.plan.decide(read)?;
            for ((m, v), (_, version)) in self.plan.moves.iter().zip(new).zip(read) {
                if checked {
                    let sql = format!(
                        "UPDATE {} SET {} = ?, version = version + 1 WHERE id = ? AND version = ?",
                        m.table, m.column
                    );
                    let done = tx
                        .query(&sql)
                        .bind(v)
                        .bind(m.id)
                        .bind(*version)
                        .execute(tx.conn())
                        .await?;
                    optimistic::check(done.rows_affected())?;
                } else {
                    let sql = format!("UPDATE {} SET {} = ? WHERE id = ?", m.table, m.column);
                    tx.query(&sql).bind(v).bind(m.id).execute(tx.conn()).await?;
                }
            }
            self.plan.record(tx).await
        })
    }

    fn atomic<'c>(&'c self, tx: &'c mut Tx) -> Option<BoxFuture<'c, Result<(), LabError>>> {
        Some(Box::pin(async move {
            // In canonical order; a guarded move that does not apply refuses (and rolls back
            // the moves before it).
            for m in &self.plan.moves {
                let counter = Counter::new(&m.table, "id", m.column).map_err(Error::aborted)?;
                if m.delta < 0 {
                    if counter.try_sub(tx, m.id, -m.delta).await?.is_none() {
                        return Err(LabError::Refused(m.why));
                    }
                } else {
                    counter.add(tx, m.id, m.delta).await?;
                }
            }
            self.plan.record(tx).await
        }))
    }
}

/// Applies `plan` under `ctx.strategy`.
pub(crate) async fn apply(ctx: &Ctx, session: &mut Session, plan: Plan) -> OpReport {
    let op = ApplyPlan {
        plan,
        backend: ctx.db.backend(),
    };
    execute(ctx, session, op).await.1
}

/// The transfer scenario.
#[derive(Debug, Default)]
pub struct Transfer;

/// Accounts.
const ACCOUNTS: i64 = 4;
/// Each account's opening balance.
const OPENING: i64 = 20;

impl Transfer {
    /// The scenario.
    pub fn new() -> Self {
        Transfer
    }
}

fn tables(ctx: &Ctx) -> (String, String) {
    (
        table_name(ctx, "transfer"),
        table_name(ctx, "transfer_ledger"),
    )
}

/// Operation `seq`: from, to (different, both directions over time) and amount 1..=5.
fn pick(seq: u64) -> (i64, i64, i64) {
    let k = ACCOUNTS as u64;
    let from = seq % k;
    let to = (from + 1 + (seq / k) % (k - 1)) % k;
    (from as i64 + 1, to as i64 + 1, (seq % 5) as i64 + 1)
}

impl Scenario for Transfer {
    fn name(&self) -> &'static str {
        "transfer"
    }

    fn supports(&self, strategy: Strategy, backend: Backend) -> Result<(), String> {
        base_support(strategy, backend)
    }

    fn setup<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let (acc, ledger) = tables(ctx);
            let db = &ctx.db;
            let engine = engine(db.backend());
            drop_tables(db, &[acc.clone(), ledger.clone()]).await?;
            db.execute_script(&format!(
                "CREATE TABLE {acc} (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL, \
                 version BIGINT NOT NULL){engine}"
            ))
            .await?;
            db.execute_script(&format!(
                "CREATE TABLE {ledger} (account BIGINT NOT NULL, delta BIGINT NOT NULL){engine}"
            ))
            .await?;
            for id in 1..=ACCOUNTS {
                let account = db.query(&format!("INSERT INTO {acc} VALUES (?, ?, 0)"));
                super::exec(db, account.bind(id).bind(OPENING)).await?;
                let entry = db.query(&format!("INSERT INTO {ledger} VALUES (?, ?)"));
                super::exec(db, entry.bind(id).bind(OPENING)).await?;
            }
            fenced::setup(ctx).await
        })
    }

    fn op_in_session<'a>(
        &'a self,
        ctx: &'a Ctx,
        session: &'a mut Session,
        _worker: usize,
        seq: u64,
    ) -> BoxFuture<'a, OpReport> {
        Box::pin(async move {
            let (acc, ledger) = tables(ctx);
            let (from, to, amount) = pick(seq);
            let moves = vec![
                Move {
                    table: acc.clone(),
                    column: "balance",
                    id: from,
                    delta: -amount,
                    why: "insufficient funds",
                },
                Move {
                    table: acc,
                    column: "balance",
                    id: to,
                    delta: amount,
                    why: "",
                },
            ];
            let record = format!("INSERT INTO {ledger} (account, delta) VALUES (?, ?), (?, ?)");
            let plan = Plan::new(moves, record, vec![from, -amount, to, amount]);
            apply(ctx, session, plan).await
        })
    }

    fn check<'a>(
        &'a self,
        ctx: &'a Ctx,
        _totals: &'a Totals,
    ) -> BoxFuture<'a, anyhow::Result<Vec<Invariant>>> {
        Box::pin(async move {
            let (acc, ledger) = tables(ctx);
            let db = &ctx.db;
            let b = db.backend();
            let expected = ACCOUNTS * OPENING;
            let total = scalar(
                db,
                &format!("SELECT {} FROM {acc}", sum_bigint(b, "balance")),
            )
            .await?;
            let negative =
                scalar(db, &format!("SELECT COUNT(*) FROM {acc} WHERE balance < 0")).await?;
            let balances = pairs(db, &format!("SELECT id, balance FROM {acc} ORDER BY id")).await?;
            let sums = pairs(
                db,
                &format!(
                    "SELECT account, {} FROM {ledger} GROUP BY account ORDER BY account",
                    sum_bigint(b, "delta")
                ),
            )
            .await?;
            let mismatched: Vec<String> = balances
                .iter()
                .filter_map(|(id, bal)| {
                    let sum = sums.iter().find(|(a, _)| a == id).map_or(0, |(_, s)| *s);
                    (sum != *bal).then(|| format!("account {id}: balance {bal}, ledger {sum}"))
                })
                .collect();
            Ok(vec![
                invariant(
                    "total_conserved",
                    total.abs_diff(expected),
                    format!("total {total}, expected {expected}"),
                ),
                invariant(
                    "no_negative_balance",
                    negative as u64,
                    format!("{negative} accounts below zero"),
                ),
                invariant(
                    "ledger_matches_balances",
                    mismatched.len() as u64,
                    if mismatched.is_empty() {
                        format!("{ACCOUNTS} accounts match their ledger")
                    } else {
                        mismatched.join("; ")
                    },
                ),
            ])
        })
    }

    fn teardown<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let (acc, ledger) = tables(ctx);
            let keys: Vec<String> = (1..=ACCOUNTS).map(|id| row_key(&acc, id)).collect();
            fenced::teardown(ctx, &keys).await?;
            drop_tables(&ctx.db, &[acc, ledger]).await
        })
    }
}
