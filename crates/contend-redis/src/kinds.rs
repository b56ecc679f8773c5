//! Locks beyond mutual exclusion, on one Redis server ([`LockClient`]): a reentrant lock, a
//! semaphore whose permits expire with their holder, a fair (FIFO) lock that cannot hang on a
//! vanished waiter, and a read-write lock that does not starve writers.
//!
//! Every one of them:
//! - waits on release notifications (the client's pub/sub connection), not by polling;
//! - leases what it grants: a holder that dies (process killed, connection gone, lease not
//!   renewed) loses it when its lease ends, and nobody waits longer than that;
//! - hands out guards with the loss signal of [`LockGuard`] (`is_lost`, `lost`, `extend`, an
//!   optional watchdog) that release on drop;
//! - runs each step as one Lua script (see [`crate::scripts`]) using the server's clock.
//!
//! # Redis keys
//! Under the client's namespace `ns` and a kind `reentrant`, `semaphore`, `fair` or `rw`:
//! `ns:KIND:lock:K` (the lock: a hash for `reentrant`, a sorted set of holders for
//! `semaphore`, the writer's token for `rw`), `ns:KIND:fence:K` (fencing counter),
//! `ns:KIND:released:K` (release channel); the fair lock adds `…:lock:K:queue` (waiters by
//! ticket), `…:lock:K:heartbeat` (waiters by expiry) and `…:lock:K:tickets`; the read-write
//! lock adds `…:lock:K:readers` and `…:lock:K:intents` (waiting writers by expiry).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use contend::fencing::FencingToken;
use contend::{BoxFuture, Error, Result};

use crate::LockClient;
use crate::guard::{GuardCore, Holder, LockGuard, SingleNode, extend_on, raise_on};
use crate::node::Node;
use crate::options::{Acquiring, LockKeys, LockOptions, new_token, valid_until};
use crate::scripts;
use crate::waiters::{Interest, Wake};

/// Shortest queue or intent timeout accepted.
const MIN_HEARTBEAT: Duration = Duration::from_millis(30);

/// The outcome of one attempt: granted, or held for about this many more milliseconds.
enum Try<T> {
    Got(T),
    Held(Option<u64>),
}

type Attempt<'a, T> = Pin<Box<dyn Future<Output = Result<Try<T>>> + Send + 'a>>;

/// The wait loop every kind shares: attempt; if refused, subscribe (then attempt again) or
/// park until a notification, the hint's end, or — for waiters that must renew their place —
/// the next `refresh`.
async fn wait_for<'a, T>(
    interest: &Interest<'_>,
    key: &str,
    acquiring: &Acquiring,
    options: &LockOptions,
    refresh: Option<Duration>,
    mut attempt: impl FnMut() -> Attempt<'a, T>,
) -> Result<T> {
    let mut first = true;
    loop {
        let was_subscribed = interest.is_subscribed();
        if std::mem::take(&mut first)
            && refresh.is_none()
            && let Some(holder_until) = interest.queue_behind()
        {
            interest
                .park(None, holder_until.min(acquiring.deadline))
                .await;
            continue;
        }
        interest.mark();
        let hint = match attempt().await? {
            Try::Got(granted) => return Ok(granted),
            Try::Held(hint) => hint,
        };
        let now = Instant::now();
        if now >= acquiring.deadline {
            return Err(Error::LockNotAcquired {
                key: key.to_string(),
                waited_ms: acquiring.started.elapsed().as_millis() as u64,
            });
        }
        if !was_subscribed {
            interest.subscribe().await?;
            continue;
        }
        let holder_until = now
            + hint.map_or(options.lease_time(), |ms| {
                Duration::from_millis(ms.saturating_add(1))
            });
        let wake = match refresh {
            Some(period) => holder_until.min(now + period),
            None => holder_until,
        };
        interest
            .park(Some(holder_until), wake.min(acquiring.deadline))
            .await;
    }
}

/// A remaining time from a script: negative values (no expiry, or none known) give no hint.
fn hint(ms: i64) -> Option<u64> {
    u64::try_from(ms).ok()
}

