//! Locks on etcd for contend: a lease with keepalive, waiters ordered by create revision and
//! woken by a watch on their predecessor, and the lock key's revision as fencing token.
//!
//! # Brief overview
//! - [`EtcdLocks`]: the client (several member URLs for failover). [`EtcdLocks::acquire`]
//!   writes a key of its own under the lock's prefix with the client's lease, and is granted
//!   the lock when that key is the oldest there; otherwise it watches the key just before its
//!   own and is woken when that one is deleted (no polling). It implements
//!   [`contend::lock::LockService`], so the strategy executor runs any operation under it
//!   ([`contend::strategy::Strategy::Etcd`]).
//! - [`EtcdGuard`]: the held lock. [`EtcdGuard::fencing_token`] is its key's create revision;
//!   [`EtcdGuard::lost`] and [`EtcdGuard::is_lost`] tell the holder when its lease has
//!   expired (keepalive failing, or the process paused longer than the lease).
//! - [`EtcdError`]: what went wrong, inside [`contend::Error::LockService`]; without a quorum
//!   a request fails with [`EtcdError::NoQuorum`] or [`EtcdError::Unavailable`] after the
//!   request timeout instead of hanging.
//!
//! # The safety net
//! etcd's maintainers say it plainly: a lock holder can lose its lock without noticing (a
//! pause past the lease), so the resource must check the lock's revision. Fence the database
//! write with the guard's token, in the same transaction:
//!
//! ```no_run
//! # async fn demo(db: contend::Db) -> contend::Result<()> {
//! use std::sync::Arc;
//! use contend::strategy::{Executor, Strategy};
//! use contend_etcd::EtcdLocks;
//! let locks = EtcdLocks::builder(&["http://127.0.0.1:2379", "http://127.0.0.1:22379", "http://127.0.0.1:32379"])
//!     .namespace("shop")
//!     .connect()
//!     .await?;
//! // The executor fences every key it locked with the grant's token before the write.
//! let executor: Executor = Executor::new().lock_service(Strategy::Etcd, Arc::new(locks));
//! # let _ = (db, executor);
//! # Ok(()) }
//! ```
//!
//! # etcd keys
//! For a lock `K` (with `/` and `%` escaped) in namespace `ns` (default `contend`): each
//! holder or waiter owns `ns/lock/K/<lease>-<n>`, attached to the client's lease, empty. A
//! release deletes it; an expired lease deletes all of a client's keys. Nothing else is
//! stored: the fencing token is etcd's own revision, which never goes back (unlike a counter
//! that a restart without persistence could reset).
//!
//! # Requests per acquisition
//! Uncontended: one transaction to lock, one delete to release (plus a keepalive per third
//! of the TTL for the whole client). A waiter adds one watch on the key just before its own
//! and one range when woken (again a watch and a range if a waiter ahead of it gave up).
//! [`EtcdLocks::requests`] counts them.

mod error;
mod lease;
mod locks;

pub use contend::fencing::FencingToken;
pub use error::EtcdError;
pub use locks::{DEFAULT_NAMESPACE, EtcdGuard, EtcdLocks, EtcdLocksBuilder};
