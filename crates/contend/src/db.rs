//! [`Db`]: one pooled handle for SQLite, PostgreSQL and MySQL/MariaDB, chosen by URL, with the
//! session settings each backend needs for safe concurrent use; over one server or the nodes
//! of a Galera cluster ([`crate::nodes`]).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::query::{Query, QueryScalar};
use sqlx::{Any, AssertSqlSafe, ConnectOptions, Connection, Executor, Pool};

use crate::backend::{Backend, Database, address_of, redact_url, sqlite::DEFAULT_BUSY_TIMEOUT_MS};
use crate::error::{ConflictKind, Error, Result};
use crate::nodes::{self, Cluster};
use crate::session::Session;
use crate::tx::{self, Again, Attempted, Once, Tx, TxError, TxOptions};

/// A pooled database handle. Cheap to clone; clones share the pool.
///
/// `Db` is generic over the sqlx database. `Db` without a parameter is `Db<sqlx::Any>`, made from
/// a URL by [`Db::connect`] when the backend is chosen at run time. A service that already has a
/// typed pool (`sqlx::PgPool`, `MySqlPool`, `SqlitePool`) wraps it with [`Db::from_pool`] and
/// keeps its own types: transaction bodies get that database's own connection.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
/// let db = contend::Db::connect("sqlite::memory:").await?;
/// assert_eq!(db.backend(), contend::Backend::Sqlite);
/// let one: i64 = db.query_scalar("SELECT 1").fetch_one(db.pool()).await?;
/// assert_eq!(one, 1);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Db<DB: Database = Any> {
    inner: Arc<Inner<DB>>,
}

