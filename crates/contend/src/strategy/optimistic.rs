//! `optimistic`: prevents lost updates without holding locks while the application thinks. Every
//! row carries a version number; a write says which version it read
//! (`UPDATE ... SET ..., version = version + 1 WHERE id = ? AND version = ?`) and changes
//! nothing when someone else wrote first. Zero rows is a conflict
//! ([`ConflictKind::Version`]), which the transaction's retry policy answers by running the body
//! again from the start: re-read, re-decide, re-write. This is Rails' `lock_version`,
//! Hibernate's `@Version` and django-concurrency.
//!
//! It shines when conflicts are rare; on a hot row most attempts lose and retry, which the lab
//! makes visible. On SQLite a write transaction already holds the database write lock from
//! `BEGIN IMMEDIATE`, so a read made *inside* it cannot go stale; the version check still catches
//! a version read in an earlier transaction (an edit form, say).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use contend::{ConflictKind, Db, strategy::{Value, optimistic::{self, Versioned}}};
//! let db = Db::connect("sqlite::memory:").await?;
//! db.execute_script("CREATE TABLE doc (id INTEGER PRIMARY KEY, body TEXT NOT NULL,
//!                    version BIGINT NOT NULL DEFAULT 0); INSERT INTO doc (id, body) VALUES (1, 'a')").await?;
//! let docs = Versioned::new("doc", "id", "version")?;
//! let stale = db.transaction(|tx| {
//!     let docs = docs.clone();
//!     Box::pin(async move {
//!         docs.update(tx, 1, 0, &[("body", Value::from("b"))]).await?; // version 0 -> 1
//!         Ok::<_, contend::Error>(docs.update(tx, 1, 0, &[("body", Value::from("c"))]).await) // still thinks 0
//!     })
//! }).await?;
//! assert_eq!(stale.unwrap_err().conflict(), Some(ConflictKind::Version));
//! # let _ = optimistic::options();
//! # Ok(()) }
//! ```

use std::time::Duration;

use sqlx::{Encode, Type};

use super::{BlockDatabase, Ident, InvalidIdent, Value};
use crate::error::{ConflictKind, Error, Result};
use crate::retry::RetryPolicy;
use crate::tx::{Tx, TxOptions};

/// The error of a write whose version check failed.
pub fn conflict() -> Error {
    Error::Conflict {
        kind: ConflictKind::Version,
        source: None,
    }
}

/// `Ok` when a versioned write changed a row, the version conflict when it changed none.
///
/// # Errors
/// [`ConflictKind::Version`] when `rows_affected` is 0.
pub fn check(rows_affected: u64) -> Result<()> {
    if rows_affected == 0 {
        Err(conflict())
    } else {
        Ok(())
    }
}

/// A retry policy for optimistic writes: quick attempts with jittered backoff from 0.2 ms
/// doubling up to 500 ms (a lost race costs one re-read; a long run of lost races spreads the
/// contenders out), for at most 30 s in all, with no attempt limit. Every conflict kind is
/// retried.
pub fn retry_policy() -> RetryPolicy {
    RetryPolicy::new()
        .base_delay(Duration::from_micros(200))
        .max_delay(Duration::from_millis(500))
        .max_elapsed(Duration::from_secs(30))
}

/// Transaction options for an optimistic read-decide-write: the backend's default isolation and
/// [`retry_policy`].
pub fn options() -> TxOptions {
    TxOptions::new().retry(retry_policy())
}

/// A table with a key column (any type sqlx binds for the database: `i64`, text, a
/// `uuid::Uuid` on PostgreSQL, ...) and a `BIGINT` version column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    table: Ident,
    key_column: Ident,
    version_column: Ident,
}

impl Versioned {
    /// Rows of `table` found by `key_column`, versioned by `version_column`.
    ///
    /// # Errors
    /// [`InvalidIdent`] when a name is not a plain SQL identifier.
    pub fn new(table: &str, key_column: &str, version_column: &str) -> Result<Self, InvalidIdent> {
        Ok(Versioned {
            table: Ident::new(table)?,
            key_column: Ident::new(key_column)?,
            version_column: Ident::new(version_column)?,
        })
    }

    /// The current version of row `key`, or `None` when there is no such row.
    ///
    /// # Errors
    /// Database errors, classified.
    ///
    /// # Cancel safety
    /// A read: as the caller's transaction.
    pub async fn version<'k, DB, K>(&self, tx: &mut Tx<DB>, key: K) -> Result<Option<i64>>
    where
        DB: BlockDatabase,
        K: Encode<'k, DB> + Type<DB> + Send,
    {
        let sql = format!(
            "SELECT {} FROM {} WHERE {} = ?",
            self.version_column, self.table, self.key_column
        );
        let q = tx.query(&sql).bind(key);
        match DB::fetch_optional_query(tx.conn(), q).await? {
            Some(row) => Ok(Some(DB::get_i64(&row, 0)?)),
            None => Ok(None),
        }
    }

    /// Sets `assignments` on row `key` and increments its version, only if its version is still
    /// `expected`. Returns the new version.
    ///
    /// # Errors
    /// [`ConflictKind::Version`] when the row's version is no longer `expected` (or the row is
    /// gone): let the retry policy run the body again. [`Error::Aborted`] when `assignments` is
    /// empty or names a column that is not a plain identifier. Database errors, classified.
    ///
    /// # Cancel safety
    /// As the caller's transaction: dropped, it rolls back.
    pub async fn update<'k, DB, K>(
        &self,
        tx: &mut Tx<DB>,
        key: K,
        expected: i64,
        assignments: &[(&str, Value)],
    ) -> Result<i64>
    where
        DB: BlockDatabase,
        K: Encode<'k, DB> + Type<DB> + Send,
    {
        if assignments.is_empty() {
            return Err(Error::aborted(
                "a versioned update needs at least one column",
            ));
        }
        let mut set = String::new();
        for (column, _) in assignments {
            let column = Ident::new(column).map_err(Error::aborted)?;
            set.push_str(&format!("{column} = ?, "));
        }
        let v = &self.version_column;
        let sql = format!(
            "UPDATE {} SET {set}{v} = {v} + 1 WHERE {} = ? AND {v} = ?",
            self.table, self.key_column
        );
        let mut q = tx.query(&sql);
        for (_, value) in assignments {
            q = DB::bind_value(q, value);
        }
        let q = DB::bind_value(q.bind(key), &Value::Int(expected));
        check(DB::execute_query(tx.conn(), q).await?)?;
        Ok(expected + 1)
    }
}
