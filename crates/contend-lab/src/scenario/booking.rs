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
use contend::{Backend, BoxFuture, Session};

use super::claim::{AtomicClaim, Claims, fill};
use super::{
    Ctx, Invariant, OpReport, Scenario, Totals, base_support, drop_tables, engine, fenced,
    invariant, scalar, table_name,
};

/// The booking scenario.
#[derive(Debug, Default)]
pub struct Booking;

impl Booking {
    /// The scenario.
    pub fn new() -> Self {
        Booking
    }

    /// Seats: half the operations, at least 1.
    fn seats(operations: u64) -> i64 {
        i64::try_from(operations / 2).unwrap_or(i64::MAX).max(1)
    }
}

fn tables(ctx: &Ctx) -> (String, String) {
    (table_name(ctx, "booking_seat"), table_name(ctx, "booking"))
}

/// Seats are claimed by setting `booked_by` (0 while free) and recorded as bookings; under
/// `atomic` the unique booking decides.
static SEATS: Claims = Claims {
    free: "booked_by = 0",
    claim: "booked_by = ?",
    item_column: "seat",
    claimant_column: "customer",
    none_left: "sold out",
    atomic: AtomicClaim::UniqueRecord,
};

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
            fill(db, &seats, Booking::seats(ctx.operations), |i| {
                format!("({i}, 0, 0)")
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
        let _ = worker;
        let customer = i64::try_from(seq).unwrap_or(i64::MAX - 1) + 1;
        let (seats, bookings) = tables(ctx);
        Box::pin(SEATS.run_op(ctx, session, seats, bookings, customer))
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