impl<DB: Database> Clone for Db<DB> {
    fn clone(&self) -> Self {
        Db {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner<DB: Database> {
    /// The first node's pool.
    pool: Pool<DB>,
    /// The pools of the other nodes of a cluster (empty for one server).
    others: Vec<Pool<DB>>,
    /// The round-robin counter of [`Db::acquire`] over `pool` and `others`.
    next: AtomicUsize,
    /// What the pools are connected to.
    cluster: Cluster,
    backend: Backend,
    url: String,
    busy_timeout_ms: u64,
    /// SQLite: the queue of this `Db`'s write transactions (see [`DbBuilder::writer_queue`]).
    writer: Option<Writer<DB>>,
    /// How long a transaction waits for its turn in `writer` when it sets no lock timeout.
    turn_timeout: Duration,
    /// Behind a transaction pooler ([`DbBuilder::transaction_pooler`]).
    pooler: bool,
}

/// SQLite's in-process writer queue: one turn at a time, and (for file databases opened by URL)
/// the one connection every write transaction of the process runs on.
#[derive(Debug)]
pub(crate) struct Writer<DB: Database> {
    /// The turn. It holds the dedicated writer connection between transactions (`None` before
    /// the first write, after a transaction that did not finish cleanly, and without one).
    turn: tokio::sync::Mutex<Option<PoolConnection<DB>>>,
    /// A pool of one connection, of this `Db`'s own settings, that writes run on; `None`: write
    /// transactions run on the caller's connection (in-memory databases, `Db::from_pool`).
    dedicated: Option<Pool<DB>>,
    /// With `dedicated`: a pool of one connection that checkpoints the WAL in the background
    /// (the writer connection has no automatic checkpoints, so that no write waits for one).
    checkpointer: Option<Pool<Any>>,
    /// Write transactions since the last checkpoint was started.
    writes: AtomicUsize,
    /// Whether a background checkpoint is running.
    checkpointing: Arc<std::sync::atomic::AtomicBool>,
}

/// How many writes on the dedicated writer connection start a background checkpoint. SQLite's
/// own automatic checkpoint runs every 1,000 WAL pages inside the commit that crosses them; a
/// write transaction of a few rows adds a handful of pages. Every checkpoint that copies pages
/// syncs the WAL and the database file, and those syncs slow the writer's own file writes
/// meanwhile: fewer, larger checkpoints cost the writer less (measured with
/// `bench/sqlite-scaling.sh`: 200 gave a larger p99 at 16 workers).
const CHECKPOINT_EVERY: usize = 1_000;

/// How many frames (pages) the WAL may hold before a background checkpoint catches up with the
/// write turn held: 16 MiB with 4 KiB pages, four times SQLite's own automatic checkpoint.
/// Below this, checkpoints copy alongside the writer and never stop it; but the WAL starts over
/// only after a checkpoint that copied all of it, which a writer that never pauses does not
/// allow, so above this the next checkpoint pauses the writers for as long as it takes to copy
/// what was appended meanwhile.
const CATCH_UP_FRAMES: i64 = 4_096;

/// A checkpoint that copies what it can without waiting for anyone; its row is (whether it was
/// blocked, frames in the WAL, frames copied into the database file).
const PASSIVE_CHECKPOINT: &str = "PRAGMA wal_checkpoint(PASSIVE)";

/// How long the writer queue must have been idle (no write finished, no turn held) before
/// [`idle_catch_up`] checkpoints what the WAL holds beyond the last checkpoint.
const IDLE: Duration = Duration::from_millis(1);

/// How many checkpoints [`idle_catch_up`] tries before it leaves the rest to the next periodic
/// one (a reader that keeps an old snapshot open keeps every one of them from finishing).
const IDLE_ATTEMPTS: usize = 100;

/// A passive checkpoint on the checkpointer connection: (whether it was blocked, frames in the
/// WAL when it started, frames copied into the database file by now).
async fn passive_checkpoint(pool: &Pool<Any>) -> std::result::Result<(i64, i64, i64), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    sqlx::query_as(PASSIVE_CHECKPOINT)
        .fetch_one(&mut *conn)
        .await
}

/// After a background checkpoint that ran alongside the writer (which appended to the WAL
/// meanwhile, so the WAL cannot start over), waits for a moment when the writer queue is idle
/// and checkpoints the rest then, without taking the write turn: once a checkpoint has copied
/// the whole WAL, the next write starts it over. A writer that arrives meanwhile does not wait
/// (it appends again, and the next idle moment tries again); no write pays for this. It gives up
/// when the next periodic checkpoint is due ([`CHECKPOINT_EVERY`] more writes, under a load
/// that never pauses): that one catches up with the turn held once the WAL reaches
/// [`CATCH_UP_FRAMES`]. Without this, the WAL started over only when a periodic checkpoint
/// happened to finish while the writer paused, so under bursts of load (the lab's runs, a
/// service's busy moments) it kept growing from one burst to the next until the catch-up held
/// the turn in the middle of one, through two fsyncs: every queued writer stalled together.
/// Measured with the lab (`--scenario withdraw,transfer --strategy none,mutex,atomic,pessimistic`,
/// 7 alternating rounds while another process wrote and synced 16 MiB files on the same disk):
/// `transfer`/`atomic`, where the catch-up fell, p99 median 15.3 ms (2.0-29.9) before, 2.0 ms
/// (1.7-8.8) after. What is left under such disk load: the periodic checkpoint's own copying
/// and syncing still slows the writer's commits now and then (it holds no turn).
async fn idle_catch_up<DB: Database>(
    writer: &Writer<DB>,
    pool: &Pool<Any>,
) -> std::result::Result<(), sqlx::Error> {
    let mut seen = writer.writes.load(Ordering::Relaxed);
    let mut attempts = 0;
    while attempts < IDLE_ATTEMPTS {
        tokio::time::sleep(IDLE).await;
        if pool.is_closed() {
            return Ok(());
        }
        let writes = writer.writes.load(Ordering::Relaxed);
        if writes >= CHECKPOINT_EVERY {
            return Ok(());
        }
        // Idle: no write finished since the last look, and none holds or waits for the turn
        // (a waiting writer would hold it: the turn is handed over in arrival order).
        let idle = writes == seen && writer.turn.try_lock().is_ok();
        seen = writes;
        if !idle {
            continue;
        }
        attempts += 1;
        let (busy, frames, copied) = passive_checkpoint(pool).await?;
        // It ran (another connection's checkpoint makes it return busy, without a count), copied
        // everything the WAL held into the database file, and no write came meanwhile.
        if busy == 0
            && frames >= 0
            && copied == frames
            && writer.writes.load(Ordering::Relaxed) == seen
        {
            return Ok(());
        }
    }
    Ok(())
}

impl<DB: Database> Writer<DB> {
    fn new(dedicated: Option<(Pool<DB>, Pool<Any>)>) -> Self {
        let (dedicated, checkpointer) = dedicated.unzip();
        Writer {
            turn: tokio::sync::Mutex::new(None),
            dedicated,
            checkpointer,
            writes: AtomicUsize::new(0),
            checkpointing: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }
}

/// A write turn ([`Db::writer_turn`]): held for the whole write transaction; it keeps the dedicated
/// writer connection while no transaction uses it.
pub(crate) type WriterTurn<'a, DB> = tokio::sync::MutexGuard<'a, Option<PoolConnection<DB>>>;

/// The turn to write and the dedicated writer connection, held together for one write
/// ([`Db::writer_lease`]): for a write transaction and for the executor's one-statement
/// `atomic` alike.
pub(crate) struct WriterLease<'a, DB: Database> {
    db: &'a Db<DB>,
    turn: WriterTurn<'a, DB>,
    /// The writer connection, unless it was lent out with [`WriterLease::take`].
    conn: Option<PoolConnection<DB>>,
}

impl<DB: Database> WriterLease<'_, DB> {
    /// The writer connection.
    pub(crate) fn conn(&mut self) -> &mut PoolConnection<DB> {
        self.conn
            .as_mut()
            .expect("the writer connection was not taken")
    }

    /// Lends the writer connection out (to a [`Tx`], which owns its connection); give it back
    /// with [`WriterLease::put`] once the work on it finished cleanly.
    pub(crate) fn take(&mut self) -> PoolConnection<DB> {
        self.conn
            .take()
            .expect("the writer connection was not taken")
    }

    /// Gives back the connection lent out with [`WriterLease::take`].
    pub(crate) fn put(&mut self, conn: PoolConnection<DB>) {
        self.conn = Some(conn);
    }

    /// The write finished cleanly: the connection goes back to the turn for the next writer,
    /// the write is counted towards the background checkpoint ([`Db::wrote`]), and the turn is
    /// released. Without the connection (lent out and not given back) only the turn is
    /// released: the next write opens another connection.
    pub(crate) fn done(mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        *self.turn = Some(conn);
        self.db.wrote();
    }
}

impl<DB: Database> Drop for WriterLease<'_, DB> {
    fn drop(&mut self) {
        // Not `done`: the work on the connection did not finish cleanly.
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

impl<DB: Database> std::fmt::Debug for WriterLease<'_, DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterLease")
            .field("conn", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

/// Settings for [`Db`], made by [`Db::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `connect` is called"]
pub struct DbBuilder {
    url: String,
    max_connections: u32,
    acquire_timeout: Duration,
    connect_timeout: Duration,
    busy_timeout: Duration,
    test_before_acquire: bool,
    writer_queue: bool,
    pooler: Option<bool>,
}

impl DbBuilder {
    /// Largest number of pooled connections. Default 16 (always 1 for `sqlite::memory:`, where
    /// every connection would be a database of its own).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long a caller waits for a free pooled connection before [`Error::Unavailable`].
    /// Default 30 s.
    pub fn acquire_timeout(mut self, t: Duration) -> Self {
        self.acquire_timeout = t;
        self
    }

    /// How long [`DbBuilder::connect`] may take to open the first connection. Default 5 s.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// SQLite's busy timeout: how long a statement waits for another connection's lock before
    /// failing with `SQLITE_BUSY`. Default 5 s. Ignored by the other backends.
    pub fn busy_timeout(mut self, t: Duration) -> Self {
        self.busy_timeout = t;
        self
    }

    /// Whether the pool checks an idle connection with a round trip (a ping) before handing it
    /// out. Default `true`: a connection the server closed is noticed before it is used. `false`
    /// saves one round trip per transaction or statement, which benchmarks (the lab) want; a
    /// dead connection then surfaces as the statement's error.
    pub fn test_before_acquire(mut self, test: bool) -> Self {
        self.test_before_acquire = test;
        self
    }

    /// SQLite: whether write transactions of this `Db` queue for one writer at a time in the
    /// process (default `true`). A transaction waits for its turn at most its
    /// [`TxOptions::lock_timeout`](crate::TxOptions::lock_timeout), or else the acquire
    /// timeout, and then fails with a [`crate::ConflictKind::Busy`] conflict (retryable).
    /// SQLite allows one writer per database file; without the queue, concurrent
    /// `BEGIN IMMEDIATE`s of one process meet in SQLite's busy handler, which sleeps
    /// and polls (up to 100 ms per sleep) instead of handing the lock over in order, so
    /// throughput collapses and latency grows with concurrency. With the queue, writers take
    /// turns on an async mutex before `BEGIN` and the busy handler is left to guard against
    /// *other* processes writing the same file. The library's writes outside transactions take
    /// the same turn: the executor's one-statement `atomic`, [`Session::write_autocommit`], the
    /// building blocks' autocommit forms (`Counter::try_sub_now` / `try_sub_in`,
    /// `GetOrCreate::get_or_create`), the idempotency `Store` and [`Db::execute_script`].
    /// Read-only transactions, reads, statements the application runs through
    /// [`Session::autocommit`] or on [`Db::pool`], and other processes do not take part in the
    /// queue (a write among them may still meet the busy timeout). Ignored by the other
    /// backends.
    ///
    /// On a SQLite file, every write transaction of the `Db` (and the executor's one-statement
    /// `atomic`) then runs on one dedicated writer connection, kept with the turn between
    /// transactions and opened with the same settings outside the pool (so it does not count
    /// against [`DbBuilder::max_connections`]), instead of on the caller's or a
    /// [`Session`]'s connection: a connection that another one wrote behind must reread the
    /// pages it uses, and each sqlx SQLite connection has a thread of its own, so one writer
    /// connection keeps its page cache valid and one thread hot. Measured with
    /// `bench/sqlite-scaling.sh` (README, Backends). Consequently, connection-local state set
    /// on a session's connection (temporary tables, `PRAGMA`s) is not seen by its write
    /// transactions. A write transaction that does not finish cleanly closes the writer
    /// connection; the next one opens another. `sqlite::memory:` (one connection, the
    /// database itself) and [`Db::from_pool`] (whose pool's `after_connect` hooks contend
    /// cannot repeat) keep writing on the caller's connection.
    pub fn writer_queue(mut self, queue: bool) -> Self {
        self.writer_queue = queue;
        self
    }

    /// PostgreSQL: whether the server is reached through a pooler in transaction pooling mode
    /// (pgbouncer `pool_mode = transaction`, and the like), which hands the client's server
    /// connection to other clients whenever no transaction is open. Default `false`, or what the
    /// URL's `pgbouncer=true` parameter says (the name Prisma uses; it is removed from the URL
    /// before sqlx sees it). The setting given here wins over the URL's.
    ///
    /// Behind such a pooler only what lives inside one transaction is safe, so `Db` then:
    /// - keeps no named-statement cache (`statement-cache-capacity=0`) and clears the server
    ///   connection's prepared statements (`DEALLOCATE ALL`) in the same round trip as every
    ///   `BEGIN`, `COMMIT` and `ROLLBACK`, so that a statement prepared by one client never meets
    ///   another (the pooler of Debian 12, pgbouncer 1.18, cannot carry prepared statements);
    /// - runs what would be autocommit statements ([`Session::autocommit`], the building blocks'
    ///   one-statement forms, the idempotency store) inside `BEGIN` ... `COMMIT`: sqlx prepares
    ///   a statement and executes it in two round trips, between which the pooler may give the
    ///   server connection to someone else;
    /// - refuses session-scoped state: [`crate::strategy::advisory::SessionLock`] fails with
    ///   [`Error::Unsupported`] (the lock would stay on a pooled server connection that other
    ///   clients are then handed, and its release would run on another one). Timeouts are
    ///   `SET LOCAL` and advisory locks `pg_advisory_xact_lock`, which end with the transaction.
    ///
    /// Statements that the application runs on [`Db::pool`] itself, outside a transaction, are
    /// not covered: run them in a transaction or through [`Session::autocommit`]. The pooler
    /// must accept (or ignore) the `extra_float_digits` startup parameter that sqlx sends:
    /// pgbouncer's `ignore_startup_parameters = extra_float_digits`.
    ///
    /// ```no_run
    /// # async fn f() -> contend::Result<()> {
    /// let db = contend::Db::builder("postgres://app@127.0.0.1:6432/app")
    ///     .transaction_pooler(true)
    ///     .connect()
    ///     .await?;
    /// assert!(db.transaction_pooler());
    /// // the same: contend::Db::connect("postgres://app@127.0.0.1:6432/app?pgbouncer=true")
    /// # Ok(()) }
    /// ```
    ///
    /// [`connect`](DbBuilder::connect) fails with [`Error::InvalidUrl`] when it is asked of a
    /// database other than PostgreSQL, or for a `pgbouncer` parameter that is not `true`/`1` or
    /// `false`/`0`, before connecting:
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use contend::{Db, Error};
    /// let sqlite = Db::builder("sqlite::memory:").transaction_pooler(true).connect().await;
    /// assert!(matches!(sqlite, Err(Error::InvalidUrl { .. })));
    /// let mysql = Db::connect("mysql://root@127.0.0.1:1/app?pgbouncer=true").await;
    /// assert!(matches!(mysql, Err(Error::InvalidUrl { .. })));
    /// let typo = Db::connect("postgres://app@127.0.0.1:1/app?pgbouncer=maybe").await;
    /// assert!(matches!(typo, Err(Error::InvalidUrl { .. })));
    /// # }
    /// ```
    pub fn transaction_pooler(mut self, pooler: bool) -> Self {
        self.pooler = Some(pooler);
        self
    }

    /// Opens the pool (one per node) and one connection to each node, so that a bad address
    /// fails here, clearly. A MySQL/MariaDB server is asked whether it is a Galera node
    /// ([`Db::cluster`]); several URLs must be the nodes of one Galera cluster
    /// ([`crate::nodes`]).
    ///
    /// SQLite files are created if missing, and every SQLite connection gets WAL journaling,
    /// `synchronous = NORMAL`, foreign keys and the busy timeout.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for a URL that names no supported backend or cannot be parsed,
    /// for several URLs that are not the nodes of one Galera cluster, and for a transaction
    /// pooler ([`DbBuilder::transaction_pooler`]) asked of a database other than PostgreSQL;
    /// [`Error::Connect`] naming the backend and address when a server cannot be reached in
    /// time or refuses the login.
    ///
    /// # Cancel safety
    /// Dropping the future drops the pools opened so far.
    pub async fn connect(self) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let mut urls = Vec::new();
        let mut url_pooler = false;
        for url in nodes::split_urls(&self.url) {
            let (url, pooler) = pooler_param(&url)?;
            url_pooler |= pooler;
            urls.push(url);
        }
        let backend = nodes::check_urls(&urls)?;
        let pooler = self.pooler.unwrap_or(url_pooler);
        if pooler && backend != Backend::Postgres {
            return Err(Error::InvalidUrl {
                url: redact_url(&self.url),
                reason: format!(
                    "a transaction pooler (pgbouncer=true) is a PostgreSQL setting, not one of {backend}"
                ),
            });
        }
        let mut pools = Vec::with_capacity(urls.len());
        let mut dedicated = None;
        for url in &urls {
            let (pool, writer) = self.connect_node(backend, url, pooler).await?;
            pools.push(pool);
            dedicated = dedicated.or(writer);
        }
        let cluster = if backend == Backend::MySql {
            let mut infos = Vec::with_capacity(pools.len());
            for (pool, url) in pools.iter().zip(&urls) {
                infos.push(probe_node(pool, backend, url).await?);
            }
            nodes::cluster_of(&urls, &infos)?
        } else {
            Cluster::Single
        };
        let mut pools = pools.into_iter();
        let pool = pools.next().expect("check_urls: at least one URL");
        Ok(Db {
            inner: Arc::new(Inner {
                pool,
                others: pools.collect(),
                next: AtomicUsize::new(0),
                cluster,
                backend,
                url: urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>()
                    .join(","),
                busy_timeout_ms: self.busy_timeout.as_millis() as u64,
                writer: (backend == Backend::Sqlite && self.writer_queue)
                    .then(|| Writer::new(dedicated)),
                turn_timeout: self.acquire_timeout,
                pooler,
            }),
        })
    }

    /// The pool of one node (or the one server) at `url`; behind a transaction pooler without
    /// a statement cache. For a SQLite file with the writer queue, also the pool of the one
    /// dedicated writer connection (opened on the first write, with the same settings).
    async fn connect_node(
        &self,
        backend: Backend,
        url: &str,
        pooler: bool,
    ) -> Result<(Pool<Any>, Option<(Pool<Any>, Pool<Any>)>)> {
        let with_options = if pooler {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}statement-cache-capacity=0")
        } else {
            url.to_string()
        };
        let (normalized, memory) = normalize_url(backend, &with_options);
        let options = AnyConnectOptions::from_str(&normalized).map_err(|e| Error::InvalidUrl {
            url: redact_url(url),
            reason: e.to_string(),
        })?;
        let busy_ms = self.busy_timeout.as_millis() as u64;
        let mut pool = AnyPoolOptions::new()
            .max_connections(if memory { 1 } else { self.max_connections })
            .acquire_timeout(self.acquire_timeout)
            .test_before_acquire(self.test_before_acquire);
        if memory {
            pool = pool
                .idle_timeout(None)
                .max_lifetime(None)
                .min_connections(1);
        }
        let (mut writer, mut checkpointer) = (None, None);
        if backend == Backend::Sqlite {
            pool = pool.after_connect(move |conn, _| sqlite_settings(conn, busy_ms));
            // Every write of the process on one connection: its page cache stays valid from one
            // transaction to the next (a connection that another one wrote behind must reread
            // the pages it uses), and one SQLite worker thread does all the writing.
            if self.writer_queue && !memory {
                // One connection each, kept open for the life of the `Db`.
                let single = || {
                    AnyPoolOptions::new()
                        .max_connections(1)
                        .acquire_timeout(self.acquire_timeout)
                        .test_before_acquire(false)
                        .idle_timeout(None)
                        .max_lifetime(None)
                };
                writer = Some(
                    single()
                        .after_connect(move |conn, _| {
                            Box::pin(async move {
                                sqlite_settings(conn, busy_ms).await?;
                                conn.execute("PRAGMA wal_autocheckpoint = 0").await?;
                                Ok(())
                            })
                        })
                        .connect_lazy_with(options.clone()),
                );
                checkpointer = Some(
                    single()
                        .after_connect(move |conn, _| sqlite_settings(conn, busy_ms))
                        .connect_lazy_with(options.clone()),
                );
            }
        }
        // The pool retries refused connections until its acquire timeout and then reports only
        // "pool timed out". Open one connection directly first, so that an unreachable server or
        // a refused login reports the real cause ("connection refused", "access denied", ...).
        let address = address_of(url);
        let connect_error = |source| Error::Connect {
            backend,
            address: address.clone(),
            source,
        };
        let timed_out = || {
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {:?}", self.connect_timeout),
            ))
        };
        if !memory {
            match tokio::time::timeout(self.connect_timeout, options.connect()).await {
                Ok(Ok(probe)) => {
                    let _ = probe.close().await;
                }
                Ok(Err(source)) => return Err(connect_error(source)),
                Err(_) => return Err(connect_error(timed_out())),
            }
        }
        let connect = pool.connect_with(options);
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(pool)) => Ok((pool, writer.zip(checkpointer))),
            Ok(Err(source)) => Err(connect_error(source)),
            Err(_) => Err(connect_error(timed_out())),
        }
    }
}

