//! MySQL/MariaDB: `SET TRANSACTION ...` before `START TRANSACTION` on the same connection,
//! session timeouts restored afterwards, on a Galera node a guard that finds a transaction the
//! cluster rolled back on its own, error-number classification.
//!
//! # The commit guard (Galera)
//! On a Galera node, a write set replicated from another node brute-force aborts a local
//! transaction that holds a lock it needs: the transaction is rolled back while its client goes
//! on. MariaDB is meant to report it on the client's next statement, but does not always. Seen on
//! MariaDB 10.11 with Galera 4 under `contend faults` (kill-connections): a transfer's two
//! balance updates were rolled back, while its ledger `INSERT` after them and the `COMMIT`
//! answered success. With `autocommit` on, the `INSERT` had run as an autocommit statement and
//! committed by itself: the ledger row stayed without its balance changes.
//!
//! So on a Galera node ([`TxOptions`]' commit guard, set from the `Db`) a read-write
//! transaction runs with `autocommit` off and begins with a savepoint of its own (`contend_tx`).
//! Statements after such a rollback run in a new transaction, which commits nothing by itself,
//! and the `COMMIT` round trip first releases that savepoint, which exists only in the
//! transaction that began. When it is gone the release fails (1305), the `COMMIT` is not run, the
//! new transaction is rolled back, and the commit fails with a [`ConflictKind::Certification`]
//! conflict, which a retry policy runs again. The guard's statements ride the round trips of
//! `START TRANSACTION` and `COMMIT`.
//!
//! A single server has no such abort: a whole transaction is rolled back there only with an
//! error the body is given (an InnoDB deadlock), and the guard is left out. On Galera it costs:
//! MariaDB makes a savepoint expensive there (16 clients moving money between 4 rows of one node
//! of the test cluster committed 25-30 % fewer transactions with one). Cheaper markers were
//! tried and fail: `@@in_transaction` cannot tell the new transaction from the old one, and a
//! read-only session default with `START TRANSACTION READ WRITE` does not hold, because the
//! brute-force rollback leaves the `READ WRITE` in force for the statements after it.

use std::fmt::Write;
use std::time::Duration;

use sqlx::error::DatabaseError;

use super::{AdvisoryXact, Backend, Dialect, RowLock};
use crate::error::{ConflictKind, Error, Result};
use crate::tx::TxOptions;

/// The savepoint a guarded transaction begins with (see the module): a macro, so that
/// [`Dialect::end`] can name it in its `&'static str` with `concat!`.
macro_rules! guard_savepoint {
    () => {
        "contend_tx"
    };
}

/// The MySQL/MariaDB dialect.
#[derive(Debug, Clone, Copy, Default)]
pub struct MySql;

impl Dialect for MySql {
    fn backend(&self) -> Backend {
        Backend::MySql
    }

    /// `SET SESSION ..; SET TRANSACTION ISOLATION LEVEL ..; START TRANSACTION [READ ONLY]`, and
    /// with the commit guard (read-write transactions on a Galera node) `autocommit = 0` among
    /// the session settings and `SAVEPOINT contend_tx` last (see the module). Lock and
    /// statement timeouts are session variables in InnoDB/MariaDB (`innodb_lock_wait_timeout`,
    /// whole seconds, at least 1; `max_statement_time`), so they are set before and reset to
    /// the server default after the transaction, never left on a pooled connection.
    fn begin(&self, options: &TxOptions) -> Result<(String, Option<String>)> {
        let guard = options.commit_guard;
        let mut set = Vec::new();
        let mut restore = Vec::new();
        if guard {
            // Reset by `end`, in the round trip of the COMMIT or ROLLBACK.
            set.push("autocommit = 0".to_string());
        }
        if let Some(t) = options.lock_timeout {
            let secs = t.as_millis().div_ceil(1000).max(1);
            set.push(format!("innodb_lock_wait_timeout = {secs}"));
            restore.push("innodb_lock_wait_timeout = DEFAULT");
        }
        if let Some(t) = options.statement_timeout {
            set.push(format!("max_statement_time = {:.3}", t.as_secs_f64()));
            restore.push("max_statement_time = DEFAULT");
        }
        let mut sql = String::new();
        if !set.is_empty() {
            write!(sql, "SET SESSION {}; ", set.join(", ")).unwrap();
        }
        if let Some(level) = options.isolation {
            write!(sql, "SET TRANSACTION ISOLATION LEVEL {}; ", level.sql()).unwrap();
        }
        sql.push_str("START TRANSACTION");
        if options.read_only {
            sql.push_str(" READ ONLY");
        }
        if guard {
            sql.push_str(concat!("; SAVEPOINT ", guard_savepoint!()));
        }
        let restore = (!restore.is_empty()).then(|| format!("SET SESSION {}", restore.join(", ")));
        Ok((sql, restore))
    }

    /// With the commit guard, `RELEASE SAVEPOINT contend_tx; COMMIT; SET autocommit = 1` or
    /// `ROLLBACK; SET autocommit = 1`: the release fails when the transaction that began is gone
    /// (see the module), and then nothing after it runs.
    fn end(&self, commit: bool, commit_guard: bool) -> &'static str {
        match (commit, commit_guard) {
            (true, true) => concat!(
                "RELEASE SAVEPOINT ",
                guard_savepoint!(),
                "; COMMIT; SET autocommit = 1"
            ),
            (false, true) => "ROLLBACK; SET autocommit = 1",
            (true, false) => "COMMIT",
            (false, false) => "ROLLBACK",
        }
    }

    /// `1305` (no such savepoint) from the guard of [`Dialect::end`]: the transaction had been
    /// rolled back before its `COMMIT` by a brute-force abort (the guard is used on Galera
    /// nodes), a [`ConflictKind::Certification`] conflict.
    fn rolled_back_before_commit(&self, err: &dyn DatabaseError) -> Option<Error> {
        #[cfg(feature = "mysql")]
        if let Some(e) = err.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            && e.number() == 1305
        {
            return Some(Error::Conflict {
                kind: ConflictKind::Certification,
                source: None,
            });
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
