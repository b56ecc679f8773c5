//! PostgreSQL: `BEGIN ISOLATION LEVEL ...`, `SET LOCAL` timeouts, SQLSTATE classification.

use std::fmt::Write;
use std::time::Duration;

use sqlx::error::DatabaseError;

use super::{AdvisoryXact, Backend, Dialect, RowLock};
use crate::error::{ConflictKind, Error, Result};
use crate::tx::TxOptions;

/// The PostgreSQL dialect.
#[derive(Debug, Clone, Copy, Default)]
pub struct Postgres;

impl Dialect for Postgres {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    /// `BEGIN [ISOLATION LEVEL ..] [READ ONLY]`, then `SET LOCAL lock_timeout` and
    /// `statement_timeout`, which end with the transaction: nothing to undo.
    fn begin(&self, options: &TxOptions) -> Result<(String, Option<String>)> {
        let mut sql = String::from("BEGIN");
        if let Some(level) = options.isolation {
            write!(sql, " ISOLATION LEVEL {}", level.sql()).unwrap();
        }
        if options.read_only {
            sql.push_str(" READ ONLY");
        }
        if let Some(t) = options.lock_timeout {
            write!(
                sql,
                "; SET LOCAL lock_timeout = '{}ms'",
                t.as_millis().max(1)
            )
            .unwrap();
        }
        if let Some(t) = options.statement_timeout {
            write!(
                sql,
                "; SET LOCAL statement_timeout = '{}ms'",
                t.as_millis().max(1)
            )
            .unwrap();
        }
        Ok((sql, None))
    }

    /// `COMMIT` behind a statement that fails when the transaction was aborted. PostgreSQL
    /// answers `COMMIT` of a transaction that an error has aborted with success (and the
    /// command tag ROLLBACK, which the Any driver does not show), so a body that swallowed a
    /// database error would "commit" nothing and its hooks would run. Any statement but
    /// `COMMIT`/`ROLLBACK` fails in an aborted transaction (25P02), so one in the same round
    /// trip tells the two apart. The cheapest such statement: a transaction-local `SET` of a
    /// custom setting (no snapshot, no plan, no row to send and decode, unlike `SELECT 1`;
    /// allowed in read-only transactions and on standbys; it ends with the `COMMIT` and touches
    /// no setting anything reads).
    fn end(&self, commit: bool, _commit_guard: bool) -> &'static str {
        if commit {
            "SET LOCAL contend.commit_guard = 1; COMMIT"
        } else {
            "ROLLBACK"
        }
    }

    /// `25P02` (in_failed_sql_transaction) from the guard of [`Dialect::end`]:
    /// [`Error::TransactionBroken`].
    fn rolled_back_before_commit(&self, err: &dyn DatabaseError) -> Option<Error> {
        (err.code().as_deref() == Some("25P02")).then_some(Error::TransactionBroken(
            "PostgreSQL had aborted the transaction after a database error that the body did \
             not return; it was rolled back, not committed",
        ))
    }

    /// `40001` serialization_failure, `40P01` deadlock_detected, `55P03` lock_not_available.
    fn classify(&self, err: &dyn DatabaseError) -> Option<ConflictKind> {
        match err.code()?.as_ref() {
            "40001" => Some(ConflictKind::Serialization),
            "40P01" => Some(ConflictKind::Deadlock),
            "55P03" => Some(ConflictKind::LockTimeout),
            _ => None,
        }
    }

    fn advisory_xact(
        &self,
        key: &str,
        wait: Option<Duration>,
        tx_lock_timeout: Option<Duration>,
    ) -> Result<AdvisoryXact> {
        let id = crate::strategy::advisory::key_id(key);
        let lock = format!("SELECT COUNT(*) FROM (SELECT pg_advisory_xact_lock({id})) AS l");
        // `id` is a number and the timeouts are numbers: nothing from the caller is spliced.
        let acquire = match wait {
            None => lock,
            Some(wait) => {
                let restore = match tx_lock_timeout {
                    Some(t) => format!("'{}ms'", t.as_millis().max(1)),
                    None => "DEFAULT".into(),
                };
                format!(
                    "SET LOCAL lock_timeout = '{}ms'; {lock}; SET LOCAL lock_timeout = {restore}",
                    wait.as_millis().max(1)
                )
            }
        };
        Ok(AdvisoryXact {
            acquire,
            returns_granted: false,
            after_end: None,
        })
    }

    fn row_lock_clause(&self, mode: RowLock) -> Result<&'static str> {
        Ok(match mode {
            RowLock::Update => " FOR UPDATE",
            RowLock::NoKeyUpdate => " FOR NO KEY UPDATE",
            RowLock::Share => " FOR SHARE",
            RowLock::UpdateNowait => " FOR UPDATE NOWAIT",
            RowLock::UpdateSkipLocked => " FOR UPDATE SKIP LOCKED",
        })
    }
}

#[cfg(feature = "postgres")]
super::impl_database!(sqlx::Postgres,
    backend: |_pool| Ok(Backend::Postgres),
    url: |_| None
);

/// This dialect, when `err` comes from this database's driver.
pub(super) fn recognise(err: &dyn DatabaseError) -> Option<&'static dyn Dialect> {
    #[cfg(feature = "postgres")]
    if err
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        return Some(&Postgres);
    }
    let _ = err;
    None
}
