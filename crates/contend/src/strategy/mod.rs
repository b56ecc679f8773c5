//! The concurrency-control strategies, side by side: which ones exist, which backends can run
//! each, and which are safe. The building blocks live in the submodules.
//!
//! | strategy | prevents lost updates by | SQLite | PostgreSQL | MySQL/MariaDB | PostgreSQL via pgbouncer | Galera (several nodes) |
//! |---|---|---|---|---|---|---|
//! | `none` | nothing (unsafe baseline) | yes | yes | yes | yes | yes (baseline) |
//! | `mutex` | an in-process lock per key: one process only | yes | yes | yes | yes | no (refused) |
//! | `atomic` | a conditional `UPDATE` computed in the database | yes | yes | yes | yes | yes |
//! | `pessimistic` | row locks taken before reading, in canonical order | yes (`BEGIN IMMEDIATE`) | yes (`FOR UPDATE`) | yes (`FOR UPDATE`) | yes (`FOR UPDATE`) | yes |
//! | `optimistic` | a version column checked by the write, retried | yes | yes | yes | yes | yes |
//! | `serializable` | SERIALIZABLE isolation, retried | yes | yes | yes | yes | no (refused) |
//! | `advisory` | a database advisory lock per key | no | yes (`pg_advisory_xact_lock`) | yes (`GET_LOCK`) | yes (`pg_advisory_xact_lock`) | no (refused) |
//! | `redis` | a Redis lock with a fencing token | yes | yes | yes | yes | yes |
//! | `redis-spin` | a Redis `SET NX` spin lock (slow baseline) | yes | yes | yes | yes | yes |
//! | `redlock` | a Redis quorum lock with a fencing token | yes | yes | yes | yes | yes |
//! | `etcd` | an etcd lock (lease, waiters woken by a watch) fenced by its key's revision | yes | yes | yes | yes | yes |
//! | `batched` | concurrent operations on the same keys combined into one transaction under row locks ([`crate::batch`]) | yes | yes | yes | yes | yes |
//!
//! "yes"/"no" is what [`Executor::check`] allows (the lock-service strategies with a
//! [`crate::lock::LockService`] configured; on Galera also what [`Executor::check_db`] refuses
//! there, [`crate::nodes::Cluster::unsafe_strategy`]); the crate's test `support_table.rs` keeps this
//! table and README's in step with it. "PostgreSQL via pgbouncer" is a [`crate::Db`] told it is
//! behind a transaction pooler ([`crate::DbBuilder::transaction_pooler`], `?pgbouncer=true`):
//! its transactions are what the pooler keeps on one server connection, so every strategy runs
//! there; [`advisory::SessionLock`] is refused.
//!
//! # Running an operation under any strategy
//! [`Executor::run`] runs an [`Operation`] (keys, a read, a decision and write, optionally a
//! conditional statement) under the [`Strategy`] chosen at run time: write the operation once,
//! and every strategy in the table above is available for it.
//!
//! # Building blocks
//! - [`atomic`]: conditional `UPDATE` with in-database arithmetic ([`atomic::Counter`]).
//! - [`pessimistic`]: row locks, and [`pessimistic::LockTarget::lock_many`], which locks several
//!   rows in one canonical order so that opposite transfers cannot deadlock.
//! - [`optimistic`]: a version column checked by the write ([`optimistic::Versioned`]).
//! - [`serializable`]: SERIALIZABLE isolation with retry ([`serializable::options`]).
//! - [`advisory`]: database advisory locks, transaction- and session-scoped.
//! - [`mutex`]: an in-process async mutex per key ([`mutex::KeyedMutex`]).
//! - [`get_or_create`]: create-or-find that neither raises on the race nor creates two rows.
//!
//! Table and column names are passed as [`Ident`]s, checked once, so that no building block
//! splices unchecked text into SQL.

pub mod advisory;
pub mod atomic;
mod executor;
pub mod get_or_create;
pub mod mutex;
pub mod optimistic;
pub mod pessimistic;
pub mod serializable;

use std::fmt;
use std::str::FromStr;

use futures_util::future::BoxFuture;
use sqlx::Any;
use sqlx::any::AnyArguments;
use sqlx::query::Query;

use crate::backend::{Backend, Database};

pub use executor::{Executed, Executor, Operation};