/// What every SQLite connection of a URL-built `Db` runs first: WAL journaling,
/// `synchronous = NORMAL`, foreign keys and the busy timeout.
fn sqlite_settings(
    conn: &mut sqlx::AnyConnection,
    busy_ms: u64,
) -> BoxFuture<'_, std::result::Result<(), sqlx::Error>> {
    Box::pin(async move {
        let sql = format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = {busy_ms}"
        );
        conn.execute(AssertSqlSafe(sql)).await.map(|_| ())
    })
}

/// Whether `sql` is one `SELECT` statement (optionally ending with `;`), which cannot write:
/// [`Db::execute_script`] runs it without the SQLite writer's turn. Anything else (several
/// statements, a `WITH`, a comment first) counts as a possible write.
fn single_select(sql: &str) -> bool {
    let sql = sql.trim();
    let sql = sql.strip_suffix(';').unwrap_or(sql);
    let select = sql
        .get(..6)
        .is_some_and(|h| h.eq_ignore_ascii_case("select"))
        && sql[6..].starts_with(char::is_whitespace);
    select && !sql.contains(';')
}

/// Asks the MySQL/MariaDB node behind `pool` whether it is a Galera node.
async fn probe_node<DB: Database>(
    pool: &Pool<DB>,
    backend: Backend,
    url: &str,
) -> Result<nodes::NodeInfo> {
    let probe = async {
        let mut conn = pool.acquire().await?;
        nodes::probe::<DB>(&mut conn).await
    };
    probe.await.map_err(|source| Error::Connect {
        backend,
        address: address_of(url),
        source,
    })
}

