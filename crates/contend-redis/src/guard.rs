//! Lock guards: what a holder has while it holds a lock. They know how long the lock stays
//! valid, renew it with a watchdog, report its loss, and release it on drop without blocking.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use contend::fencing::FencingToken;
use contend::{BoxFuture, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::node::Node;
use crate::options::{LockKeys, valid_until};

/// What a lock implementation does for a guard (single node, Redlock, spin lock).
pub(crate) trait Holder: Send + Sync + 'static {
    /// Extends the lease. `Ok(Some(t))`: still held, valid until `t`. `Ok(None)`: not ours any
    /// more.
    fn extend<'a>(
        &'a self,
        keys: &'a LockKeys,
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Instant>>>;

    /// Releases the lock if it still carries `token`. `Ok(true)` when it did.
    fn release<'a>(&'a self, keys: &'a LockKeys, token: &'a str) -> BoxFuture<'a, Result<bool>>;

    /// Raises the fencing counter to at least `value` wherever the lock still carries `token`.
    /// `Ok(true)` when enough nodes did (the node; a majority) for the next grant's token to
    /// exceed `value`. The default, for holders whose guards have no public raise (shared
    /// members, reentrant holds): `Ok(false)`.
    fn raise<'a>(
        &'a self,
        keys: &'a LockKeys,
        token: &'a str,
        value: u64,
    ) -> BoxFuture<'a, Result<bool>> {
        let _ = (keys, token, value);
        Box::pin(async { Ok(false) })
    }
}

/// The [`Holder`] of a lock on one node (the lock client and the spin lock): extend and
/// release run their script on that node.
#[derive(Debug)]
pub(crate) struct SingleNode {
    node: Node,
    /// Whether a release publishes on the key's channel (waiters subscribe there).
    notify: bool,
}

impl SingleNode {
    /// The holder for locks on `node`; `notify` as [`Node::release_script`] takes it.
    pub fn new(node: Node, notify: bool) -> SingleNode {
        SingleNode { node, notify }
    }
}

impl Holder for SingleNode {
    fn extend<'a>(
        &'a self,
        keys: &'a LockKeys,
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Instant>>> {
        Box::pin(extend_on(&self.node, keys, token, lease))
    }

    fn release<'a>(&'a self, keys: &'a LockKeys, token: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move { Ok(self.node.release_script(keys, token, self.notify).await? == 1) })
    }

    fn raise<'a>(
        &'a self,
        keys: &'a LockKeys,
        token: &'a str,
        value: u64,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(raise_on(&self.node, keys, token, value))
    }
}

/// Raises the fencing counter of the single-node lock `keys` to at least `value` if `node`
/// still holds it with `token`: `true` when it does.
pub(crate) async fn raise_on(
    node: &Node,
    keys: &LockKeys,
    token: &str,
    value: u64,
) -> Result<bool> {
    Ok(node.raise_script(keys, token, value).await? == 1)
}

/// Extends the single-node lock `keys` held with `token` on `node` by `lease`: the new
/// `valid_until`, or `None` when the lock is no longer held with that token.
pub(crate) async fn extend_on(
    node: &Node,
    keys: &LockKeys,
    token: &str,
    lease: Duration,
) -> Result<Option<Instant>> {
    let sent = Instant::now();
    let extended = node.extend_script(keys, token, lease).await?;
    Ok((extended == 1).then(|| valid_until(sent, lease)))
}

#[derive(Debug, Clone, Copy)]
struct Validity {
    valid_until: Instant,
    lost: bool,
}

/// The shared part of every guard.
pub(crate) struct GuardCore {
    keys: LockKeys,
    token: String,
    lease: Duration,
    holder: Arc<dyn Holder>,
    state: Arc<watch::Sender<Validity>>,
    watchdog: Option<JoinHandle<()>>,
    released: bool,
}

impl std::fmt::Debug for GuardCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = *self.state.borrow();
        f.debug_struct("Guard")
            .field("key", &self.keys.key)
            .field("lease", &self.lease)
            .field(
                "valid_for",
                &v.valid_until.saturating_duration_since(Instant::now()),
            )
            .field("lost", &v.lost)
            .finish()
    }
}

