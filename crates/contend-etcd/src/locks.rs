//! [`EtcdLocks`]: the lock recipe on etcd, and its connection to the cluster.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use contend::BoxFuture;
use contend::fencing::FencingToken;
use contend::lock::{HeldLock, LockService};
use etcd_client::{
    Client, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, WatchFilterType, WatchOptions,
};
use tokio::sync::watch;

use crate::error::{EtcdError, Failure, classify, ms};
use crate::lease::{KeepAlive, Lease};

/// The default key prefix: lock keys live under `contend/lock/`.
pub const DEFAULT_NAMESPACE: &str = "contend";

/// Pause between two tries of a request that failed on an unreachable member or during an
/// election.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The shortest time one try of a request is given (see [`EtcdLocksBuilder::request_timeout`]).
const MIN_TRY: Duration = Duration::from_millis(500);

/// Settings of [`EtcdLocks`], given to [`EtcdLocks::builder`].
#[derive(Debug, Clone)]
pub struct EtcdLocksBuilder {
    urls: Vec<String>,
    namespace: String,
    lease_ttl: Duration,
    wait: Duration,
    request_timeout: Duration,
}

impl EtcdLocksBuilder {
    /// Prefix of every key this client writes (`<namespace>/lock/<key>/...`). Clients that
    /// must exclude each other must use the same one. Default [`DEFAULT_NAMESPACE`].
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_string();
        self
    }

    /// TTL of the client's lease (whole seconds, at least 1 s; etcd rounds it up to its own
    /// minimum, about 2 s with default election settings). A lock whose holder dies or pauses
    /// is released by etcd at most this long after the last keepalive. Default 10 s.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How long [`EtcdLocks::acquire`] waits for a held lock before
    /// [`contend::Error::LockNotAcquired`]. Default 5 s.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// How long one request (grant, lock, range, release) is tried, across members and
    /// elections, before [`EtcdError::Unavailable`] or [`EtcdError::NoQuorum`]: the bound
    /// on how long a call takes when the cluster has lost its quorum. Each try gets a third of
    /// it (at least 500 ms), so that a request lost with a dying leader is sent again. Default
    /// 5 s: with etcd's default settings a dead leader is noticed after 1 s and replaced within
    /// about 2 s more.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Connects to the cluster and checks that it answers (one read).
    ///
    /// # Errors
    /// [`contend::Error::LockService`] with [`EtcdError::Config`] for bad settings (no URL, a
    /// URL that is not `http://host:port`, an empty namespace, a lease under 1 s), or
    /// [`EtcdError::Unavailable`] / [`EtcdError::NoQuorum`] when the cluster does not answer.
    ///
    /// # Cancel safety
    /// Safe to drop: nothing is written before it returns.
    pub async fn connect(self) -> contend::Result<EtcdLocks> {
        if self.urls.is_empty() {
            return Err(EtcdError::Config("no etcd URL given".into()).into());
        }
        let mut endpoints = Vec::with_capacity(self.urls.len());
        for url in &self.urls {
            endpoints.push(check_url(url)?);
        }
        if self.namespace.is_empty() {
            return Err(EtcdError::Config("the namespace must not be empty".into()).into());
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(EtcdError::Config(format!(
                "the lease TTL must be at least 1 s, got {} ms",
                ms(self.lease_ttl)
            ))
            .into());
        }
        if self.request_timeout.is_zero() {
            return Err(EtcdError::Config("the request timeout must be positive".into()).into());
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(self.request_timeout)
            .with_keep_alive(Duration::from_secs(2), self.request_timeout)
            .with_require_leader(true);
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|source| EtcdError::Request {
                what: "connect",
                source,
            })?;
        let ttl_secs = self.lease_ttl.as_secs() + u64::from(self.lease_ttl.subsec_nanos() > 0);
        let locks = EtcdLocks {
            inner: Arc::new(Inner {
                client,
                prefix: format!("{}/lock/", self.namespace),
                ttl_secs: i64::try_from(ttl_secs).unwrap_or(i64::MAX),
                wait: self.wait,
                request_timeout: self.request_timeout,
                lease: tokio::sync::Mutex::new(None),
                seq: AtomicU64::new(0),
                requests: Arc::new(AtomicU64::new(0)),
            }),
        };
        let probe = locks.inner.prefix.clone().into_bytes();
        locks
            .inner
            .call("connect check", |mut c| {
                let probe = probe.clone();
                async move {
                    c.get(probe, Some(GetOptions::new().with_count_only()))
                        .await
                }
            })
            .await?;
        Ok(locks)
    }
}

