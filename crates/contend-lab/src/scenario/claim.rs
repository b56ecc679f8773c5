//! What `booking` and `queue` share: a table of items (seats, jobs) that workers claim, the
//! lowest-numbered free item first, so that every worker races for the same one, and a table
//! that records each claim (bookings, processed jobs). A scenario describes its tables with a
//! [`Claims`]; this module makes the claim an operation for the strategy executor.

use contend::strategy::{Operation, optimistic};
use contend::{Backend, BoxFuture, Db, Error, RowLock, Session, Tx};
use sqlx::AnyConnection;

use super::{Ctx, LabError, OpReport, execute, sql_for, think};

/// How `atomic` decides who wins an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtomicClaim {
    /// The record table has a unique constraint on the item: the record's `INSERT` decides, in
    /// a savepoint (so that PostgreSQL's transaction survives the violation); a lost race moves
    /// on to the next item.
    UniqueRecord,
    /// A conditional `UPDATE ... WHERE <free>` decides; a lost race moves on to the next item.
    ConditionalUpdate,
}

/// The SQL shape of one claim scenario. Every item table has the columns `id` and `version`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claims {
    /// The condition of a free item, e.g. `booked_by = 0`.
    pub free: &'static str,
    /// The assignments that claim an item for the claimant, bound as the one `?`, e.g.
    /// `booked_by = ?`.
    pub claim: &'static str,
    /// The record table's column of the item.
    pub item_column: &'static str,
    /// The record table's column of the claimant.
    pub claimant_column: &'static str,
    /// The refusal when no item is free.
    pub none_left: &'static str,
    /// How `atomic` decides.
    pub atomic: AtomicClaim,
}

impl Claims {
    fn record_sql(&self, records: &str) -> String {
        format!(
            "INSERT INTO {records} ({}, {}) VALUES (?, ?)",
            self.item_column, self.claimant_column
        )
    }

    /// Claimant `who`'s operation on the `items` and `records` tables, run under
    /// `ctx.strategy`. Every lock-taking strategy takes one lock for the whole item table, since
    /// every worker wants the lowest free item (`pessimistic`: `FOR UPDATE SKIP LOCKED`).
    pub(crate) async fn run_op(
        &'static self,
        ctx: &Ctx,
        session: &mut Session,
        items: String,
        records: String,
        who: i64,
    ) -> OpReport {
        let op = Claim {
            shape: self,
            items,
            records,
            who,
            backend: ctx.db.backend(),
        };
        execute(ctx, session, op).await.1
    }
}

/// One claim of the lowest free item by `who`, recorded.
struct Claim {
    shape: &'static Claims,
    items: String,
    records: String,
    who: i64,
    backend: Backend,
}

impl Claim {
    /// Records the claim of `item`, inside the caller's transaction.
    async fn record(&self, tx: &mut Tx, item: i64) -> Result<(), LabError> {
        tx.query(&self.shape.record_sql(&self.records))
            .bind(item)
            .bind(self.who)
            .execute(tx.conn())
            .await?;
        Ok(())
    }

    /// Sets the claim columns of `item` (and, `checked`, only if its version is still
    /// `version`, bumping it).
    async fn mark(
        &self,
        tx: &mut Tx,
        item: i64,
        version: i64,
        checked: bool,
    ) -> Result<(), LabError> {
        let (items, claim) = (&self.items, self.shape.claim);
        if checked {
            let sql = format!(
                "UPDATE {items} SET {claim}, version = version + 1 WHERE id = ? AND version = ?"
            );
            let done = tx
                .query(&sql)
                .bind(self.who)
                .bind(item)
                .bind(version)
                .execute(tx.conn())
                .await?;
            optimistic::check(done.rows_affected())?;
        } else {
            tx.query(&format!("UPDATE {items} SET {claim} WHERE id = ?"))
                .bind(self.who)
                .bind(item)
                .execute(tx.conn())
                .await?;
        }
        Ok(())
    }

    /// `atomic`, as [`Claims::atomic`] says: try the free items in order until one is won.
    async fn atomic_claim(&self, tx: &mut Tx) -> Result<(), LabError> {
        let shape = self.shape;
        let (items, who) = (&self.items, self.who);
        let next = format!(
            "SELECT id FROM {items} WHERE {} AND id > ? ORDER BY id LIMIT 1",
            shape.free
        );
        let mut after = 0_i64;
        loop {
            let item: Option<i64> = tx
                .query_scalar(&next)
                .bind(after)
                .fetch_optional(tx.conn())
                .await?;
            think().await;
            let Some(item) = item else {
                return Err(LabError::Refused(shape.none_left));
            };
            match shape.atomic {
                AtomicClaim::UniqueRecord => {
                    let insert = shape.record_sql(&self.records);
                    let won: Result<_, Error> = tx
                        .savepoint(move |tx| {
                            Box::pin(async move {
                                tx.query(&insert)
                                    .bind(item)
                                    .bind(who)
                                    .execute(tx.conn())
                                    .await?;
                                Ok(())
                            })
                        })
                        .await;
                    match won {
                        Ok(()) => return self.mark(tx, item, 0, false).await,
                        Err(e) if e.is_unique_violation() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                AtomicClaim::ConditionalUpdate => {
                    let claimed = tx
                        .query(&format!(
                            "UPDATE {items} SET {} WHERE id = ? AND {}",
                            shape.claim, shape.free
                        ))
                        .bind(who)
                        .bind(item)
                        .execute(tx.conn())
                        .await?;
                    if claimed.rows_affected() == 1 {
                        return self.record(tx, item).await;
                    }
                }
            }
            after = item;
        }
    }
}

impl Operation for Claim {
    /// The lowest free item and its version, if any.
    type State = Option<(i64, i64)>;
    type Output = ();
    type Error = LabError;

    fn keys(&self) -> Vec<String> {
        vec![self.items.clone()]
    }

    /// Every worker wants the same lowest free item: under `pessimistic` a locked one is
    /// skipped, so each worker gets a different one without waiting.
    fn row_lock(&self) -> RowLock {
        RowLock::UpdateSkipLocked
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, Result<Option<(i64, i64)>, LabError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT id, version FROM {} WHERE {} ORDER BY id LIMIT 1{lock}",
                self.items, self.shape.free
            );
            let item = sqlx::query_as(sql_for(self.backend, &sql))
                .fetch_optional(conn)
                .await?;
            think().await;
            Ok(item)
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        item: &'c Option<(i64, i64)>,
        checked: bool,
    ) -> BoxFuture<'c, Result<(), LabError>> {
        Box::pin(async move {
            let Some((item, version)) = *item else {
                return Err(LabError::Refused(self.shape.none_left));
            };
            self.mark(tx, item, version, checked).await?;
            self.record(tx, item).await
        })
    }

    fn atomic<'c>(&'c self, tx: &'c mut Tx) -> Option<BoxFuture<'c, Result<(), LabError>>> {
        Some(Box::pin(self.atomic_claim(tx)))
    }
}

/// Fills `items` with rows `1..=n`, `row(id)` giving each row's `VALUES` tuple, 500 per
/// statement.
pub(crate) async fn fill(
    db: &Db,
    items: &str,
    n: i64,
    row: impl Fn(i64) -> String,
) -> anyhow::Result<()> {
    let mut id = 1;
    while id <= n {
        let end = (id + 499).min(n);
        let values: Vec<String> = (id..=end).map(&row).collect();
        db.execute_script(&format!("INSERT INTO {items} VALUES {}", values.join(", ")))
            .await?;
        id = end + 1;
    }
    Ok(())
}
