//! Transactions that cannot be nested by accident, savepoints for nesting on purpose,
//! `on_commit` hooks, per-transaction isolation and timeouts, and retry of conflicts.
//!
//! # Transaction versus savepoint
//! Django's `atomic` means "transaction" at the top and "savepoint" when nested, so code that
//! must really commit (before calling a payment provider, say) can be wrapped by a caller and
//! rolled back later. Here the two are different calls:
//! - [`crate::Db::transaction`] always starts the outermost transaction. Called while the same
//!   task is already inside one, it fails with [`Error::NestedTransaction`]: what it commits is
//!   durable when it returns.
//! - [`Tx::savepoint`] nests, and can only be called with a transaction in hand. When its body
//!   fails, only its own work is rolled back and the outer transaction goes on.
//!
//! # "Transaction required"
//! A function that must run inside a transaction takes `&mut Tx`. There is no way to get a
//! `Tx` outside [`crate::Db::transaction`], so forgetting the transaction does not compile:
//!
//! ```
//! use contend::{Result, Tx};
//! /// Debits `amount` if the balance allows. Must run in the caller's transaction.
//! async fn debit(tx: &mut Tx, account: i64, amount: i64) -> Result<bool> {
//!     let q = tx
//!         .query("UPDATE account SET balance = balance - ? WHERE id = ? AND balance >= ?")
//!         .bind(amount)
//!         .bind(account)
//!         .bind(amount);
//!     Ok(q.execute(tx.conn()).await?.rows_affected() == 1)
//! }
//! ```
//!
//! # Retries
//! With a [`RetryPolicy`] in [`TxOptions::retry`], a body that fails with a conflict
//! ([`Error::conflict`], or [`TxError::conflict`] of the caller's own error type) is run again
//! from the start on a fresh transaction. The retrying entry points
//! ([`crate::Db::transaction_with`], [`crate::Db::run`]) take an `FnMut` for that reason; keep side
//! effects that must happen once out of it, in [`Tx::on_commit`] hooks; hooks of failed attempts
//! never run. [`crate::Db::transaction`] never retries and takes an `FnOnce`, so the body can
//! move what it captured without cloning it first.
//!
//! # The body's error type
//! A body returns `Result<T, E>` with any `E` that implements [`TxError`] (`contend::Error` does):
//! business errors need no wrapping, and conflicts are still recognised for retry.
//!
//! # Database errors the body does not return
//! Return database errors with `?`, or catch them with [`Tx::savepoint`]. A body that ignores
//! one and returns `Ok` gets different outcomes per backend:
//! - PostgreSQL aborts the whole transaction at the first error, and would answer the final
//!   `COMMIT` with a silent rollback. contend checks for this in the same round trip as the
//!   `COMMIT` and returns [`Error::TransactionBroken`] instead; hooks do not run.
//! - MariaDB and SQLite undo only the failed statement: the rest of the transaction commits.
//!   Exception: an InnoDB deadlock (and, with `innodb_rollback_on_timeout`, a lock wait timeout)
//!   rolls back the *whole* transaction, and statements the body runs after ignoring it execute
//!   outside any transaction. Never swallow [`Error::conflict`] errors: return them, so that the
//!   attempt ends and the retry policy can run it again. On a Galera node, where a brute-force
//!   abort can roll a transaction back without any statement reporting it, contend runs
//!   read-write transactions with `autocommit` off and a savepoint that the `COMMIT` checks:
//!   what ran after such a rollback is rolled back too, and the commit fails with a
//!   [`ConflictKind::Certification`] conflict, which a retry policy runs again.
//!
//! # Cancellation
//! Dropping the future of a transaction at any await point (an HTTP client went away) is safe:
//! the connection of an unfinished transaction is closed instead of returned to the pool, so the
//! server rolls the transaction back. (`Tx` issues its own `BEGIN` for this reason: sqlx 0.9.0's
//! `begin` could return a cancelled connection to the pool inside a transaction,
//! launchbadge/sqlx#4393.) A future dropped while `COMMIT` was on its way may still have
//! committed; its hooks then do not run.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::query::{Query, QueryScalar};
use sqlx::{Any, AssertSqlSafe};

