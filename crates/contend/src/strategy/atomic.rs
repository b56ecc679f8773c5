//! `atomic`: prevents the lost update by never reading the value into the application at all.
//! The new value is computed inside the database by one conditional `UPDATE`
//! (`SET balance = balance - ? WHERE id = ? AND balance >= ?`), and the affected-row count (or
//! `RETURNING`) says whether it applied. This is Django's `F()` with `filter(...).update(...)`.
//!
//! The database applies each such statement to the latest committed row under its own row lock
//! (SQLite: under the database write lock), so two concurrent withdrawals can neither both read
//! the same old balance nor take the balance below the guard. It cannot express a decision that
//! needs several rows or application logic between read and write: use [`super::pessimistic`],
//! [`super::optimistic`] or [`super::serializable`] for those.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use contend::{Db, strategy::atomic::Counter};
//! let db = Db::connect("sqlite::memory:").await?;
//! db.execute_script("CREATE TABLE account (id INTEGER PRIMARY KEY, balance BIGINT NOT NULL);
//!                    INSERT INTO account VALUES (1, 5)").await?;
//! let balance = Counter::new("account", "id", "balance")?;
//! assert!(balance.try_sub_now(&db, 1, 3).await?);   // 5 -> 2
//! assert!(!balance.try_sub_now(&db, 1, 3).await?);  // refused: only 2 left
//! let left = db
//!     .transaction(|tx| {
//!         let balance = balance.clone();
//!         Box::pin(async move { balance.try_sub(tx, 1, 2).await })
//!     })
//!     .await?;
//! assert_eq!(left, Some(0));
//! # Ok(()) }
//! ```

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyConnection};

use super::{Ident, InvalidIdent};
use crate::backend::Backend;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::session::Session;
use crate::tx::Tx;

/// Runs a conditional write and says whether it applied (changed at least one row).
///
/// # Errors
/// The statement's error, classified ([`Error::Conflict`] for a conflict).
///
/// # Cancel safety
/// One statement: if dropped inside a transaction, the transaction's own cancel safety applies;
/// in autocommit the statement either committed or did not.
pub async fn apply(
    conn: &mut AnyConnection,
    query: Query<'static, Any, AnyArguments>,
) -> Result<bool> {
    Ok(query.execute(conn).await?.rows_affected() > 0)
}

/// A numeric column guarded against going below zero, changed only by in-database arithmetic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    table: Ident,
    key_column: Ident,
    column: Ident,
}

impl Counter {
    /// The column `column` of `table`, whose rows are found by the `BIGINT` key `key_column`.
    ///
    /// # Errors
    /// [`InvalidIdent`] when a name is not a plain SQL identifier.
    pub fn new(table: &str, key_column: &str, column: &str) -> Result<Counter, InvalidIdent> {
        Ok(Counter {
            table: Ident::new(table)?,
            key_column: Ident::new(key_column)?,
            column: Ident::new(column)?,
        })
    }

    /// The conditional `UPDATE` this counter runs, with `?` placeholders for amount, key and
    /// amount again (for benchmarks that replay the same SQL with another client).
    pub fn sub_sql(&self) -> String {
        let Counter {
            table,
            key_column,
            column,
        } = self;
        format!(
            "UPDATE {table} SET {column} = {column} - ? WHERE {key_column} = ? AND {column} >= ?"
        )
    }

    fn check_amount(amount: i64) -> Result<()> {
        if amount <= 0 {
            return Err(Error::aborted(format!(
                "amount must be positive, got {amount}"
            )));
        }
        Ok(())
    }

    /// Subtracts `amount` if the value is at least `amount`, in one autocommit statement.
    /// Returns whether it applied (`false`: not enough, or no such row).
    ///
    /// # Errors
    /// [`Error::Aborted`] for an `amount` that is not positive; database errors, classified.
    ///
    /// # Cancel safety
    /// One autocommit statement: when dropped it either committed or did not; nothing partial.
    pub async fn try_sub_now(&self, db: &Db, key: i64, amount: i64) -> Result<bool> {
        Self::check_amount(amount)?;
        let q = db
            .query(&self.sub_sql())
            .bind(amount)
            .bind(key)
            .bind(amount);
        Ok(q.execute(db.pool()).await?.rows_affected() > 0)
    }

    /// Like [`Counter::try_sub_now`], on a [`Session`]'s held connection (one autocommit
    /// statement).
    ///
    /// # Errors
    /// [`Error::Aborted`] for an `amount` that is not positive; database errors, classified.
    ///
    /// # Cancel safety
    /// As [`Session::autocommit`]: an interrupted statement's connection is closed, not kept.
    pub async fn try_sub_in(&self, session: &mut Session, key: i64, amount: i64) -> Result<bool> {
        Self::check_amount(amount)?;
        let q = session
            .db()
            .query(&self.sub_sql())
            .bind(amount)
            .bind(key)
            .bind(amount);
        session
            .autocommit(|conn| {
                Box::pin(async move { Ok(q.execute(conn).await?.rows_affected() > 0) })
            })
            .await
    }

    /// Subtracts `amount` inside the caller's transaction if the value is at least `amount`, and
    /// returns the new value, or `None` when it did not apply (not enough, or no such row).
    ///
    /// PostgreSQL and SQLite read the new value with `RETURNING`; MariaDB has no
    /// `UPDATE ... RETURNING`, so the value is read back in the same transaction, where the row
    /// is still locked by this update.
    ///
    /// # Errors
    /// [`Error::Aborted`] for an `amount` that is not positive; database errors, classified.
    ///
    /// # Cancel safety
    /// As the caller's transaction: dropped, it rolls back.
    pub async fn try_sub(&self, tx: &mut Tx, key: i64, amount: i64) -> Result<Option<i64>> {
        Self::check_amount(amount)?;
        let Counter {
            table,
            key_column,
            column,
        } = self;
        match tx.backend() {
            Backend::MySql => {
                let q = tx
                    .query(&self.sub_sql())
                    .bind(amount)
                    .bind(key)
                    .bind(amount);
                if q.execute(tx.conn()).await?.rows_affected() == 0 {
                    return Ok(None);
                }
                let sql = format!("SELECT {column} FROM {table} WHERE {key_column} = ?");
                let value: i64 = tx.query_scalar(&sql).bind(key).fetch_one(tx.conn()).await?;
                Ok(Some(value))
            }
            _ => {
                let sql = format!("{} RETURNING {column}", self.sub_sql());
                let q = tx.query_scalar(&sql).bind(amount).bind(key).bind(amount);
                Ok(q.fetch_optional(tx.conn()).await?)
            }
        }
    }

    /// Adds `amount` (which may be negative) without any guard, in the caller's transaction.
    /// Returns whether the row exists.
    ///
    /// # Errors
    /// Database errors, classified.
    ///
    /// # Cancel safety
    /// As the caller's transaction: dropped, it rolls back.
    pub async fn add(&self, tx: &mut Tx, key: i64, amount: i64) -> Result<bool> {
        let Counter {
            table,
            key_column,
            column,
        } = self;
        let sql = format!("UPDATE {table} SET {column} = {column} + ? WHERE {key_column} = ?");
        let q = tx.query(&sql).bind(amount).bind(key);
        Ok(q.execute(tx.conn()).await?.rows_affected() > 0)
    }
}
