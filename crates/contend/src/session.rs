//! [`Session`]: one pooled connection held across many operations of one worker, with the same
//! transaction API and cancellation safety as [`crate::Db`].
//!
//! Every connection returned to sqlx's pool is tested with a round trip before it can be reused.
//! For a worker that runs thousands of short operations in a row (a lab worker, a queue
//! consumer), that round trip is a large share of each operation: a session keeps its connection
//! instead, the way a pgbench client does.

use futures_util::future::BoxFuture;
use sqlx::Any;
use sqlx::pool::PoolConnection;

use crate::backend::Database;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::tx::{self, Again, Attempted, Once, Tx, TxError, TxOptions};

/// A connection held by one worker. Made by [`Db::session`].
///
/// The connection is acquired on first use and kept. When an operation on it is cancelled
/// halfway, the connection is closed rather than kept, and the next operation acquires a fresh
/// one, so a session never runs anything on a connection in an unknown state.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
/// let db = contend::Db::connect("sqlite::memory:").await?;
/// db.execute_script("CREATE TABLE t (v INTEGER)").await?;
/// let mut session = db.session();
/// for v in 0..3_i64 {
///     session
///         .transaction(move |tx| Box::pin(async move {
///             tx.query("INSERT INTO t VALUES (?)").bind(v).execute(tx.conn()).await?;
///             Ok::<_, contend::Error>(())
///         }))
///         .await?;
/// }
/// let q = db.query("SELECT COUNT(*) FROM t");
/// let n: i64 = session
///     .autocommit(|conn| Box::pin(async move { Ok::<_, contend::Error>(sqlx::Row::get(&q.fetch_one(conn).await?, 0)) }))
///     .await?;
/// assert_eq!(n, 3);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Session<DB: Database = Any> {
    db: Db<DB>,
    conn: Option<PoolConnection<DB>>,
}

/// Closes the connection unless the operation finished (take it out of the guard when it did).
pub(crate) struct CloseUnlessDone<DB: Database>(pub(crate) Option<PoolConnection<DB>>);

impl<DB: Database> Drop for CloseUnlessDone<DB> {
    fn drop(&mut self) {
        if let Some(conn) = self.0.as_mut() {
            conn.close_on_drop();
        }
    }
}

impl<DB: Database> Session<DB> {
    pub(crate) fn new(db: Db<DB>) -> Session<DB> {
        Session { db, conn: None }
    }

    /// The database this session belongs to.
    pub fn db(&self) -> &Db<DB> {
        &self.db
    }

    /// Gives the held connection back to the pool (which tests it before its next use); the
    /// next operation acquires one again. For a worker about to wait (for a lock, say) without
    /// needing its connection meanwhile.
    pub fn release(&mut self) {
        self.conn = None;
    }

