//! [`LockClient`]: the single-node Redis lock. Token-checked release and extension by Lua,
//! a fencing token with every grant, waiting on release notifications instead of polling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use contend::fencing::FencingToken;
use contend::{Error, Result};

use crate::guard::{GuardCore, Holder, LockGuard, SingleNode};
use crate::node::{Node, Timeouts};
use crate::options::{Acquiring, LockKeys, LockOptions, valid_until};
use crate::scripts;
use crate::waiters::{Waiters, Wake};

/// Default namespace of every Redis key and channel the locks use.
pub const DEFAULT_NAMESPACE: &str = "contend";

/// Settings for a [`LockClient`], made by [`LockClient::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `connect` is called"]
pub struct LockClientBuilder {
    url: String,
    namespace: String,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl LockClientBuilder {
    /// Prefix of the Redis keys and channels (`{ns}:lock:{key}`, `{ns}:fence:{key}`,
    /// `{ns}:released:{key}`). Default `contend`.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_string();
        self
    }

    /// How long opening a connection may take. Default 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long to wait for one reply. Default 1 s.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Connects (one multiplexed connection for commands, loaded with the scripts), and starts
    /// the pub/sub dispatcher (its connection is opened on the first wait).
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for a URL that is not `redis://`, `rediss://` or `unix://`;
    /// [`Error::LockService`] when the server cannot be reached within the timeouts.
    ///
    /// # Cancel safety
    /// Safe: nothing is shared until it returns.
    pub async fn connect(self) -> Result<LockClient> {
        if self.namespace.is_empty() {
            return Err(Error::aborted("the lock namespace must not be empty"));
        }
        let timeouts = Timeouts {
            connect: self.connect_timeout,
            response: self.response_timeout,
        };
        let node = Node::connect(&self.url, timeouts, false).await?;
        let waiters = Waiters::start(
            vec![(node.client().clone(), node.address().to_string())],
            timeouts,
            1,
        );
        Ok(LockClient {
            inner: Arc::new(Inner {
                holder: Arc::new(SingleNode::new(node.clone(), true)),
                node,
                namespace: self.namespace,
                waiters,
            }),
        })
    }
}

/// A lock client for one Redis server. Cheap to clone; clones share the connections.
///
/// Create one per process and share it: all its waiters share one pub/sub subscription.
///
/// ```no_run
/// # async fn demo() -> contend::Result<()> {
/// use std::time::Duration;
/// use contend_redis::{LockClient, LockOptions};
/// let locks = LockClient::connect("redis://127.0.0.1:6379/0").await?;
/// let options = LockOptions::new().lease(Duration::from_secs(5)).wait(Duration::from_secs(2));
/// let guard = locks.acquire("account:42", &options).await?;
/// let token = guard.fencing_token(); // pass to contend::fencing::fence in the DB transaction
/// # let _ = token;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct LockClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: Node,
    /// Extends and releases this client's locks (on `node`).
    holder: Arc<SingleNode>,
    namespace: String,
    waiters: Waiters,
}

/// The outcome of one acquire script call.
pub(crate) enum Attempt {
    /// Granted with this fencing token; the request was sent at this time.
    Granted(u64),
    /// Held by someone else for this many more milliseconds (-1: no expiry).
    Held(i64),
}

/// Runs the acquire script on `node`.
pub(crate) async fn attempt(
    node: &Node,
    keys: &LockKeys,
    token: &str,
    lease_ms: u64,
) -> Result<Attempt> {
    let result: Result<(i64, i64)> = node
        .eval(
            &scripts::ACQUIRE,
            &[&keys.lock, &keys.fence],
            &[&token, &lease_ms],
        )
        .await;
    match result {
        Ok((1, fence)) => Ok(Attempt::Granted(u64::try_from(fence).unwrap_or(0))),
        Ok((_, pttl)) => Ok(Attempt::Held(pttl)),
        Err(e) => {
            // The script may have run even though we did not see its reply: release with our
            // token in the background so that a grant we never learned of does not linger.
            let node = node.clone();
            let keys = keys.clone();
            let token = token.to_string();
            tokio::spawn(async move {
                let _ = node.release_script(&keys, &token, true).await;
            });
            Err(e)
        }
    }
}

impl LockClient {
    /// Connects with default settings. See [`LockClientBuilder::connect`].
    ///
    /// # Errors
    /// As [`LockClientBuilder::connect`].
    ///
    /// # Cancel safety
    /// Safe.
    pub async fn connect(url: &str) -> Result<LockClient> {
        LockClient::builder(url).connect().await
    }