/// Runs an extend `script` (`KEYS[1]` the lock, `ARGV[1]` token, `ARGV[2]` lease in ms; 1 when
/// extended) and gives the new `valid_until` when it extended.
async fn extend_lease(
    node: &Node,
    script: &redis::Script,
    keys: &LockKeys,
    token: &str,
    lease: Duration,
) -> Result<Option<Instant>> {
    let sent = Instant::now();
    let extended: i64 = node
        .eval(script, &[&keys.lock], &[&token, &ms(lease)])
        .await?;
    Ok((extended == 1).then(|| valid_until(sent, lease)))
}

fn check_heartbeat(what: &str, timeout: Duration) -> Result<()> {
    if timeout < MIN_HEARTBEAT || timeout > crate::MAX_LEASE {
        return Err(Error::aborted(format!(
            "invalid {what} {} ms: it must be between {} ms and {} ms",
            timeout.as_millis(),
            MIN_HEARTBEAT.as_millis(),
            crate::MAX_LEASE.as_millis()
        )));
    }
    Ok(())
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

// ----------------------------------------------------------------------------------------
// Reentrant lock
// ----------------------------------------------------------------------------------------

/// Who holds a [`ReentrantLock`]: acquisitions with the same owner nest. Clone it to hand it
/// down to the code that may take the lock again; make a new one per logical holder (a task,
/// a request), never share one between holders that must exclude each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner(String);

impl Owner {
    /// A new owner with a random 128-bit id.
    pub fn new() -> Owner {
        Owner(new_token())
    }

    /// The owner's id, as stored in Redis.
    pub fn id(&self) -> &str {
        &self.0
    }
}

impl Default for Owner {
    fn default() -> Self {
        Owner::new()
    }
}

/// A lock that the same [`Owner`] can take again while it holds it: each acquisition counts,
/// each release (or dropped guard) counts down, and the lock is free when the count reaches
/// zero. The fencing token is the same for all nested holds.
///
/// The lock's lease covers all holds: a nested acquisition extends it to at least its own
/// lease, and a crashed owner's holds all end with it. Each guard's validity
/// ([`ReentrantGuard::valid_until`]) is that of its own grant; use the watchdog for long holds.
///
/// ```no_run
/// # async fn demo() -> contend::Result<()> {
/// use contend_redis::{LockClient, LockOptions, Owner, ReentrantLock};
/// let client = LockClient::connect("redis://127.0.0.1:6379/0").await?;
/// let lock = ReentrantLock::new(&client);
/// let me = Owner::new();
/// let outer = lock.acquire("account:1", &me, &LockOptions::new()).await?;
/// let inner = lock.acquire("account:1", &me, &LockOptions::new()).await?; // nests
/// assert_eq!(inner.holds(), 2);
/// assert_eq!(inner.fencing_token(), outer.fencing_token());
/// inner.release().await?; // still held by `outer`
/// outer.release().await?; // free
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ReentrantLock {
    client: LockClient,
    holder: Arc<ReentrantHolder>,
}

#[derive(Debug)]
struct ReentrantHolder {
    node: Node,
}

impl Holder for ReentrantHolder {
    fn extend<'a>(
        &'a self,
        keys: &'a LockKeys,
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Instant>>> {
        Box::pin(extend_lease(
            &self.node,
            &scripts::REENTRANT_EXTEND,
            keys,
            token,
            lease,
        ))
    }

    fn raise<'a>(
        &'a self,
        keys: &'a LockKeys,
        token: &'a str,
        value: u64,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let raised: i64 = self
                .node
                .eval(
                    &scripts::REENTRANT_RAISE,
                    &[&keys.lock, &keys.fence],
                    &[&token, &value],
                )
                .await?;
            Ok(raised == 1)
        })
    }

    fn release<'a>(&'a self, keys: &'a LockKeys, token: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let left: i64 = self
                .node
                .eval(
                    &scripts::REENTRANT_RELEASE,
                    &[&keys.lock],
                    &[&token, &keys.channel],
                )
                .await?;
            Ok(left >= 0)
        })
    }
}

impl ReentrantLock {
    /// The reentrant locks of `client`'s server and namespace.
    pub fn new(client: &LockClient) -> ReentrantLock {
        ReentrantLock {
            client: client.clone(),
            holder: Arc::new(ReentrantHolder {
                node: client.node().clone(),
            }),
        }
    }