impl GuardCore {
    pub fn new(
        keys: LockKeys,
        token: String,
        lease: Duration,
        valid_until: Instant,
        holder: Arc<dyn Holder>,
        watchdog: bool,
    ) -> GuardCore {
        let (tx, _) = watch::channel(Validity {
            valid_until,
            lost: false,
        });
        let state = Arc::new(tx);
        let watchdog = watchdog.then(|| {
            tokio::spawn(renew(
                holder.clone(),
                keys.clone(),
                token.clone(),
                lease,
                state.clone(),
            ))
        });
        GuardCore {
            keys,
            token,
            lease,
            holder,
            state,
            watchdog,
            released: false,
        }
    }

    pub fn key(&self) -> &str {
        &self.keys.key
    }

    pub fn valid_until(&self) -> Instant {
        self.state.borrow().valid_until
    }

    pub fn is_lost(&self) -> bool {
        let v = *self.state.borrow();
        v.lost || Instant::now() >= v.valid_until
    }

    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.state.subscribe();
        async move {
            loop {
                let v = *rx.borrow_and_update();
                if v.lost {
                    return;
                }
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            // The guard is gone (released): the lock is no longer held.
                            return;
                        }
                    }
                    _ = tokio::time::sleep_until(v.valid_until.into()) => {
                        if !rx.has_changed().unwrap_or(false) {
                            return;
                        }
                    }
                }
            }
        }
    }

    pub async fn extend(&self, lease: Duration) -> Result<bool> {
        match self.holder.extend(&self.keys, &self.token, lease).await? {
            Some(until) => {
                self.state.send_modify(|v| v.valid_until = until);
                Ok(true)
            }
            None => {
                self.state.send_modify(|v| v.lost = true);
                Ok(false)
            }
        }
    }

    pub async fn raise_fence(&self, value: u64) -> Result<bool> {
        self.holder.raise(&self.keys, &self.token, value).await
    }

    pub async fn release(mut self) -> Result<bool> {
        if let Some(w) = self.watchdog.take() {
            w.abort();
        }
        self.released = true;
        self.state.send_modify(|v| v.lost = true);
        self.holder.release(&self.keys, &self.token).await
    }
}

impl Drop for GuardCore {
    fn drop(&mut self) {
        if let Some(w) = self.watchdog.take() {
            w.abort();
        }
        if self.released {
            return;
        }
        self.state.send_modify(|v| v.lost = true);
        let holder = self.holder.clone();
        let keys = std::mem::replace(&mut self.keys, LockKeys::new("", ""));
        let token = std::mem::take(&mut self.token);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    if let Err(e) = holder.release(&keys, &token).await {
                        tracing::warn!(key = %keys.key, error = %e,
                            "releasing a dropped lock guard failed; the lease will expire it");
                    }
                });
            }
            Err(_) => tracing::warn!(key = %keys.key,
                "lock guard dropped outside a Tokio runtime; the lease will expire it"),
        }
    }
}

/// The watchdog: extends the lease every third of it until the lock is lost or the guard ends.
async fn renew(
    holder: Arc<dyn Holder>,
    keys: LockKeys,
    token: String,
    lease: Duration,
    state: Arc<watch::Sender<Validity>>,
) {
    let period = lease / 3;
    loop {
        tokio::time::sleep(period).await;
        if state.borrow().lost {
            return;
        }
        match holder.extend(&keys, &token, lease).await {
            Ok(Some(until)) => state.send_modify(|v| v.valid_until = until),
            Ok(None) => {
                tracing::warn!(key = %keys.key, "lock lost: the watchdog found it taken or expired");
                state.send_modify(|v| v.lost = true);
                return;
            }
            Err(e) => {
                let valid_until = state.borrow().valid_until;
                if Instant::now() >= valid_until {
                    tracing::warn!(key = %keys.key, error = %e,
                        "lock lost: the watchdog could not renew it before its lease ended");
                    state.send_modify(|v| v.lost = true);
                    return;
                }
                tracing::debug!(key = %keys.key, error = %e, "lock renewal failed; retrying");
            }
        }
    }
}

/// A held lock with a fencing token, from [`crate::LockClient`] or [`crate::Redlock`].
///
/// Dropping the guard releases the lock in a spawned task (never blocking); call
/// [`LockGuard::release`] to release it at once and learn whether it was still held.
///
/// Before each write the lock guards, pass [`LockGuard::fencing_token`] to
/// [`contend::fencing::fence`] in the same database transaction: if the lock was lost (a pause
/// past the lease) and someone else got it since, the database refuses the write.
#[must_use = "dropping the guard releases the lock"]
#[derive(Debug)]
pub struct LockGuard {
    core: GuardCore,
    fence: FencingToken,
}

