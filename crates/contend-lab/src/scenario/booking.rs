//! `booking`: every worker asks for the best seat still free (the lowest-numbered one), so they
//! all race for the same seat. Half as many seats as operations: the rest are refused (sold
//! out). A seat must never be booked twice.
//!
//! Strategies that differ from the others here:
//! - `atomic` is the **unique-constraint** variant: the bookings table has `UNIQUE (seat)`, and the
//!   `INSERT` of the booking decides the race (a lost race moves on to the next seat).
//! - `pessimistic` is the **`SKIP LOCKED`** variant: `SELECT ... ORDER BY id LIMIT 1 FOR UPDATE
//!   SKIP LOCKED` hands each worker a different free seat without waiting (SQLite: the write
//!   transaction's lock).
//!
//! Invariants: no seat booked twice; one booking per success; each booked seat records the
//! customer of its booking.

use contend::strategy::Strategy;
use contend::strategy::mutex::KeyedMutex;
use contend::strategy::optimistic;
use contend::{Backend, BoxFuture, Db, RetryPolicy, RowLock, Session, Tx, TxOptions};

use super::{
    Ctx, Guard, Invariant, OpReport, Scenario, Totals, base_support, drop_tables, engine, fenced,
    guarded, invariant, op_on_own_session, refuse, report, report_plain, scalar, table_name, think,
};

/// The booking scenario.
#[derive(Debug, Default)]
pub struct Booking {
    mutex: KeyedMutex,
}

impl Booking {
    /// The scenario.
    pub fn new() -> Self {
        Booking::default()
    }

    /// Seats: half the operations, at least 1.
    fn seats(operations: u64) -> i64 {
        i64::try_from(operations / 2).unwrap_or(i64::MAX).max(1)
    }
}

fn tables(ctx: &Ctx) -> (String, String) {
    (table_name(ctx, "booking_seat"), table_name(ctx, "booking"))
}

const SOLD_OUT: &str = "sold out";

fn lock_options() -> TxOptions {
    TxOptions::new().retry(RetryPolicy::new().max_attempts(30))
}

/// The lowest free seat (with `lock` appended to the query), or `None`.
async fn free_seat(tx: &mut Tx, seats: &str, lock: &str) -> contend::Result<Option<(i64, i64)>> {
    let sql =
        format!("SELECT id, version FROM {seats} WHERE booked_by = 0 ORDER BY id LIMIT 1{lock}");
    let sql = tx.backend().sql(&sql).into_owned();
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_optional(tx.conn())
        .await?)
}