    /// Takes the lock for `owner`, or one more hold if `owner` holds it already; waits up to
    /// the options' wait time while another owner holds it.
    ///
    /// # Errors
    /// [`Error::LockNotAcquired`] when the wait time passes; [`Error::LockService`] when Redis
    /// cannot be reached; [`Error::Aborted`] for an invalid key or options.
    ///
    /// # Cancel safety
    /// Safe while waiting. Dropped while an attempt is in flight, a hold may be counted that no
    /// guard will release; the owner's other guards then cannot free the lock, and it ends
    /// with its lease (use a fresh [`Owner`] after cancelling).
    pub async fn acquire(
        &self,
        key: &str,
        owner: &Owner,
        options: &LockOptions,
    ) -> Result<ReentrantGuard> {
        let namespace = format!("{}:reentrant", self.client.namespace());
        let acquiring = Acquiring::begin(&namespace, key, options)?;
        let keys = acquiring.keys.clone();
        let interest = self.client.waiters().register(&keys.channel, Wake::One);
        let node = self.client.node();
        let (keys_ref, owner_id) = (&keys, owner.id());
        let (fence, holds, sent) = wait_for(&interest, key, &acquiring, options, None, || {
            Box::pin(async move {
                let sent = Instant::now();
                let (granted, value, holds): (i64, i64, i64) = node
                    .eval(
                        &scripts::REENTRANT_ACQUIRE,
                        &[&keys_ref.lock, &keys_ref.fence],
                        &[&owner_id, &options.lease_ms()],
                    )
                    .await?;
                Ok(if granted == 1 {
                    Try::Got((value as u64, holds as u64, sent))
                } else {
                    Try::Held(hint(value))
                })
            })
        })
        .await?;
        let lease = options.lease_time();
        let holder: Arc<dyn Holder> = self.holder.clone();
        let core = GuardCore::new(
            keys,
            owner.id().to_string(),
            lease,
            valid_until(sent, lease),
            holder,
            options.has_watchdog(),
        );
        Ok(ReentrantGuard {
            core,
            fence: FencingToken::new(fence),
            holds,
        })
    }
}

/// One hold of a [`ReentrantLock`]. Dropping it releases this hold (spawned, never blocking).
#[must_use = "dropping the guard releases the hold"]
#[derive(Debug)]
pub struct ReentrantGuard {
    core: GuardCore,
    fence: FencingToken,
    holds: u64,
}

impl ReentrantGuard {
    /// The lock's key.
    pub fn key(&self) -> &str {
        self.core.key()
    }

    /// The fencing token of the outermost hold (the same for every nested one).
    pub fn fencing_token(&self) -> FencingToken {
        self.fence
    }

    /// How many holds the owner had with this one, when it was granted (1: the outermost).
    pub fn holds(&self) -> u64 {
        self.holds
    }

    /// Until when this hold is surely valid.
    pub fn valid_until(&self) -> Instant {
        self.core.valid_until()
    }

    /// True once the lock is lost (renewal found it gone, or the validity ran out).
    pub fn is_lost(&self) -> bool {
        self.core.is_lost()
    }

    /// Completes when the lock is lost or this hold released (as [`LockGuard::lost`]).
    ///
    /// # Cancel safety
    /// Safe: it only watches.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        self.core.lost()
    }

    /// Extends the lease of the whole lock, if the owner still holds it.
    ///
    /// # Errors
    /// [`Error::LockService`] when Redis cannot be reached.
    ///
    /// # Cancel safety
    /// As [`LockGuard::extend`].
    pub async fn extend(&self, lease: Duration) -> Result<bool> {
        self.core.extend(lease).await
    }

    /// Raises the key's fencing counter past `highest`, the token the database refused this
    /// hold's for ([`contend::Error::StaleFencingToken`]), while the owner still holds the lock:
    /// as [`LockGuard::raise_fence`] (a Redis restarted without persistence counts from 0
    /// again). The next outermost hold's token is then newer than `highest`.
    ///
    /// # Errors
    /// [`Error::LockService`] when Redis cannot be reached.
    ///
    /// # Cancel safety
    /// As [`LockGuard::raise_fence`].
    pub async fn raise_fence(&self, highest: FencingToken) -> Result<bool> {
        self.core.raise_fence(highest.get()).await
    }

    /// Releases this hold; the lock is free once every hold is released. `Ok(false)` when the
    /// lock was no longer the owner's.
    ///
    /// # Errors
    /// [`Error::LockService`] when Redis cannot be reached; the lease then ends the lock.
    ///
    /// # Cancel safety
    /// As [`LockGuard::release`].
    pub async fn release(self) -> Result<bool> {
        self.core.release().await
    }
}