/// `url` without its `pgbouncer` parameter, and whether that parameter asked for a transaction
/// pooler (`true`/`1` or `false`/`0`).
fn pooler_param(url: &str) -> Result<(String, bool)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), false));
    };
    let mut pooler = false;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("pgbouncer", value)) => {
                pooler = match value {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    other => {
                        return Err(Error::InvalidUrl {
                            url: redact_url(url),
                            reason: format!("pgbouncer={other}: expected true or false"),
                        });
                    }
                }
            }
            _ if pair == "pgbouncer" => pooler = true,
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, pooler))
}

/// `mariadb://` becomes `mysql://` (same protocol); SQLite files get `mode=rwc` so that they are
/// created when missing. Returns whether the URL is an in-memory SQLite database.
fn normalize_url(backend: Backend, url: &str) -> (String, bool) {
    match backend {
        Backend::MySql => match url.split_once("://") {
            Some((_, rest)) => (format!("mysql://{rest}"), false),
            None => (url.to_string(), false),
        },
        Backend::Sqlite => {
            let memory = url.contains(":memory:") || url.contains("mode=memory");
            if memory || url.contains("mode=") {
                (url.to_string(), memory)
            } else if url.contains('?') {
                (format!("{url}&mode=rwc"), false)
            } else {
                (format!("{url}?mode=rwc"), false)
            }
        }
        _ => (url.to_string(), false),
    }
}

