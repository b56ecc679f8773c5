//! What `booking` and `queue` share: a table of items (seats, jobs) that workers claim, the
//! lowest-numbered free item first, so that every worker races for the same one, and a table
//! that records each claim (bookings, processed jobs). A scenario describes its tables with a
//! [`Claims`]; this module runs every strategy on them.

use contend::strategy::Strategy;
use contend::strategy::mutex::KeyedMutex;
use contend::strategy::optimistic;
use contend::{Db, RetryPolicy, RowLock, Session, Tx, TxOptions};

use super::{Ctx, Guard, OpReport, guarded, refuse, report, report_plain, think};

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

/// The item and record tables of one run.
pub(crate) struct Tables<'a> {
    /// The items.
    pub items: &'a str,
    /// The records of claims.
    pub records: &'a str,
}

/// Retries of the transactional strategies: a lost race is a conflict to retry, not an error.
pub(crate) fn lock_options() -> TxOptions {
    TxOptions::new().retry(RetryPolicy::new().max_attempts(30))
}

impl Claims {
    fn record_sql(&self, records: &str) -> String {
        format!(
            "INSERT INTO {records} ({}, {}) VALUES (?, ?)",
            self.item_column, self.claimant_column
        )
    }

    /// The lowest free item and its version (the query ending with `lock`), or `None`.
    async fn next_free(
        &self,
        tx: &mut Tx,
        items: &str,
        lock: &str,
    ) -> contend::Result<Option<(i64, i64)>> {
        let sql = format!(
            "SELECT id, version FROM {items} WHERE {} ORDER BY id LIMIT 1{lock}",
            self.free
        );
        let sql = tx.backend().sql(&sql).into_owned();
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_optional(tx.conn())
            .await?)
    }

    /// Claims `item` for `who` and records it, inside the caller's transaction.
    async fn claim_tx(
        &self,
        tx: &mut Tx,
        t: &Tables<'_>,
        item: i64,
        who: i64,
    ) -> contend::Result<()> {
        tx.query(&format!(
            "UPDATE {} SET {} WHERE id = ?",
            t.items, self.claim
        ))
        .bind(who)
        .bind(item)
        .execute(tx.conn())
        .await?;
        tx.query(&self.record_sql(t.records))
            .bind(item)
            .bind(who)
            .execute(tx.conn())
            .await?;
        Ok(())
    }

    /// `none`: find the lowest free item (autocommit), decide, claim and record it in separate
    /// statements.
    async fn unlocked(&self, db: &Db, t: &Tables<'_>, who: i64) -> contend::Result<()> {
        let sql = format!(
            "SELECT id FROM {} WHERE {} ORDER BY id LIMIT 1",
            t.items, self.free
        );
        let item: Option<i64> = db.query_scalar(&sql).fetch_optional(db.pool()).await?;
        think().await;
        let Some(item) = item else {
            return Err(refuse(self.none_left));
        };
        db.query(&format!(
            "UPDATE {} SET {} WHERE id = ?",
            t.items, self.claim
        ))
        .bind(who)
        .bind(item)
        .execute(db.pool())
        .await?;
        db.query(&self.record_sql(t.records))
            .bind(item)
            .bind(who)
            .execute(db.pool())
            .await?;
        Ok(())
    }

    /// Read, decide, write inside the caller's transaction, the read taking `lock`.
    async fn read_decide_write(
        &self,
        tx: &mut Tx,
        t: &Tables<'_>,
        who: i64,
        lock: &str,
    ) -> contend::Result<()> {
        let item = self.next_free(tx, t.items, lock).await?;
        think().await;
        let Some((item, _)) = item else {
            return Err(refuse(self.none_left));
        };
        self.claim_tx(tx, t, item, who).await
    }

    /// `optimistic`: read the lowest free item and its version, claim it only if the version is
    /// unchanged (else the retry re-reads).
    async fn versioned(&self, tx: &mut Tx, t: &Tables<'_>, who: i64) -> contend::Result<()> {
        let item = self.next_free(tx, t.items, "").await?;
        think().await;
        let Some((item, version)) = item else {
            return Err(refuse(self.none_left));
        };
        let done = tx
            .query(&format!(
                "UPDATE {} SET {}, version = version + 1 WHERE id = ? AND version = ?",
                t.items, self.claim
            ))
            .bind(who)
            .bind(item)
            .bind(version)
            .execute(tx.conn())
            .await?;
        optimistic::check(done.rows_affected())?;
        tx.query(&self.record_sql(t.records))
            .bind(item)
            .bind(who)
            .execute(tx.conn())
            .await?;
        Ok(())
    }

    /// `atomic`, as [`Claims::atomic`] says: try the free items in order until one is won.
    async fn atomic_claim(&self, tx: &mut Tx, t: &Tables<'_>, who: i64) -> contend::Result<()> {
        let next = format!(
            "SELECT id FROM {} WHERE {} AND id > ? ORDER BY id LIMIT 1",
            t.items, self.free
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
                return Err(refuse(self.none_left));
            };
            match self.atomic {
                AtomicClaim::UniqueRecord => {
                    let insert = self.record_sql(t.records);
                    let won: Result<_, contend::Error> = tx
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
                        Ok(()) => {
                            tx.query(&format!(
                                "UPDATE {} SET {} WHERE id = ?",
                                t.items, self.claim
                            ))
                            .bind(who)
                            .bind(item)
                            .execute(tx.conn())
                            .await?;
                            return Ok(());
                        }
                        Err(e) if e.is_unique_violation() => {}
                        Err(e) => return Err(e),
                    }
                }
                AtomicClaim::ConditionalUpdate => {
                    let claimed = tx
                        .query(&format!(
                            "UPDATE {} SET {} WHERE id = ? AND {}",
                            t.items, self.claim, self.free
                        ))
                        .bind(who)
                        .bind(item)
                        .execute(tx.conn())
                        .await?;
                    if claimed.rows_affected() == 1 {
                        tx.query(&self.record_sql(t.records))
                            .bind(item)
                            .bind(who)
                            .execute(tx.conn())
                            .await?;
                        return Ok(());
                    }
                }
            }
            after = item;
        }
    }

    /// One operation of claimant `who` under `ctx.strategy`: `mutex` locks the item table's
    /// name in `mutex`; every lock-taking strategy takes one lock for the whole item table, since
    /// every worker wants the lowest free item (`pessimistic`: `FOR UPDATE SKIP LOCKED`).
    pub(crate) async fn run_op(
        &'static self,
        ctx: &Ctx,
        session: &mut Session,
        mutex: &KeyedMutex,
        items: String,
        records: String,
        who: i64,
    ) -> OpReport {
        let db = &ctx.db;
        let t = Tables {
            items: &items,
            records: &records,
        };
        match ctx.strategy {
            Strategy::None => report_plain(self.unlocked(db, &t, who).await),
            Strategy::Mutex => {
                let _guard = mutex.lock(&items).await;
                report_plain(self.unlocked(db, &t, who).await)
            }
            Strategy::Atomic => report(
                session
                    .run(&lock_options(), |tx| {
                        let (i, r) = (items.clone(), records.clone());
                        Box::pin(async move {
                            let t = Tables {
                                items: &i,
                                records: &r,
                            };
                            self.atomic_claim(tx, &t, who).await
                        })
                    })
                    .await,
            ),
            Strategy::Optimistic => report(
                session
                    .run(&optimistic::options(), |tx| {
                        let (i, r) = (items.clone(), records.clone());
                        Box::pin(async move {
                            let t = Tables {
                                items: &i,
                                records: &r,
                            };
                            self.versioned(tx, &t, who).await
                        })
                    })
                    .await,
            ),
            _ => {
                let keys = [items.clone()];
                let guard = Guard {
                    keys: &keys,
                    row_lock: RowLock::UpdateSkipLocked,
                    lock_options: lock_options(),
                };
                guarded(ctx, session, &guard, move |tx, lock| {
                    let (i, r) = (items.clone(), records.clone());
                    Box::pin(async move {
                        let t = Tables {
                            items: &i,
                            records: &r,
                        };
                        self.read_decide_write(tx, &t, who, lock).await
                    })
                })
                .await
            }
        }
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
