//! `/audit` (the invariants, computed from the data in one consistent snapshot) and `/healthz`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use contend::{Backend, IsolationLevel, TxOptions};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::Auth;
use crate::idempotency::Outcome;

/// The audit object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Audit {
    /// Number of accounts.
    pub accounts: i64,
    /// Sum of all balances (exact: it may exceed the range of i64 with many large balances).
    pub total_balance: i128,
    /// Opening balances + deposits - withdrawals - order totals (from the ledger; exact).
    pub expected_total_balance: i128,
    /// Accounts with a negative balance.
    pub negative_balances: i64,
    /// Accounts whose balance differs from the sum of their ledger movements.
    pub ledger_mismatches: i64,
    /// Products whose stock is negative, or differs from the initial stock minus the units sold.
    pub oversold_products: i64,
    /// Seats of an event booked more than once.
    pub double_booked_seats: i64,
    /// True iff the totals match and every counter is 0.
    pub consistent: bool,
}

/// The health object.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// `sqlite`, `postgres` or `mysql`.
    pub backend: String,
    /// The server's default strategy.
    pub strategy: String,
}

/// Rows summed per group by [`exact_sum_sql`]: every summed value is at most 10^15 in
/// magnitude (amounts, balances and opening balances are bounded by the contract), so a group's
/// sum stays below 4.2 * 10^18, inside i64 on every backend (SQLite's `SUM` fails on overflow,
/// PostgreSQL's and MariaDB's would overflow the cast to BIGINT).
const SUM_GROUP: i64 = 4096;

/// A query returning partial sums of `expr` over `table`, one row per group of at most
/// [`SUM_GROUP`] consecutive ids; their exact total is summed in i128 by [`exact_sum`].
fn exact_sum_sql(backend: Backend, expr: &str, table: &str) -> String {
    let group = match backend {
        Backend::MySql => format!("id DIV {SUM_GROUP}"),
        _ => format!("id / {SUM_GROUP}"),
    };
    format!(
        "SELECT {} FROM {table} GROUP BY {group}",
        sum(backend, expr)
    )
}

/// Runs an [`exact_sum_sql`] query in `tx` and adds its partial sums without overflow.
async fn exact_sum(tx: &mut contend::Tx, sql: &str) -> contend::Result<i128> {
    let rows = tx.query(sql).fetch_all(tx.conn()).await?;
    let mut total = 0i128;
    for row in &rows {
        total += i128::from(row.try_get::<i64, _>(0)?);
    }
    Ok(total)
}

fn sum(backend: Backend, expr: &str) -> String {
    match backend {
        Backend::Postgres => format!("CAST(COALESCE(SUM({expr}), 0) AS BIGINT)"),
        Backend::MySql => format!("CAST(COALESCE(SUM({expr}), 0) AS SIGNED)"),
        _ => format!("COALESCE(SUM({expr}), 0)"),
    }
}

/// Computes the audit in one read-only snapshot.
///
/// # Errors
/// Database errors (503 when unavailable).
///
/// # Cancel safety
/// Read-only: safe to drop.
pub async fn compute(state: &AppState) -> Result<Audit, ApiError> {
    let db = &state.inner.db;
    let backend = db.backend();
    let totals = format!(
        "SELECT COUNT(*), {} FROM accounts",
        sum(backend, "CASE WHEN balance < 0 THEN 1 ELSE 0 END")
    );
    let balances = exact_sum_sql(backend, "balance", "accounts");
    let expected = exact_sum_sql(backend, "amount", "ledger");
    let mismatches = "SELECT COUNT(*) FROM accounts a LEFT JOIN \
        (SELECT account_id, SUM(amount) AS s FROM ledger GROUP BY account_id) l ON l.account_id = a.id \
        WHERE l.s IS NULL OR a.balance <> l.s";
    let oversold = "SELECT COUNT(*) FROM products p LEFT JOIN \
        (SELECT sku, SUM(quantity) AS sold FROM orders GROUP BY sku) o ON o.sku = p.sku \
        WHERE p.stock < 0 OR p.stock + COALESCE(o.sold, 0) <> p.initial_stock";
    let double = "SELECT COUNT(*) FROM (SELECT event_id, seat FROM bookings GROUP BY event_id, seat \
        HAVING COUNT(*) > 1) d";
    let options = TxOptions::new()
        .isolation(IsolationLevel::RepeatableRead)
        .read_only(true);
    let audit = db
        .transaction_with(&options, move |tx| {
            let (totals, balances, expected) = (totals.clone(), balances.clone(), expected.clone());
            Box::pin(async move {
                let row = tx.query(&totals).fetch_one(tx.conn()).await?;
                let (accounts, negative_balances): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
                let total_balance = exact_sum(tx, &balances).await?;
                let expected_total_balance = exact_sum(tx, &expected).await?;
                let ledger_mismatches: i64 = tx
                    .query(mismatches)
                    .fetch_one(tx.conn())
                    .await?
                    .try_get(0)?;
                let oversold_products: i64 =
                    tx.query(oversold).fetch_one(tx.conn()).await?.try_get(0)?;
                let double_booked_seats: i64 =
                    tx.query(double).fetch_one(tx.conn()).await?.try_get(0)?;
                let consistent = total_balance == expected_total_balance
                    && negative_balances == 0
                    && ledger_mismatches == 0
                    && oversold_products == 0
                    && double_booked_seats == 0;
                Ok::<_, contend::Error>(Audit {
                    accounts,
                    total_balance,
                    expected_total_balance,
                    negative_balances,
                    ledger_mismatches,
                    oversold_products,
                    double_booked_seats,
                    consistent,
                })
            })
        })
        .await?;
    Ok(audit)
}

/// `GET /audit`
#[utoipa::path(get, path = "/audit", security(("bearer" = [])),
    responses((status = 200, body = Audit), (status = 401, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn audit(State(state): State<AppState>, Auth(auth): Auth) -> Result<Outcome, ApiError> {
    auth.require_admin()?;
    Ok(Outcome::json(StatusCode::OK, &compute(&state).await?))
}

/// `GET /healthz`
#[utoipa::path(get, path = "/healthz",
    responses((status = 200, body = Health), (status = 503, body = crate::error::ErrorBody)))]
pub async fn healthz(State(state): State<AppState>) -> Result<Outcome, ApiError> {
    let db = &state.inner.db;
    // Without parameters, in the simple query protocol: one round trip, and safe behind a
    // transaction pooler.
    let ping = db.execute_script("SELECT 1");
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => Ok(Outcome::json(
            StatusCode::OK,
            &Health {
                status: "ok".into(),
                backend: db.backend().name().into(),
                strategy: state.inner.strategy.to_string(),
            },
        )),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check failed");
            Err(ApiError::unavailable(
                "unavailable",
                "the database is unavailable",
            ))
        }
        Err(_) => Err(ApiError::unavailable(
            "unavailable",
            "the database did not answer within 2 s",
        )),
    }
}