use crate::backend::{Backend, Database};
use crate::db::Db;
use crate::error::{ConflictKind, Error, Result};
use crate::isolation::IsolationLevel;
use crate::retry::RetryPolicy;

tokio::task_local! {
    /// Set while a transaction body runs on this task.
    static IN_TRANSACTION: ();
}

/// Whether the current task is running a transaction body.
///
/// ```
/// assert!(!contend::tx::in_transaction());
/// ```
pub fn in_transaction() -> bool {
    IN_TRANSACTION.try_with(|_| ()).is_ok()
}

/// Options of one transaction: isolation level, read-only, lock and statement timeouts, retry.
///
/// ```
/// use std::time::Duration;
/// use contend::{IsolationLevel, RetryPolicy, TxOptions};
/// let options = TxOptions::new()
///     .isolation(IsolationLevel::Serializable)
///     .lock_timeout(Duration::from_millis(500))
///     .retry(RetryPolicy::new().max_attempts(20));
/// assert_eq!(options.isolation_level(), Some(IsolationLevel::Serializable));
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct TxOptions {
    pub(crate) isolation: Option<IsolationLevel>,
    pub(crate) read_only: bool,
    pub(crate) lock_timeout: Option<Duration>,
    pub(crate) statement_timeout: Option<Duration>,
    pub(crate) retry: RetryPolicy,
    /// Set from the `Db` by [`run`]: the busy timeout a SQLite connection goes back to.
    pub(crate) session_busy_timeout_ms: Option<u64>,
    /// Set from the `Db` by [`run`]: begin and end with the commit guard (a read-write
    /// transaction on a Galera node; see `backend::mysql`).
    pub(crate) commit_guard: bool,
}

impl TxOptions {
    /// The backend's default isolation level, read-write, no timeouts, no retry.
    pub fn new() -> Self {
        TxOptions::default()
    }

    /// Run at this isolation level (see [`crate::isolation`] for what each backend gives).
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.isolation = Some(level);
        self
    }

    /// Make the transaction read-only: writes fail.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Wait at most this long for a row lock (PostgreSQL `lock_timeout`, InnoDB
    /// `innodb_lock_wait_timeout` rounded up to whole seconds). On SQLite, the wait for this
    /// process's turn to write ([`crate::DbBuilder::writer_queue`]); other processes' locks are
    /// waited for up to the Db's busy timeout (without the queue: the busy timeout of this
    /// transaction). Expiry is a [`ConflictKind::LockTimeout`] (SQLite: [`ConflictKind::Busy`]).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = Some(timeout);
        self
    }

    /// Cancel any statement running longer than this (PostgreSQL `statement_timeout`, MariaDB
    /// `max_statement_time`; SQLite has none: [`Error::Unsupported`]).
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// Retry conflicts under this policy (default: [`RetryPolicy::none`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The requested isolation level, if any.
    pub fn isolation_level(&self) -> Option<IsolationLevel> {
        self.isolation
    }
}

/// The outcome of [`crate::Db::run`]: the body's result and how it was reached.
#[derive(Debug)]
#[must_use]
pub struct Attempted<T, E = Error> {
    /// The committed value, or the error of the last attempt.
    pub result: Result<T, E>,
    /// How many times the body ran (1 when it did not need a retry).
    pub attempts: u32,
    /// The conflict of every failed attempt, in order (including the last one when the retry
    /// policy gave up on it).
    pub conflicts: Vec<ConflictKind>,
}

/// An error type a transaction body may return: [`Error`] itself, or the caller's own error type
/// that converts from it, so that business errors need no wrapping.
///
/// The retry loop asks [`TxError::conflict`] whether a failed attempt was a concurrency conflict
/// (and may be run again); everything else ends the transaction with that error.
///
/// ```
/// use contend::{ConflictKind, TxError};
///
/// #[derive(Debug, thiserror::Error)]
/// enum ShopError {
///     #[error("sold out")]
///     SoldOut,
///     #[error(transparent)]
///     Db(#[from] contend::Error),
/// }
///
/// impl From<sqlx::Error> for ShopError {
///     fn from(e: sqlx::Error) -> Self {
///         ShopError::Db(e.into()) // classified: conflicts stay recognisable
///     }
/// }
///
/// impl TxError for ShopError {
///     fn conflict(&self) -> Option<ConflictKind> {
///         match self {
///             ShopError::Db(e) => e.conflict(),
///             ShopError::SoldOut => None,
///         }
///     }
/// }
/// ```
pub trait TxError: From<Error> + Send {
    /// The kind of concurrency conflict this error is, or `None`.
    fn conflict(&self) -> Option<ConflictKind>;
}

