//! Concurrency control for request handlers: the right transaction, lock or retry, so that two
//! requests racing for the same row neither lose an update nor break an invariant.
//!
//! # Brief overview
//! - [`Db`] is a pooled handle for SQLite, PostgreSQL or MySQL/MariaDB: made from the
//!   application's own typed pool ([`Db::from_pool`]; transaction bodies then get its
//!   connection type, `&mut PgConnection` in a `Tx<sqlx::Postgres>`), or chosen by URL
//!   ([`Db::connect`], a `Db<sqlx::Any>`). Each database is a cargo feature.
//! - [`strategy::Executor`] runs one read-decide-write ([`strategy::Operation`]) under any
//!   [`strategy::Strategy`], including locks outside the database ([`lock`]) and batching
//!   ([`batch`]); [`idempotency`] keeps the outcome of keyed requests in the business
//!   transaction.
//! - [`Db::transaction`] runs a closure in the outermost transaction; [`Tx::savepoint`] nests;
//!   [`Tx::on_commit`] defers side effects until the commit; [`TxOptions`] sets the
//!   [`IsolationLevel`], timeouts and a [`RetryPolicy`] for conflicts ([`ConflictKind`]).
//! - Functions that must run inside a transaction take `&mut Tx` (see [`tx`]).
//! - One `Db` can spread its connections over the nodes of a Galera cluster ([`nodes`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
//! use contend::{Db, RetryPolicy, TxOptions};
//! let db = Db::connect("sqlite::memory:").await?;
//! db.execute_script("CREATE TABLE account (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
//!                    INSERT INTO account VALUES (1, 100)").await?;
//! // Withdraw 30 only if the balance allows it: one conditional UPDATE, no lost update.
//! let options = TxOptions::new().retry(RetryPolicy::new());
//! let applied = db.transaction_with(&options, |tx| Box::pin(async move {
//!     let q = tx.query("UPDATE account SET balance = balance - ? WHERE id = ? AND balance >= ?")
//!         .bind(30_i64).bind(1_i64).bind(30_i64);
//!     Ok::<_, contend::Error>(q.execute(tx.conn()).await?.rows_affected() == 1)
//! })).await?;
//! assert!(applied);
//! # Ok(()) }
//! ```
//!
//! # Closures and `Send`
//! Transaction bodies have sqlx's shape, `|tx| Box::pin(async move { .. })`, because async
//! closures (`AsyncFnMut`) do not yet produce `Send` futures on stable Rust, and axum handlers and
//! `tokio::spawn` need `Send`.

pub mod backend;
pub mod batch;
pub mod db;
pub mod error;
pub mod fencing;
pub mod idempotency;
pub mod isolation;
pub mod lock;
pub mod nodes;
pub mod retry;
pub mod session;
pub mod strategy;
pub mod tx;

pub use backend::{Backend, Database, RowLock};
pub use db::{Db, DbBuilder};
pub use error::{BoxError, ConflictKind, Error, Result};
pub use futures_util::future::BoxFuture;
pub use isolation::IsolationLevel;
pub use retry::RetryPolicy;
pub use session::Session;
pub use tx::{Attempted, Tx, TxError, TxOptions};
