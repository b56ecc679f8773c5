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
use contend::{Backend, BoxFuture, Db, Error, Session, Tx};
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

/// What [`ApplyPlan`] reads: each move's row (value and version), in canonical order; and,
/// under `batched`, the records of the operations decided on these rows in memory
/// ([`Operation::apply`]) and not written yet.
#[derive(Debug)]
struct Rows {
    values: Vec<(i64, i64)>,
    records: Vec<(String, Vec<i64>)>,
}

/// The records of `records` as few `INSERT`s as possible: consecutive records with the same
/// statement (`INSERT INTO t (..) VALUES (?, ..)`) become one multi-row `INSERT`, at most
/// `MAX_ROWS` of them per statement (bind-parameter limits).
fn combined_inserts(records: &[(String, Vec<i64>)]) -> Vec<(String, Vec<i64>)> {
    const MAX_ROWS: usize = 128;
    let mut out: Vec<(String, Vec<i64>)> = Vec::new();
    let mut i = 0;
    while i < records.len() {
        let (sql, values) = &records[i];
        let mut j = i + 1;
        while j < records.len() && records[j].0 == *sql && j - i < MAX_ROWS {
            j += 1;
        }
        match sql.split_once(" VALUES ") {
            Some((head, tuples)) if j - i > 1 => {
                let all = vec![tuples; j - i].join(", ");
                let binds = records[i..j].iter().flat_map(|(_, v)| v.iter().copied());
                out.push((format!("{head} VALUES {all}"), binds.collect()));
            }
            _ => out.push((sql.clone(), values.clone())),
        }
        i = j;
    }
    out
}

/// A [`Plan`] as an operation: read every row's value and version (in canonical order, with
/// the lock clause), decide, write each row (checking its version under `optimistic`) and the
/// record; under `atomic`, in-database arithmetic with a guarded subtraction per move; under
/// `batched`, the plans of one batch decided in memory on rows read once, written once.
struct ApplyPlan {
    plan: Plan,
    backend: Backend,
}

impl Operation for ApplyPlan {
    type State = Rows;
    type Output = ();
    type Error = LabError;