impl TxError for Error {
    fn conflict(&self) -> Option<ConflictKind> {
        Error::conflict(self)
    }
}

/// A function to run after the outermost transaction commits.
type Hook = Box<dyn FnOnce() -> BoxFuture<'static, Result<(), String>> + Send>;

/// What an `on_commit` hook returns: `()` or a `Result` whose error is logged.
pub trait HookOutcome {
    /// `Err` with a message when the hook failed.
    fn into_outcome(self) -> Result<(), String>;
}

impl HookOutcome for () {
    fn into_outcome(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: std::fmt::Display> HookOutcome for Result<(), E> {
    fn into_outcome(self) -> Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

/// An open transaction: the handle a transaction body gets.
///
/// Run statements with sqlx on [`Tx::conn`]; [`Tx::query`] rewrites `?` placeholders for the
/// backend. Errors convert into [`Error`] with `?`, conflicts classified.
///
/// `Tx` is generic over the sqlx database: a transaction of a `Db<sqlx::Postgres>` hands out
/// `&mut PgConnection`, so every sqlx query form and type (UUIDs, NUMERIC, timestamps,
/// `query_as`) works unchanged. `Tx` without a parameter is `Tx<sqlx::Any>`.
#[must_use = "a transaction body must use its Tx"]
pub struct Tx<DB: Database = Any> {
    conn: Option<PoolConnection<DB>>,
    backend: Backend,
    depth: u32,
    hooks: Vec<(u32, Hook)>,
    finished: bool,
    restore: Option<String>,
    lock_timeout: Option<Duration>,
    /// Behind a transaction pooler: every `BEGIN`, `COMMIT` and `ROLLBACK` also clears the
    /// server connection's prepared statements ([`crate::DbBuilder::transaction_pooler`]).
    pooler: bool,
    /// Begun with the commit guard ([`TxOptions`]' `commit_guard`): ended with it too.
    commit_guard: bool,
}

impl<DB: Database> std::fmt::Debug for Tx<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("backend", &self.backend)
            .field("depth", &self.depth)
            .field("hooks", &self.hooks.len())
            .finish()
    }
}

impl<DB: Database> Drop for Tx<DB> {
    /// A transaction that did not finish (its future was dropped, or `ROLLBACK` failed) closes
    /// its connection instead of returning it to the pool: the server then rolls back.
    fn drop(&mut self) {
        if !self.finished
            && let Some(conn) = self.conn.as_mut()
        {
            conn.close_on_drop();
        }
    }
}

impl<DB: Database> Tx<DB> {
    async fn begin(
        conn: PoolConnection<DB>,
        backend: Backend,
        options: &TxOptions,
        pooler: bool,
    ) -> Result<Tx<DB>> {
        let (sql, restore) = backend.dialect().begin(options)?;
        let mut tx = Tx {
            conn: Some(conn),
            backend,
            depth: 0,
            hooks: Vec::new(),
            finished: false,
            restore,
            lock_timeout: options.lock_timeout,
            pooler,
            commit_guard: options.commit_guard,
        };
        let sql = tx.pooled(sql);
        if let Err(e) = tx.raw(sql).await {
            // Whatever part of the BEGIN took effect is undone; if that fails the connection is
            // closed on drop.
            let rollback = tx.pooled(backend.dialect().end(false, tx.commit_guard).into());
            let rolled_back = match tx.raw(rollback).await {
                Ok(()) => true,
                // SQLite answers ROLLBACK with an error when BEGIN did not start a transaction
                // (`BEGIN IMMEDIATE` busy): it answered, so the connection is fine and worth
                // keeping (a busy database would otherwise also pay for reconnecting).
                Err(Error::Database(sqlx::Error::Database(db))) => {
                    backend == Backend::Sqlite && db.message().contains("no transaction is active")
                }
                Err(_) => false,
            };
            if rolled_back {
                match tx.restore.take() {
                    Some(restore) => tx.finished = tx.raw(restore).await.is_ok(),
                    None => tx.finished = true,
                }
            }
            return Err(e);
        }
        Ok(tx)
    }

