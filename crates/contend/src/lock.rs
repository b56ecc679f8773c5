//! Locks held outside the database: the seam between the strategy executor
//! ([`crate::strategy::Executor`]) and a lock service such as Redis (`contend-redis`) or etcd.
//!
//! A lock outside the database prevents lost updates only while its holder really holds it. A
//! holder can lose it without knowing (a pause longer than the lease, a failover), so every grant
//! carries a [`FencingToken`] that the database write checks in the same transaction
//! ([`crate::fencing::fence`]): a stale holder's write is refused. The executor does that for
//! every key it locked.
//!
//! The core names no lock service and depends on none; a lock crate implements [`LockService`].

use crate::BoxFuture;
use crate::error::Result;
use crate::fencing::FencingToken;

/// A service that grants exclusive locks on string keys, such as a Redis lock client.
///
/// ```
/// use std::collections::HashSet;
/// use std::sync::{Arc, Mutex};
/// use contend::lock::{HeldLock, LockService};
/// use contend::{BoxFuture, Error, Result};
/// use contend::fencing::FencingToken;
///
/// /// A toy in-process service that refuses a key already held (no waiting).
/// #[derive(Default)]
/// struct Toy(Arc<Mutex<(HashSet<String>, u64)>>);
///
/// struct ToyHeld(Arc<Mutex<(HashSet<String>, u64)>>, String, u64);
///
/// impl LockService for Toy {
///     fn acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn HeldLock>>> {
///         Box::pin(async move {
///             let mut state = self.0.lock().unwrap();
///             if !state.0.insert(key.to_string()) {
///                 return Err(Error::LockNotAcquired { key: key.into(), waited_ms: 0 });
///             }
///             state.1 += 1;
///             Ok(Box::new(ToyHeld(self.0.clone(), key.into(), state.1)) as Box<dyn HeldLock>)
///         })
///     }
/// }
///
/// impl HeldLock for ToyHeld {
///     fn fencing_token(&self) -> Option<FencingToken> {
///         Some(FencingToken::new(self.2))
///     }
///     fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
///         Box::pin(async move {
///             self.0.lock().unwrap().0.remove(&self.1);
///             Ok(())
///         })
///     }
/// }
/// ```
pub trait LockService: Send + Sync {
    /// Acquires the lock on `key`, waiting as the service is configured to.
    ///
    /// # Errors
    /// [`crate::Error::LockNotAcquired`] when the wait runs out; [`crate::Error::LockService`]
    /// when the service cannot be reached.
    ///
    /// # Cancel safety
    /// Implementations must make a dropped acquisition leave no lock behind that outlives its
    /// lease (the Redis implementations release or let the lease expire).
    fn acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn HeldLock>>>;
}

/// A lock granted by a [`LockService`].
pub trait HeldLock: Send {
    /// The fencing token of this grant (strictly increasing per key), or `None` for a service
    /// that has none (a baseline such as a spin lock; its writes are then not fenced).
    fn fencing_token(&self) -> Option<FencingToken>;

    /// The database refused this grant's token because it has accepted a newer one for the
    /// key, `highest` ([`crate::Error::StaleFencingToken`]). Either this holder lost its lock
    /// (a pause past the lease: a newer grant exists), or the service's counter went back (a
    /// Redis node restarted without persistence counts from 0 again, and every later grant
    /// would be refused until the counter caught up with the database). A service whose
    /// counter can go back raises it to at least `highest` here, while this grant still holds
    /// the lock, so that the next grant is newer; the executor calls this before releasing a
    /// refused grant. The default does nothing (a counter that cannot go back, such as etcd's
    /// revision).
    ///
    /// # Errors
    /// [`crate::Error::LockService`] when the service cannot be reached (the next grants are
    /// then refused until a later refusal raises the counter).
    ///
    /// # Cancel safety
    /// Cancel-safe: raising a counter to a value is idempotent, and a dropped call leaves the
    /// counter as it was or raised.
    fn token_refused(&mut self, highest: FencingToken) -> BoxFuture<'_, Result<()>> {
        let _ = highest;
        Box::pin(async { Ok(()) })
    }

    /// Releases the lock.
    ///
    /// # Errors
    /// [`crate::Error::LockService`] when the service cannot be reached (the lock then ends
    /// with its lease).
    ///
    /// # Cancel safety
    /// If dropped, the lock may stay held until its lease ends.
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>>;
}
