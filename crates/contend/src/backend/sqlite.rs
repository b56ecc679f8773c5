//! SQLite: `BEGIN IMMEDIATE` for write transactions (the database write lock is taken at the
//! start, so a transaction never fails halfway with a lock upgrade), `query_only` for read-only
//! ones, busy timeout as the lock timeout, `SQLITE_BUSY`/`SQLITE_LOCKED` classification.

use std::fmt::Write;

use sqlx::error::DatabaseError;

use super::{Backend, Dialect, RowLock};
use crate::error::{ConflictKind, Error, Result};
use crate::tx::TxOptions;

/// The busy timeout every SQLite connection of a [`crate::Db`] gets unless configured otherwise.
pub const DEFAULT_BUSY_TIMEOUT_MS: u64 = 5_000;

/// The SQLite dialect.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sqlite;

impl Dialect for Sqlite {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    /// Write transactions: `BEGIN IMMEDIATE`. Read-only: `PRAGMA query_only = ON; BEGIN`
    /// (deferred: a snapshot from the first read, no write lock). Every isolation level runs as
    /// serializable (see [`crate::isolation`]). The lock timeout is the busy timeout, set for the
    /// transaction and reset afterwards. A statement timeout does not exist in SQLite: error.
    fn begin(&self, options: &TxOptions) -> Result<(String, Option<String>)> {
        if options.statement_timeout.is_some() {
            return Err(Error::Unsupported {
                backend: Backend::Sqlite,
                what: "a statement timeout".into(),
            });
        }
        let mut sql = String::new();
        let mut restore = Vec::new();
        if let Some(t) = options.lock_timeout {
            write!(sql, "PRAGMA busy_timeout = {}; ", t.as_millis()).unwrap();
            restore.push(format!(
                "PRAGMA busy_timeout = {}",
                options
                    .session_busy_timeout_ms
                    .unwrap_or(DEFAULT_BUSY_TIMEOUT_MS)
            ));
        }
        if options.read_only {
            sql.push_str("PRAGMA query_only = ON; BEGIN DEFERRED");
            restore.push("PRAGMA query_only = OFF".into());
        } else {
            sql.push_str("BEGIN IMMEDIATE");
        }
        let restore = (!restore.is_empty()).then(|| restore.join("; "));
        Ok((sql, restore))
    }

    /// `SQLITE_BUSY` (5) and its extended codes (`BUSY_RECOVERY` 261, `BUSY_SNAPSHOT` 517,
    /// `BUSY_TIMEOUT` 773), `SQLITE_LOCKED` (6) and its extended codes.
    fn classify(&self, err: &dyn DatabaseError) -> Option<ConflictKind> {
        let code: i64 = err.code()?.parse().ok()?;
        matches!(code & 0xff, 5 | 6).then_some(ConflictKind::Busy)
    }

    /// SQLite has no row locks: every mode is [`Error::Unsupported`]. The pessimistic strategy
    /// takes the whole database's write lock with `BEGIN IMMEDIATE` instead.
    fn row_lock_clause(&self, mode: RowLock) -> Result<&'static str> {
        Err(Error::Unsupported {
            backend: Backend::Sqlite,
            what: format!(
                "row locks ({mode:?}); a write transaction holds the database write lock from BEGIN IMMEDIATE"
            ),
        })
    }
}

#[cfg(feature = "sqlite")]
super::impl_database!(sqlx::Sqlite,
    backend: |_pool| Ok(Backend::Sqlite),
    url: |_| None
);

/// This dialect, when `err` comes from this database's driver.
pub(super) fn recognise(err: &dyn DatabaseError) -> Option<&'static dyn Dialect> {
    #[cfg(feature = "sqlite")]
    if err
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        return Some(&Sqlite);
    }
    let _ = err;
    None
}