// ----------------------------------------------------------------------------------------
// Semaphore and read locks: sets of holders leased one by one
// ----------------------------------------------------------------------------------------

/// The holder of a member of a leased set (a permit, a read lock).
#[derive(Debug)]
struct SharedHolder {
    node: Node,
    /// Publish only when the set is left empty (read locks: writers wait for the last one).
    notify_when_empty: bool,
}

impl Holder for SharedHolder {
    fn extend<'a>(
        &'a self,
        keys: &'a LockKeys,
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Instant>>> {
        Box::pin(extend_lease(
            &self.node,
            &scripts::SHARED_EXTEND,
            keys,
            token,
            lease,
        ))
    }

    fn release<'a>(&'a self, keys: &'a LockKeys, token: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let mode = if self.notify_when_empty { "1" } else { "0" };
            let released: i64 = self
                .node
                .eval(
                    &scripts::SHARED_RELEASE,
                    &[&keys.lock],
                    &[&token, &keys.channel, &mode],
                )
                .await?;
            Ok(released == 1)
        })
    }
}

/// A counting semaphore: at most `permits` holders at once. Every permit is leased: the
/// holders are a sorted set scored by lease end, and the script that acquires first removes
/// the expired ones, so a client that dies holding a permit does not leak it — it comes back
/// when its lease ends (with the watchdog, a live holder keeps renewing it).
///
/// Every client of one key must use the same number of permits.
///
/// ```no_run
/// # async fn demo() -> contend::Result<()> {
/// use std::time::Duration;
/// use contend_redis::{LockClient, LockOptions, Semaphore};
/// let client = LockClient::connect("redis://127.0.0.1:6379/0").await?;
/// let downloads = Semaphore::new(&client, "downloads", 3)?;
/// let permit = downloads.acquire(&LockOptions::new().lease(Duration::from_secs(30))).await?;
/// // ... at most 3 of these run at once, across every process ...
/// permit.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Semaphore {
    client: LockClient,
    key: String,
    permits: u32,
    holder: Arc<SharedHolder>,
}

impl Semaphore {
    /// The semaphore `key` with `permits` permits on `client`'s server.
    ///
    /// # Errors
    /// [`Error::Aborted`] for zero permits or an invalid key.
    pub fn new(client: &LockClient, key: &str, permits: u32) -> Result<Semaphore> {
        crate::options::check_key(key)?;
        if permits == 0 {
            return Err(Error::aborted("a semaphore needs at least one permit"));
        }
        Ok(Semaphore {
            client: client.clone(),
            key: key.to_string(),
            permits,
            holder: Arc::new(SharedHolder {
                node: client.node().clone(),
                notify_when_empty: false,
            }),
        })
    }

    /// The number of permits.
    pub fn permits(&self) -> u32 {
        self.permits
    }

    /// Takes a permit, waiting up to the options' wait time while all are taken (woken by a
    /// release, or when the first permit's lease ends).
    ///
    /// # Errors
    /// [`Error::LockNotAcquired`] when the wait time passes; [`Error::LockService`] when Redis
    /// cannot be reached; [`Error::Aborted`] for invalid options.
    ///
    /// # Cancel safety
    /// Safe while waiting. Dropped while an attempt is in flight, a permit may be granted that
    /// nobody holds; it comes back when its lease ends.
    pub async fn acquire(&self, options: &LockOptions) -> Result<SharedGuard> {
        let namespace = format!("{}:semaphore", self.client.namespace());
        let acquiring = Acquiring::begin(&namespace, &self.key, options)?;
        let keys = acquiring.keys.clone();
        let interest = self.client.waiters().register(&keys.channel, Wake::One);
        let node = self.client.node();
        let (keys_ref, token, permits) = (&keys, acquiring.token.as_str(), self.permits);
        let sent = wait_for(&interest, &self.key, &acquiring, options, None, || {
            Box::pin(async move {
                let sent = Instant::now();
                let (granted, wait): (i64, i64) = node
                    .eval(
                        &scripts::PERMIT_ACQUIRE,
                        &[&keys_ref.lock],
                        &[&token, &options.lease_ms(), &permits],
                    )
                    .await?;
                Ok(if granted == 1 {
                    Try::Got(sent)
                } else {
                    Try::Held(hint(wait))
                })
            })
        })
        .await?;
        Ok(shared_guard(
            keys,
            acquiring.token.clone(),
            sent,
            options,
            self.holder.clone(),
        ))
    }
}