    fn keys(&self) -> Vec<String> {
        self.plan.keys()
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, Result<Rows, LabError>> {
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
            Ok(Rows {
                values: read,
                records: Vec::new(),
            })
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        Rows { values: read, .. }: &'c Rows,
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

    /// `batched`: one queue for all the plans on these tables (a few accounts, a few
    /// products), whatever their rows, so that one commit serves transfers between any pairs.
    fn batch_domain(&self) -> Option<String> {
        let mut tables: Vec<&str> = self.plan.moves.iter().map(|m| m.table.as_str()).collect();
        tables.dedup();
        Some(tables.join(","))
    }

    /// `batched`: decided on the rows as the plans before it in its group left them (the
    /// operations of a group have the same key set, so the same rows in the same order); a
    /// refusal changes nothing.
    fn apply(&self, rows: &mut Rows) -> Option<Result<(), LabError>> {
        let new = match self.plan.decide(&rows.values) {
            Ok(new) => new,
            Err(refused) => return Some(Err(refused)),
        };
        for ((value, version), v) in rows.values.iter_mut().zip(new) {
            *value = v;
            *version += 1;
        }
        let plan = &self.plan;
        rows.records
            .push((plan.record_sql.clone(), plan.record_values.clone()));
        Some(Ok(()))
    }

    fn write_state<'c>(
        &'c self,
        tx: &'c mut Tx,
        rows: &'c Rows,
    ) -> Option<BoxFuture<'c, Result<(), LabError>>> {
        Some(Box::pin(async move {
            for (m, (value, version)) in self.plan.moves.iter().zip(&rows.values) {
                let sql = format!(
                    "UPDATE {} SET {} = ?, version = ? WHERE id = ?",
                    m.table, m.column
                );
                tx.query(&sql)
                    .bind(*value)
                    .bind(*version)
                    .bind(m.id)
                    .execute(tx.conn())
                    .await?;
            }
            for (sql, values) in combined_inserts(&rows.records) {
                let mut q = tx.query(&sql);
                for v in values {
                    q = q.bind(v);
                }
                q.execute(tx.conn()).await?;
            }
            Ok(())
        }))
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

/// Applies `plan` under `ctx.strategy`, with the operation's own result next to its report
/// (the fault suite tells a lost answer from a definite failure by the error).
pub(crate) async fn apply_result(
    ctx: &Ctx,
    session: &mut Session,
    plan: Plan,
) -> (Result<(), LabError>, OpReport) {
    let op = ApplyPlan {
        plan,
        backend: ctx.db.backend(),
    };
    execute(ctx, session, op).await
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

/// What the books' checks read: the total of all balances, how many are negative, and each
/// account whose balance differs from the sum of its ledger rows (described).
pub(crate) struct BooksReading {
    pub total: i64,
    pub negative: i64,
    pub mismatched: Vec<String>,
}

/// Reads the books of accounts table `acc` (id, balance) and ledger `ledger` (account, delta).
pub(crate) async fn read_books(db: &Db, acc: &str, ledger: &str) -> anyhow::Result<BooksReading> {
    let b = db.backend();
    let total = scalar(
        db,
        &format!("SELECT {} FROM {acc}", sum_bigint(b, "balance")),
    )
    .await?;
    let negative = scalar(db, &format!("SELECT COUNT(*) FROM {acc} WHERE balance < 0")).await?;
    let balances = pairs(db, &format!("SELECT id, balance FROM {acc} ORDER BY id")).await?;
    let sums = pairs(
        db,
        &format!(
            "SELECT account, {} FROM {ledger} GROUP BY account ORDER BY account",
            sum_bigint(b, "delta")
        ),
    )
    .await?;
    let mismatched = balances
        .iter()
        .filter_map(|(id, bal)| {
            let sum = sums.iter().find(|(a, _)| a == id).map_or(0, |(_, s)| *s);
            (sum != *bal).then(|| format!("account {id}: balance {bal}, ledger {sum}"))
        })
        .collect();
    Ok(BooksReading {
        total,
        negative,
        mismatched,
    })
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
            let expected = ACCOUNTS * OPENING;
            let BooksReading {
                total,
                negative,
                mismatched,
            } = read_books(&ctx.db, &acc, &ledger).await?;
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

#[cfg(test)]
mod tests {
    use super::combined_inserts;

    fn rec(sql: &str, values: &[i64]) -> (String, Vec<i64>) {
        (sql.to_string(), values.to_vec())
    }

    #[test]
    fn consecutive_records_of_one_statement_become_one_insert() {
        let ledger = "INSERT INTO l (account, delta) VALUES (?, ?), (?, ?)";
        let order = "INSERT INTO o (account, qty) VALUES (?, ?)";
        let out = combined_inserts(&[
            rec(ledger, &[1, -2, 2, 2]),
            rec(ledger, &[2, -1, 1, 1]),
            rec(order, &[7, 1]),
            rec(ledger, &[1, -3, 2, 3]),
        ]);
        assert_eq!(
            out,
            vec![
                rec(
                    "INSERT INTO l (account, delta) VALUES (?, ?), (?, ?), (?, ?), (?, ?)",
                    &[1, -2, 2, 2, 2, -1, 1, 1]
                ),
                rec(order, &[7, 1]),
                rec(ledger, &[1, -3, 2, 3]),
            ]
        );
    }

    #[test]
    fn long_runs_are_split() {
        let sql = "INSERT INTO o (a) VALUES (?)";
        let records: Vec<_> = (0..300).map(|i| rec(sql, &[i])).collect();
        let out = combined_inserts(&records);
        assert_eq!(out.len(), 3);
        assert_eq!(out.iter().map(|(_, v)| v.len()).sum::<usize>(), 300);
        assert_eq!(out[0].1[..3], [0, 1, 2]);
        assert_eq!(out[2].1.last(), Some(&299));
    }
}