impl Db<Any> {
    /// Connects with default settings. See [`DbBuilder::connect`]. `url` may be a
    /// comma-separated list of the nodes of one Galera cluster ([`crate::nodes`]).
    ///
    /// # Errors
    /// As [`DbBuilder::connect`].
    pub async fn connect(url: &str) -> Result<Db> {
        Db::builder(url).connect().await
    }

    /// Starts configuring a connection to `url`: `sqlite:PATH`, `sqlite::memory:`,
    /// `postgres://user:pass@host:port/db`, `mysql://...` or `mariadb://...`; or to the nodes of
    /// one Galera cluster, `mysql://node1/db,mysql://node2/db,...` ([`crate::nodes`]). Pool
    /// settings apply to each node's pool.
    pub fn builder(url: &str) -> DbBuilder {
        DbBuilder {
            url: url.to_string(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            busy_timeout: Duration::from_millis(DEFAULT_BUSY_TIMEOUT_MS),
            test_before_acquire: true,
            writer_queue: true,
            pooler: None,
        }
    }
}

impl<DB: Database> Db<DB> {
    /// Wraps a pool the application already has, so that contend's transactions, sessions and
    /// strategies run on it and its bodies get the database's own connection type.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
    /// use contend::Db;
    /// use sqlx::SqlitePool;
    /// let pool = SqlitePool::connect("sqlite::memory:").await?;
    /// let db = Db::from_pool(pool)?;
    /// db.execute_script("CREATE TABLE t (v INTEGER)").await?;
    /// db.transaction(|tx| Box::pin(async move {
    ///     // `tx.conn()` is a `&mut SqliteConnection`: any sqlx type binds and decodes.
    ///     sqlx::query("INSERT INTO t VALUES (?)").bind(1_i32).execute(tx.conn()).await?;
    ///     Ok::<_, contend::Error>(())
    /// })).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// The pool's own settings are kept. contend's URL-built SQLite pools also set WAL
    /// journaling, `synchronous = NORMAL`, foreign keys and a busy timeout; a SQLite pool made
    /// elsewhere should do the same for concurrent use.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for an `Any` pool whose URL names no supported backend.
    pub fn from_pool(pool: Pool<DB>) -> Result<Db<DB>> {
        let backend = DB::backend_of(&pool)?;
        let turn_timeout = pool.options().get_acquire_timeout();
        let url = match DB::url_of(&pool) {
            Some(url) => redact_url(&url),
            None => format!("{backend} pool"),
        };
        Ok(Db {
            inner: Arc::new(Inner {
                pool,
                others: Vec::new(),
                next: AtomicUsize::new(0),
                cluster: Cluster::Single,
                backend,
                url,
                busy_timeout_ms: DEFAULT_BUSY_TIMEOUT_MS,
                writer: (backend == Backend::Sqlite).then(|| Writer::new(None)),
                turn_timeout,
                pooler: false,
            }),
        })
    }

    /// Like [`Db::from_pool`] for the nodes of one cluster, one pool per node, in the order
    /// [`Db::acquire`] takes them; and it asks MySQL/MariaDB servers whether they are Galera
    /// nodes ([`Db::cluster`]), which [`Db::from_pool`] (not async) cannot. One pool is fine:
    /// a single Galera node is then recognised as one. Use it for any Galera node: what contend
    /// does differently there (certification conflicts at `COMMIT`, the commit guard of
    /// [`crate::backend::mysql`], the executor's refusals) follows from [`Db::cluster`].
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
    /// use sqlx::MySqlPool;
    /// let mut pools = Vec::new();
    /// for url in ["mysql://app@10.0.0.1/app", "mysql://app@10.0.0.2/app", "mysql://app@10.0.0.3/app"] {
    ///     pools.push(MySqlPool::connect(url).await?);
    /// }
    /// let db = contend::Db::from_pools(pools).await?;
    /// assert!(db.cluster().is_galera());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Db::from_pool`]; [`Error::InvalidUrl`] for no pool, pools of different backends, or
    /// several pools that are not nodes of one Galera cluster; [`Error::Connect`] when a node
    /// cannot be asked.
    ///
    /// # Cancel safety
    /// Dropping the future drops the pools.
    pub async fn from_pools(pools: Vec<Pool<DB>>) -> Result<Db<DB>> {
        let mut pools = pools.into_iter();
        let Some(first) = pools.next() else {
            return Err(Error::InvalidUrl {
                url: String::new(),
                reason: "no pool given".into(),
            });
        };
        let others: Vec<Pool<DB>> = pools.collect();
        let db = Db::from_pool(first)?;
        let backend = db.backend();
        let mut urls = vec![db.url().to_string()];
        for pool in &others {
            let url =
                DB::url_of(pool).map_or_else(|| format!("{backend} pool"), |u| redact_url(&u));
            if DB::backend_of(pool)? != backend {
                return Err(Error::InvalidUrl {
                    url,
                    reason: format!(
                        "the nodes of one database must be of one backend, and the first pool is {backend}"
                    ),
                });
            }
            urls.push(url);
        }
        if !others.is_empty() && backend != Backend::MySql {
            return Err(Error::InvalidUrl {
                url: urls.join(","),
                reason: format!(
                    "several pools are accepted only for the nodes of a MariaDB Galera cluster, not for {backend}"
                ),
            });
        }
        let cluster = if backend == Backend::MySql {
            let mut infos = vec![probe_node(db.pool(), backend, &urls[0]).await?];
            for (pool, url) in others.iter().zip(&urls[1..]) {
                infos.push(probe_node(pool, backend, url).await?);
            }
            nodes::cluster_of(&urls, &infos)?
        } else {
            Cluster::Single
        };
        let inner = Arc::into_inner(db.inner).expect("a Db just made has no clones");
        Ok(Db {
            inner: Arc::new(Inner {
                others,
                cluster,
                url: urls.join(","),
                ..inner
            }),
        })
    }