fn shared_guard(
    keys: LockKeys,
    token: String,
    sent: Instant,
    options: &LockOptions,
    holder: Arc<SharedHolder>,
) -> SharedGuard {
    let lease = options.lease_time();
    let holder: Arc<dyn Holder> = holder;
    SharedGuard {
        core: GuardCore::new(
            keys,
            token,
            lease,
            valid_until(sent, lease),
            holder,
            options.has_watchdog(),
        ),
    }
}

/// A held share: a [`Semaphore`] permit or a [`RwLock`] read lock. No fencing token (several
/// hold one at once). Dropping it releases it (spawned, never blocking).
#[must_use = "dropping the guard releases it"]
#[derive(Debug)]
pub struct SharedGuard {
    core: GuardCore,
}

impl SharedGuard {
    /// The semaphore's or lock's key.
    pub fn key(&self) -> &str {
        self.core.key()
    }

    /// Until when the share is surely held.
    pub fn valid_until(&self) -> Instant {
        self.core.valid_until()
    }

    /// True once the share is lost: its lease ran out (it may be handed to someone else).
    pub fn is_lost(&self) -> bool {
        self.core.is_lost()
    }

    /// Completes when the share is lost or released (as [`LockGuard::lost`]).
    ///
    /// # Cancel safety
    /// Safe: it only watches.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        self.core.lost()
    }

    /// Extends the lease, unless it already ran out.
    ///
    /// # Errors
    /// [`Error::LockService`] when Redis cannot be reached.
    ///
    /// # Cancel safety
    /// As [`LockGuard::extend`].
    pub async fn extend(&self, lease: Duration) -> Result<bool> {
        self.core.extend(lease).await
    }

    /// Releases now; `Ok(false)` when the lease had already run out.
    ///
    /// # Errors
    /// [`Error::LockService`] when Redis cannot be reached; the lease then ends it.
    ///
    /// # Cancel safety
    /// As [`LockGuard::release`].
    pub async fn release(self) -> Result<bool> {
        self.core.release().await
    }
}

// ----------------------------------------------------------------------------------------
// Fair lock
// ----------------------------------------------------------------------------------------

/// A first-come, first-served lock: waiters queue in Redis by ticket and the lock goes to the
/// head of the queue only.
///
/// # Vanished waiters
/// Every waiter has its own heartbeat in Redis: its expiry is set to now + the queue timeout
/// (server time) by each of its own attempts, which a waiting client repeats every third of
/// the queue timeout. Each attempt and each release first removes the waiters whose heartbeat
/// ran out. So a waiter whose process died leaves the queue one queue timeout after its last
/// attempt, and the next waiter is told at once if the lock is free; any number of dead
/// waiters cost one queue timeout together, not one each.
///
/// Redisson's fair lock computes each waiter's timeout from the previous waiter's (plus 5 s
/// per waiter): the chained timeouts drifted far into the future (redisson issues #1104,
/// #2099) and live waiters were dropped as expired and then never woken (#3004), so the queue
/// hung. Here no timeout depends on another waiter's, a live waiter renews its own well
/// before it runs out, and a waiter that was dropped anyway (paused for longer than the
/// timeout) joins the queue again at the back on its next attempt rather than hanging.
///
/// A release publishes the token of the new head, and only that waiter wakes.
///
/// ```no_run
/// # async fn demo() -> contend::Result<()> {
/// use std::time::Duration;
/// use contend_redis::{FairLock, LockClient, LockOptions};
/// let client = LockClient::connect("redis://127.0.0.1:6379/0").await?;
/// let fair = FairLock::new(&client).queue_timeout(Duration::from_secs(3));
/// let guard = fair.acquire("printer", &LockOptions::new()).await?;
/// let token = guard.fencing_token();
/// # let _ = token;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct FairLock {
    client: LockClient,
    queue_timeout: Duration,
    holder: Arc<FairHolder>,
}