    /// Runs statements outside a transaction (each its own autocommit) on the held connection.
    /// For statements that write, use [`Session::write_autocommit`], which on a SQLite `Db`
    /// runs them in the writer's turn; here they run beside the writer queue.
    ///
    /// Behind a transaction pooler ([`crate::DbBuilder::transaction_pooler`]) the body runs
    /// inside `BEGIN` ... `COMMIT` instead (`ROLLBACK` when it fails): only a transaction keeps
    /// a statement's prepare and execute round trips on one server connection.
    ///
    /// # Errors
    /// [`crate::Error::Unavailable`] when no connection can be acquired; the body's error.
    ///
    /// # Cancel safety
    /// Safe to drop: a connection whose statement was interrupted is closed, not kept.
    pub async fn autocommit<T, E, F>(&mut self, body: F) -> Result<T, E>
    where
        E: From<Error>,
        F: for<'c> FnOnce(&'c mut DB::Connection) -> BoxFuture<'c, Result<T, E>>,
    {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.db.acquire().await?,
        };
        let mut guard = CloseUnlessDone(Some(conn));
        let conn = guard.0.as_mut().expect("connection present");
        let (result, fit) = pinned(&self.db, conn, body).await;
        if fit {
            self.conn = guard.0.take();
        }
        result
    }

    /// Runs statements that write outside a transaction (each its own autocommit), in this
    /// process's turn to write: [`Session::autocommit`] for writes.
    ///
    /// On a SQLite `Db` with a writer queue ([`crate::DbBuilder::writer_queue`]) the body runs
    /// in the queue, as a write transaction does: on the dedicated writer connection when the
    /// `Db` has one, else on the held connection with the turn held. A write through
    /// [`Session::autocommit`] instead runs on the session's own connection beside the queue:
    /// it meets the queue's writer in SQLite's busy handler, which sleeps 1, 2, 5, 10, ... ms
    /// and holds up every queued writer behind it. Elsewhere this is [`Session::autocommit`].
    /// The turn is waited for at most the `Db`'s acquire timeout.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
    /// let db = contend::Db::connect("sqlite::memory:").await?;
    /// db.execute_script("CREATE TABLE seen (v INTEGER)").await?;
    /// let mut session = db.session();
    /// let insert = db.query("INSERT INTO seen VALUES (?)").bind(7_i64);
    /// let n = session
    ///     .write_autocommit(|conn| Box::pin(async move {
    ///         Ok::<_, contend::Error>(insert.execute(conn).await?.rows_affected())
    ///     }))
    ///     .await?;
    /// assert_eq!(n, 1);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// A [`crate::ConflictKind::Busy`] conflict when the turn does not come within the acquire
    /// timeout; as [`Session::autocommit`].
    ///
    /// # Cancel safety
    /// Safe to drop: the turn is released, and a connection whose statement was interrupted is
    /// closed, not kept.
    pub async fn write_autocommit<T, E, F>(&mut self, body: F) -> Result<T, E>
    where
        T: Send,
        E: From<Error> + Send,
        F: for<'c> FnOnce(&'c mut DB::Connection) -> BoxFuture<'c, Result<T, E>> + Send + 'static,
    {
        self.write_autocommit_within(None, body).await
    }

    /// [`Session::write_autocommit`], waiting for the turn at most `lock_timeout` (else the
    /// acquire timeout): the executor's one-statement `atomic`.
    ///
    /// # Errors
    /// A [`crate::ConflictKind::Busy`] conflict when the turn does not come within
    /// `lock_timeout` (else the acquire timeout); as [`Session::autocommit`].
    ///
    /// # Cancel safety
    /// As [`Session::write_autocommit`].
    pub(crate) async fn write_autocommit_within<T, E, F>(
        &mut self,
        lock_timeout: Option<std::time::Duration>,
        body: F,
    ) -> Result<T, E>
    where
        T: Send,
        E: From<Error> + Send,
        F: for<'c> FnOnce(&'c mut DB::Connection) -> BoxFuture<'c, Result<T, E>> + Send + 'static,
    {
        let db = self.db.clone();
        if let Some(mut lease) = db.writer_lease(lock_timeout).await? {
            let result = body(lease.conn()).await;
            lease.done();
            return result;
        }
        self.autocommit(move |conn| {
            Box::pin(async move {
                let _turn = db.writer_turn(lock_timeout).await?;
                body(conn).await
            })
        })
        .await
    }

    /// Like [`Db::transaction`], on the held connection.
    ///
    /// # Errors
    /// As [`Db::transaction`].
    ///
    /// # Cancel safety
    /// As [`Db::transaction`]: an unfinished transaction's connection is closed, never kept.
    pub async fn transaction<T, E, F>(&mut self, body: F) -> Result<T, E>
    where
        T: Send,
        E: TxError,
        F: for<'c> FnOnce(&'c mut Tx<DB>) -> BoxFuture<'c, Result<T, E>> + Send,
    {
        self.attempts(&TxOptions::default(), Once(Some(body)))
            .await
            .result
    }

    /// Like [`Db::transaction_with`], on the held connection.
    ///
    /// # Errors
    /// As [`Db::transaction_with`].
    ///
    /// # Cancel safety
    /// As [`Db::transaction`].
    pub async fn transaction_with<T, E, F>(&mut self, options: &TxOptions, body: F) -> Result<T, E>
    where
        T: Send,
        E: TxError,
        F: for<'c> FnMut(&'c mut Tx<DB>) -> BoxFuture<'c, Result<T, E>> + Send,
    {
        self.run(options, body).await.result
    }

    /// Like [`Db::run`], on the held connection.
    ///
    /// # Cancel safety
    /// As [`Db::transaction`].
    pub async fn run<T, E, F>(&mut self, options: &TxOptions, body: F) -> Attempted<T, E>
    where
        T: Send,
        E: TxError,
        F: for<'c> FnMut(&'c mut Tx<DB>) -> BoxFuture<'c, Result<T, E>> + Send,
    {
        self.attempts(options, Again(body)).await
    }

    async fn attempts<T, E, B>(&mut self, options: &TxOptions, body: B) -> Attempted<T, E>
    where
        T: Send,
        E: TxError,
        B: tx::Body<DB, T, E>,
    {
        tx::run(&self.db, Some(&mut self.conn), options, body).await
    }
}

/// What clears a PostgreSQL server connection's prepared statements, run behind a transaction
/// pooler in the same round trip as `BEGIN`, `COMMIT` and `ROLLBACK`.
pub(crate) const POOLER_RESET: &str = "DEALLOCATE ALL";

/// Runs `body` on `conn` as autocommit work: as it is, or behind a transaction pooler inside
/// `BEGIN` ... `COMMIT` (`ROLLBACK` when it fails), each with [`POOLER_RESET`]. Returns the
/// body's result and whether the connection is fit for reuse (`false` after a failed `COMMIT`
/// or `ROLLBACK`: the caller must not keep or pool it).
pub(crate) async fn pinned<DB, T, E, F>(
    db: &Db<DB>,
    conn: &mut DB::Connection,
    body: F,
) -> (Result<T, E>, bool)
where
    DB: Database,
    E: From<Error>,
    F: for<'c> FnOnce(&'c mut DB::Connection) -> BoxFuture<'c, Result<T, E>>,
{
    if !db.transaction_pooler() {
        return (body(conn).await, true);
    }
    if let Err(e) = DB::execute_raw(conn, format!("BEGIN; {POOLER_RESET}")).await {
        return (Err(Error::from(e).into()), false);
    }
    let result = body(&mut *conn).await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    match DB::execute_raw(conn, format!("{end}; {POOLER_RESET}")).await {
        Ok(()) => (result, true),
        Err(e) => match result {
            Ok(_) => (Err(Error::from(e).into()), false),
            Err(body_error) => (Err(body_error), false),
        },
    }
}

/// [`pinned`] on a pooled connection, which is closed instead of pooled when it is not fit.
pub(crate) async fn pinned_pooled<DB, T, E, F>(
    db: &Db<DB>,
    conn: &mut PoolConnection<DB>,
    body: F,
) -> Result<T, E>
where
    DB: Database,
    E: From<Error>,
    F: for<'c> FnOnce(&'c mut DB::Connection) -> BoxFuture<'c, Result<T, E>>,
{
    let (result, fit) = pinned(db, conn, body).await;
    if !fit {
        conn.close_on_drop();
    }
    result
}

/// `future`'s database error converted into [`Error`] (classified).
pub(crate) fn classified<'c, T: Send + 'c>(
    future: BoxFuture<'c, Result<T, sqlx::Error>>,
) -> BoxFuture<'c, Result<T>> {
    Box::pin(async move { future.await.map_err(Error::from) })
}
