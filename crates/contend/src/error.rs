//! Errors of the `contend` library, and their classification into retryable conflict kinds.
//!
//! Callers never parse SQLSTATEs or vendor error numbers: [`Error::conflict`] says whether an error
//! is a concurrency conflict (and which kind), and [`crate::RetryPolicy`] decides whether to retry it.

use std::fmt;

use crate::backend::Backend;

/// A boxed error from user code, carried by [`Error::Aborted`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as its default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The kinds of concurrency conflict a transaction can run into.
///
/// Each is a reason to run the whole transaction again from the start; none is a bug in the
/// caller's code. See [`Error::conflict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ConflictKind {
    /// The database could not serialize the transaction (PostgreSQL `40001`, MariaDB `1020`).
    Serialization,
    /// The transaction was chosen as a deadlock victim (PostgreSQL `40P01`, MariaDB `1213`).
    Deadlock,
    /// A row or advisory lock could not be had in time, or at once with `NOWAIT`
    /// (PostgreSQL `55P03`, MariaDB `1205` / `3572`).
    LockTimeout,
    /// SQLite's database lock was held by another connection past the busy timeout
    /// (`SQLITE_BUSY` 5 and its extended codes, `SQLITE_LOCKED` 6).
    Busy,
    /// An optimistic version check found that another transaction changed the row first.
    Version,
    /// A Galera cluster aborted the transaction at `COMMIT` because a conflicting transaction
    /// of another node was ordered first (a certification failure, or a brute-force abort that
    /// surfaced at `COMMIT`). The server reports it as a deadlock (`1213`, SQLSTATE `40001`,
    /// "Deadlock found when trying to get lock"); contend tells it apart by where it happened:
    /// on a connection to a Galera node ([`crate::nodes::Cluster::Galera`]) and at `COMMIT`,
    /// where InnoDB never reports a deadlock of its own (`COMMIT` takes no row locks).
    ///
    /// A brute-force abort that hits an earlier statement of the transaction comes back with
    /// the same number, SQLSTATE and message as a local InnoDB deadlock, so it is reported as
    /// [`ConflictKind::Deadlock`]: nothing in the error tells the two apart.
    Certification,
}

impl ConflictKind {
    /// Every kind, in a stable order (for reports).
    pub const ALL: [ConflictKind; 6] = [
        ConflictKind::Serialization,
        ConflictKind::Deadlock,
        ConflictKind::LockTimeout,
        ConflictKind::Busy,
        ConflictKind::Version,
        ConflictKind::Certification,
    ];

    /// The snake_case name used in reports and JSON (`serialization`, `deadlock`, ...).
    ///
    /// ```
    /// assert_eq!(contend::ConflictKind::LockTimeout.as_str(), "lock_timeout");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictKind::Serialization => "serialization",
            ConflictKind::Deadlock => "deadlock",
            ConflictKind::LockTimeout => "lock_timeout",
            ConflictKind::Busy => "busy",
            ConflictKind::Version => "version",
            ConflictKind::Certification => "certification",
        }
    }
}

