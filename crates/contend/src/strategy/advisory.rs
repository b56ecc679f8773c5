//! `advisory`: prevents concurrent read-decide-writes on the same *key* (an account, a user, a
//! job name: anything, even rows that do not exist yet) with a named lock kept by the database
//! server, so it works across processes without locking any row.
//!
//! - [`lock_xact`]: transaction-scoped. PostgreSQL `pg_advisory_xact_lock`, released by the
//!   server at `COMMIT` or `ROLLBACK`. MariaDB has only session-scoped `GET_LOCK`, so there it is
//!   taken on the transaction's own connection and released with `RELEASE_LOCK` on that same
//!   connection right after the transaction ends, before the connection goes back to the pool
//!   (and the connection is closed instead if that fails or the transaction is dropped).
//! - [`SessionLock`]: session-scoped, held on one pooled connection until
//!   [`SessionLock::release`] (PostgreSQL `pg_advisory_lock`/`pg_advisory_unlock`, MariaDB
//!   `GET_LOCK`/`RELEASE_LOCK`). Dropped without release, its connection is closed, which makes
//!   the server release the lock: a session lock never leaks into the pool. Refused behind a
//!   transaction pooler ([`crate::DbBuilder::transaction_pooler`]): pgbouncer in transaction
//!   mode gives the server connection, with the lock on it, to other clients between
//!   transactions. [`lock_xact`] is safe there.
//!
//! Keys are strings hashed to 64 bits ([`key_id`]); PostgreSQL takes the number, MariaDB a
//! name made from it ([`mysql_lock_name`]). SQLite has no advisory locks
//! ([`crate::Error::Unsupported`]); its write transactions are serial anyway.
//!
//! An advisory lock only protects code that takes it: every writer of the data must use the same
//! key.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AssertSqlSafe, Executor};

use crate::backend::{Backend, Database};
use crate::db::Db;
use crate::error::{ConflictKind, Error, Result};
use crate::tx::Tx;

/// The 64-bit lock number of `key`: the first 8 bytes of its SHA-256, big-endian.
///
/// ```
/// use contend::strategy::advisory::key_id;
/// assert_eq!(key_id("account:1"), key_id("account:1"));
/// assert_ne!(key_id("account:1"), key_id("account:2"));
/// ```
pub fn key_id(key: &str) -> i64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// The MariaDB `GET_LOCK` name of `key`: `contend_` and the 16 hex digits of [`key_id`] (lock
/// names are server-wide and at most 64 characters).
///
/// ```
/// assert_eq!(contend::strategy::advisory::mysql_lock_name("k").len(), 24);
/// ```
pub fn mysql_lock_name(key: &str) -> String {
    format!("contend_{}", hex::encode(key_id(key).to_be_bytes()))
}

fn unsupported(backend: Backend) -> Error {
    Error::Unsupported {
        backend,
        what: "advisory locks".into(),
    }
}

fn timed_out() -> Error {
    Error::Conflict {
        kind: ConflictKind::LockTimeout,
        source: None,
    }
}

/// `GET_LOCK` with a timeout in seconds (`None`: the session's `innodb_lock_wait_timeout`).
async fn mysql_get_lock(
    conn: &mut AnyConnection,
    name: &str,
    wait: Option<Duration>,
) -> Result<bool> {
    let got: Option<i64> = match wait {
        Some(wait) => {
            sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
                .bind(name.to_string())
                .bind(wait.as_secs_f64())
                .fetch_one(conn)
                .await?
        }
        None => {
            sqlx::query_scalar("SELECT GET_LOCK(?, @@innodb_lock_wait_timeout)")
                .bind(name.to_string())
                .fetch_one(conn)
                .await?
        }
    };
    match got {
        Some(1) => Ok(true),
        Some(_) => Ok(false),
        None => Err(Error::aborted(format!(
            "GET_LOCK('{name}') failed (returned NULL)"
        ))),
    }
}

/// Takes the advisory lock on `key` for the rest of the caller's transaction.
///
/// `wait`: how long to wait for it; `None` waits as long as a row lock would in this
/// transaction ([`crate::TxOptions::lock_timeout`]; PostgreSQL's default is forever, MariaDB's
/// `innodb_lock_wait_timeout` 50 s). One round trip either way. Works in a transaction of any
/// [`crate::Database`] whose backend has advisory locks (PostgreSQL, MySQL/MariaDB); the SQL is
/// the backend dialect's ([`crate::backend::Dialect::advisory_xact`]).
///
/// ```no_run
/// # async fn f(db: contend::Db) -> contend::Result<()> {
/// use contend::strategy::advisory;
/// db.transaction(|tx| Box::pin(async move {
///     advisory::lock_xact(tx, "account:42", None).await?;
///     // ... read, decide, write: one holder per key at a time ...
///     Ok::<_, contend::Error>(())
/// })).await
/// # }
/// ```
///
/// # Errors
/// [`Error::Unsupported`] on SQLite; a [`ConflictKind::LockTimeout`] conflict when the lock is
/// not had in time (retryable); database errors.
///
/// # Cancel safety
/// As the caller's transaction: dropped, the transaction's connection is closed, and the server
/// releases the lock with the session.
pub async fn lock_xact<DB: Database>(
    tx: &mut Tx<DB>,
    key: &str,
    wait: Option<Duration>,
) -> Result<()> {
    let backend = tx.backend();
    let plan = backend
        .dialect()
        .advisory_xact(key, wait, tx.lock_timeout())?;
    if plan.returns_granted {
        let granted = DB::fetch_i64(tx.conn(), backend, &plan.acquire, &[]).await?;
        if granted != Some(1) {
            return Err(timed_out());
        }
    } else {
        DB::execute_raw(tx.conn(), plan.acquire).await?;
    }
    if let Some(release) = plan.after_end {
        tx.after_end(release);
    }
    Ok(())
}