    async fn raw(&mut self, sql: String) -> Result<()> {
        DB::execute_raw(self.conn(), sql).await?;
        Ok(())
    }

    /// `sql` (a `BEGIN`, `COMMIT` or `ROLLBACK`), followed behind a transaction pooler by the
    /// statement that clears the server connection's prepared statements, in the same round
    /// trip: the pooler cannot hand the connection over in between.
    fn pooled(&self, sql: String) -> String {
        if self.pooler {
            format!("{sql}; {}", crate::session::POOLER_RESET)
        } else {
            sql
        }
    }

    /// Ends the transaction with `COMMIT` (when `commit`) or `ROLLBACK`, undoes session
    /// settings, and marks the connection fit for the pool. The end goes with the backend's
    /// commit guard ([`crate::backend::Dialect::end`]): a `COMMIT` of a transaction that the
    /// server had already rolled back fails with the guard's error (PostgreSQL:
    /// [`Error::TransactionBroken`]; a Galera node: a certification conflict) instead of
    /// committing what ran after the rollback.
    async fn finish(&mut self, commit: bool) -> Result<()> {
        let dialect = self.backend.dialect();
        let end = self.pooled(dialect.end(commit, self.commit_guard).into());
        let mut result = self.raw(end).await;
        if commit
            && let Err(e) = &result
            && let Some(instead) =
                database_error(e).and_then(|db| dialect.rolled_back_before_commit(db))
        {
            tracing::debug!(error = %e, "the transaction had been rolled back before COMMIT");
            result = Err(instead);
        }
        if result.is_err() && commit {
            // A failed COMMIT may leave the transaction open (SQLite busy; after the guard, the
            // transaction of what ran after the rollback): roll it back, and keep the
            // connection out of the pool if even that fails.
            let rollback = self.pooled(dialect.end(false, self.commit_guard).into());
            if self.raw(rollback).await.is_err() {
                return result;
            }
        } else if result.is_err() {
            return result;
        }
        if let Some(restore) = self.restore.take()
            && let Err(e) = self.raw(restore).await
        {
            tracing::warn!(error = %e, "could not reset session settings; closing the connection");
            return result;
        }
        self.finished = true;
        result
    }

    /// The backend this transaction runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The connection, to run sqlx queries on: `query.execute(tx.conn()).await?`. It is the
    /// database's own connection type (`&mut PgConnection` in a `Tx<sqlx::Postgres>`).
    pub fn conn(&mut self) -> &mut DB::Connection {
        self.conn.as_mut().expect("connection present until drop")
    }

    /// A query with `?` placeholders rewritten for this backend.
    pub fn query(&self, sql: &str) -> Query<'static, DB, DB::Arguments> {
        sqlx::query(AssertSqlSafe(self.backend.sql(sql).into_owned()))
    }

    /// A single-value query with `?` placeholders rewritten for this backend.
    pub fn query_scalar<O>(&self, sql: &str) -> QueryScalar<'static, DB, O, DB::Arguments>
    where
        (O,): for<'r> sqlx::FromRow<'r, DB::Row>,
    {
        sqlx::query_scalar(AssertSqlSafe(self.backend.sql(sql).into_owned()))
    }

    /// Runs `sql` on this transaction's connection right after it ends (after `COMMIT` or
    /// `ROLLBACK`, before the connection goes back to the pool); if that fails, the connection is
    /// closed instead of pooled. A dropped transaction closes its connection anyway. For session
    /// state that must not outlive the transaction, such as a MariaDB `GET_LOCK`.
    pub(crate) fn after_end(&mut self, sql: String) {
        self.restore = Some(match self.restore.take() {
            Some(existing) => format!("{existing}; {sql}"),
            None => sql,
        });
    }

