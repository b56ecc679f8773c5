//! The strategy executor: one read-decide-write [`Operation`], run under any [`Strategy`].
//!
//! An operation is written once, in four parts: the lock keys it touches, a read of the rows it
//! decides on (with a row-lock clause the executor supplies), a write that decides in Rust and
//! writes absolute values (checking versions when asked), and optionally the same effect as one
//! conditional statement computed by the database. [`Executor::run`] combines them:
//!
//! | strategy | how the parts are combined |
//! |---|---|
//! | `none` | read on its own (autocommit), then write in a transaction: the lost update |
//! | `mutex` | as `none`, inside an in-process lock per key (safe in one process only) |
//! | `atomic` | the conditional statement in a transaction |
//! | `pessimistic` | read with the row-lock clause (rows in canonical order), then write |
//! | `optimistic` | read, then write with version checks; version conflicts retried |
//! | `serializable` | read + write at SERIALIZABLE; serialization failures retried |
//! | `advisory` | advisory locks on the keys (sorted), then read + write |
//! | `redis`, `redis-spin`, `redlock`, `etcd` | a [`LockService`] lock per key (sorted), then one transaction that fences every key with its grant's token first, then read + write |
//! | `batched` | queued with concurrent operations on the same keys; each batch is one transaction in which every operation reads with the row-lock clause and writes inside its own savepoint; one commit ([`crate::batch`]) |
//!
//! The executor knows nothing of the operation's tables or types: a PostgreSQL user's operation
//! reads and writes with `&mut PgConnection` and their own row types.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Any;

use super::{Strategy, advisory, mutex::KeyedMutex, optimistic, pessimistic, serializable};
use crate::BoxFuture;
use crate::backend::{Database, RowLock};
use crate::batch::{BatchOptions, BatchStats, Batcher};
use crate::error::{ConflictKind, Error, Result};
use crate::fencing::{self, FencingToken};
use crate::lock::{HeldLock, LockService};
use crate::retry::RetryPolicy;
use crate::session::Session;
use crate::tx::{Attempted, Tx, TxError, TxOptions};

