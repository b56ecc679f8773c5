//! The concurrency-control strategies, side by side: which ones exist, which backends can run
//! each, and which are safe. The building blocks live in the submodules.
//!
//! | strategy | prevents lost updates by | SQLite | PostgreSQL | MySQL/MariaDB |
//! |---|---|---|---|---|
//! | `none` | nothing (unsafe baseline) | yes | yes | yes |
//! | `mutex` | an in-process lock per key: one process only | yes | yes | yes |
//! | `atomic` | a conditional `UPDATE` computed in the database | yes | yes | yes |
//! | `pessimistic` | row locks taken before reading, in canonical order | `BEGIN IMMEDIATE` | `FOR UPDATE` | `FOR UPDATE` |
//! | `optimistic` | a version column checked by the write, retried | yes | yes | yes |
//! | `serializable` | SERIALIZABLE isolation, retried | yes | yes | yes |
//! | `advisory` | a database advisory lock per key | no | `pg_advisory_xact_lock` | `GET_LOCK` |
//! | `redis` | a Redis lock with a fencing token | yes | yes | yes |
//! | `redis-spin` | a Redis `SET NX` spin lock (slow baseline) | yes | yes | yes |
//! | `redlock` | a Redis quorum lock with a fencing token | yes | yes | yes |

use std::fmt;
use std::str::FromStr;

use crate::backend::Backend;

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
}

impl Strategy {
    /// Every strategy, baseline first.
    pub const ALL: [Strategy; 10] = [
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
        matches!(self, Strategy::Redis | Strategy::RedisSpin | Strategy::Redlock)
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
#[error("unknown strategy `{0}` (expected one of: none, mutex, atomic, pessimistic, optimistic, serializable, advisory, redis, redis-spin, redlock)")]
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