/// A checked SQL identifier (a table or column name): ASCII letters, digits and `_`, not
/// starting with a digit, 1 to 63 characters. Safe to splice into SQL unquoted.
///
/// ```
/// use contend::strategy::Ident;
/// assert_eq!(Ident::new("account_1").unwrap().as_str(), "account_1");
/// assert!(Ident::new("account; DROP TABLE x").is_err());
/// assert!(Ident::new("").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(String);

/// The error of [`Ident::new`] for a name that is not a plain SQL identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid SQL identifier `{0}`: use 1 to 63 ASCII letters, digits or `_`, not starting with a digit"
)]
pub struct InvalidIdent(pub String);

impl Ident {
    /// Checks `name`.
    ///
    /// # Errors
    /// [`InvalidIdent`] when `name` is empty, too long, starts with a digit or contains anything
    /// but ASCII letters, digits and `_`.
    pub fn new(name: &str) -> Result<Ident, InvalidIdent> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && !name.as_bytes()[0].is_ascii_digit()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if ok {
            Ok(Ident(name.to_string()))
        } else {
            Err(InvalidIdent(name.to_string()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Ident {
    type Err = InvalidIdent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ident::new(s)
    }
}

/// A value to bind to a statement built by a building block (a column default, a new value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A `BIGINT`.
    Int(i64),
    /// A text value.
    Text(String),
    /// SQL `NULL`.
    Null,
}

impl Value {
    /// Binds this value as the next parameter of `query`.
    pub fn bind_to(
        &self,
        query: Query<'static, Any, AnyArguments>,
    ) -> Query<'static, Any, AnyArguments> {
        match self {
            Value::Int(v) => query.bind(*v),
            Value::Text(v) => query.bind(v.clone()),
            Value::Null => query.bind(Option::<i64>::None),
        }
    }
}

/// The few statements the building blocks ([`atomic`], [`pessimistic`], [`optimistic`],
/// [`get_or_create`]) run on a database's own connection: implemented for every sqlx database
/// contend supports (`sqlx::Postgres`, `sqlx::MySql`, `sqlx::Sqlite`, each behind its cargo
/// feature, and `sqlx::Any`). Users never call it; it is what lets a building block take a
/// `Tx<sqlx::Postgres>` and a `uuid::Uuid` key as well as a `Tx` (Any) and an `i64`.
///
/// Keys are any type sqlx can bind for the database: the building blocks take
/// `K: sqlx::Encode<'k, DB> + sqlx::Type<DB> + Send`.
pub trait BlockDatabase: Database {
    /// Binds `value` as the next parameter of `query`.
    fn bind_value<'q>(
        query: Query<'q, Self, <Self as sqlx::Database>::Arguments>,
        value: &Value,
    ) -> Query<'q, Self, <Self as sqlx::Database>::Arguments>;

    /// Runs `query` on `conn` and returns the number of rows it affected.
    ///
    /// # Cancel safety
    /// As sqlx's `execute`: if dropped, the statement may or may not have run.
    fn execute_query<'c, 'q: 'c>(
        conn: &'c mut Self::Connection,
        query: Query<'q, Self, <Self as sqlx::Database>::Arguments>,
    ) -> BoxFuture<'c, Result<u64, sqlx::Error>>;

    /// Runs `query` on `conn` and returns its first row, if any.
    ///
    /// # Cancel safety
    /// As sqlx's `fetch_optional`.
    fn fetch_optional_query<'c, 'q: 'c>(
        conn: &'c mut Self::Connection,
        query: Query<'q, Self, <Self as sqlx::Database>::Arguments>,
    ) -> BoxFuture<'c, Result<Option<Self::Row>, sqlx::Error>>;

    /// Runs an `INSERT` on `conn` and returns the rows it affected and the id the database
    /// generated, where the driver reports one (MySQL's `LAST_INSERT_ID()`, SQLite's rowid;
    /// `None` on PostgreSQL, which has `RETURNING`).
    ///
    /// # Cancel safety
    /// As sqlx's `execute`.
    fn execute_insert<'c, 'q: 'c>(
        conn: &'c mut Self::Connection,
        query: Query<'q, Self, <Self as sqlx::Database>::Arguments>,
    ) -> BoxFuture<'c, Result<(u64, Option<i64>), sqlx::Error>>;

    /// Column `index` of `row` as an `i64` (a `BIGINT`).
    ///
    /// # Errors
    /// sqlx's decoding error.
    fn get_i64(row: &Self::Row, index: usize) -> Result<i64, sqlx::Error>;
}

