//! `serializable`: prevents every anomaly of concurrent read-decide-write (lost update, write
//! skew, phantoms) by running the whole transaction at SERIALIZABLE and letting the database
//! abort one of two transactions that could not have run one after the other. The aborted one
//! is run again from the start by the retry policy.
//!
//! What the database does to keep its promise differs, and so does the cost:
//! - PostgreSQL (SSI): no extra blocking; a dangerous pattern fails with `40001`
//!   ([`ConflictKind::Serialization`]).
//! - MariaDB/InnoDB: plain reads take shared locks, so two transactions that read a hot row and
//!   then write it deadlock (`1213`, [`ConflictKind::Deadlock`]); InnoDB rolls one back.
//! - SQLite: write transactions are serial already (`BEGIN IMMEDIATE`); a conflict shows up only
//!   as [`ConflictKind::Busy`] when the busy timeout expires.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
//! use contend::{Db, IsolationLevel, strategy::serializable};
//! let db = Db::connect("sqlite::memory:").await?;
//! let options = serializable::options();
//! assert_eq!(options.isolation_level(), Some(IsolationLevel::Serializable));
//! let n = db.transaction_with(&options, |tx| Box::pin(async move {
//!     Ok::<_, contend::Error>(tx.query_scalar::<i64>("SELECT 1").fetch_one(tx.conn()).await?)
//! })).await?;
//! assert_eq!(n, 1);
//! # Ok(()) }
//! ```

use std::time::Duration;

use crate::error::ConflictKind;
use crate::isolation::IsolationLevel;
use crate::retry::RetryPolicy;
use crate::tx::TxOptions;

/// The retry policy of [`options`]: serialization failures, deadlocks, Galera certification
/// failures, lock timeouts and busy errors, with jittered backoff from 0.5 ms doubling up to
/// 500 ms (so that after a run of lost rounds 64 contenders spread over half a second instead
/// of colliding again), for at most 30 s in all (no attempt limit: see [`crate::retry`]).
pub fn retry_policy() -> RetryPolicy {
    RetryPolicy::new()
        .base_delay(Duration::from_micros(500))
        .max_delay(Duration::from_millis(500))
        .max_elapsed(Duration::from_secs(30))
        .only(&[
            ConflictKind::Serialization,
            ConflictKind::Deadlock,
            ConflictKind::Certification,
            ConflictKind::Busy,
            ConflictKind::LockTimeout,
        ])
}

/// Transaction options: SERIALIZABLE with [`retry_policy`]. Pass them to
/// [`crate::Db::transaction_with`] or [`crate::Db::run`].
pub fn options() -> TxOptions {
    TxOptions::new()
        .isolation(IsolationLevel::Serializable)
        .retry(retry_policy())
}