    /// The lock timeout this transaction was started with ([`TxOptions::lock_timeout`]).
    pub(crate) fn lock_timeout(&self) -> Option<Duration> {
        self.lock_timeout
    }

    /// How many savepoints are open around the current code (0 in the transaction body itself).
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Registers `hook` to run once the outermost transaction has committed.
    ///
    /// Hooks run in registration order, after the commit and after the connection went back to
    /// the pool. They never run when the transaction (or the savepoint they were registered in)
    /// rolls back, nor for attempts that a retry replaced. A hook that returns `Err` or panics is
    /// logged and the others still run.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
    /// use std::sync::{Arc, atomic::{AtomicU32, Ordering}};
    /// let db = contend::Db::connect("sqlite::memory:").await?;
    /// let sent = Arc::new(AtomicU32::new(0));
    /// let s = sent.clone();
    /// db.transaction(move |tx| {
    ///     let s = s.clone();
    ///     Box::pin(async move {
    ///         tx.on_commit(move || async move { s.fetch_add(1, Ordering::SeqCst); });
    ///         Ok::<_, contend::Error>(())
    ///     })
    /// })
    /// .await?;
    /// assert_eq!(sent.load(Ordering::SeqCst), 1);
    /// # Ok(()) }
    /// ```
    pub fn on_commit<F, Fut, R>(&mut self, hook: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: HookOutcome,
    {
        self.hooks.push((
            self.depth,
            Box::new(move || Box::pin(async move { hook().await.into_outcome() })),
        ));
    }

    /// Runs `body` inside a savepoint. When it returns `Err`, only its work (and the hooks it
    /// registered) is rolled back, and the error is returned; the outer transaction goes on.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
    /// let db = contend::Db::connect("sqlite::memory:").await?;
    /// db.execute_script("CREATE TABLE t (v INTEGER)").await?;
    /// db.transaction(|tx| Box::pin(async move {
    ///     tx.query("INSERT INTO t VALUES (1)").execute(tx.conn()).await?;
    ///     let inner: contend::Result<()> = tx.savepoint(|tx| Box::pin(async move {
    ///         tx.query("INSERT INTO t VALUES (2)").execute(tx.conn()).await?;
    ///         Err::<(), _>(contend::Error::aborted("changed my mind"))
    ///     })).await;
    ///     assert!(inner.is_err());
    ///     Ok::<_, contend::Error>(())
    /// })).await?;
    /// let n: i64 = db.query_scalar("SELECT COUNT(*) FROM t").fetch_one(db.pool()).await?;
    /// assert_eq!(n, 1);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The body's error, or the error of `SAVEPOINT`/`RELEASE`. If the database already rolled
    /// back the whole transaction (an InnoDB deadlock does), the body's error is returned and the
    /// transaction is marked broken, so it cannot commit.
    ///
    /// # Cancel safety
    /// If this future is dropped before it finishes, the savepoint stays open and the
    /// transaction can no longer commit: its commit rolls everything back and fails with
    /// [`Error::TransactionBroken`]. No partial savepoint work becomes visible.
    pub async fn savepoint<T, E, F>(&mut self, body: F) -> Result<T, E>
    where
        E: From<Error>,
        F: for<'c> FnOnce(&'c mut Tx<DB>) -> BoxFuture<'c, Result<T, E>>,
    {
        let outer = self.depth;
        let depth = outer + 1;
        self.raw(format!("SAVEPOINT contend_sp_{depth}")).await?;
        self.depth = depth;
        let result = body(self).await;
        if self.depth != depth {
            return Err(Error::TransactionBroken("a nested savepoint was cancelled").into());
        }
        match result {
            Ok(value) => {
                self.raw(format!("RELEASE SAVEPOINT contend_sp_{depth}"))
                    .await?;
                for hook in &mut self.hooks {
                    if hook.0 == depth {
                        hook.0 = outer;
                    }
                }
                self.depth = outer;
                Ok(value)
            }
            Err(err) => {
                self.hooks.retain(|h| h.0 < depth);
                let undo = format!(
                    "ROLLBACK TO SAVEPOINT contend_sp_{depth}; RELEASE SAVEPOINT contend_sp_{depth}"
                );
                if self.raw(undo).await.is_ok() {
                    self.depth = outer;
                }
                // else: depth stays above the caller's, so the transaction cannot commit.
                Err(err)
            }
        }
    }
}