macro_rules! impl_block_database {
    ($db:ty, last_insert_id: |$done:ident| $last:expr) => {
        impl BlockDatabase for $db {
            fn bind_value<'q>(
                query: Query<'q, Self, <Self as sqlx::Database>::Arguments>,
                value: &Value,
            ) -> Query<'q, Self, <Self as sqlx::Database>::Arguments> {
                match value {
                    Value::Int(v) => query.bind(*v),
                    Value::Text(v) => query.bind(v.clone()),
                    Value::Null => query.bind(Option::<i64>::None),
                }
            }

            fn execute_query<'c, 'q: 'c>(
                conn: &'c mut Self::Connection,
                query: Query<'q, Self, <Self as sqlx::Database>::Arguments>,
            ) -> BoxFuture<'c, Result<u64, sqlx::Error>> {
                Box::pin(async move { Ok(query.execute(conn).await?.rows_affected()) })
            }

            fn fetch_optional_query<'c, 'q: 'c>(
                conn: &'c mut Self::Connection,
                query: Query<'q, Self, <Self as sqlx::Database>::Arguments>,
            ) -> BoxFuture<'c, Result<Option<Self::Row>, sqlx::Error>> {
                Box::pin(query.fetch_optional(conn))
            }

            fn execute_insert<'c, 'q: 'c>(
                conn: &'c mut Self::Connection,
                query: Query<'q, Self, <Self as sqlx::Database>::Arguments>,
            ) -> BoxFuture<'c, Result<(u64, Option<i64>), sqlx::Error>> {
                Box::pin(async move {
                    let $done = query.execute(conn).await?;
                    Ok(($done.rows_affected(), $last))
                })
            }

            fn get_i64(row: &Self::Row, index: usize) -> Result<i64, sqlx::Error> {
                sqlx::Row::try_get(row, index)
            }
        }
    };
}

#[cfg(feature = "postgres")]
impl_block_database!(sqlx::Postgres, last_insert_id: |done| {
    let _ = &done;
    None
});
#[cfg(feature = "mysql")]
impl_block_database!(sqlx::MySql, last_insert_id: |done| i64::try_from(done.last_insert_id()).ok());
#[cfg(feature = "sqlite")]
impl_block_database!(sqlx::Sqlite, last_insert_id: |done| Some(done.last_insert_rowid()));
impl_block_database!(sqlx::Any, last_insert_id: |done| done.last_insert_id());

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

/// A concurrency-control strategy, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Strategy {
    /// Read, decide in Rust, write in separate statements: the classic lost update.
    None,
    /// An in-process async mutex per key: safe in one process, unsafe across several.
    Mutex,
    /// Conditional `UPDATE ... WHERE balance >= ?` whose row count says whether it applied.
    Atomic,
    /// Row locks (`SELECT ... FOR UPDATE`) in canonical order; SQLite: `BEGIN IMMEDIATE`.
    Pessimistic,
    /// Version column checked by `UPDATE ... WHERE version = ?`, retried on conflict.
    Optimistic,
    /// The whole read-decide-write at SERIALIZABLE, retried on serialization failure.
    Serializable,
    /// Database advisory lock per key (PostgreSQL, MySQL/MariaDB).
    Advisory,
    /// Single-node Redis lock with pub/sub waiting and a fencing token.
    Redis,
    /// Redis `SET NX` polled in a loop: the baseline the `redis` lock is measured against.
    RedisSpin,
    /// Redlock over several Redis nodes, with a fencing token.
    Redlock,
    /// An etcd lock (lease with keepalive, waiters ordered by create revision and woken by a
    /// watch), fenced by its key's create revision (`contend-etcd`).
    Etcd,
    /// Concurrent operations on the same keys combined into one transaction, each under row
    /// locks and its own savepoint, one commit for all ([`crate::batch`]).
    Batched,
}