#[derive(Debug)]
struct FairHolder {
    node: Node,
}

/// The fair lock's queue keys beside `lock`.
fn fair_keys(lock: &str) -> [String; 3] {
    [
        format!("{lock}:queue"),
        format!("{lock}:heartbeat"),
        format!("{lock}:tickets"),
    ]
}

impl Holder for FairHolder {
    fn extend<'a>(
        &'a self,
        keys: &'a LockKeys,
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Instant>>> {
        Box::pin(extend_on(&self.node, keys, token, lease))
    }

    /// The fair lock's key holds the owner's token as the plain lock's does.
    fn raise<'a>(
        &'a self,
        keys: &'a LockKeys,
        token: &'a str,
        value: u64,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(raise_on(&self.node, keys, token, value))
    }

    fn release<'a>(&'a self, keys: &'a LockKeys, token: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let [queue, heartbeat, _] = fair_keys(&keys.lock);
            let released: i64 = self
                .node
                .eval(
                    &scripts::FAIR_RELEASE,
                    &[&keys.lock, &queue, &heartbeat],
                    &[&token, &keys.channel],
                )
                .await?;
            Ok(released == 1)
        })
    }
}

/// A queued fair waiter: leaves the queue when dropped before it got the lock.
struct Queued {
    node: Node,
    keys: LockKeys,
    token: String,
    granted: bool,
}

impl Drop for Queued {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        let (node, keys, token) = (
            self.node.clone(),
            self.keys.clone(),
            std::mem::take(&mut self.token),
        );
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let [queue, heartbeat, _] = fair_keys(&keys.lock);
                let _ = node
                    .eval::<i64>(
                        &scripts::FAIR_LEAVE,
                        &[&keys.lock, &queue, &heartbeat],
                        &[&token, &keys.channel],
                    )
                    .await;
            });
        }
    }
}

impl FairLock {
    /// The fair locks of `client`'s server and namespace, with a queue timeout of 5 s.
    pub fn new(client: &LockClient) -> FairLock {
        FairLock {
            client: client.clone(),
            queue_timeout: Duration::from_secs(5),
            holder: Arc::new(FairHolder {
                node: client.node().clone(),
            }),
        }
    }

    /// How long a waiter keeps its place without renewing it (it renews every third of this
    /// while it waits); a vanished waiter delays the others by at most this. Between 30 ms
    /// and one day (checked by `acquire`). Default 5 s.
    #[must_use]
    pub fn queue_timeout(mut self, timeout: Duration) -> FairLock {
        self.queue_timeout = timeout;
        self
    }

    /// Joins the queue for `key` and takes the lock when this waiter reaches the head and the
    /// lock is free, waiting up to the options' wait time.
    ///
    /// # Errors
    /// [`Error::LockNotAcquired`] when the wait time passes (the waiter leaves the queue);
    /// [`Error::LockService`] when Redis cannot be reached; [`Error::Aborted`] for an invalid
    /// key, options or queue timeout.
    ///
    /// # Cancel safety
    /// Safe while waiting: the dropped waiter leaves the queue (in a spawned task; if that
    /// fails, its heartbeat runs out within the queue timeout). Dropped while an attempt is in
    /// flight, a grant may be made that nobody holds; it ends with its lease.
    pub async fn acquire(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        check_heartbeat("queue timeout", self.queue_timeout)?;
        let namespace = format!("{}:fair", self.client.namespace());
        let acquiring = Acquiring::begin(&namespace, key, options)?;
        let keys = acquiring.keys.clone();
        let token = acquiring.token.clone();
        let interest = self.client.waiters().register_named(&keys.channel, &token);
        let node = self.client.node();
        let mut queued = Queued {
            node: node.clone(),
            keys: keys.clone(),
            token: token.clone(),
            granted: false,
        };
        let [queue, heartbeat, tickets] = fair_keys(&keys.lock);
        let (keys_ref, token_ref, timeout_ms) = (&keys, token.as_str(), ms(self.queue_timeout));
        let (queue, heartbeat, tickets) = (&queue, &heartbeat, &tickets);
        let refresh = Some(self.queue_timeout / 3);
        let (fence, sent) = wait_for(&interest, key, &acquiring, options, refresh, || {
            Box::pin(async move {
                let sent = Instant::now();
                let (granted, value): (i64, i64) = node
                    .eval(
                        &scripts::FAIR_ACQUIRE,
                        &[&keys_ref.lock, queue, heartbeat, tickets, &keys_ref.fence],
                        &[
                            &token_ref,
                            &options.lease_ms(),
                            &timeout_ms,
                            &keys_ref.channel,
                        ],
                    )
                    .await?;
                Ok(if granted == 1 {
                    Try::Got((value as u64, sent))
                } else {
                    Try::Held(hint(value))
                })
            })
        })
        .await?;
        queued.granted = true;
        let lease = options.lease_time();
        let holder: Arc<dyn Holder> = self.holder.clone();
        let core = GuardCore::new(
            keys,
            token,
            lease,
            valid_until(sent, lease),
            holder,
            options.has_watchdog(),
        );
        Ok(LockGuard::new(core, FencingToken::new(fence)))
    }
}