/// A session-scoped advisory lock, held on one pooled connection of its own.
///
/// Release it with [`SessionLock::release`]. If it is dropped instead (an error, a cancelled
/// request), its connection is closed rather than returned to the pool, and the server releases
/// the lock when the session ends.
#[derive(Debug)]
#[must_use = "dropping the lock closes its connection; call `release`"]
pub struct SessionLock {
    conn: Option<PoolConnection<Any>>,
    backend: Backend,
    key: String,
    released: bool,
}

impl SessionLock {
    /// Takes the lock on `key`, waiting at most `wait`.
    ///
    /// ```no_run
    /// # async fn f(db: contend::Db) -> contend::Result<()> {
    /// use std::time::Duration;
    /// use contend::strategy::advisory::SessionLock;
    /// let lock = SessionLock::acquire(&db, "nightly-report", Duration::from_secs(1)).await?;
    /// // ... only one process runs this at a time ...
    /// lock.release().await
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::Unsupported`] on SQLite, and on a `Db` behind a transaction pooler
    /// ([`crate::DbBuilder::transaction_pooler`]), where a session lock is not the client's;
    /// [`Error::LockNotAcquired`] when another session holds it past `wait`; connection and
    /// database errors.
    ///
    /// # Cancel safety
    /// Dropped while waiting or after taking the lock, the connection is closed, never pooled
    /// with the lock (or a pending lock request) on it.
    pub async fn acquire(db: &Db, key: &str, wait: Duration) -> Result<SessionLock> {
        let backend = db.backend();
        if !matches!(backend, Backend::Postgres | Backend::MySql) {
            return Err(unsupported(backend));
        }
        if db.transaction_pooler() {
            return Err(Error::Unsupported {
                backend,
                what: "session-scoped advisory locks behind a transaction pooler: the lock \
                       would belong to a pooled server connection that other clients are \
                       handed between transactions, and its release would run on another one \
                       (use `advisory::lock_xact` inside a transaction)"
                    .into(),
            });
        }
        let started = Instant::now();
        let mut lock = SessionLock {
            conn: Some(db.acquire().await?),
            backend,
            key: key.to_string(),
            released: false,
        };
        let got = match backend {
            Backend::Postgres => {
                let ms = wait.as_millis().max(1);
                let id = key_id(key);
                // One implicit transaction: on a timeout the `SET` is rolled back with it.
                let sql = format!(
                    "SET lock_timeout = '{ms}ms'; \
                     SELECT COUNT(*) FROM (SELECT pg_advisory_lock({id})) AS l; \
                     RESET lock_timeout"
                );
                match lock.conn().execute(sqlx::raw_sql(AssertSqlSafe(sql))).await {
                    Ok(_) => true,
                    Err(e) => match Error::from(e) {
                        Error::Conflict {
                            kind: ConflictKind::LockTimeout,
                            ..
                        } => false,
                        other => return Err(other),
                    },
                }
            }
            _ => mysql_get_lock(lock.conn(), &mysql_lock_name(key), Some(wait)).await?,
        };
        if !got {
            // Nothing is held: the connection can go back to the pool.
            lock.released = true;
            return Err(Error::LockNotAcquired {
                key: key.to_string(),
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        Ok(lock)
    }

    /// The key this lock holds.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The connection holding the lock, to run statements on the same session.
    pub fn conn(&mut self) -> &mut AnyConnection {
        self.conn.as_mut().expect("connection present until drop")
    }

    /// Releases the lock on the connection that holds it and returns the connection to the pool.
    ///
    /// # Errors
    /// A database error, or [`Error::Aborted`] when the server says this session did not hold
    /// the lock. Either way the connection is closed, so the lock is gone.
    ///
    /// # Cancel safety
    /// Dropped before it finishes, the connection is closed and the server releases the lock.
    pub async fn release(mut self) -> Result<()> {
        let held: Option<i64> = match self.backend {
            Backend::Postgres => {
                let id = key_id(&self.key);
                let ok: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
                    .bind(id)
                    .fetch_one(self.conn())
                    .await?;
                Some(i64::from(ok))
            }
            _ => {
                let name = mysql_lock_name(&self.key);
                sqlx::query_scalar("SELECT RELEASE_LOCK(?)")
                    .bind(name)
                    .fetch_one(self.conn())
                    .await?
            }
        };
        if held != Some(1) {
            return Err(Error::aborted(format!(
                "advisory lock `{}` was not held by this session",
                self.key
            )));
        }
        self.released = true;
        Ok(())
    }
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        if !self.released
            && let Some(conn) = self.conn.as_mut()
        {
            conn.close_on_drop();
        }
    }
}