/// A read-decide-write operation, in the parts every strategy needs.
///
/// ```
/// use contend::strategy::Operation;
/// use contend::{BoxFuture, Error, Tx};
/// use sqlx::{Row, SqliteConnection};
///
/// /// Withdraw `amount` from account `id`, refusing to overdraw.
/// struct Withdraw { id: i64, amount: i64 }
///
/// #[derive(Debug, thiserror::Error)]
/// enum BankError {
///     #[error("insufficient funds")]
///     Insufficient,
///     #[error(transparent)]
///     Db(#[from] Error),
/// }
/// impl From<sqlx::Error> for BankError {
///     fn from(e: sqlx::Error) -> Self { BankError::Db(e.into()) }
/// }
/// impl contend::TxError for BankError {
///     fn conflict(&self) -> Option<contend::ConflictKind> {
///         match self { BankError::Db(e) => e.conflict(), _ => None }
///     }
/// }
///
/// impl Operation<sqlx::Sqlite> for Withdraw {
///     type State = (i64, i64); // balance, version
///     type Output = i64; // the new balance
///     type Error = BankError;
///
///     fn keys(&self) -> Vec<String> {
///         vec![format!("account:{}", self.id)]
///     }
///
///     fn read<'c>(&'c self, conn: &'c mut SqliteConnection, lock: &'static str)
///         -> BoxFuture<'c, Result<(i64, i64), BankError>> {
///         Box::pin(async move {
///             let sql = format!("SELECT balance, version FROM account WHERE id = ?{lock}");
///             let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(self.id).fetch_one(conn).await?;
///             Ok((row.try_get(0)?, row.try_get(1)?))
///         })
///     }
///
///     fn write<'c>(&'c self, tx: &'c mut Tx<sqlx::Sqlite>, state: &'c (i64, i64), checked: bool)
///         -> BoxFuture<'c, Result<i64, BankError>> {
///         Box::pin(async move {
///             let (balance, version) = *state;
///             if balance < self.amount {
///                 return Err(BankError::Insufficient);
///             }
///             let sql = if checked {
///                 "UPDATE account SET balance = ?, version = version + 1 WHERE id = ? AND version = ?"
///             } else {
///                 "UPDATE account SET balance = ?, version = version + 1 WHERE id = ? AND ? IS NOT NULL"
///             };
///             let done = sqlx::query(sql).bind(balance - self.amount).bind(self.id).bind(version)
///                 .execute(tx.conn()).await?;
///             contend::strategy::optimistic::check(done.rows_affected())?;
///             Ok(balance - self.amount)
///         })
///     }
/// }
/// ```
pub trait Operation<DB: Database = Any>: Send + Sync + 'static {
    /// What [`Operation::read`] returns and [`Operation::write`] decides on.
    type State: Send + Sync + 'static;
    /// What the operation returns when it succeeds.
    type Output: Send + 'static;
    /// The caller's error type: business refusals and converted [`Error`]s.
    type Error: TxError + 'static;

    /// The lock keys of the rows this operation touches (`account:42`, ...), in any order: the
    /// executor sorts and deduplicates them, so that two operations on the same keys take their
    /// locks in the same order and cannot deadlock. Used by `mutex`, `advisory` and the lock
    /// services; a key also names the fence resource of a lock-service grant (at most 255
    /// bytes).
    fn keys(&self) -> Vec<String>;

    /// The row lock [`Operation::read`] takes under `pessimistic`. Default [`RowLock::Update`].
    fn row_lock(&self) -> RowLock {
        RowLock::Update
    }

    /// Reads what the decision depends on. `lock` is a clause to append to every `SELECT` (empty,
    /// or a row-lock clause such as ` FOR UPDATE`); read several rows in one canonical order
    /// (sorted keys) so that two operations never lock them in opposite orders. Runs inside the
    /// transaction, except under `none` and `mutex`, where it runs on its own.
    fn read<'c>(
        &'c self,
        conn: &'c mut DB::Connection,
        lock: &'static str,
    ) -> BoxFuture<'c, Result<Self::State, Self::Error>>;

    /// Decides on `state` and writes absolute values. With `checked` (the `optimistic`
    /// strategy), every write must also check that the row's version is still the one read,
    /// and fail with [`optimistic::conflict`] when it is not (see [`optimistic::check`]).
    fn write<'c>(
        &'c self,
        tx: &'c mut Tx<DB>,
        state: &'c Self::State,
        checked: bool,
    ) -> BoxFuture<'c, Result<Self::Output, Self::Error>>;

    /// The same effect as conditional statements computed by the database (`UPDATE ... SET
    /// balance = balance - ? WHERE balance >= ?`), for `atomic`; `None` (the default) when the
    /// operation has no such form, and `atomic` then fails with [`Error::Unsupported`].
    fn atomic<'c>(
        &'c self,
        _tx: &'c mut Tx<DB>,
    ) -> Option<BoxFuture<'c, Result<Self::Output, Self::Error>>> {
        None
    }

    /// The whole operation as ONE conditional statement that needs no transaction around it
    /// (a single `UPDATE ... WHERE balance >= ?` is atomic on its own), run in autocommit by
    /// `atomic` in preference to [`Operation::atomic`]: one round trip instead of `BEGIN`,
    /// statement and `COMMIT`. `None` (the default) when the operation has no such form.
    /// Conflicts (a deadlock, SQLite busy) are retried under the executor's retry policy.
    fn atomic_statement<'c>(
        &'c self,
        _conn: &'c mut DB::Connection,
    ) -> Option<BoxFuture<'c, Result<Self::Output, Self::Error>>> {
        None
    }

    /// For `batched`: decides on `state` in memory exactly as [`Operation::write`] would on
    /// the rows, and changes `state` to what the rows would hold after it, without writing.
    /// `None` (the default) when the operation has no such form. With it, consecutive
    /// operations of this type in a batch read their rows once, are decided one after the
    /// other on the running state, and the result is written once with
    /// [`Operation::write_state`]: a few round trips per batch instead of a few per operation.
    /// Implement both or neither.
    fn apply(&self, _state: &mut Self::State) -> Option<Result<Self::Output, Self::Error>> {
        None
    }

    /// For `batched`: the queue this operation joins. `None` (the default): the operations on
    /// exactly its key set (one hot account; one pair of accounts). `Some(domain)`: every
    /// operation of the same domain, whatever its keys (all the transfers among a few
    /// accounts), so that one commit serves them all. A batch of a domain runs its operations
    /// grouped by key set (consecutive ones of a type with [`Operation::apply`] share one read
    /// and one write), the groups in key order; see [`crate::batch`] for what that costs.
    fn batch_domain(&self) -> Option<String> {
        None
    }

    /// For `batched`, with [`Operation::apply`]: writes `state` (absolute values) after
    /// [`Operation::apply`] decided one or more operations of this type on it. Called on the
    /// first operation of such a group. `None` (the default) when there is no such form.
    fn write_state<'c>(
        &'c self,
        _tx: &'c mut Tx<DB>,
        _state: &'c Self::State,
    ) -> Option<BoxFuture<'c, Result<(), Self::Error>>> {
        None
    }
}