fn check_url(url: &str) -> Result<String, EtcdError> {
    let url = url.trim();
    let rest = if let Some(rest) = url.strip_prefix("http://") {
        rest
    } else if url.starts_with("https://") {
        return Err(EtcdError::Config(format!(
            "`{url}`: TLS is not supported by this build; use an http:// client URL"
        )));
    } else {
        return Err(EtcdError::Config(format!(
            "`{url}` is not an etcd client URL (expected http://host:port)"
        )));
    };
    let host_port = rest.trim_end_matches('/');
    let ok = match host_port.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    };
    if !ok || host_port.contains('/') {
        return Err(EtcdError::Config(format!(
            "`{url}` is not an etcd client URL (expected http://host:port)"
        )));
    }
    Ok(format!("http://{host_port}"))
}

/// Exclusive locks on etcd, with the lock key's revision as fencing token.
///
/// # The recipe
/// The client holds one lease, granted on first use and kept alive by a background task (a
/// keepalive every third of the TTL). To lock `K`, one transaction writes a key of its own
/// under `<namespace>/lock/<K>/`, attached to the lease, and reads the two newest keys under
/// that prefix: if its own is the only one, the lock is granted (one request). Otherwise the
/// waiter watches only the key created just before its own (by create revision; the same
/// transaction names it) and is woken when that key is deleted, a release or an expired lease:
/// waiters are served in arrival order, without polling and without waking everyone at once. A
/// waiter sends the transaction, one watch, one range when woken, and the release. The
/// **fencing token** is the create revision of the waiter's key: etcd's revision grows with
/// every write to the cluster, so a later grant of the same lock always has a larger token.
///
/// # Failures
/// Requests go to any reachable member (`http://` URLs of the cluster); one that fails on an
/// unreachable member or during an election is tried again until
/// [`EtcdLocksBuilder::request_timeout`], then fails with [`EtcdError::NoQuorum`] or
/// [`EtcdError::Unavailable`]. When the lease expires (keepalive failing for a TTL, a paused
/// process) the locks are lost: [`EtcdGuard::lost`] completes, and a late write fenced with
/// the old token is refused by the database ([`contend::fencing`]).
///
/// ```no_run
/// # async fn demo(db: contend::Db) -> contend::Result<()> {
/// use std::time::Duration;
/// use contend::fencing;
/// use contend_etcd::EtcdLocks;
/// let locks = EtcdLocks::builder(&["http://127.0.0.1:2379", "http://127.0.0.1:22379"])
///     .lease_ttl(Duration::from_secs(10))
///     .wait(Duration::from_secs(5))
///     .connect()
///     .await?;
/// let guard = locks.acquire("account:1").await?;
/// let token = guard.fencing_token();
/// db.transaction(move |tx| Box::pin(async move {
///     fencing::fence(tx, "account:1", token).await?; // refuses a holder that lost the lock
///     let q = tx.query("UPDATE account SET balance = balance - 10 WHERE id = 1");
///     q.execute(tx.conn()).await?;
///     Ok::<_, contend::Error>(())
/// })).await?;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EtcdLocks {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLocks")
            .field("prefix", &self.inner.prefix)
            .field("lease_ttl_s", &self.inner.ttl_secs)
            .field("wait", &self.inner.wait)
            .field("request_timeout", &self.inner.request_timeout)
            .finish()
    }
}

struct Inner {
    client: Client,
    /// `<namespace>/lock/`.
    prefix: String,
    ttl_secs: i64,
    wait: Duration,
    request_timeout: Duration,
    /// The current lease; replaced when it is lost.
    lease: tokio::sync::Mutex<Option<Arc<Lease>>>,
    /// Makes every waiter's key unique, also for waiters of one lease on the same lock.
    seq: AtomicU64,
    /// Requests sent to etcd (each try, each keepalive, each watch).
    requests: Arc<AtomicU64>,
}

