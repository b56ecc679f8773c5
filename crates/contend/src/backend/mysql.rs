//! MySQL/MariaDB: `SET TRANSACTION ...` before `START TRANSACTION` on the same connection,
//! session timeouts restored afterwards, a guard that finds a transaction the server rolled back
//! on its own, error-number classification.
//!
//! # The commit guard
//! MariaDB rolls a whole transaction back on its own after an InnoDB deadlock, and on a Galera
//! node when a replicated write set brute-force aborts it. With `autocommit` on, whatever the
//! client sends afterwards runs as autocommit statements, each committed at once: the end of a
//! transaction commits without its beginning. The error that should stop the client reaches it
//! only when a statement reports it; a brute-force abort can go unreported. Seen on MariaDB
//! 10.11 with Galera 4 under `contend faults` (kill-connections): a transfer's two balance
//! updates were rolled back, its ledger `INSERT` after them and the `COMMIT` answered success,
//! and the ledger row stayed without its balance changes.
//!
//! So a transaction runs with `autocommit` off and begins with a savepoint of its own
//! (`contend_tx`): statements after such a rollback run in a new transaction, which commits
//! nothing by itself, and the `COMMIT` round trip first releases that savepoint, which exists
//! only in the transaction that began. Gone, the release fails (1305), the `COMMIT` is not run,
//! and the transaction is rolled back: [`Error::TransactionBroken`], or on a Galera node a
//! [`ConflictKind::Certification`] conflict, which a retry policy runs again. Both statements
//! ride the round trips of `START TRANSACTION` and `COMMIT`.

use std::fmt::Write;
use std::time::Duration;

use sqlx::error::DatabaseError;

use super::{AdvisoryXact, Backend, Dialect, RowLock};
use crate::error::{ConflictKind, Error, Result};
use crate::tx::TxOptions;

/// The savepoint every transaction begins with: the commit guard (see the module).
const GUARD: &str = "contend_tx";

/// What [`Dialect::rolled_back_before_commit`] says on MySQL/MariaDB (on a Galera node the
/// `Db` makes it a certification conflict).
pub(crate) const ROLLED_BACK_BEFORE_COMMIT: &str = "MariaDB/MySQL had rolled the transaction back \
     before COMMIT (a deadlock or lock wait timeout that the body did not return, a Galera \
     brute-force abort, or the body ended it itself: COMMIT, or DDL, which commits \
     implicitly); what ran after that was rolled back, not committed";

/// The MySQL/MariaDB dialect.
#[derive(Debug, Clone, Copy, Default)]
pub struct MySql;

impl Dialect for MySql {
    fn backend(&self) -> Backend {
        Backend::MySql
    }

    /// `SET autocommit = 0; SET TRANSACTION ISOLATION LEVEL ..; START TRANSACTION [READ ONLY];
    /// SAVEPOINT contend_tx` (the commit guard, see the module). Lock and statement timeouts
    /// are session variables in InnoDB/MariaDB (`innodb_lock_wait_timeout`, whole seconds, at
    /// least 1; `max_statement_time`), so they are set before and reset to the server default
    /// after the transaction, never left on a pooled connection.
    fn begin(&self, options: &TxOptions) -> Result<(String, Option<String>)> {
        let mut sql = String::from("SET autocommit = 0; ");
        let mut restore = Vec::new();
        if let Some(t) = options.lock_timeout {
            let secs = t.as_millis().div_ceil(1000).max(1);
            write!(sql, "SET SESSION innodb_lock_wait_timeout = {secs}; ").unwrap();
            restore.push("innodb_lock_wait_timeout = DEFAULT");
        }
        if let Some(t) = options.statement_timeout {
            write!(
                sql,
                "SET SESSION max_statement_time = {:.3}; ",
                t.as_secs_f64()
            )
            .unwrap();
            restore.push("max_statement_time = DEFAULT");
        }
        if let Some(level) = options.isolation {
            write!(sql, "SET TRANSACTION ISOLATION LEVEL {}; ", level.sql()).unwrap();
        }
        sql.push_str("START TRANSACTION");
        if options.read_only {
            sql.push_str(" READ ONLY");
        }
        write!(sql, "; SAVEPOINT {GUARD}").unwrap();
        let restore = (!restore.is_empty()).then(|| format!("SET SESSION {}", restore.join(", ")));
        Ok((sql, restore))
    }