    /// Whether this `Db` reaches PostgreSQL through a transaction pooler
    /// ([`DbBuilder::transaction_pooler`], [`Db::with_transaction_pooler`]).
    pub fn transaction_pooler(&self) -> bool {
        self.inner.pooler
    }

    /// Marks a `Db` made by [`Db::from_pool`] as reached through a transaction pooler, with
    /// the consequences listed at [`DbBuilder::transaction_pooler`]. Call it right after
    /// `from_pool`: clones made before keep the old setting. The pool must keep no statement
    /// cache: build it with `PgConnectOptions::statement_cache_capacity(0)` (and
    /// `extra_float_digits(None)` if the pooler refuses that startup parameter), and bind
    /// queries run outside a transaction are the application's to keep inside one.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::str::FromStr;
    /// use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    /// let options = PgConnectOptions::from_str("postgres://app@127.0.0.1:6432/app")?
    ///     .statement_cache_capacity(0);
    /// let pool = PgPoolOptions::new().connect_with(options).await?;
    /// let db = contend::Db::from_pool(pool)?.with_transaction_pooler(true)?;
    /// assert!(db.transaction_pooler());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Unsupported`] when `pooler` is asked of a database other than PostgreSQL.
    pub fn with_transaction_pooler(self, pooler: bool) -> Result<Db<DB>> {
        let backend = self.backend();
        if pooler && backend != Backend::Postgres {
            return Err(Error::Unsupported {
                backend,
                what: "a transaction pooler (a PostgreSQL setting)".into(),
            });
        }
        let inner = &self.inner;
        Ok(Db {
            inner: Arc::new(Inner {
                pool: inner.pool.clone(),
                others: inner.others.clone(),
                next: AtomicUsize::new(0),
                cluster: inner.cluster.clone(),
                backend,
                url: inner.url.clone(),
                busy_timeout_ms: inner.busy_timeout_ms,
                writer: inner
                    .writer
                    .as_ref()
                    .map(|w| Writer::new(w.dedicated.clone().zip(w.checkpointer.clone()))),
                turn_timeout: inner.turn_timeout,
                pooler,
            }),
        })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// What this `Db` is connected to: one server, or nodes of a Galera cluster
    /// ([`crate::nodes`]).
    pub fn cluster(&self) -> &Cluster {
        &self.inner.cluster
    }

    /// Every node's pool, the first node's first (one for a single server).
    pub fn pools(&self) -> impl Iterator<Item = &Pool<DB>> {
        std::iter::once(&self.inner.pool).chain(self.inner.others.iter())
    }

    /// Closes every node's pool: waits for the connections in use to come back, closes them all,
    /// and makes further acquisitions fail.
    ///
    /// # Cancel safety
    /// As sqlx's `Pool::close`: dropping the future leaves the pools closed to new acquisitions.
    pub async fn close(&self) {
        if let Some(writer) = &self.inner.writer {
            // The dedicated writer connection goes back (after the write in progress), then
            // its pool closes.
            writer.turn.lock().await.take();
            if let Some(pool) = &writer.dedicated {
                pool.close().await;
            }
            if let Some(pool) = &writer.checkpointer {
                pool.close().await;
            }
        }
        for pool in self.pools() {
            pool.close().await;
        }
    }

    /// On a Galera cluster, waits until every node has applied all that the cluster had
    /// committed when this was called, so that reads on any node see it (a causal read,
    /// `wsrep_sync_wait`, on one connection of each node). Nothing to do on one server, where
    /// it returns at once. Call it between writing on some nodes and reading on others
    /// (after loading data, before checking a result).
    ///
    /// # Errors
    /// A node that cannot be reached, or a wait past the cluster's causal read timeout.
    ///
    /// # Cancel safety
    /// Safe to drop: a connection interrupted mid-statement is closed, not returned.
    pub async fn catch_up(&self) -> Result<()> {
        if !self.inner.cluster.is_galera() {
            return Ok(());
        }
        for pool in self.pools() {
            // Its own connection, closed afterwards: never a pooled one left with the setting.
            let mut conn = pool.acquire().await?;
            conn.close_on_drop();
            DB::execute_raw(
                &mut conn,
                "SET SESSION wsrep_sync_wait = 1; SELECT 1".into(),
            )
            .await?;
        }
        Ok(())
    }

    /// The error of a failed `COMMIT`, classified: on a Galera node a deadlock reported by
    /// `COMMIT` (which takes no row locks, so InnoDB cannot have found one) is a certification
    /// conflict ([`ConflictKind::Certification`]).
    pub(crate) fn commit_error(&self, err: Error) -> Error {
        match err {
            Error::Conflict {
                kind: ConflictKind::Deadlock,
                source,
            } if self.inner.cluster.is_galera() => Error::Conflict {
                kind: ConflictKind::Certification,
                source,
            },
            other => other,
        }
    }

    /// The URL, with its password redacted (the nodes' URLs, comma separated, for a cluster).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The connection pool, for statements outside a transaction (autocommit); over several
    /// nodes, the first node's pool ([`Db::pools`] has them all, [`Db::acquire`] takes them in
    /// turn).
    pub fn pool(&self) -> &Pool<DB> {
        &self.inner.pool
    }

    /// Takes a connection from the pool for autocommit work. Over several nodes, each call
    /// takes the next node in turn (round robin, as a load balancer would).
    ///
    /// # Errors
    /// [`Error::Unavailable`] when none becomes free within the acquire timeout.
    ///
    /// # Cancel safety
    /// Safe to drop: no connection is taken.
    pub async fn acquire(&self) -> Result<PoolConnection<DB>> {
        let pool = if self.inner.others.is_empty() {
            &self.inner.pool
        } else {
            let n = self.inner.others.len() + 1;
            match self.inner.next.fetch_add(1, Ordering::Relaxed) % n {
                0 => &self.inner.pool,
                i => &self.inner.others[i - 1],
            }
        };
        pool.acquire().await.map_err(Error::from)
    }

    /// A query with `?` placeholders rewritten for this backend (see [`Backend::sql`]).
    pub fn query(&self, sql: &str) -> Query<'static, DB, DB::Arguments> {
        sqlx::query(AssertSqlSafe(self.inner.backend.sql(sql).into_owned()))
    }