impl Strategy {
    /// Every strategy, baseline first.
    pub const ALL: [Strategy; 12] = [
        Strategy::None,
        Strategy::Mutex,
        Strategy::Atomic,
        Strategy::Pessimistic,
        Strategy::Optimistic,
        Strategy::Serializable,
        Strategy::Advisory,
        Strategy::Redis,
        Strategy::RedisSpin,
        Strategy::Redlock,
        Strategy::Etcd,
        Strategy::Batched,
    ];

    /// The name used on the command line, in HTTP headers and in reports.
    ///
    /// ```
    /// use contend::strategy::Strategy;
    /// assert_eq!(Strategy::RedisSpin.as_str(), "redis-spin");
    /// assert_eq!("pessimistic".parse::<Strategy>().unwrap(), Strategy::Pessimistic);
    /// assert!("bogus".parse::<Strategy>().is_err());
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::Mutex => "mutex",
            Strategy::Atomic => "atomic",
            Strategy::Pessimistic => "pessimistic",
            Strategy::Optimistic => "optimistic",
            Strategy::Serializable => "serializable",
            Strategy::Advisory => "advisory",
            Strategy::Redis => "redis",
            Strategy::RedisSpin => "redis-spin",
            Strategy::Redlock => "redlock",
            Strategy::Etcd => "etcd",
            Strategy::Batched => "batched",
        }
    }

    /// Whether the strategy claims to keep invariants when several requests race in one
    /// process. (`mutex` does; across processes it does not, see [`Strategy::safe_across_processes`].)
    pub fn expected_safe(self) -> bool {
        !matches!(self, Strategy::None)
    }

    /// Whether the strategy keeps invariants when several processes share the database.
    pub fn safe_across_processes(self) -> bool {
        !matches!(self, Strategy::None | Strategy::Mutex)
    }

    /// Whether the strategy needs Redis (`--redis-url` or `--redlock-urls`).
    pub fn needs_redis(self) -> bool {
        matches!(
            self,
            Strategy::Redis | Strategy::RedisSpin | Strategy::Redlock
        )
    }

    /// Whether the strategy takes its locks from a [`crate::lock::LockService`] (Redis or
    /// etcd), configured with [`Executor::lock_service`], and fences its writes with the grants'
    /// tokens.
    ///
    /// ```
    /// use contend::strategy::Strategy;
    /// assert!(Strategy::Etcd.needs_lock_service() && !Strategy::Etcd.needs_redis());
    /// assert!(Strategy::Redlock.needs_lock_service() && !Strategy::Advisory.needs_lock_service());
    /// ```
    pub fn needs_lock_service(self) -> bool {
        self.needs_redis() || matches!(self, Strategy::Etcd)
    }

    /// Whether the strategy waits for a lock before or at the start of its transaction: an
    /// in-process mutex, an advisory lock, a lock-service lock, or `pessimistic`'s locking
    /// read. [`Executed::lock_wait`] of such a run is that wait (a metric of lock contention);
    /// for the others it is zero, or under `batched` the time queued for a batch.
    ///
    /// ```
    /// use contend::strategy::Strategy;
    /// assert!(Strategy::Pessimistic.takes_locks() && Strategy::Redis.takes_locks());
    /// assert!(!Strategy::Optimistic.takes_locks() && !Strategy::Batched.takes_locks());
    /// ```
    pub fn takes_locks(self) -> bool {
        !matches!(
            self,
            Strategy::None
                | Strategy::Atomic
                | Strategy::Optimistic
                | Strategy::Serializable
                | Strategy::Batched
        )
    }

    /// `Ok` when `backend` can run this strategy, or the reason it cannot.
    ///
    /// ```
    /// use contend::{Backend, strategy::Strategy};
    /// assert!(Strategy::Advisory.supported_on(Backend::Postgres).is_ok());
    /// assert!(Strategy::Advisory.supported_on(Backend::Sqlite).is_err());
    /// ```
    pub fn supported_on(self, backend: Backend) -> Result<(), &'static str> {
        match (self, backend) {
            (Strategy::Advisory, Backend::Sqlite) => {
                Err("SQLite has no advisory locks (one writer at a time already)")
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing an unknown strategy name.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "unknown strategy `{0}` (expected one of: none, mutex, atomic, pessimistic, optimistic, serializable, advisory, redis, redis-spin, redlock, etcd, batched)"
)]
pub struct UnknownStrategy(pub String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase().replace('_', "-");
        Strategy::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or(UnknownStrategy(s))
    }
}
