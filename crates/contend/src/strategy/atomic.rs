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

use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Encode, Type};

use super::{BlockDatabase, Ident, InvalidIdent, Value};
use crate::db::Db;
use crate::error::{Error, Result};
use crate::session::{Session, classified};
use crate::tx::Tx;

/// Runs a conditional write and says whether it applied (changed at least one row).
///
/// # Errors
/// The statement's error, classified ([`Error::Conflict`] for a conflict).
///
/// # Cancel safety
/// One statement: if dropped inside a transaction, the transaction's own cancel safety applies;
/// in autocommit the statement either committed or did not.
pub async fn apply<DB: BlockDatabase>(
    conn: &mut DB::Connection,
    query: Query<'_, DB, <DB as sqlx::Database>::Arguments>,
) -> Result<bool> {
    Ok(DB::execute_query(conn, query).await? > 0)
}

/// A numeric column guarded against going below zero, changed only by in-database arithmetic.
///
/// Its rows are found by a key of any type sqlx binds for the database (`i64`, text, a
/// `uuid::Uuid` on PostgreSQL, ...); the column is a `BIGINT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    table: Ident,
    key_column: Ident,
    column: Ident,
}

impl Counter {
    /// The column `column` of `table`, whose rows are found by the key column `key_column`.
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

    /// The conditional `UPDATE` for `backend` with its parameters bound.
    fn sub_query<'k, DB, K>(
        &self,
        backend: crate::Backend,
        suffix: &str,
        key: K,
        amount: i64,
    ) -> Query<'static, DB, <DB as sqlx::Database>::Arguments>
    where
        DB: BlockDatabase,
        K: Encode<'k, DB> + Type<DB>,
    {
        let sql = format!("{}{suffix}", self.sub_sql());
        let q = sqlx::query(AssertSqlSafe(backend.sql(&sql).into_owned()));
        let q = DB::bind_value(q, &Value::Int(amount)).bind(key);
        DB::bind_value(q, &Value::Int(amount))
    }

    /// Subtracts `amount` if the value is at least `amount`, in one autocommit statement.
    /// Returns whether it applied (`false`: not enough, or no such row).
    ///
    /// On a SQLite `Db` with a writer queue ([`crate::DbBuilder::writer_queue`]) the statement
    /// waits for this process's turn to write, as a write transaction does, and runs on the
    /// dedicated writer connection when the `Db` has one ([`Session::write_autocommit`]): the
    /// process's concurrent writers never meet in SQLite's busy handler. The future is `Send`
    /// (it runs inside `tokio::spawn`).
    ///
    /// # Errors
    /// [`Error::Aborted`] for an `amount` that is not positive; a
    /// [`crate::ConflictKind::Busy`] conflict when the SQLite writer's turn does not come
    /// within the `Db`'s acquire timeout; database errors, classified.
    ///
    /// # Cancel safety
    /// One autocommit statement: when dropped it either committed or did not; nothing partial.
    /// Dropped while waiting for the writer's turn, it leaves the queue without writing.
    pub async fn try_sub_now<'k, DB, K>(&self, db: &Db<DB>, key: K, amount: i64) -> Result<bool>
    where
        DB: BlockDatabase,
        K: Encode<'k, DB> + Type<DB> + Send,
    {
        self.try_sub_in(&mut db.session(), key, amount).await
    }

    /// Like [`Counter::try_sub_now`], on a [`Session`]'s held connection (one autocommit
    /// statement; behind a transaction pooler, in a transaction of its own), through
    /// [`Session::write_autocommit`]: on a SQLite `Db` with a writer queue, in this process's
    /// turn to write (on the dedicated writer connection when the `Db` has one).
    ///
    /// # Errors
    /// [`Error::Aborted`] for an `amount` that is not positive; a
    /// [`crate::ConflictKind::Busy`] conflict when the SQLite writer's turn does not come
    /// within the `Db`'s acquire timeout; database errors, classified.
    ///
    /// # Cancel safety
    /// As [`Session::write_autocommit`]: the turn is released, and an interrupted statement's
    /// connection is closed, not kept; the statement either committed or did not.
    pub async fn try_sub_in<'k, DB, K>(
        &self,
        session: &mut Session<DB>,
        key: K,
        amount: i64,
    ) -> Result<bool>
    where
        DB: BlockDatabase,
        K: Encode<'k, DB> + Type<DB> + Send,
    {
        Self::check_amount(amount)?;
        let q = self.sub_query(session.db().backend(), "", key, amount);
        let done = session
            .write_autocommit(move |conn| classified(DB::execute_query(conn, q)))
            .await?;
        Ok(done > 0)
    }

    /// Subtracts `amount` inside the caller's transaction if the value is at least `amount`, and
    /// returns the new value, or `None` when it did not apply (not enough, or no such row).
    ///
    /// PostgreSQL and SQLite read the new value with `RETURNING`; MariaDB has no
    /// `UPDATE ... RETURNING`, so the value is read back in the same transaction, where the row
    /// is still locked by this update.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use contend::{Db, strategy::atomic::Counter};
    /// use sqlx::SqlitePool;
    /// // A typed pool and a text key: any key type sqlx binds for the database.
    /// let db = Db::from_pool(SqlitePool::connect("sqlite::memory:").await?)?;
    /// db.execute_script("CREATE TABLE stock (sku TEXT PRIMARY KEY, left_ BIGINT NOT NULL);
    ///                    INSERT INTO stock VALUES ('mug', 3)").await?;
    /// let stock = Counter::new("stock", "sku", "left_")?;
    /// let left = db.transaction(|tx| Box::pin(async move {
    ///     stock.try_sub(tx, "mug", 2).await
    /// })).await?;
    /// assert_eq!(left, Some(1));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Aborted`] for an `amount` that is not positive; database errors, classified.
    ///
    /// # Cancel safety
    /// As the caller's transaction: dropped, it rolls back.
    pub async fn try_sub<'k, DB, K>(
        &self,
        tx: &mut Tx<DB>,
        key: K,
        amount: i64,
    ) -> Result<Option<i64>>
    where
        DB: BlockDatabase,
        K: Encode<'k, DB> + Type<DB> + Send + Clone,
    {
        Self::check_amount(amount)?;
        let Counter {
            table,
            key_column,
            column,
        } = self;
        let backend = tx.backend();
        if backend.dialect().returning() {
            let q = self.sub_query(backend, &format!(" RETURNING {column}"), key, amount);
            return match DB::fetch_optional_query(tx.conn(), q).await? {
                Some(row) => Ok(Some(DB::get_i64(&row, 0)?)),
                None => Ok(None),
            };
        }
        let q = self.sub_query(backend, "", key.clone(), amount);
        if DB::execute_query(tx.conn(), q).await? == 0 {
            return Ok(None);
        }
        let sql = format!("SELECT {column} FROM {table} WHERE {key_column} = ?");
        let q = sqlx::query(AssertSqlSafe(backend.sql(&sql).into_owned())).bind(key);
        match DB::fetch_optional_query(tx.conn(), q).await? {
            Some(row) => Ok(Some(DB::get_i64(&row, 0)?)),
            None => Ok(None),
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
    pub async fn add<'k, DB, K>(&self, tx: &mut Tx<DB>, key: K, amount: i64) -> Result<bool>
    where
        DB: BlockDatabase,
        K: Encode<'k, DB> + Type<DB> + Send,
    {
        let Counter {
            table,
            key_column,
            column,
        } = self;
        let sql = format!("UPDATE {table} SET {column} = {column} + ? WHERE {key_column} = ?");
        let q = DB::bind_value(tx.query(&sql), &Value::Int(amount)).bind(key);
        Ok(DB::execute_query(tx.conn(), q).await? > 0)
    }
}