    /// Starts configuring a client for the Redis server at `url` (`redis://host:port/db`).
    pub fn builder(url: &str) -> LockClientBuilder {
        LockClientBuilder {
            url: url.to_string(),
            namespace: DEFAULT_NAMESPACE.to_string(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
        }
    }

    /// The key namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// `host:port` of the server.
    pub fn address(&self) -> &str {
        self.inner.node.address()
    }

    pub(crate) fn node(&self) -> &Node {
        &self.inner.node
    }

    pub(crate) fn waiters(&self) -> &Waiters {
        &self.inner.waiters
    }

    /// Tries to take the lock once, without waiting.
    ///
    /// # Errors
    /// [`Error::LockService`] when Redis cannot be reached or does not answer in time;
    /// [`Error::Aborted`] for an invalid key or options.
    ///
    /// # Cancel safety
    /// If dropped after the request was sent, the lock may have been granted to nobody that
    /// knows it; it is then held until its lease ends. Prefer [`LockClient::acquire`] with a
    /// wait limit over cancelling.
    pub async fn try_acquire(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        let Acquiring { keys, token, .. } = Acquiring::begin(&self.inner.namespace, key, options)?;
        let sent = Instant::now();
        match attempt(&self.inner.node, &keys, &token, options.lease_ms()).await? {
            Attempt::Granted(fence) => Ok(Some(self.guard(keys, token, fence, sent, options))),
            Attempt::Held(_) => Ok(None),
        }
    }

    /// Takes the lock, waiting up to the options' wait time while someone else holds it.
    ///
    /// One attempt; if the lock is held, the task sleeps until a release notification for the
    /// key arrives or the holder's lease runs out, then tries again. Under contention that is
    /// about one failed attempt, one successful attempt and one release per acquisition.
    ///
    /// # Errors
    /// [`Error::LockNotAcquired`] when the wait time passes; [`Error::LockService`] when Redis cannot
    /// be reached or does not answer within the timeouts; [`Error::Aborted`] for an invalid key
    /// or options.
    ///
    /// # Cancel safety
    /// Dropping the future while it waits is safe: it gives up its place, and a release
    /// notification it had been handed goes to the next waiter. Dropped while an attempt is in
    /// flight, a grant may be made that nobody holds; it expires with its lease.
    pub async fn acquire(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        let Acquiring {
            started,
            deadline,
            keys,
            token,
        } = Acquiring::begin(&self.inner.namespace, key, options)?;
        let lease_ms = options.lease_ms();
        let interest = self.inner.waiters.register(&keys.channel, Wake::One);
        let mut first = true;
        loop {
            let was_subscribed = interest.is_subscribed();
            let queued = if first { interest.queue_behind() } else { None };
            first = false;
            let sent = Instant::now();
            let pttl = match queued {
                Some(holder_until) => {
                    // Others of this process wait already: queue behind them.
                    interest.park(None, holder_until.min(deadline)).await;
                    continue;
                }
                None => match attempt(&self.inner.node, &keys, &token, lease_ms).await? {
                    Attempt::Granted(fence) => {
                        return Ok(self.guard(keys, token, fence, sent, options));
                    }
                    Attempt::Held(pttl) => pttl,
                },
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::LockNotAcquired {
                    key: key.to_string(),
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            if !was_subscribed {
                // A release between our attempt and the subscription would be missed: subscribe,
                // then try again before waiting.
                interest.subscribe().await?;
                continue;
            }
            let holder_until = if pttl >= 0 {
                // +1 ms: PTTL rounds down, and waking a hair early costs a wasted attempt.
                now + Duration::from_millis(pttl as u64 + 1)
            } else {
                // A key without expiry (not ours): look again after one lease.
                now + options.lease_time()
            };
            interest
                .park(Some(holder_until), holder_until.min(deadline))
                .await;
        }
    }

    fn guard(
        &self,
        keys: LockKeys,
        token: String,
        fence: u64,
        sent: Instant,
        options: &LockOptions,
    ) -> LockGuard {
        let lease = options.lease_time();
        let valid_until = valid_until(sent, lease);
        let holder: Arc<dyn Holder> = self.inner.holder.clone();
        let core = GuardCore::new(
            keys,
            token,
            lease,
            valid_until,
            holder,
            options.has_watchdog(),
        );
        LockGuard::new(core, FencingToken::new(fence))
    }
}