impl EtcdLocks {
    /// Settings for a client of the cluster whose client URLs are `urls` (`http://host:port`,
    /// several for failover).
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = contend_etcd::EtcdLocks::builder(&["http://127.0.0.1:2379"])
    ///     .namespace("shop")
    ///     .wait(Duration::from_secs(2));
    /// # let _ = builder;
    /// ```
    pub fn builder<S: AsRef<str>>(urls: &[S]) -> EtcdLocksBuilder {
        EtcdLocksBuilder {
            urls: urls.iter().map(|u| u.as_ref().to_string()).collect(),
            namespace: DEFAULT_NAMESPACE.to_string(),
            lease_ttl: Duration::from_secs(10),
            wait: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }

    /// Requests sent to etcd so far by this client and its clones: every try of a unary
    /// request, every watch opened and every keepalive message.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// The lock wait ([`EtcdLocksBuilder::wait`]).
    pub fn wait_time(&self) -> Duration {
        self.inner.wait
    }

    /// Acquires the lock on `key`, waiting up to the configured wait
    /// ([`EtcdLocksBuilder::wait`]).
    ///
    /// # Errors
    /// [`contend::Error::LockNotAcquired`] when the wait runs out;
    /// [`contend::Error::LockService`] with an [`EtcdError`] when etcd does not answer
    /// ([`EtcdError::NoQuorum`], [`EtcdError::Unavailable`]), or with
    /// [`EtcdError::LeaseLost`] when the client's lease was lost just as the wait ran out.
    ///
    /// # A lease that lapses while waiting
    /// A keepalive answered late (during an election, say) lets the lease's validity run out
    /// for a moment: the waiter keeps its place until the keepalive decides. A late positive
    /// answer means etcd renewed the lease before it expired, so the waiter's key was never
    /// deleted and it goes on waiting; a lock granted in that moment is handed over only once
    /// the lease is confirmed again. When the lease is gone, the acquisition starts again with
    /// a new lease (at the back of the queue) within the same wait.
    ///
    /// # Cancel safety
    /// Safe: if the future is dropped after its key was written, the key is deleted in a
    /// spawned task (and, failing that, goes with the lease), so no lock is left behind.
    pub async fn acquire(&self, key: &str) -> contend::Result<EtcdGuard> {
        self.acquire_within(key, self.inner.wait).await
    }

    /// [`EtcdLocks::acquire`] with a wait of its own.
    ///
    /// # Errors
    /// As [`EtcdLocks::acquire`].
    ///
    /// # Cancel safety
    /// As [`EtcdLocks::acquire`].
    pub async fn acquire_within(&self, key: &str, wait: Duration) -> contend::Result<EtcdGuard> {
        let started = Instant::now();
        let deadline = started + wait;
        let prefix = format!("{}{}/", self.inner.prefix, escape(key));
        loop {
            let lease = self.inner.lease().await?;
            let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
            let own = format!("{prefix}{:016x}-{seq:x}", lease.id()).into_bytes();
            let mut pending = Pending {
                inner: self.inner.clone(),
                key: Some(own.clone()),
            };
            let attempt = self.inner.lock(&prefix, &own, &lease);
            let token = match tokio::time::timeout_at(deadline.into(), attempt).await {
                Ok(Ok(token)) => token,
                Ok(Err(EtcdError::LeaseLost)) if Instant::now() < deadline => {
                    // The waiter's key went (or goes) with the lease; `pending` deletes it
                    // in case etcd still has it, and the next turn takes a new lease.
                    tracing::debug!(
                        key,
                        "etcd lease lost while waiting; waiting again on a new lease"
                    );
                    continue;
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    return Err(contend::Error::LockNotAcquired {
                        key: key.to_string(),
                        waited_ms: ms(started.elapsed()),
                    });
                }
            };
            pending.key = None;
            let (released, _) = watch::channel(false);
            return Ok(EtcdGuard {
                key: key.to_string(),
                own,
                token: FencingToken::new(u64::try_from(token).unwrap_or(0)),
                lease,
                inner: self.inner.clone(),
                released: Arc::new(released),
                done: false,
            });
        }
    }
}

/// Deletes a waiter's key when its acquisition ends without a grant (error, timeout, drop).
struct Pending {
    inner: Arc<Inner>,
    key: Option<Vec<u8>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.inner.clone().delete_later(key);
        }
    }
}

