//! [`Session`]: one pooled connection held across many operations of one worker, with the same
//! transaction API and cancellation safety as [`crate::Db`].
//!
//! Every connection returned to sqlx's pool is tested with a round trip before it can be reused.
//! For a worker that runs thousands of short operations in a row (a lab worker, a queue
//! consumer), that round trip is a large share of each operation: a session keeps its connection
//! instead, the way a pgbench client does.

use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection};

use crate::db::Db;
use crate::error::Result;
use crate::tx::{self, Attempted, Tx, TxOptions};

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
///             Ok(())
///         }))
///         .await?;
/// }
/// let q = db.query("SELECT COUNT(*) FROM t");
/// let n: i64 = session
///     .autocommit(|conn| Box::pin(async move { Ok(sqlx::Row::get(&q.fetch_one(conn).await?, 0)) }))
///     .await?;
/// assert_eq!(n, 3);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Session {
    db: Db,
    conn: Option<PoolConnection<Any>>,
}

/// Closes the connection unless the operation finished.
struct CloseUnlessDone(Option<PoolConnection<Any>>);

impl Drop for CloseUnlessDone {
    fn drop(&mut self) {
        if let Some(conn) = self.0.as_mut() {
            conn.close_on_drop();
        }
    }
}

impl Session {
    pub(crate) fn new(db: Db) -> Session {
        Session { db, conn: None }
    }

    /// The database this session belongs to.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Runs statements outside a transaction (each its own autocommit) on the held connection.
    ///
    /// # Errors
    /// [`crate::Error::Unavailable`] when no connection can be acquired; the body's error.
    ///
    /// # Cancel safety
    /// Safe to drop: a connection whose statement was interrupted is closed, not kept.
    pub async fn autocommit<T, F>(&mut self, body: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Result<T>>,
    {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.db.acquire().await?,
        };
        let mut guard = CloseUnlessDone(Some(conn));
        let result = body(guard.0.as_mut().expect("connection present")).await;
        self.conn = guard.0.take();
        result
    }

    /// Like [`Db::transaction`], on the held connection.
    ///
    /// # Errors
    /// As [`Db::transaction`].
    ///
    /// # Cancel safety
    /// As [`Db::transaction`]: an unfinished transaction's connection is closed, never kept.
    pub async fn transaction<T, F>(&mut self, body: F) -> Result<T>
    where
        T: Send,
        F: for<'c> FnMut(&'c mut Tx) -> BoxFuture<'c, Result<T>> + Send,
    {
        self.run(&TxOptions::default(), body).await.result
    }

    /// Like [`Db::run`], on the held connection.
    ///
    /// # Cancel safety
    /// As [`Db::transaction`].
    pub async fn run<T, F>(&mut self, options: &TxOptions, body: F) -> Attempted<T>
    where
        T: Send,
        F: for<'c> FnMut(&'c mut Tx) -> BoxFuture<'c, Result<T>> + Send,
    {
        let mut options = options.clone();
        options.session_busy_timeout_ms = Some(self.db.busy_timeout_ms());
        let backend = self.db.backend();
        tx::run(
            self.db.pool(),
            Some(&mut self.conn),
            backend,
            &options,
            body,
        )
        .await
    }
}