/// The outcome of [`Executor::run`]: the operation's result and how it was reached.
#[derive(Debug)]
#[must_use]
pub struct Executed<T, E = Error> {
    /// The committed output, or the error that ended the operation.
    pub result: Result<T, E>,
    /// Transaction attempts (0 when no transaction ran, e.g. a lock was not acquired).
    pub attempts: u32,
    /// The conflict of every failed attempt, in order.
    pub conflicts: Vec<ConflictKind>,
    /// Time spent waiting for locks taken before or at the start of the transaction: in-process
    /// and lock-service locks, advisory locks, and the locking read of `pessimistic` (of the
    /// last attempt).
    pub lock_wait: Duration,
    /// True when the write was refused because a lock-service grant's fencing token was stale
    /// (its holder had lost the lock).
    pub fenced: bool,
}

impl<T, E> Executed<T, E> {
    fn from_attempts(run: Attempted<T, E>, lock_wait: Duration, fenced: bool) -> Self {
        Executed {
            result: run.result,
            attempts: run.attempts,
            conflicts: run.conflicts,
            lock_wait,
            fenced,
        }
    }

    fn failed(error: E, lock_wait: Duration) -> Self {
        Executed {
            result: Err(error),
            attempts: 0,
            conflicts: Vec::new(),
            lock_wait,
            fenced: false,
        }
    }
}

/// Runs [`Operation`]s under a chosen [`Strategy`]. Cheap to clone; clones share the in-process
/// locks and lock services, so every request handler of a process should use clones of one
/// executor (the `mutex` strategy is only a lock when they do).
///
/// ```
/// use std::time::Duration;
/// use contend::strategy::Executor;
/// let executor: Executor = Executor::new().lock_wait(Duration::from_secs(2));
/// assert_eq!(executor.lock_wait_time(), Duration::from_secs(2));
/// ```
pub struct Executor<DB: Database = Any> {
    lock_wait: Duration,
    options: TxOptions,
    mutexes: KeyedMutex,
    services: HashMap<Strategy, Arc<dyn LockService>>,
    batch: BatchOptions,
    batcher: Batcher<DB>,
    allow_unsafe_on_cluster: bool,
    _db: std::marker::PhantomData<fn() -> DB>,
}