/// Escapes `/` (and `%`) in a lock name, so that one lock's prefix never contains another's.
fn escape(key: &str) -> String {
    key.replace('%', "%25").replace('/', "%2F")
}

impl Inner {
    /// Sends a request built by `f`, trying again on unreachable members and elections until
    /// the request budget is spent.
    async fn call<T, F, Fut>(&self, what: &'static str, mut f: F) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = Instant::now();
        let mut no_leader = false;
        loop {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let left = self.request_timeout.saturating_sub(started.elapsed());
            // One try never takes the whole budget: a request forwarded to a leader that just
            // died is never answered, and the next try reaches the new one.
            let try_for = left.min((self.request_timeout / 3).max(MIN_TRY));
            let last = match tokio::time::timeout(try_for, f(self.client.clone())).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => match classify(&e) {
                    Failure::Fatal | Failure::LeaseGone => {
                        return Err(EtcdError::Request { what, source: e });
                    }
                    Failure::NoLeader => {
                        no_leader = true;
                        e.to_string()
                    }
                    Failure::Retry => {
                        no_leader = false;
                        e.to_string()
                    }
                },
                Err(_) => format!("no answer within {} ms", ms(try_for)),
            };
            if started.elapsed() + RETRY_PAUSE >= self.request_timeout {
                let waited_ms = ms(started.elapsed());
                return Err(if no_leader {
                    EtcdError::NoQuorum { what, waited_ms }
                } else {
                    EtcdError::Unavailable {
                        what,
                        waited_ms,
                        last,
                    }
                });
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// The current lease, granted anew when there is none or the last one was lost.
    async fn lease(self: &Arc<Self>) -> Result<Arc<Lease>, EtcdError> {
        let mut current = self.lease.lock().await;
        if let Some(lease) = current.as_ref()
            && !lease.is_lost()
        {
            return Ok(lease.clone());
        }
        let sent = Instant::now();
        let ttl = self.ttl_secs;
        let granted = self
            .call("lease grant", |c| async move {
                c.lease_client().grant(ttl, None).await
            })
            .await?;
        let keep = KeepAlive {
            client: self.client.clone(),
            ttl: Duration::from_secs(granted.ttl().unsigned_abs()),
            request_timeout: self.request_timeout,
            requests: self.requests.clone(),
        };
        let lease = Arc::new(Lease::start(granted.id(), sent, keep));
        *current = Some(lease.clone());
        Ok(lease)
    }

    /// The recipe ([`Inner::queue`]), handing the lock over only on a lease that is valid: one
    /// whose validity ran out while a keepalive was late is granted once the keepalive
    /// confirms it again. Returns the fencing token.
    async fn lock(&self, prefix: &str, own: &[u8], lease: &Lease) -> Result<i64, EtcdError> {
        let token = self.queue(prefix, own, lease).await?;
        if lease.confirmed().await {
            Ok(token)
        } else {
            Err(EtcdError::LeaseLost)
        }
    }

    /// Writes `own` under `prefix` with the lease, then waits until it is the oldest key
    /// there. Returns its create revision. Fails with [`EtcdError::LeaseLost`] (the lease
    /// marked lost) when the lease is gone, not merely unconfirmed ([`Lease::gone`]).
    async fn queue(&self, prefix: &str, own: &[u8], lease: &Lease) -> Result<i64, EtcdError> {
        let lease_id = lease.id();
        let last_two = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(2)
            .with_keys_only();
        // Put, read back our key (its create revision, also when a retried put finds it
        // already written), and the two newest keys of the lock: inside the transaction ours
        // is the newest, so the other one is the key to wait for. One round trip.
        let txn = Txn::new().and_then([
            TxnOp::put(own, "", Some(PutOptions::new().with_lease(lease_id))),
            TxnOp::get(own, Some(GetOptions::new().with_keys_only())),
            TxnOp::get(prefix, Some(last_two.clone())),
        ]);
        let answer = self
            .call("lock", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(EtcdError::Request { source, .. }) if classify(&source) == Failure::LeaseGone => {
                lease.mark_lost();
                return Err(EtcdError::LeaseLost);
            }
            Err(e) => return Err(e),
        };
        let responses = answer.op_responses();
        let created = match responses.get(1) {
            Some(TxnOpResponse::Get(own)) => own.kvs().first().map(KeyValue::create_revision),
            _ => None,
        };
        let Some(mine) = created else {
            // Written and gone in the same transaction cannot happen; the lease must be gone.
            lease.mark_lost();
            return Err(EtcdError::LeaseLost);
        };
        let from = answer.header().map_or(0, |h| h.revision()) + 1;
        // The key to wait for first, when the transaction already tells it.
        let mut next = match responses.get(2) {
            Some(TxnOpResponse::Get(newest)) => match newest.kvs() {
                [only] if only.create_revision() == mine => return Ok(mine),
                [ours, before] if ours.create_revision() == mine => {
                    Some((before.key().to_vec(), from))
                }
                // A retried put: ours is not the newest any more; look below.
                _ => None,
            },
            _ => None,
        };
        // Wait for the key created just before ours, until ours is the oldest.
        let last_two = last_two.with_max_create_revision(mine);
        loop {
            let (before, from) = match next.take() {
                Some(found) => found,
                None => {
                    let range = self
                        .call("lock wait", |mut c| {
                            let options = last_two.clone();
                            async move { c.get(prefix, Some(options)).await }
                        })
                        .await?;
                    let kvs = range.kvs();
                    match kvs.first() {
                        Some(kv) if kv.create_revision() == mine => {}
                        // Our key is gone: the lease expired while we waited.
                        _ => {
                            lease.mark_lost();
                            return Err(EtcdError::LeaseLost);
                        }
                    }
                    let Some(before) = kvs.get(1) else {
                        return Ok(mine);
                    };
                    let from = range.header().map_or(0, |h| h.revision()) + 1;
                    (before.key().to_vec(), from)
                }
            };
            tokio::select! {
                waited = self.deleted(&before, from) => waited?,
                // Not `lost()`: a lapse while a keepalive is late is not a reason to leave the
                // queue; the keepalive decides within a request timeout.
                () = lease.gone() => return Err(EtcdError::LeaseLost),
            }
        }
    }

    /// Waits until `key` is deleted at or after revision `from` (or the watch ends, after
    /// which the caller looks again).
    async fn deleted(&self, key: &[u8], from: i64) -> Result<(), EtcdError> {
        let options = WatchOptions::new()
            .with_start_revision(from)
            .with_filters([WatchFilterType::NoPut]);
        let mut stream = self
            .call("lock watch", |c| {
                let options = options.clone();
                async move { c.watch_client().watch(key, Some(options)).await }
            })
            .await?;
        loop {
            match stream.message().await {
                Ok(Some(answer)) => {
                    if answer.canceled()
                        || answer
                            .events()
                            .iter()
                            .any(|e| e.event_type() == EventType::Delete)
                    {
                        return Ok(());
                    }
                }
                // The member went away or cancelled the watch: look again.
                Ok(None) | Err(_) => return Ok(()),
            }
        }
    }

    /// Deletes `key`. `Ok(true)` when it existed.
    async fn delete(&self, key: &[u8]) -> Result<bool, EtcdError> {
        let done = self
            .call("unlock", |mut c| async move {
                c.delete(key, None::<DeleteOptions>).await
            })
            .await?;
        Ok(done.deleted() > 0)
    }

    /// Deletes `key` in a spawned task (from a drop).
    fn delete_later(self: Arc<Self>, key: Vec<u8>) {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    if let Err(e) = self.delete(&key).await {
                        tracing::warn!(error = %e,
                            "deleting an etcd lock key failed; it goes with the lease");
                    }
                });
            }
            Err(_) => tracing::warn!(
                "etcd lock key dropped outside a Tokio runtime; it goes with the lease"
            ),
        }
    }
}