impl LockGuard {
    pub(crate) fn new(core: GuardCore, fence: FencingToken) -> LockGuard {
        LockGuard { core, fence }
    }

    /// The lock's key.
    pub fn key(&self) -> &str {
        self.core.key()
    }

    /// The fencing token of this grant: larger than every earlier grant's on the same key.
    pub fn fencing_token(&self) -> FencingToken {
        self.fence
    }

    /// Until when the lock is surely held: the time of the request plus the lease, less the
    /// drift allowance; moved forward by renewals.
    pub fn valid_until(&self) -> Instant {
        self.core.valid_until()
    }

    /// True once the lock is lost: a renewal found it taken, or its validity ran out.
    pub fn is_lost(&self) -> bool {
        self.core.is_lost()
    }

    /// A future that completes when the lock is lost (renewal failed, or validity ran out
    /// without renewal) or released. It owns what it needs, so it can be raced against the
    /// critical section with `tokio::select!` while the guard is still used.
    ///
    /// # Cancel safety
    /// Safe: it only watches.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        self.core.lost()
    }

    /// Extends the lease to `lease` from now, if the lock is still ours.
    ///
    /// # Errors
    /// [`contend::Error::LockService`] when Redis cannot be reached (the lock may still be held until
    /// its lease ends).
    ///
    /// # Cancel safety
    /// Safe: if dropped, the lease was either extended or not; [`LockGuard::valid_until`] is
    /// only moved forward by a confirmed extension.
    pub async fn extend(&self, lease: Duration) -> Result<bool> {
        self.core.extend(lease).await
    }

    /// Raises the key's fencing counter past `highest`, the token the database says it has
    /// already accepted ([`contend::Error::StaleFencingToken`]), so that the next grant's token
    /// is newer. Call it when the database refused this grant's token: a Redis node restarted
    /// without persistence counts from 0 again, and without the raise every grant would be
    /// refused until the counter caught up with the database by itself. `Ok(true)` when the
    /// counter was raised (or already as high) where the lock is still ours (on a majority
    /// for Redlock); `Ok(false)` when the lock is no longer ours: this holder lost it, a newer
    /// grant exists, and the counter is already past this token.
    ///
    /// ```no_run
    /// # async fn demo(guard: contend_redis::LockGuard, db: contend::Db) -> contend::Result<()> {
    /// use contend::fencing;
    /// let token = guard.fencing_token();
    /// let write = db.transaction(|tx| Box::pin(async move {
    ///     fencing::fence(tx, "account:1", token).await
    ///     // ... the write the lock guards
    /// })).await;
    /// if let Err(contend::Error::StaleFencingToken { highest, .. }) = write {
    ///     guard.raise_fence(contend::fencing::FencingToken::new(highest)).await?;
    /// }
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`contend::Error::LockService`] when Redis cannot be reached.
    ///
    /// # Cancel safety
    /// Cancel-safe: raising a counter to a value is idempotent; a dropped call leaves it as it
    /// was or raised.
    pub async fn raise_fence(&self, highest: FencingToken) -> Result<bool> {
        self.core.raise_fence(highest.get()).await
    }

    /// Releases the lock now. `Ok(true)` when it was still ours; `Ok(false)` when it had
    /// expired (and may have been taken by someone else, whose lock is left alone).
    ///
    /// # Errors
    /// [`contend::Error::LockService`] when Redis cannot be reached; the lease then expires the lock.
    ///
    /// # Cancel safety
    /// If dropped before Redis answers, the release may or may not have happened; either way
    /// the lease bounds how long the lock stays held.
    pub async fn release(self) -> Result<bool> {
        self.core.release().await
    }
}

/// A held spin lock ([`crate::SpinLock`]): no fencing token, no watchdog.
#[must_use = "dropping the guard releases the lock"]
#[derive(Debug)]
pub struct SpinGuard {
    core: GuardCore,
}

impl SpinGuard {
    pub(crate) fn new(core: GuardCore) -> SpinGuard {
        SpinGuard { core }
    }

    /// The lock's key.
    pub fn key(&self) -> &str {
        self.core.key()
    }

    /// True once the lease has run out.
    pub fn is_lost(&self) -> bool {
        self.core.is_lost()
    }

    /// Releases the lock now; `Ok(true)` when it was still ours.
    ///
    /// # Errors
    /// [`contend::Error::LockService`] when Redis cannot be reached.
    ///
    /// # Cancel safety
    /// As [`LockGuard::release`].
    pub async fn release(self) -> Result<bool> {
        self.core.release().await
    }
}