/// The database error behind `err`, if there is one.
fn database_error(err: &Error) -> Option<&dyn sqlx::error::DatabaseError> {
    let source = match err {
        Error::Database(e) => e,
        Error::Conflict {
            source: Some(e), ..
        } => e.as_ref(),
        _ => return None,
    };
    match source {
        sqlx::Error::Database(db) => Some(db.as_ref()),
        _ => None,
    }
}

/// Whether a transaction body may be run more than once: the plain `transaction` calls take a
/// closure called once, the retrying ones a closure that can be called again.
pub(crate) trait Body<DB: Database, T, E>: Send {
    /// Runs the body on `tx`. `None` when a once-only body is asked to run a second time (the
    /// retry loop never does that: it retries only with a [`crate::RetryPolicy`], which the
    /// once-only entry points do not take).
    fn call<'c>(&mut self, tx: &'c mut Tx<DB>) -> Option<BoxFuture<'c, Result<T, E>>>;
}

/// A body called once ([`crate::Db::transaction`]).
pub(crate) struct Once<F>(pub(crate) Option<F>);

impl<DB, T, E, F> Body<DB, T, E> for Once<F>
where
    DB: Database,
    F: for<'c> FnOnce(&'c mut Tx<DB>) -> BoxFuture<'c, Result<T, E>> + Send,
{
    fn call<'c>(&mut self, tx: &'c mut Tx<DB>) -> Option<BoxFuture<'c, Result<T, E>>> {
        self.0.take().map(|body| body(tx))
    }
}

/// A body that may be called again ([`crate::Db::transaction_with`], [`crate::Db::run`]).
pub(crate) struct Again<F>(pub(crate) F);

impl<DB, T, E, F> Body<DB, T, E> for Again<F>
where
    DB: Database,
    F: for<'c> FnMut(&'c mut Tx<DB>) -> BoxFuture<'c, Result<T, E>> + Send,
{
    fn call<'c>(&mut self, tx: &'c mut Tx<DB>) -> Option<BoxFuture<'c, Result<T, E>>> {
        Some((self.0)(tx))
    }
}

/// The retry loop behind [`crate::Db::run`].
pub(crate) async fn run<DB, T, E, B>(
    db: &Db<DB>,
    mut held: Option<&mut Option<PoolConnection<DB>>>,
    options: &TxOptions,
    mut body: B,
) -> Attempted<T, E>
where
    DB: Database,
    T: Send,
    E: TxError,
    B: Body<DB, T, E>,
{
    let mut report = Attempted {
        result: Err(Error::NestedTransaction.into()),
        attempts: 0,
        conflicts: Vec::new(),
    };
    if in_transaction() {
        return report;
    }
    // What the Db knows that the caller's options do not.
    let mut options = options.clone();
    options.session_busy_timeout_ms = Some(db.busy_timeout_ms());
    options.commit_guard = db.cluster().is_galera() && !options.read_only;
    let options = &options;
    let started = Instant::now();
    loop {
        report.attempts += 1;
        let slot = held.as_deref_mut();
        let attempt = IN_TRANSACTION.scope((), attempt(db, slot, options, &mut body));
        match attempt.await {
            Ok((value, hooks)) => {
                run_hooks(hooks).await;
                report.result = Ok(value);
                return report;
            }
            Err(err) => {
                if let Some(kind) = err.conflict() {
                    report.conflicts.push(kind);
                    if options
                        .retry
                        .should_retry(kind, report.attempts, started.elapsed())
                    {
                        tokio::time::sleep(options.retry.backoff(report.attempts)).await;
                        continue;
                    }
                }
                report.result = Err(err);
                return report;
            }
        }
    }
}