impl<DB: Database> Clone for Executor<DB> {
    fn clone(&self) -> Self {
        Executor {
            lock_wait: self.lock_wait,
            options: self.options.clone(),
            mutexes: self.mutexes.clone(),
            services: self.services.clone(),
            batch: self.batch,
            batcher: self.batcher.clone(),
            allow_unsafe_on_cluster: self.allow_unsafe_on_cluster,
            _db: std::marker::PhantomData,
        }
    }
}

impl<DB: Database> std::fmt::Debug for Executor<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("lock_wait", &self.lock_wait)
            .field("options", &self.options)
            .field("lock_services", &self.services.keys().collect::<Vec<_>>())
            .field("batch", &self.batch)
            .field("allow_unsafe_on_cluster", &self.allow_unsafe_on_cluster)
            .finish()
    }
}

impl<DB: Database> Default for Executor<DB> {
    fn default() -> Self {
        Executor::new()
    }
}

/// The retry policy of strategies that do not expect conflicts: deadlocks (two transactions that
/// locked in different orders elsewhere), Galera certification failures (a node-local row lock
/// lost to another node's commit) and SQLite busy errors only; 10 s in all, no attempt limit.
fn base_retry() -> RetryPolicy {
    RetryPolicy::new()
        .max_delay(Duration::from_millis(50))
        .max_elapsed(Duration::from_secs(10))
        .only(&[
            ConflictKind::Deadlock,
            ConflictKind::Certification,
            ConflictKind::Busy,
        ])
}

impl<DB: Database> Executor<DB> {
    /// An executor with a lock wait of 5 s, no lock services, and the default transaction
    /// options of the lock-taking strategies (retry deadlocks, Galera certification failures
    /// and SQLite busy errors for 10 s at most).
    pub fn new() -> Self {
        let lock_wait = Duration::from_secs(5);
        Executor {
            lock_wait,
            options: TxOptions::new().retry(base_retry()),
            mutexes: KeyedMutex::new(),
            services: HashMap::new(),
            batch: BatchOptions::new(),
            batcher: Batcher::new(),
            allow_unsafe_on_cluster: false,
            _db: std::marker::PhantomData,
        }
    }

    /// How long an operation waits for a row, advisory or in-process lock before it fails
    /// (a [`ConflictKind::LockTimeout`] conflict, or [`Error::LockNotAcquired`]). Default 5 s.
    /// Lock services wait as they are configured.
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// The lock wait ([`Executor::lock_wait`]).
    pub fn lock_wait_time(&self) -> Duration {
        self.lock_wait
    }

    /// Transaction options (isolation, timeouts, retry) of `none`, `mutex`, `atomic`,
    /// `pessimistic`, `advisory` and the lock-service strategies. `optimistic` and
    /// `serializable` use [`optimistic::options`] and [`serializable::options`]. The lock wait
    /// is applied as the lock timeout on top of these.
    pub fn options(mut self, options: TxOptions) -> Self {
        self.options = options;
        self
    }

    /// Uses `service` for `strategy` (`redis`, `redis-spin`, `redlock`, `etcd`).
    pub fn lock_service(mut self, strategy: Strategy, service: Arc<dyn LockService>) -> Self {
        self.services.insert(strategy, service);
        self
    }

    /// Settings of the `batched` strategy (batch size, wait); default [`BatchOptions::new`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use contend::batch::BatchOptions;
    /// use contend::strategy::Executor;
    /// let executor: Executor = Executor::new()
    ///     .batch(BatchOptions::new().max_size(128).max_wait(Duration::from_micros(100)));
    /// assert_eq!(executor.batch_options().max_batch_size(), 128);
    /// ```
    pub fn batch(mut self, options: BatchOptions) -> Self {
        self.batch = options;
        self
    }

    /// Runs strategies that cannot be safe on the database's cluster instead of refusing them
    /// ([`Executor::check_db`]): for showing the failure (the lab's
    /// `--allow-unsafe-on-cluster`), never for serving requests. Default `false`.
    pub fn allow_unsafe_on_cluster(mut self, allow: bool) -> Self {
        self.allow_unsafe_on_cluster = allow;
        self
    }