async fn book_tx(
    tx: &mut Tx,
    seats: &str,
    bookings: &str,
    seat: i64,
    customer: i64,
) -> contend::Result<()> {
    tx.query(&format!("UPDATE {seats} SET booked_by = ? WHERE id = ?"))
        .bind(customer)
        .bind(seat)
        .execute(tx.conn())
        .await?;
    tx.query(&format!(
        "INSERT INTO {bookings} (seat, customer) VALUES (?, ?)"
    ))
    .bind(seat)
    .bind(customer)
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// Find the best free seat (autocommit), decide, book it in separate statements.
async fn unlocked(db: &Db, seats: &str, bookings: &str, customer: i64) -> contend::Result<()> {
    let sql = format!("SELECT id FROM {seats} WHERE booked_by = 0 ORDER BY id LIMIT 1");
    let seat: Option<i64> = db.query_scalar(&sql).fetch_optional(db.pool()).await?;
    think().await;
    let Some(seat) = seat else {
        return Err(refuse(SOLD_OUT));
    };
    db.query(&format!("UPDATE {seats} SET booked_by = ? WHERE id = ?"))
        .bind(customer)
        .bind(seat)
        .execute(db.pool())
        .await?;
    db.query(&format!(
        "INSERT INTO {bookings} (seat, customer) VALUES (?, ?)"
    ))
    .bind(seat)
    .bind(customer)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Read, decide, write inside the caller's transaction, the read taking `lock`.
async fn read_decide_write(
    tx: &mut Tx,
    seats: &str,
    bookings: &str,
    customer: i64,
    lock: &str,
) -> contend::Result<()> {
    let seat = free_seat(tx, seats, lock).await?;
    think().await;
    let Some((seat, _)) = seat else {
        return Err(refuse(SOLD_OUT));
    };
    book_tx(tx, seats, bookings, seat, customer).await
}

/// The unique-constraint variant: the booking's `INSERT` decides; a lost race tries the next
/// seat. The insert runs in a savepoint so that PostgreSQL's transaction survives the violation.
async fn unique_claim(
    tx: &mut Tx,
    seats: &str,
    bookings: &str,
    customer: i64,
) -> contend::Result<()> {
    let mut after = 0_i64;
    loop {
        let sql =
            format!("SELECT id FROM {seats} WHERE booked_by = 0 AND id > ? ORDER BY id LIMIT 1");
        let seat: Option<i64> = tx
            .query_scalar(&sql)
            .bind(after)
            .fetch_optional(tx.conn())
            .await?;
        think().await;
        let Some(seat) = seat else {
            return Err(refuse(SOLD_OUT));
        };
        let insert = format!("INSERT INTO {bookings} (seat, customer) VALUES (?, ?)");
        let won = tx
            .savepoint(move |tx| {
                Box::pin(async move {
                    tx.query(&insert)
                        .bind(seat)
                        .bind(customer)
                        .execute(tx.conn())
                        .await?;
                    Ok(())
                })
            })
            .await;
        match won {
            Ok(()) => {
                tx.query(&format!("UPDATE {seats} SET booked_by = ? WHERE id = ?"))
                    .bind(customer)
                    .bind(seat)
                    .execute(tx.conn())
                    .await?;
                return Ok(());
            }
            Err(e) if e.is_unique_violation() => after = seat,
            Err(e) => return Err(e),
        }
    }
}

/// Optimistic: read the best free seat and its version, book it only if the version is
/// unchanged (else the retry re-reads).
async fn versioned(tx: &mut Tx, seats: &str, bookings: &str, customer: i64) -> contend::Result<()> {
    let seat = free_seat(tx, seats, "").await?;
    think().await;
    let Some((seat, version)) = seat else {
        return Err(refuse(SOLD_OUT));
    };
    let done = tx
        .query(&format!(
            "UPDATE {seats} SET booked_by = ?, version = version + 1 WHERE id = ? AND version = ?"
        ))
        .bind(customer)
        .bind(seat)
        .bind(version)
        .execute(tx.conn())
        .await?;
    optimistic::check(done.rows_affected())?;
    tx.query(&format!(
        "INSERT INTO {bookings} (seat, customer) VALUES (?, ?)"
    ))
    .bind(seat)
    .bind(customer)
    .execute(tx.conn())
    .await?;
    Ok(())
}

impl Booking {
    async fn run_op(&self, ctx: &Ctx, session: &mut Session, customer: i64) -> OpReport {
        let db = &ctx.db;
        let (seats, bookings) = tables(ctx);
        match ctx.strategy {
            Strategy::None => report_plain(unlocked(db, &seats, &bookings, customer).await),
            Strategy::Mutex => {
                let _guard = self.mutex.lock(&seats).await;
                report_plain(unlocked(db, &seats, &bookings, customer).await)
            }
            Strategy::Atomic => report(
                session
                    .run(&lock_options(), |tx| {
                        let (s, b) = (seats.clone(), bookings.clone());
                        Box::pin(async move { unique_claim(tx, &s, &b, customer).await })
                    })
                    .await,
            ),
            Strategy::Optimistic => report(
                session
                    .run(&optimistic::options(), |tx| {
                        let (s, b) = (seats.clone(), bookings.clone());
                        Box::pin(async move { versioned(tx, &s, &b, customer).await })
                    })
                    .await,
            ),
            _ => {
                // One lock for the whole seat map: every worker wants the best free seat.
                let keys = [seats.clone()];
                let guard = Guard {
                    keys: &keys,
                    row_lock: RowLock::UpdateSkipLocked,
                    lock_options: lock_options(),
                };
                guarded(ctx, session, &guard, move |tx, lock| {
                    let (s, b) = (seats.clone(), bookings.clone());
                    Box::pin(async move { read_decide_write(tx, &s, &b, customer, lock).await })
                })
                .await
            }
        }
    }
}

impl Scenario for Booking {
    fn name(&self) -> &'static str {
        "booking"
    }

    fn supports(&self, strategy: Strategy, backend: Backend) -> Result<(), String> {
        base_support(strategy, backend)
    }

    fn setup<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let (seats, bookings) = tables(ctx);
            let db = &ctx.db;
            let engine = engine(db.backend());
            drop_tables(db, &[seats.clone(), bookings.clone()]).await?;
            // booked_by: 0 while free, else the customer.
            db.execute_script(&format!(
                "CREATE TABLE {seats} (id BIGINT PRIMARY KEY, booked_by BIGINT NOT NULL, \
                 version BIGINT NOT NULL){engine}"
            ))
            .await?;
            db.execute_script(&format!(
                "CREATE INDEX {seats}_free ON {seats} (booked_by, id)"
            ))
            .await?;
            // Only the unique-constraint variant gets the constraint: for every other strategy
            // a double booking must stay visible to the check.
            let unique = if ctx.strategy == Strategy::Atomic {
                ", UNIQUE (seat)"
            } else {
                ""
            };
            db.execute_script(&format!(
                "CREATE TABLE {bookings} (seat BIGINT NOT NULL, customer BIGINT NOT NULL{unique}){engine}"
            ))
            .await?;
            let n = Booking::seats(ctx.operations);
            let mut id = 1;
            while id <= n {
                let end = (id + 499).min(n);
                let values: Vec<String> = (id..=end).map(|i| format!("({i}, 0, 0)")).collect();
                db.execute_script(&format!("INSERT INTO {seats} VALUES {}", values.join(", ")))
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
        let _ = worker;
        let customer = i64::try_from(seq).unwrap_or(i64::MAX - 1) + 1;
        Box::pin(self.run_op(ctx, session, customer))
    }

    fn check<'a>(
        &'a self,
        ctx: &'a Ctx,
        totals: &'a Totals,
    ) -> BoxFuture<'a, anyhow::Result<Vec<Invariant>>> {
        Box::pin(async move {
            let (seats, bookings) = tables(ctx);
            let db = &ctx.db;
            let extra = scalar(
                db,
                &format!("SELECT COUNT(*) - COUNT(DISTINCT seat) FROM {bookings}"),
            )
            .await?;
            let count = scalar(db, &format!("SELECT COUNT(*) FROM {bookings}")).await?;
            let succeeded = i64::try_from(totals.succeeded).unwrap_or(i64::MAX);
            let mismatched = scalar(
                db,
                &format!(
                    "SELECT COUNT(*) FROM {seats} s WHERE s.booked_by <> 0 AND NOT EXISTS \
                     (SELECT 1 FROM {bookings} b WHERE b.seat = s.id AND b.customer = s.booked_by)"
                ),
            )
            .await?;
            Ok(vec![
                invariant(
                    "no_double_booking",
                    extra as u64,
                    format!("{extra} bookings of an already booked seat"),
                ),
                invariant(
                    "one_booking_per_success",
                    count.abs_diff(succeeded),
                    format!("{count} bookings, {succeeded} successful operations"),
                ),
                invariant(
                    "seat_matches_booking",
                    mismatched as u64,
                    format!("{mismatched} booked seats whose holder has no booking"),
                ),
            ])
        })
    }

    fn teardown<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let (seats, bookings) = tables(ctx);
            fenced::teardown(ctx, std::slice::from_ref(&seats)).await?;
            drop_tables(&ctx.db, &[seats, bookings]).await
        })
    }
}
