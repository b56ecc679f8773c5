//! `pessimistic`: prevents lost updates and write skew on the rows it locks by taking row locks
//! *before* reading (`SELECT ... FOR UPDATE`), so a second transaction that wants the same rows
//! waits until the first commits and then reads the new values.
//!
//! | mode ([`RowLock`]) | PostgreSQL | MySQL/MariaDB 10.11 | SQLite |
//! |---|---|---|---|
//! | `Update` | `FOR UPDATE` | `FOR UPDATE` | database write lock |
//! | `NoKeyUpdate` | `FOR NO KEY UPDATE` | unsupported | database write lock |
//! | `Share` | `FOR SHARE` | `LOCK IN SHARE MODE` | database write lock |
//! | `UpdateNowait` | `FOR UPDATE NOWAIT` | `FOR UPDATE NOWAIT` | database write lock |
//! | `UpdateSkipLocked` | `FOR UPDATE SKIP LOCKED` | `FOR UPDATE SKIP LOCKED` | database write lock |
//!
//! **SQLite has no row locks.** Every write transaction of [`crate::Db`] starts with
//! `BEGIN IMMEDIATE`, which takes the database's single write lock before the first read and
//! holds it to the end; that is a (coarse) pessimistic lock on every row at once, so
//! [`lock_clause`] returns an empty clause there. Inside a write transaction no other writer
//! can hold a row, so `NOWAIT` never fails and `SKIP LOCKED` never skips. Do not rely on it in a
//! read-only transaction, which takes no write lock.
//!
//! Two transactions that lock the same rows in different orders can deadlock (A→B against
//! B→A). [`LockTarget::lock_many`] always locks in ascending key order, so they cannot.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use contend::{Db, RowLock, strategy::pessimistic::LockTarget};
//! use sqlx::Row;
//! let db = Db::connect("sqlite::memory:").await?;
//! db.execute_script("CREATE TABLE account (id INTEGER PRIMARY KEY, balance BIGINT NOT NULL);
//!                    INSERT INTO account VALUES (1, 10), (2, 0)").await?;
//! let accounts = LockTarget::new("account", "id", &["balance"])?;
//! db.transaction(|tx| {
//!     let accounts = accounts.clone();
//!     Box::pin(async move {
//!         // Transfer 4 from 2 <- 1: rows locked in the order 1, 2 whatever the direction.
//!         let rows = accounts.lock_many(tx, &[2, 1], RowLock::Update).await?;
//!         let from: i64 = rows[0].1.try_get(0)?;
//!         assert_eq!(from, 10);
//!         tx.query("UPDATE account SET balance = balance - 4 WHERE id = 1").execute(tx.conn()).await?;
//!         tx.query("UPDATE account SET balance = balance + 4 WHERE id = 2").execute(tx.conn()).await?;
//!         Ok::<_, contend::Error>(())
//!     })
//! }).await?;
//! # Ok(()) }
//! ```

use sqlx::{AssertSqlSafe, Encode, Type};

use super::{BlockDatabase, Ident, InvalidIdent};
use crate::backend::{Backend, RowLock};
use crate::error::Result;
use crate::tx::Tx;

/// The clause to append to a `SELECT` to take row locks of `mode` on `backend`.
///
/// On SQLite this is the empty string: the write transaction's `BEGIN IMMEDIATE` already holds
/// the database write lock (see the module docs).
///
/// ```
/// use contend::{Backend, RowLock, strategy::pessimistic::lock_clause};
/// assert_eq!(lock_clause(Backend::Postgres, RowLock::UpdateSkipLocked).unwrap(), " FOR UPDATE SKIP LOCKED");
/// assert_eq!(lock_clause(Backend::MySql, RowLock::Share).unwrap(), " LOCK IN SHARE MODE");
/// assert_eq!(lock_clause(Backend::Sqlite, RowLock::Update).unwrap(), "");
/// assert!(lock_clause(Backend::MySql, RowLock::NoKeyUpdate).is_err());
/// ```
///
/// # Errors
/// [`crate::Error::Unsupported`] for a mode the backend lacks (`NoKeyUpdate` on MySQL/MariaDB).
pub fn lock_clause(backend: Backend, mode: RowLock) -> Result<&'static str> {
    match backend {
        Backend::Sqlite => Ok(""),
        other => other.dialect().row_lock_clause(mode),
    }
}