    /// The settings of the `batched` strategy ([`Executor::batch`]).
    pub fn batch_options(&self) -> BatchOptions {
        self.batch
    }

    /// Counters of the `batched` strategy of this executor and its clones: commits, operations,
    /// the largest batch, retries, splits.
    pub fn batch_stats(&self) -> BatchStats {
        self.batcher.stats()
    }

    /// `Ok` when this executor can run `strategy` on `backend`, else the reason.
    ///
    /// ```
    /// use contend::{Backend, strategy::{Executor, Strategy}};
    /// let executor: Executor = Executor::new();
    /// assert!(executor.check(Strategy::Pessimistic, Backend::Postgres).is_ok());
    /// assert!(executor.check(Strategy::Advisory, Backend::Sqlite).is_err());
    /// assert!(executor.check(Strategy::Redis, Backend::Postgres).is_err()); // no lock service
    /// ```
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming the reason.
    pub fn check(&self, strategy: Strategy, backend: crate::Backend) -> Result<()> {
        if let Err(why) = strategy.supported_on(backend) {
            return Err(Error::Unsupported {
                backend,
                what: format!("strategy `{strategy}`: {why}"),
            });
        }
        if strategy.needs_lock_service() && !self.services.contains_key(&strategy) {
            return Err(Error::Unsupported {
                backend,
                what: format!("strategy `{strategy}` without a lock service configured for it"),
            });
        }
        Ok(())
    }