// ----------------------------------------------------------------------------------------
// Read-write lock
// ----------------------------------------------------------------------------------------

/// Many readers or one writer.
///
/// # Policy: writer preference
/// A writer that finds the lock busy records an *intent*; while an intent is live, new
/// readers wait, so the readers inside drain and the writer gets in: a steady stream of
/// readers cannot starve a writer. Readers can wait while writers keep coming (they get in
/// whenever no writer holds or waits). The intent is a sorted-set member scored by its expiry
/// (the intent timeout, renewed by the waiting writer every third of it), so a writer that
/// dies while waiting stops blocking readers within one intent timeout, and one that gives
/// up withdraws its intent and wakes the readers at once.
///
/// Readers are leased one by one (as [`Semaphore`] permits are): a reader that dies does
/// not keep writers out past its lease. A writer's release wakes every waiter of the key in
/// the process; the last reader's release wakes them too.
///
/// ```no_run
/// # async fn demo() -> contend::Result<()> {
/// use contend_redis::{LockClient, LockOptions, RwLock};
/// let client = LockClient::connect("redis://127.0.0.1:6379/0").await?;
/// let rw = RwLock::new(&client);
/// let a = rw.read("catalog", &LockOptions::new()).await?;
/// let b = rw.read("catalog", &LockOptions::new()).await?; // readers share
/// a.release().await?;
/// b.release().await?;
/// let w = rw.write("catalog", &LockOptions::new()).await?; // alone, with a fencing token
/// println!("token {}", w.fencing_token());
/// w.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RwLock {
    client: LockClient,
    intent_timeout: Duration,
    readers: Arc<SharedHolder>,
    writer: Arc<SingleNode>,
}

/// A waiting writer's intent: withdrawn when dropped before the writer got the lock.
struct Intent {
    node: Node,
    intents: String,
    channel: String,
    token: String,
    granted: bool,
}

impl Drop for Intent {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        let (node, intents, channel, token) = (
            self.node.clone(),
            std::mem::take(&mut self.intents),
            std::mem::take(&mut self.channel),
            std::mem::take(&mut self.token),
        );
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = node
                    .eval::<i64>(&scripts::WRITE_LEAVE, &[&intents], &[&token, &channel])
                    .await;
            });
        }
    }
}

impl RwLock {
    /// The read-write locks of `client`'s server and namespace, with an intent timeout of 5 s.
    pub fn new(client: &LockClient) -> RwLock {
        RwLock {
            client: client.clone(),
            intent_timeout: Duration::from_secs(5),
            readers: Arc::new(SharedHolder {
                node: client.node().clone(),
                notify_when_empty: true,
            }),
            writer: Arc::new(SingleNode::new(client.node().clone(), true)),
        }
    }

    /// How long a waiting writer's intent keeps new readers out without being renewed (a
    /// waiting writer renews it every third of this). Between 30 ms and one day (checked by
    /// `write`). Default 5 s.
    #[must_use]
    pub fn intent_timeout(mut self, timeout: Duration) -> RwLock {
        self.intent_timeout = timeout;
        self
    }

    fn keys(&self, key: &str, options: &LockOptions) -> Result<(Acquiring, String, String)> {
        let namespace = format!("{}:rw", self.client.namespace());
        let acquiring = Acquiring::begin(&namespace, key, options)?;
        let readers = format!("{}:readers", acquiring.keys.lock);
        let intents = format!("{}:intents", acquiring.keys.lock);
        Ok((acquiring, readers, intents))
    }

