//! [`SpinLock`]: the baseline the pub/sub lock is measured against: `SET key token NX PX lease`
//! in a loop with a short sleep, as most Redis lock libraries do. Correct (token-checked
//! release) but it floods Redis with attempts under contention, and has no fencing token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use contend::{Error, Result};

use crate::LockClient;
use crate::guard::{GuardCore, Holder, SingleNode, SpinGuard};
use crate::node::Node;
use crate::options::{Acquiring, LockOptions, valid_until};

/// A polling Redis lock (the `redis-spin` strategy of the lab).
///
/// ```no_run
/// # async fn demo() -> contend::Result<()> {
/// use std::time::Duration;
/// use contend_redis::{LockClient, LockOptions, SpinLock};
/// let client = LockClient::connect("redis://127.0.0.1:6379/0").await?;
/// let spin = SpinLock::new(&client).retry_interval(Duration::from_millis(5));
/// let guard = spin.acquire("account:42", &LockOptions::new()).await?;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SpinLock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: Node,
    /// Extends and releases this client's locks (on `node`).
    holder: Arc<SingleNode>,
    namespace: String,
    interval: Duration,
}

impl SpinLock {
    /// A spin lock on `client`'s server and namespace, retrying every 10 ms.
    pub fn new(client: &LockClient) -> SpinLock {
        SpinLock {
            inner: Arc::new(Inner {
                node: client.node().clone(),
                holder: Arc::new(SingleNode::new(client.node().clone(), false)),
                namespace: client.namespace().to_string(),
                interval: Duration::from_millis(10),
            }),
        }
    }

    /// Sleep between attempts (at least 1 ms). Default 10 ms.
    #[must_use]
    pub fn retry_interval(self, interval: Duration) -> SpinLock {
        SpinLock {
            inner: Arc::new(Inner {
                node: self.inner.node.clone(),
                holder: self.inner.holder.clone(),
                namespace: self.inner.namespace.clone(),
                interval: interval.max(Duration::from_millis(1)),
            }),
        }
    }

    /// Takes the lock: `SET NX PX` until it succeeds or the wait time passes. The watchdog
    /// option is ignored.
    ///
    /// # Errors
    /// [`Error::LockNotAcquired`] when the wait time passes; [`Error::LockService`] when Redis cannot
    /// be reached; [`Error::Aborted`] for an invalid key or options.
    ///
    /// # Cancel safety
    /// Safe while sleeping; dropped during an attempt, a grant may be left to expire with its
    /// lease.
    pub async fn acquire(&self, key: &str, options: &LockOptions) -> Result<SpinGuard> {
        let Acquiring {
            started,
            deadline,
            keys,
            token,
        } = Acquiring::begin(&self.inner.namespace, key, options)?;
        loop {
            let sent = Instant::now();
            let set: Option<String> = self
                .inner
                .node
                .cmd(
                    redis::cmd("SET")
                        .arg(&keys.lock)
                        .arg(&token)
                        .arg("NX")
                        .arg("PX")
                        .arg(options.lease_ms())
                        .clone(),
                )
                .await?;
            if set.is_some() {
                let lease = options.lease_time();
                let holder: Arc<dyn Holder> = self.inner.holder.clone();
                let core =
                    GuardCore::new(keys, token, lease, valid_until(sent, lease), holder, false);
                return Ok(SpinGuard::new(core));
            }
            if Instant::now() + self.inner.interval > deadline {
                return Err(Error::LockNotAcquired {
                    key: key.to_string(),
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            tokio::time::sleep(self.inner.interval).await;
        }
    }
}