    /// A single-value query with placeholders rewritten for this backend.
    pub fn query_scalar<O>(&self, sql: &str) -> QueryScalar<'static, DB, O, DB::Arguments>
    where
        (O,): for<'r> sqlx::FromRow<'r, DB::Row>,
    {
        sqlx::query_scalar(AssertSqlSafe(self.inner.backend.sql(sql).into_owned()))
    }

    /// Runs several `;`-separated statements without parameters (schema setup and the like),
    /// always on the first node (so that schema changes and the data loaded after them are
    /// made in order on one node). Over several nodes of a Galera cluster it returns once every
    /// node has applied the script ([`Db::catch_up`]): the next acquisitions take the other
    /// nodes, which would otherwise apply it a little later (a table not there yet: 1146).
    ///
    /// On a SQLite `Db` with a writer queue ([`DbBuilder::writer_queue`]) the script runs in
    /// this process's turn to write, as a write transaction does (on a pooled connection, not
    /// the dedicated writer connection, so that what a script sets on its connection, a
    /// `PRAGMA` or a temporary table, never reaches later writes): it waits for the writers
    /// queued before it instead of meeting them in SQLite's busy handler. The exception is a
    /// script of one `SELECT` statement (a ping such as `SELECT 1`), which cannot write and
    /// runs at once, beside the queue. So do not run a writing script from inside a write
    /// transaction of the same SQLite `Db`: it would wait for the turn that transaction holds
    /// (until the acquire timeout, then a [`ConflictKind::Busy`] conflict; without the queue it
    /// met that transaction's lock in the busy handler instead).
    ///
    /// # Errors
    /// The first statement's error; [`Error::Unavailable`] when no connection becomes free, and
    /// a [`ConflictKind::Busy`] conflict when the SQLite writer's turn does not come, within the
    /// acquire timeout; over several Galera nodes, [`Db::catch_up`]'s errors (the script ran).
    ///
    /// # Cancel safety
    /// Dropped while waiting for a connection or the writer's turn, nothing ran. Dropped
    /// mid-script, the statements that ran stay run (each autocommits unless the script opened
    /// a transaction) and the connection is closed, not pooled. Dropped while waiting for the
    /// other Galera nodes, the script ran.
    pub async fn execute_script(&self, sql: &str) -> Result<()> {
        // The connection first, then the turn (as `writer_turn` asks).
        let conn = self.inner.pool.acquire().await?;
        let _turn = if single_select(sql) {
            None
        } else {
            self.writer_turn(None).await?
        };
        let mut guard = crate::session::CloseUnlessDone(Some(conn));
        let conn = guard.0.as_mut().expect("connection present");
        let result = DB::execute_raw(conn, sql.to_string()).await;
        drop(guard.0.take());
        result.map_err(Error::from)?;
        if !self.inner.others.is_empty() && !single_select(sql) {
            self.catch_up().await?;
        }
        Ok(())
    }

    /// Runs `body` in a new outermost transaction with default options (no retry): commits when
    /// it returns `Ok`, rolls back when it returns `Err`, then runs the `on_commit` hooks.
    ///
    /// The body is called once, so it may move what it captured. It returns the caller's own
    /// error type, any [`TxError`] (such as [`Error`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
    /// let db = contend::Db::connect("sqlite::memory:").await?;
    /// db.execute_script("CREATE TABLE t (v TEXT)").await?;
    /// let note = String::from("moved in, not cloned");
    /// let n = db
    ///     .transaction(|tx| {
    ///         Box::pin(async move {
    ///             let q = tx.query("INSERT INTO t (v) VALUES (?)").bind(note);
    ///             Ok::<_, contend::Error>(q.execute(tx.conn()).await?.rows_affected())
    ///         })
    ///     })
    ///     .await?;
    /// assert_eq!(n, 1);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The body's error; [`Error::NestedTransaction`] when called inside another transaction of
    /// the same task; connection and `BEGIN`/`COMMIT` errors (converted into `E`).
    ///
    /// # Cancel safety
    /// Safe to drop at any await point: a connection whose transaction did not finish is closed,
    /// never returned to the pool, so the server rolls the transaction back and no partial work
    /// becomes visible. Hooks run only after a completed commit; once they have started, they
    /// run to the end in a task of their own even if this future is dropped.
    pub async fn transaction<T, E, F>(&self, body: F) -> Result<T, E>
    where
        T: Send,
        E: TxError,
        F: for<'c> FnOnce(&'c mut Tx<DB>) -> BoxFuture<'c, Result<T, E>> + Send,
    {
        self.attempts(&TxOptions::default(), Once(Some(body)))
            .await
            .result
    }