impl fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong in `contend`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database URL could not be understood.
    #[error("invalid database URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL, with any password replaced by `***`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database server could not be reached or refused the connection.
    #[error("cannot connect to {backend} at {address}: {source}")]
    Connect {
        /// Which backend was being connected to.
        backend: Backend,
        /// Host and port (or file) that was tried.
        address: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// No pooled connection became free in time, or the pool is closed.
    #[error("no database connection available: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A concurrency conflict: running the transaction again may succeed.
    #[error("{kind} conflict{}", source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Conflict {
        /// What kind of conflict.
        kind: ConflictKind,
        /// The database error behind it, if any (an optimistic version check has none).
        #[source]
        source: Option<Box<sqlx::Error>>,
    },
    /// Any other database error. Not retried.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// `transaction` was called while this task is already inside a transaction.
    ///
    /// A transaction must be the outermost one so that its commit is durable. Use
    /// [`crate::Tx::savepoint`] for a nested unit of work.
    #[error(
        "already inside a transaction: `transaction` must be the outermost one (use `savepoint` to nest)"
    )]
    NestedTransaction,
    /// The transaction handle can no longer be used: a savepoint's future was dropped before it
    /// finished, or an earlier statement left the transaction in an unknown state.
    #[error("the transaction is no longer usable: {0}")]
    TransactionBroken(&'static str),
    /// The backend cannot do what was asked (an isolation level, a lock mode, a timeout).
    #[error("{backend} does not support {what}")]
    Unsupported {
        /// The backend that was asked.
        backend: Backend,
        /// What it cannot do.
        what: String,
    },
    /// A lock could not be acquired within the wait time.
    #[error("lock `{key}` not acquired within {waited_ms} ms")]
    LockNotAcquired {
        /// The lock's key.
        key: String,
        /// How long the caller waited.
        waited_ms: u64,
    },
    /// A fenced write carried a token older than one the resource has already seen.
    #[error("stale fencing token {token} for `{resource}` (highest seen: {highest})")]
    StaleFencingToken {
        /// The resource written.
        resource: String,
        /// The token the write carried.
        token: u64,
        /// The highest token the resource has accepted.
        highest: u64,
    },
    /// A lock service outside the database (Redis, etcd) could not be reached or answered with
    /// an error. The source is the lock crate's own error (`contend_redis::NodeError` for Redis).
    #[error("lock service error: {0}")]
    LockService(#[source] BoxError),
    /// The strategy cannot keep its promise on this database cluster (a Galera cluster's
    /// node-local locks), so it was refused before anything ran. See
    /// [`crate::strategy::Executor::check_db`].
    #[error("strategy `{strategy}` is not safe on {cluster}: {reason}")]
    UnsafeOnCluster {
        /// The strategy refused.
        strategy: crate::strategy::Strategy,
        /// The cluster, in words (`a Galera cluster of 3 nodes`).
        cluster: String,
        /// Why the strategy cannot be safe there.
        reason: &'static str,
    },
    /// The caller's transaction body gave up with its own error: rolled back, not retried.
    #[error("{0}")]
    Aborted(#[source] BoxError),
}

impl Error {
    /// The kind of concurrency conflict this error is, or `None` if it is not one.
    ///
    /// ```
    /// use contend::{ConflictKind, Error};
    /// let e = Error::Conflict { kind: ConflictKind::Deadlock, source: None };
    /// assert_eq!(e.conflict(), Some(ConflictKind::Deadlock));
    /// assert_eq!(Error::NestedTransaction.conflict(), None);
    /// ```
    pub fn conflict(&self) -> Option<ConflictKind> {
        match self {
            Error::Conflict { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// Wraps a caller's own error so that a transaction body can return it: the transaction is
    /// rolled back and not retried.
    ///
    /// ```
    /// let e = contend::Error::aborted("insufficient funds");
    /// assert_eq!(e.to_string(), "insufficient funds");
    /// ```
    pub fn aborted(err: impl Into<BoxError>) -> Self {
        Error::Aborted(err.into())
    }

    /// True when the database (or a lock service) could not be reached or had no free connection: the
    /// HTTP edge maps this to 503.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Unavailable(_) | Error::LockService(_) => true,
            Error::Database(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
                    | sqlx::Error::Tls(_)
            ),
            _ => false,
        }
    }

    /// True when the operation gave up under contention rather than failed: a conflict that
    /// its retry budget did not outlast ([`Error::conflict`]), or a lock not acquired within
    /// its wait. Running it again later may succeed; nothing is wrong with it or the data.
    ///
    /// ```
    /// use contend::{ConflictKind, Error};
    /// assert!(Error::Conflict { kind: ConflictKind::Deadlock, source: None }.is_contention());
    /// assert!(Error::LockNotAcquired { key: "k".into(), waited_ms: 5000 }.is_contention());
    /// assert!(!Error::NestedTransaction.is_contention());
    /// ```
    pub fn is_contention(&self) -> bool {
        matches!(self, Error::Conflict { .. } | Error::LockNotAcquired { .. })
    }

    /// The unique-constraint violation behind this error, if it is one (any backend).
    pub fn is_unique_violation(&self) -> bool {
        match self {
            Error::Database(sqlx::Error::Database(db)) => db.is_unique_violation(),
            _ => false,
        }
    }

    /// Whether this is what PostgreSQL answers the loser of two concurrent `CREATE TABLE IF
    /// NOT EXISTS` of one table (the table then exists): a unique violation on the catalog
    /// (23505), or, when the winner committed between the loser's check and its insert,
    /// `type ... already exists` (42710) or `relation ... already exists` (42P07).
    pub(crate) fn lost_create_race(&self) -> bool {
        match self {
            Error::Database(sqlx::Error::Database(db)) => {
                db.is_unique_violation() || matches!(db.code().as_deref(), Some("42710" | "42P07"))
            }
            _ => false,
        }
    }
}

impl From<sqlx::Error> for Error {
    /// Classifies driver errors: conflicts become [`Error::Conflict`], pool exhaustion
    /// [`Error::Unavailable`], everything else [`Error::Database`].
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err
            && let Some(kind) = crate::backend::classify(db.as_ref())
        {
            return Error::Conflict {
                kind,
                source: Some(Box::new(err)),
            };
        }
        match err {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => Error::Unavailable(err),
            other => Error::Database(other),
        }
    }
}