/// One attempt. With `held` (a [`crate::Session`]'s slot), the connection is taken from it and
/// put back only when the transaction finished cleanly; otherwise it is closed (by `Tx`'s drop)
/// and the session acquires a fresh one next time.
async fn attempt<DB, T, E, B>(
    db: &Db<DB>,
    held: Option<&mut Option<PoolConnection<DB>>>,
    options: &TxOptions,
    body: &mut B,
) -> Result<(T, Vec<Hook>), E>
where
    DB: Database,
    E: TxError,
    B: Body<DB, T, E>,
{
    let mut held = held;
    // SQLite: wait for this process's turn to write, so that the process's own writers queue
    // here in order instead of in the busy handler. With a dedicated writer connection
    // (`Db::connect` on a file) the transaction runs on it, and the caller's own connection
    // (a session's) stays where it is. Otherwise the caller's connection is taken first: a
    // writer with its turn never waits for a connection that a queued writer holds.
    let mut lease = if options.read_only {
        None
    } else {
        db.writer_lease(options.lock_timeout).await?
    };
    let (conn, turn) = if let Some(lease) = lease.as_mut() {
        (lease.take(), None)
    } else {
        let conn = match held.as_mut().and_then(|slot| slot.take()) {
            Some(conn) => conn,
            None => db.acquire().await?,
        };
        let turn = if options.read_only {
            None
        } else {
            match db.writer_turn(options.lock_timeout).await {
                Ok(turn) => turn,
                Err(e) => {
                    if let Some(slot) = held {
                        *slot = Some(conn);
                    }
                    return Err(e.into());
                }
            }
        };
        (conn, turn)
    };
    // With its turn in hand, a SQLite transaction meets no writer of this process: its lock
    // timeout was spent on the turn, and other processes are left to the Db's busy timeout
    // (no `PRAGMA busy_timeout` round trips around every transaction).
    let unqueued;
    let queued = lease.is_some() || turn.is_some();
    let options = match (queued, options.lock_timeout) {
        (true, Some(_)) => {
            unqueued = TxOptions {
                lock_timeout: None,
                ..options.clone()
            };
            &unqueued
        }
        _ => options,
    };
    let mut tx = Tx::begin(conn, db.backend(), options, db.transaction_pooler()).await?;
    let Some(run) = body.call(&mut tx) else {
        let _ = tx.finish(false).await;
        return Err(Error::TransactionBroken(
            "a once-only transaction body was asked to run twice",
        )
        .into());
    };
    let result = match run.await {
        Ok(value) if tx.depth == 0 => match tx.finish(true).await {
            Ok(()) => {
                let hooks = std::mem::take(&mut tx.hooks);
                Ok((value, hooks.into_iter().map(|(_, h)| h).collect()))
            }
            Err(err) => Err(db.commit_error(err).into()),
        },
        Ok(_) => {
            let _ = tx.finish(false).await;
            Err(Error::TransactionBroken(
                "a savepoint was cancelled; the transaction was rolled back",
            )
            .into())
        }
        Err(err) => {
            if let Err(e) = tx.finish(false).await {
                tracing::debug!(error = %e, "rollback failed; the connection will be closed");
            }
            Err(err)
        }
    };
    // A cleanly finished connection goes back to the writer's turn or the session that lent
    // it; any other is closed when `tx` drops.
    if tx.finished {
        if let Some(mut lease) = lease.take() {
            if let Some(conn) = tx.conn.take() {
                lease.put(conn);
            }
            lease.done();
        } else if let Some(slot) = held {
            *slot = tx.conn.take();
        }
    }
    drop((lease, turn));
    result
}

async fn run_hooks(hooks: Vec<Hook>) {
    if hooks.is_empty() {
        return;
    }
    // A task of their own: once the commit is done, the hooks run to the end even if the
    // caller's future is dropped.
    let task = tokio::spawn(async move {
        for (index, hook) in hooks.into_iter().enumerate() {
            match AssertUnwindSafe(async move { hook().await })
                .catch_unwind()
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    tracing::error!(hook = index, %message, "on_commit hook failed")
                }
                Err(_) => tracing::error!(hook = index, "on_commit hook panicked"),
            }
        }
    });
    let _ = task.await;
}