    /// Like [`Db::transaction`], with options: isolation level, read-only, timeouts and retry.
    /// The body may run again after a conflict, so it is an `FnMut`.
    ///
    /// # Errors
    /// As [`Db::transaction`]; [`Error::Unsupported`] for an option the backend cannot honour.
    ///
    /// # Cancel safety
    /// As [`Db::transaction`].
    pub async fn transaction_with<T, E, F>(&self, options: &TxOptions, body: F) -> Result<T, E>
    where
        T: Send,
        E: TxError,
        F: for<'c> FnMut(&'c mut Tx<DB>) -> BoxFuture<'c, Result<T, E>> + Send,
    {
        self.run(options, body).await.result
    }

    /// A [`Session`]: one connection held for a worker's sequence of operations, as a pgbench
    /// client holds its connection. Saves the round trip that sqlx's pool spends testing every
    /// connection returned to it; the lab's workers use one each.
    pub fn session(&self) -> Session<DB> {
        Session::new(self.clone())
    }

    /// The busy timeout configured for SQLite connections, in milliseconds.
    pub(crate) fn busy_timeout_ms(&self) -> u64 {
        self.inner.busy_timeout_ms
    }

    /// Waits for this process's turn to write, on a SQLite `Db` with a writer queue (`None`
    /// elsewhere): at most `lock_timeout`, else the `Db`'s acquire timeout. Without a dedicated
    /// writer connection the caller writes on its own: take that connection first, then the
    /// turn, never the other way round.
    ///
    /// # Errors
    /// A [`ConflictKind::Busy`] conflict when the wait runs out.
    ///
    /// # Cancel safety
    /// Safe to drop: the turn is not taken.
    pub(crate) async fn writer_turn(
        &self,
        lock_timeout: Option<Duration>,
    ) -> Result<Option<WriterTurn<'_, DB>>> {
        let Some(writer) = &self.inner.writer else {
            return Ok(None);
        };
        let wait = lock_timeout.unwrap_or(self.inner.turn_timeout);
        match tokio::time::timeout(wait, writer.turn.lock()).await {
            Ok(turn) => Ok(Some(turn)),
            Err(_) => Err(Error::Conflict {
                kind: ConflictKind::Busy,
                source: None,
            }),
        }
    }

    /// Counts a write that finished on the dedicated writer connection ([`WriterLease::done`]),
    /// for the background checkpoints.
    ///
    /// Every [`CHECKPOINT_EVERY`] writes, unless one is running, a checkpoint starts on the
    /// checkpointer connection in a task of its own: a passive checkpoint alongside the writer
    /// (it copies what no reader still needs from the WAL into the database file and syncs it
    /// while writes go on appending to the WAL). When the WAL then holds [`CATCH_UP_FRAMES`]
    /// or more, one more passive checkpoint runs with the write turn held: it copies only what
    /// was appended meanwhile and so catches up, letting the next write start the WAL over (a
    /// checkpoint that never catches up would let it grow forever). Below that, the rest is
    /// checkpointed at the writer queue's next idle moment, without the turn ([`idle_catch_up`]),
    /// so that the WAL starts over between bursts of writes and no write waits for it.
    pub(crate) fn wrote(&self) {
        let Some(writer) = &self.inner.writer else {
            return;
        };
        if writer.checkpointer.is_none()
            || writer.writes.fetch_add(1, Ordering::Relaxed) + 1 < CHECKPOINT_EVERY
            || writer.checkpointing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        writer.writes.store(0, Ordering::Relaxed);
        let db = self.clone();
        tokio::spawn(async move {
            let Some(writer) = &db.inner.writer else {
                return;
            };
            let Some(pool) = &writer.checkpointer else {
                return;
            };
            let checkpoint = async {
                let (_, frames, _) = passive_checkpoint(pool).await?;
                if frames >= CATCH_UP_FRAMES {
                    let _turn = writer.turn.lock().await;
                    passive_checkpoint(pool).await?;
                } else {
                    idle_catch_up(writer, pool).await?;
                }
                Ok::<_, sqlx::Error>(())
            };
            if let Err(e) = checkpoint.await
                && !pool.is_closed()
            {
                // The next one retries; SQLite's WAL keeps everything meanwhile.
                tracing::warn!(error = %e, "background WAL checkpoint failed");
            }
            writer.checkpointing.store(false, Ordering::Release);
        });
    }

    /// A write on the dedicated writer connection, when this `Db` has one (`None` elsewhere):
    /// waits for this process's turn to write (as [`Db::writer_turn`]) and takes the writer
    /// connection from it, opening one if there is none (the first write, or the last one did
    /// not finish cleanly and closed it). The lease gives the connection back to the turn and
    /// counts the write with [`WriterLease::done`]; dropped without it, it closes the connection
    /// it holds (the work on it did not finish cleanly) and releases the turn.
    ///
    /// # Errors
    /// A [`ConflictKind::Busy`] conflict when the wait for the turn runs out; the connection
    /// cannot be opened within the acquire timeout.
    ///
    /// # Cancel safety
    /// Safe to drop: the turn is released and the connection, when it was taken, goes back to it.
    pub(crate) async fn writer_lease(
        &self,
        lock_timeout: Option<Duration>,
    ) -> Result<Option<WriterLease<'_, DB>>> {
        let Some(dedicated) = self
            .inner
            .writer
            .as_ref()
            .and_then(|w| w.dedicated.as_ref())
        else {
            return Ok(None);
        };
        let mut turn = self
            .writer_turn(lock_timeout)
            .await?
            .expect("a dedicated writer has a turn");
        let conn = match turn.take() {
            Some(conn) => conn,
            // Dropping this future while the connection opens leaves the turn empty, as it was.
            None => dedicated.acquire().await?,
        };
        Ok(Some(WriterLease {
            db: self,
            turn,
            conn: Some(conn),
        }))
    }

    /// Like [`Db::transaction_with`], and reports how many attempts it took and which conflicts
    /// made it retry (the lab and metrics read these).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
    /// use contend::{Db, RetryPolicy, TxOptions};
    /// let db = Db::connect("sqlite::memory:").await?;
    /// let options = TxOptions::new().retry(RetryPolicy::new().max_attempts(5));
    /// let run = db.run(&options, |_tx| Box::pin(async { Ok::<_, contend::Error>(42) })).await;
    /// assert_eq!(run.result?, 42);
    /// assert_eq!(run.attempts, 1);
    /// assert!(run.conflicts.is_empty());
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// As [`Db::transaction`].
    pub async fn run<T, E, F>(&self, options: &TxOptions, body: F) -> Attempted<T, E>
    where
        T: Send,
        E: TxError,
        F: for<'c> FnMut(&'c mut Tx<DB>) -> BoxFuture<'c, Result<T, E>> + Send,
    {
        self.attempts(options, Again(body)).await
    }

    async fn attempts<T, E, B>(&self, options: &TxOptions, body: B) -> Attempted<T, E>
    where
        T: Send,
        E: TxError,
        B: tx::Body<DB, T, E>,
    {
        tx::run(self, None, options, body).await
    }
}

#[cfg(test)]
mod tests {
    use super::single_select;

    #[test]
    fn only_one_select_skips_the_writer_turn() {
        for ping in [
            "SELECT 1",
            "select 1;",
            "  SELECT\n count(*) FROM t  ",
            "Select\t1",
        ] {
            assert!(single_select(ping), "{ping:?}");
        }
        for write in [
            "SELECT 1; DELETE FROM t",
            "INSERT INTO t VALUES (1)",
            "WITH x AS (SELECT 1) DELETE FROM t",
            "-- ping\nSELECT 1",
            "SELECTED",
            "SELECT",
            "PRAGMA user_version = 3",
            "",
        ] {
            assert!(!single_select(write), "{write:?}");
        }
    }
}