    /// `RELEASE SAVEPOINT contend_tx; COMMIT; SET autocommit = 1`, or `ROLLBACK; SET
    /// autocommit = 1`: the release fails when the transaction that began is gone (the module's
    /// commit guard), and then nothing after it runs.
    fn end(&self, commit: bool) -> &'static str {
        if commit {
            "RELEASE SAVEPOINT contend_tx; COMMIT; SET autocommit = 1"
        } else {
            "ROLLBACK; SET autocommit = 1"
        }
    }

    /// `1305` (no such savepoint) from the guard of [`Dialect::end`]:
    /// [`Error::TransactionBroken`], saying so.
    fn rolled_back_before_commit(&self, err: &dyn DatabaseError) -> Option<Error> {
        #[cfg(feature = "mysql")]
        if let Some(e) = err.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            && e.number() == 1305
        {
            return Some(Error::TransactionBroken(ROLLED_BACK_BEFORE_COMMIT));
        }
        let _ = err;
        None
    }

    /// `1213` deadlock, `1205` lock wait timeout, `3572` NOWAIT lock refused, `1020` record
    /// changed (snapshot isolation), any other SQLSTATE `40001` serialization.
    fn classify(&self, err: &dyn DatabaseError) -> Option<ConflictKind> {
        #[cfg(feature = "mysql")]
        if let Some(e) = err.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
            match e.number() {
                1213 => return Some(ConflictKind::Deadlock),
                1205 | 3572 => return Some(ConflictKind::LockTimeout),
                1020 => return Some(ConflictKind::Serialization),
                _ => {}
            }
        }
        (err.code().as_deref() == Some("40001")).then_some(ConflictKind::Serialization)
    }

    fn returning(&self) -> bool {
        false
    }

    fn on_conflict_do_nothing(&self, _key: &str, noop: &str) -> String {
        format!(" ON DUPLICATE KEY UPDATE {noop} = {noop}")
    }

    fn current_read(&self) -> &'static str {
        " LOCK IN SHARE MODE"
    }

    fn advisory_xact(
        &self,
        key: &str,
        wait: Option<Duration>,
        _tx_lock_timeout: Option<Duration>,
    ) -> Result<AdvisoryXact> {
        // `GET_LOCK` is held by the session, not the transaction: released after it ends.
        let name = crate::strategy::advisory::mysql_lock_name(key);
        let wait = match wait {
            Some(w) => format!("{:.3}", w.as_secs_f64()),
            None => "@@innodb_lock_wait_timeout".into(),
        };
        // `name` is `contend_` and hex digits, `wait` a number or a variable: safe to splice.
        Ok(AdvisoryXact {
            acquire: format!("SELECT COALESCE(GET_LOCK('{name}', {wait}), -1)"),
            returns_granted: true,
            after_end: Some(format!("DO RELEASE_LOCK('{name}')")),
        })
    }

    fn row_lock_clause(&self, mode: RowLock) -> Result<&'static str> {
        Ok(match mode {
            RowLock::Update => " FOR UPDATE",
            RowLock::Share => " LOCK IN SHARE MODE",
            RowLock::UpdateNowait => " FOR UPDATE NOWAIT",
            RowLock::UpdateSkipLocked => " FOR UPDATE SKIP LOCKED",
            RowLock::NoKeyUpdate => {
                return Err(crate::Error::Unsupported {
                    backend: Backend::MySql,
                    what: "FOR NO KEY UPDATE (a PostgreSQL lock mode)".into(),
                });
            }
        })
    }

    /// `VARCHAR(max_len)` in the binary ASCII collation without padding (`ascii_nopad_bin`,
    /// MariaDB 10.2+): keys differing only in case or trailing spaces stay distinct.
    fn exact_ascii_type(&self, max_len: usize) -> String {
        format!("VARCHAR({max_len}) CHARACTER SET ascii COLLATE ascii_nopad_bin")
    }

    /// `MEDIUMTEXT` (16 MiB; `TEXT` holds only 64 KiB) in `utf8mb4`.
    fn long_text_type(&self) -> &'static str {
        "MEDIUMTEXT CHARACTER SET utf8mb4"
    }

    /// ` ENGINE = InnoDB`: transactions and row locks need it.
    fn table_options(&self) -> &'static str {
        " ENGINE = InnoDB"
    }
}

#[cfg(feature = "mysql")]
super::impl_database!(sqlx::MySql,
    backend: |_pool| Ok(Backend::MySql),
    url: |_| None
);

/// This dialect, when `err` comes from this database's driver.
pub(super) fn recognise(err: &dyn DatabaseError) -> Option<&'static dyn Dialect> {
    #[cfg(feature = "mysql")]
    if err
        .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .is_some()
    {
        return Some(&MySql);
    }
    let _ = err;
    None
}