/// Rows of one table to lock by key (any type sqlx binds for the database: `i64`, text, a
/// `uuid::Uuid` on PostgreSQL, ...), and the columns to read while locking them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockTarget {
    table: Ident,
    key_column: Ident,
    columns: Vec<Ident>,
}

impl LockTarget {
    /// Rows of `table` found by `key_column`; locking them reads `columns` (in this order; the
    /// key column is appended last).
    ///
    /// # Errors
    /// [`InvalidIdent`] when a name is not a plain SQL identifier.
    pub fn new(
        table: &str,
        key_column: &str,
        columns: &[&str],
    ) -> Result<LockTarget, InvalidIdent> {
        Ok(LockTarget {
            table: Ident::new(table)?,
            key_column: Ident::new(key_column)?,
            columns: columns
                .iter()
                .map(|c| Ident::new(c))
                .collect::<Result<_, _>>()?,
        })
    }

    fn select_sql(&self, backend: Backend, mode: RowLock) -> Result<String> {
        let clause = lock_clause(backend, mode)?;
        let mut cols: Vec<&str> = self.columns.iter().map(Ident::as_str).collect();
        cols.push(self.key_column.as_str());
        let sql = format!(
            "SELECT {} FROM {} WHERE {} = ?{clause}",
            cols.join(", "),
            self.table,
            self.key_column
        );
        Ok(backend.sql(&sql).into_owned())
    }

    /// Locks the row with `key` and reads it, or `None` when there is no such row (or, with
    /// `UpdateSkipLocked`, when another transaction holds it). The row is the database's own
    /// row type (`PgRow` in a `Tx<sqlx::Postgres>`).
    ///
    /// # Errors
    /// [`crate::Error::Unsupported`] for a mode the backend lacks; a
    /// [`crate::ConflictKind::LockTimeout`] conflict for `UpdateNowait` on a held row or when the
    /// transaction's lock timeout expires; a deadlock conflict; other database errors.
    ///
    /// # Cancel safety
    /// As the caller's transaction: dropped, it rolls back and its locks are released.
    pub async fn lock<'k, DB, K>(
        &self,
        tx: &mut Tx<DB>,
        key: K,
        mode: RowLock,
    ) -> Result<Option<DB::Row>>
    where
        DB: BlockDatabase,
        K: Encode<'k, DB> + Type<DB> + Send,
    {
        let sql = self.select_sql(tx.backend(), mode)?;
        let q = sqlx::query(AssertSqlSafe(sql)).bind(key);
        Ok(DB::fetch_optional_query(tx.conn(), q).await?)
    }

    /// Locks the rows with `keys` one by one in ascending key order (duplicates once), so that
    /// any two transactions calling it lock shared rows in the same order and cannot deadlock
    /// on them. Returns `(key, row)` for each row found, in ascending key order.
    ///
    /// # Errors
    /// As [`LockTarget::lock`].
    ///
    /// # Cancel safety
    /// As the caller's transaction: dropped, it rolls back and its locks are released.
    pub async fn lock_many<'k, DB, K>(
        &self,
        tx: &mut Tx<DB>,
        keys: &[K],
        mode: RowLock,
    ) -> Result<Vec<(K, DB::Row)>>
    where
        DB: BlockDatabase,
        K: Encode<'k, DB> + Type<DB> + Ord + Clone + Send + Sync,
    {
        let sql = self.select_sql(tx.backend(), mode)?;
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut rows = Vec::with_capacity(sorted.len());
        for key in sorted {
            let q = sqlx::query(AssertSqlSafe(sql.clone())).bind(key.clone());
            if let Some(row) = DB::fetch_optional_query(tx.conn(), q).await? {
                rows.push((key, row));
            }
        }
        Ok(rows)
    }
}