/// A held etcd lock, from [`EtcdLocks::acquire`].
///
/// Dropping the guard releases the lock in a spawned task (never blocking); call
/// [`EtcdGuard::release`] to release it at once. Pass [`EtcdGuard::fencing_token`] to
/// [`contend::fencing::fence`] in the transaction that writes what the lock guards.
#[must_use = "dropping the guard releases the lock"]
pub struct EtcdGuard {
    key: String,
    own: Vec<u8>,
    token: FencingToken,
    lease: Arc<Lease>,
    inner: Arc<Inner>,
    released: Arc<watch::Sender<bool>>,
    done: bool,
}

impl std::fmt::Debug for EtcdGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdGuard")
            .field("key", &self.key)
            .field("token", &self.token)
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl EtcdGuard {
    /// The lock's name.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The fencing token: the create revision of this grant's key, larger than that of every
    /// earlier grant of the same lock.
    pub fn fencing_token(&self) -> FencingToken {
        self.token
    }

    /// Until when the lock is surely held: the last confirmed keepalive's send time plus the
    /// lease TTL.
    pub fn valid_until(&self) -> Instant {
        self.lease.valid_until()
    }

    /// True once the lock may be lost: the lease expired, etcd refused a keepalive, or no
    /// keepalive was confirmed for a whole TTL. While a keepalive's answer is late it is true
    /// (act on it: the lock cannot be shown to be held); a late answer that renews the lease
    /// makes it false again, since etcd renews only a lease that never expired, so the lock
    /// was in fact held throughout.
    pub fn is_lost(&self) -> bool {
        self.lease.is_lost()
    }

    /// A future that completes when the lock is lost (as [`EtcdGuard::is_lost`] turns true)
    /// or released. It owns what it needs, so it can be raced against the critical section
    /// with `tokio::select!`.
    ///
    /// # Cancel safety
    /// Safe: it only watches.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let lease = self.lease.lost();
        let mut released = self.released.subscribe();
        async move {
            tokio::select! {
                () = lease => {}
                _ = released.wait_for(|r| *r) => {}
            }
        }
    }

    /// Releases the lock now. `Ok(true)` when its key was still there; `Ok(false)` when it was
    /// already gone (the lease had expired, and someone else may hold the lock now).
    ///
    /// # Errors
    /// [`contend::Error::LockService`] when etcd does not answer; the key then goes with the
    /// lease (or when the client is dropped, which revokes the lease).
    ///
    /// # Cancel safety
    /// If dropped before etcd answers, the key may or may not be deleted yet; a spawned task
    /// deletes it.
    pub async fn release(mut self) -> contend::Result<bool> {
        self.done = true;
        self.released.send_replace(true);
        let key = std::mem::take(&mut self.own);
        // Until etcd confirms, a drop (or a failure) leaves the deletion to a spawned task.
        let mut pending = Pending {
            inner: self.inner.clone(),
            key: Some(key.clone()),
        };
        let deleted = self.inner.delete(&key).await?;
        pending.key = None;
        Ok(deleted)
    }
}

