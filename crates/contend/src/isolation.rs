//! Isolation levels, which say which anomalies a transaction may see (dirty reads, lost updates,
//! write skew...), and how each backend spells them.
//!
//! | level | PostgreSQL | MySQL/MariaDB (InnoDB) | SQLite |
//! |---|---|---|---|
//! | `ReadUncommitted` | runs as READ COMMITTED (PostgreSQL never shows uncommitted data) | READ UNCOMMITTED | runs serializable (see below) |
//! | `ReadCommitted` | READ COMMITTED | READ COMMITTED | runs serializable |
//! | `RepeatableRead` | REPEATABLE READ (snapshot isolation) | REPEATABLE READ (snapshot reads, locking writes) | runs serializable |
//! | `Serializable` | SERIALIZABLE (SSI, may fail with `40001`) | SERIALIZABLE (plain reads take shared locks) | serializable |
//!
//! SQLite has one writer at a time: a write transaction starts with `BEGIN IMMEDIATE` and holds
//! the database write lock until it ends, and in WAL mode every reader sees one snapshot. Its
//! transactions are therefore serializable whatever level is asked for. Running at a *stronger*
//! level than asked is allowed by the SQL standard; running at a weaker one never happens: a level
//! a backend cannot give is an error.

use std::fmt;
use std::str::FromStr;

/// A transaction isolation level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum IsolationLevel {
    /// READ UNCOMMITTED.
    ReadUncommitted,
    /// READ COMMITTED.
    ReadCommitted,
    /// REPEATABLE READ.
    RepeatableRead,
    /// SERIALIZABLE.
    Serializable,
}

impl IsolationLevel {
    /// All levels, weakest first.
    pub const ALL: [IsolationLevel; 4] = [
        IsolationLevel::ReadUncommitted,
        IsolationLevel::ReadCommitted,
        IsolationLevel::RepeatableRead,
        IsolationLevel::Serializable,
    ];

    /// The SQL spelling: `READ COMMITTED`, ...
    pub fn sql(self) -> &'static str {
        match self {
            IsolationLevel::ReadUncommitted => "READ UNCOMMITTED",
            IsolationLevel::ReadCommitted => "READ COMMITTED",
            IsolationLevel::RepeatableRead => "REPEATABLE READ",
            IsolationLevel::Serializable => "SERIALIZABLE",
        }
    }

    /// The snake_case name used in reports and JSON: `read_committed`, ...
    ///
    /// ```
    /// use contend::IsolationLevel;
    /// assert_eq!(IsolationLevel::RepeatableRead.as_str(), "repeatable_read");
    /// assert_eq!("serializable".parse::<IsolationLevel>().unwrap(), IsolationLevel::Serializable);
    /// assert_eq!("READ COMMITTED".parse::<IsolationLevel>().unwrap(), IsolationLevel::ReadCommitted);
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            IsolationLevel::ReadUncommitted => "read_uncommitted",
            IsolationLevel::ReadCommitted => "read_committed",
            IsolationLevel::RepeatableRead => "repeatable_read",
            IsolationLevel::Serializable => "serializable",
        }
    }
}

impl fmt::Display for IsolationLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing an unknown isolation level name.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "unknown isolation level `{0}` (expected read_uncommitted, read_committed, repeatable_read or serializable)"
)]
pub struct UnknownIsolationLevel(pub String);

impl FromStr for IsolationLevel {
    type Err = UnknownIsolationLevel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm: String = s
            .trim()
            .chars()
            .map(|c| {
                if c == ' ' || c == '-' {
                    '_'
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect();
        IsolationLevel::ALL
            .into_iter()
            .find(|l| l.as_str() == norm)
            .ok_or_else(|| UnknownIsolationLevel(s.to_string()))
    }
}