    /// [`Executor::check`] for the database `db` is connected to, which also refuses the
    /// strategies that cannot be safe on its cluster ([`crate::nodes::Cluster::unsafe_strategy`]:
    /// `advisory`, `serializable` and `mutex` on a Galera cluster), unless
    /// [`Executor::allow_unsafe_on_cluster`] was set. [`Executor::run`] checks this first.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
    /// use contend::{Db, strategy::{Executor, Strategy}};
    /// let db = Db::connect("sqlite::memory:").await?;
    /// let executor: Executor = Executor::new();
    /// assert!(executor.check_db(Strategy::Pessimistic, &db).is_ok());
    /// // On a Galera cluster: Err(Error::UnsafeOnCluster { strategy: Advisory, reason: "GET_LOCK is local ..", .. })
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Executor::check`]; [`Error::UnsafeOnCluster`] naming the strategy, the cluster and
    /// the reason.
    pub fn check_db(&self, strategy: Strategy, db: &crate::Db<DB>) -> Result<()> {
        self.check(strategy, db.backend())?;
        if !self.allow_unsafe_on_cluster
            && let Some(reason) = db.cluster().unsafe_strategy(strategy)
        {
            return Err(Error::UnsafeOnCluster {
                strategy,
                cluster: db.cluster().to_string(),
                reason,
            });
        }
        Ok(())
    }

    /// Runs `op` under `strategy` on `session` (the worker's or request's connection). Before
    /// waiting for an in-process or lock-service lock, the session gives its connection back
    /// to the pool, so that waiters never hold connections the lock's holder may need.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
    /// use std::sync::Arc;
    /// use contend::strategy::{Executor, Operation, Strategy};
    /// use contend::{BoxFuture, Db, Error, Tx};
    ///
    /// struct Add(i64);
    /// impl Operation for Add {
    ///     type State = i64;
    ///     type Output = i64;
    ///     type Error = Error;
    ///     fn keys(&self) -> Vec<String> { vec!["counter".into()] }
    ///     fn read<'c>(&'c self, conn: &'c mut sqlx::AnyConnection, lock: &'static str)
    ///         -> BoxFuture<'c, Result<i64, Error>> {
    ///         Box::pin(async move {
    ///             let sql = format!("SELECT n FROM counter{lock}");
    ///             Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(conn).await?)
    ///         })
    ///     }
    ///     fn write<'c>(&'c self, tx: &'c mut Tx, n: &'c i64, _checked: bool)
    ///         -> BoxFuture<'c, Result<i64, Error>> {
    ///         Box::pin(async move {
    ///             tx.query("UPDATE counter SET n = ?").bind(n + self.0).execute(tx.conn()).await?;
    ///             Ok(n + self.0)
    ///         })
    ///     }
    /// }
    ///
    /// let db = Db::connect("sqlite::memory:").await?;
    /// db.execute_script("CREATE TABLE counter (n INTEGER); INSERT INTO counter VALUES (0)").await?;
    /// let executor: Executor = Executor::new();
    /// let mut session = db.session();
    /// let done = executor.run(Strategy::Pessimistic, &mut session, Arc::new(Add(5))).await;
    /// assert_eq!(done.result?, 5);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// In [`Executed::result`]: the operation's own errors; [`Error::Unsupported`] when the
    /// strategy cannot run here ([`Executor::check`]), [`Error::UnsafeOnCluster`] when it
    /// cannot be safe on the database's cluster ([`Executor::check_db`]), or `atomic` is asked of an operation
    /// without [`Operation::atomic`]; lock timeouts and conflicts that the retry policy did
    /// not resolve; [`Error::StaleFencingToken`] for a lock holder that had lost its lock.
    ///
    /// # Cancel safety
    /// Safe to drop: an open transaction is rolled back (its connection closed), in-process
    /// and advisory locks are released, and lock-service locks are released or expire with
    /// their lease. Nothing half-written becomes visible. Under `batched`, an operation that
    /// already joined a batch is not cancelled: it commits or not with its batch, and its
    /// outcome is discarded.
    pub async fn run<O>(
        &self,
        strategy: Strategy,
        session: &mut Session<DB>,
        op: Arc<O>,
    ) -> Executed<O::Output, O::Error>
    where
        O: Operation<DB>,
    {
        let backend = session.db().backend();
        if let Err(e) = self.check_db(strategy, session.db()) {
            return Executed::failed(e.into(), Duration::ZERO);
        }
        let base = self.options.clone().lock_timeout(self.lock_wait);
        match strategy {
            Strategy::None => read_then_write(session, &base, op, Duration::ZERO).await,
            Strategy::Mutex => {
                session.release();
                let started = Instant::now();
                // All keys at once, queued at arrival on every one of them: taken one at a
                // time, an operation would queue again on each key behind everyone who came
                // meanwhile, and those waits add up to the tail.
                let keys = canonical(op.keys());
                let guard =
                    match tokio::time::timeout(self.lock_wait, self.mutexes.lock_all(keys.clone()))
                        .await
                    {
                        Ok(guard) => guard,
                        Err(_) => {
                            let key = self
                                .mutexes
                                .first_taken(&keys)
                                .or(keys.first().map(String::as_str))
                                .unwrap_or_default();
                            let e = Error::LockNotAcquired {
                                key: key.to_string(),
                                waited_ms: self.lock_wait.as_millis() as u64,
                            };
                            return Executed::failed(e.into(), started.elapsed());
                        }
                    };
                let done = read_then_write(session, &base, op, started.elapsed()).await;
                drop(guard);
                done
            }
            Strategy::Atomic => {
                if let Some(done) = self.atomic_statement(session, &base, &op).await {
                    return done;
                }
                let run = session
                    .run(&base, move |tx| {
                        let op = op.clone();
                        Box::pin(async move {
                            let backend = tx.backend();
                            match op.atomic(tx) {
                                Some(write) => write.await,
                                None => Err(Error::Unsupported {
                                    backend,
                                    what: "strategy `atomic` for an operation without a \
                                           conditional-statement form"
                                        .into(),
                                }
                                .into()),
                            }
                        })
                    })
                    .await;
                Executed::from_attempts(run, Duration::ZERO, false)
            }
            Strategy::Pessimistic => {
                let lock = match pessimistic::lock_clause(backend, op.row_lock()) {
                    Ok(lock) => lock,
                    Err(e) => return Executed::failed(e.into(), Duration::ZERO),
                };
                let waited = Arc::new(std::sync::Mutex::new(Duration::ZERO));
                let w = waited.clone();
                let run = session
                    .run(&base, move |tx| {
                        let (op, w) = (op.clone(), w.clone());
                        Box::pin(async move {
                            let started = Instant::now();
                            let state = op.read(tx.conn(), lock).await?;
                            *w.lock().unwrap_or_else(|e| e.into_inner()) = started.elapsed();
                            op.write(tx, &state, false).await
                        })
                    })
                    .await;
                let waited = *waited.lock().unwrap_or_else(|e| e.into_inner());
                Executed::from_attempts(run, waited, false)
            }
            Strategy::Optimistic | Strategy::Serializable => {
                let checked = strategy == Strategy::Optimistic;
                let options = if checked {
                    optimistic::options()
                } else {
                    serializable::options()
                }
                .lock_timeout(self.lock_wait);
                let run = session
                    .run(&options, move |tx| {
                        let op = op.clone();
                        Box::pin(async move {
                            let state = op.read(tx.conn(), "").await?;
                            op.write(tx, &state, checked).await
                        })
                    })
                    .await;
                Executed::from_attempts(run, Duration::ZERO, false)
            }
            Strategy::Advisory => {
                let keys = Arc::new(canonical(op.keys()));
                let waited = Arc::new(std::sync::Mutex::new(Duration::ZERO));
                let w = waited.clone();
                let run = session
                    .run(&base, move |tx| {
                        let (op, keys, w) = (op.clone(), keys.clone(), w.clone());
                        Box::pin(async move {
                            let started = Instant::now();
                            for key in keys.iter() {
                                advisory::lock_xact(tx, key, None).await?;
                            }
                            *w.lock().unwrap_or_else(|e| e.into_inner()) = started.elapsed();
                            let state = op.read(tx.conn(), "").await?;
                            op.write(tx, &state, false).await
                        })
                    })
                    .await;
                let waited = *waited.lock().unwrap_or_else(|e| e.into_inner());
                Executed::from_attempts(run, waited, false)
            }
            Strategy::Redis | Strategy::RedisSpin | Strategy::Redlock | Strategy::Etcd => {
                let service = self.services[&strategy].clone();
                self.fenced(service.as_ref(), session, &base, op).await
            }
            Strategy::Batched => {
                let keys = canonical(op.keys());
                self.batcher.run(session, &base, self.batch, keys, op).await
            }
        }
    }

    /// `atomic` as one statement in autocommit, retried on conflicts; `None` when the
    /// operation has no single-statement form (checked without a round trip).
    async fn atomic_statement<O: Operation<DB>>(
        &self,
        session: &mut Session<DB>,
        options: &TxOptions,
        op: &Arc<O>,
    ) -> Option<Executed<O::Output, O::Error>> {
        let started = Instant::now();
        let mut conflicts = Vec::new();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let o = op.clone();
            // The statement writes: on SQLite it takes this process's turn as a transaction
            // does (and runs on the dedicated writer connection, if there is one).
            let result = session
                .write_autocommit_within(options.lock_timeout, move |conn| {
                    Box::pin(async move {
                        match o.atomic_statement(conn) {
                            Some(statement) => statement.await.map(Some),
                            None => Ok(None),
                        }
                    })
                })
                .await;
            let result = match result {
                Ok(None) => return None,
                Ok(Some(output)) => Ok(output),
                Err(e) => Err(e),
            };
            if let Err(e) = &result
                && let Some(kind) = e.conflict()
            {
                conflicts.push(kind);
                if options
                    .retry
                    .should_retry(kind, attempts, started.elapsed())
                {
                    tokio::time::sleep(options.retry.backoff(attempts)).await;
                    continue;
                }
            }
            return Some(Executed {
                result,
                attempts,
                conflicts,
                lock_wait: Duration::ZERO,
                fenced: false,
            });
        }
    }

    /// A lock-service lock per key (sorted), then one transaction that fences every key with
    /// its grant's token before reading and writing; the locks are released after it ends.
    async fn fenced<O: Operation<DB>>(
        &self,
        service: &dyn LockService,
        session: &mut Session<DB>,
        options: &TxOptions,
        op: Arc<O>,
    ) -> Executed<O::Output, O::Error> {
        session.release();
        let started = Instant::now();
        let mut held: Vec<(String, Box<dyn HeldLock>)> = Vec::new();
        let mut failed = None;
        for key in canonical(op.keys()) {
            match service.acquire(&key).await {
                Ok(lock) => held.push((key, lock)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let waited = started.elapsed();
        let done = match failed {
            Some(e) => Executed::failed(e.into(), waited),
            None => {
                let fences: Arc<Vec<(String, FencingToken)>> = Arc::new(
                    held.iter()
                        .filter_map(|(key, lock)| lock.fencing_token().map(|t| (key.clone(), t)))
                        .collect(),
                );
                // The refused resource and the highest token the database had accepted.
                let stale: Arc<Mutex<Option<(String, u64)>>> = Arc::new(Mutex::new(None));
                let s = stale.clone();
                let run = session
                    .run(options, move |tx| {
                        let (op, fences, s) = (op.clone(), fences.clone(), s.clone());
                        Box::pin(async move {
                            for (resource, token) in fences.iter() {
                                if let Err(e) = fencing::fence(tx, resource, *token).await {
                                    if let Error::StaleFencingToken { highest, .. } = &e {
                                        *s.lock().expect("not poisoned") =
                                            Some((resource.clone(), *highest));
                                    }
                                    return Err(e.into());
                                }
                            }
                            let state = op.read(tx.conn(), "").await?;
                            op.write(tx, &state, false).await
                        })
                    })
                    .await;
                let refused = stale.lock().expect("not poisoned").take();
                if let Some((resource, highest)) = &refused
                    && let Some((_, lock)) = held.iter_mut().find(|(key, _)| key == resource)
                    && let Err(e) = lock.token_refused(FencingToken::new(*highest)).await
                {
                    // The next grant is refused too, and tries again.
                    tracing::warn!(error = %e, resource, "could not raise the lock's fencing counter");
                }
                Executed::from_attempts(run, waited, refused.is_some())
            }
        };
        for (_, lock) in held.into_iter().rev() {
            if let Err(e) = lock.release().await {
                // A failed release only delays the next holder until the lock's lease ends.
                tracing::debug!(error = %e, "lock release failed");
            }
        }
        done
    }
}

/// `none` and `mutex`: the read on its own (autocommit), the write in a transaction.
async fn read_then_write<DB, O>(
    session: &mut Session<DB>,
    options: &TxOptions,
    op: Arc<O>,
    lock_wait: Duration,
) -> Executed<O::Output, O::Error>
where
    DB: Database,
    O: Operation<DB>,
{
    let reader = op.clone();
    let state = match session
        .autocommit(move |conn| Box::pin(async move { reader.read(conn, "").await }))
        .await
    {
        Ok(state) => Arc::new(state),
        Err(e) => return Executed::failed(e, lock_wait),
    };
    let run = session
        .run(options, move |tx| {
            let (op, state) = (op.clone(), state.clone());
            Box::pin(async move { op.write(tx, &state, false).await })
        })
        .await;
    Executed::from_attempts(run, lock_wait, false)
}

/// Keys sorted and deduplicated: the one order in which every operation takes its locks.
fn canonical(mut keys: Vec<String>) -> Vec<String> {
    keys.sort();
    keys.dedup();
    keys
}