impl Drop for EtcdGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.released.send_replace(true);
        self.inner
            .clone()
            .delete_later(std::mem::take(&mut self.own));
    }
}

impl HeldLock for EtcdGuard {
    fn fencing_token(&self) -> Option<FencingToken> {
        Some(self.token)
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, contend::Result<()>> {
        Box::pin(async move { (*self).release().await.map(|_| ()) })
    }
}

impl LockService for EtcdLocks {
    /// # Cancel safety
    /// As [`EtcdLocks::acquire`]: a dropped acquisition leaves no key behind.
    fn acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        Box::pin(async move {
            let guard = EtcdLocks::acquire(self, key).await?;
            Ok(Box::new(guard) as Box<dyn HeldLock>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            check_url("http://127.0.0.1:2379/").unwrap(),
            "http://127.0.0.1:2379"
        );
        assert!(check_url("127.0.0.1:2379").is_err());
        assert!(check_url("https://127.0.0.1:2379").is_err());
        assert!(check_url("http://127.0.0.1").is_err());
        assert!(check_url("http://127.0.0.1:0").is_err());
        assert!(check_url("http://:2379").is_err());
        assert!(check_url("redis://127.0.0.1:6379").is_err());
    }

    #[test]
    fn lock_names_never_nest() {
        assert_eq!(escape("a/b"), "a%2Fb");
        assert_eq!(escape("a%2Fb"), "a%252Fb");
        assert_ne!(escape("a/b"), escape("a%2Fb"));
        assert!(!escape("a/b").contains('/'));
    }
}
