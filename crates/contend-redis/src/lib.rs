//! Distributed locks on Redis that are safe and fast: token-checked release, waiting on
//! release notifications instead of polling, lease renewal, fencing tokens, and Redlock.
//!
//! # Brief overview
//! - [`LockClient`]: the lock on one Redis server. [`LockClient::acquire`] makes one attempt
//!   and, if the lock is held, sleeps until the holder's release is published (one pub/sub
//!   connection per client, shared by all waiters) or its lease runs out. Every grant carries a
//!   [`FencingToken`] from a per-key counter incremented in the same script.
//! - [`LockGuard`]: the held lock. It releases on drop (spawned, never blocking) or with
//!   [`LockGuard::release`]; with [`LockOptions::watchdog`] it renews its lease while it
//!   lives; [`LockGuard::lost`] and [`LockGuard::is_lost`] tell the holder when it must stop.
//! - [`Redlock`]: the same lock over N independent nodes, granted by a majority (see
//!   [`redlock`] for what its fencing token does and does not guarantee).
//! - [`SpinLock`]: the polling `SET NX` baseline, for comparison.
//! - Beyond mutual exclusion, on one server: [`ReentrantLock`] (the same [`Owner`] nests
//!   holds), [`Semaphore`] (permits leased one by one, so a crashed holder's permit comes
//!   back), [`FairLock`] (FIFO, with per-waiter heartbeats so a vanished waiter cannot hang
//!   the queue) and [`RwLock`] (many readers or one writer, writer preference). Each waits on
//!   release notifications and reports loss like [`LockGuard`].
//! - [`command_count`]: commands sent to Redis, from `INFO commandstats`.
//!
//! # The safety net
//! A lock on Redis can be lost while its holder still runs (a pause past the lease, a
//! failover). Use the fencing token in the database write it guards:
//!
//! ```no_run
//! # async fn demo(db: contend::Db) -> contend::Result<()> {
//! use contend::fencing;
//! use contend_redis::{LockClient, LockOptions};
//! let locks = LockClient::connect("redis://127.0.0.1:6379/0").await?;
//! let guard = locks.acquire("account:1", &LockOptions::new()).await?;
//! let token = guard.fencing_token();
//! db.transaction(move |tx| Box::pin(async move {
//!     fencing::fence(tx, "account:1", token).await?; // first: refuses a stale holder
//!     let q = tx.query("UPDATE account SET balance = balance - 10 WHERE id = 1");
//!     q.execute(tx.conn()).await?;
//!     Ok::<_, contend::Error>(())
//! })).await?;
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! # Redis keys
//! For a lock key `K` in namespace `ns` (default `contend`): `ns:lock:K` holds the owner's
//! random 128-bit token with the lease as expiry; `ns:fence:K` is the fencing counter (it never
//! expires: deleting it, or losing it in a restart without persistence, makes tokens start
//! again from 1: the next fenced write is refused, and [`LockGuard::raise_fence`] with the
//! token the refusal names, which the strategy executor calls on every refused grant, raises
//! the counter past it so that the grant after that writes); `ns:released:K` is the release
//! channel.

mod client;
mod guard;
mod kinds;
mod node;
mod options;
pub mod redlock;
pub mod scripts;
mod service;
mod spin;
mod stats;
mod waiters;

pub use client::{DEFAULT_NAMESPACE, LockClient, LockClientBuilder};
pub use contend::fencing::FencingToken;
pub use guard::{LockGuard, SpinGuard};
pub use kinds::{FairLock, Owner, ReentrantGuard, ReentrantLock, RwLock, Semaphore, SharedGuard};
pub use node::NodeError;
pub use options::{LockOptions, MAX_LEASE, MIN_LEASE, drift};
pub use redlock::{Redlock, RedlockBuilder};
pub use service::RedisLocks;
pub use spin::SpinLock;
pub use stats::command_count;