    /// Takes a read lock, waiting while a writer holds the lock or waits for it.
    ///
    /// # Errors
    /// [`Error::LockNotAcquired`] when the wait time passes; [`Error::LockService`] when Redis
    /// cannot be reached; [`Error::Aborted`] for an invalid key or options.
    ///
    /// # Cancel safety
    /// Safe while waiting; dropped while an attempt is in flight, a read lock may be granted
    /// that nobody holds; it ends with its lease.
    pub async fn read(&self, key: &str, options: &LockOptions) -> Result<SharedGuard> {
        let (acquiring, readers, intents) = self.keys(key, options)?;
        let interest = self
            .client
            .waiters()
            .register(&acquiring.keys.channel, Wake::All);
        let node = self.client.node();
        let (writer, token) = (acquiring.keys.lock.as_str(), acquiring.token.as_str());
        let (readers_ref, intents_ref) = (&readers, &intents);
        let sent = wait_for(&interest, key, &acquiring, options, None, || {
            Box::pin(async move {
                let sent = Instant::now();
                let (granted, wait): (i64, i64) = node
                    .eval(
                        &scripts::READ_ACQUIRE,
                        &[writer, readers_ref, intents_ref],
                        &[&token, &options.lease_ms()],
                    )
                    .await?;
                Ok(if granted == 1 {
                    Try::Got(sent)
                } else {
                    Try::Held(hint(wait))
                })
            })
        })
        .await?;
        let keys = LockKeys {
            key: acquiring.keys.key.clone(),
            lock: readers,
            fence: acquiring.keys.fence.clone(),
            channel: acquiring.keys.channel.clone(),
        };
        Ok(shared_guard(
            keys,
            acquiring.token.clone(),
            sent,
            options,
            self.readers.clone(),
        ))
    }

    /// Takes the write lock, alone, with a fencing token; waits while a writer or readers
    /// hold it, keeping new readers out meanwhile (see the policy above).
    ///
    /// # Errors
    /// [`Error::LockNotAcquired`] when the wait time passes (the intent is withdrawn);
    /// [`Error::LockService`] when Redis cannot be reached; [`Error::Aborted`] for an invalid
    /// key, options or intent timeout.
    ///
    /// # Cancel safety
    /// Safe while waiting: the intent is withdrawn (in a spawned task; if that fails, it
    /// expires within the intent timeout). Dropped while an attempt is in flight, a write
    /// lock may be granted that nobody holds; it ends with its lease.
    pub async fn write(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        check_heartbeat("intent timeout", self.intent_timeout)?;
        let (acquiring, readers, intents) = self.keys(key, options)?;
        let interest = self
            .client
            .waiters()
            .register(&acquiring.keys.channel, Wake::All);
        let node = self.client.node();
        let mut intent = Intent {
            node: node.clone(),
            intents: intents.clone(),
            channel: acquiring.keys.channel.clone(),
            token: acquiring.token.clone(),
            granted: false,
        };
        let keys = &acquiring.keys;
        let (token, timeout_ms) = (acquiring.token.as_str(), ms(self.intent_timeout));
        let (readers_ref, intents_ref) = (&readers, &intents);
        let refresh = Some(self.intent_timeout / 3);
        let (fence, sent) = wait_for(&interest, key, &acquiring, options, refresh, || {
            Box::pin(async move {
                let sent = Instant::now();
                let (granted, value): (i64, i64) = node
                    .eval(
                        &scripts::WRITE_ACQUIRE,
                        &[&keys.lock, readers_ref, intents_ref, &keys.fence],
                        &[&token, &options.lease_ms(), &timeout_ms],
                    )
                    .await?;
                Ok(if granted == 1 {
                    Try::Got((value as u64, sent))
                } else {
                    Try::Held(hint(value))
                })
            })
        })
        .await?;
        intent.granted = true;
        let lease = options.lease_time();
        let holder: Arc<dyn Holder> = self.writer.clone();
        let core = GuardCore::new(
            acquiring.keys.clone(),
            acquiring.token.clone(),
            lease,
            valid_until(sent, lease),
            holder,
            options.has_watchdog(),
        );
        Ok(LockGuard::new(core, FencingToken::new(fence)))
    }
}
