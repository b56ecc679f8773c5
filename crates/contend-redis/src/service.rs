//! The Redis locks as a [`contend::lock::LockService`], so that the strategy executor
//! ([`contend::strategy::Executor`]) can run any operation under `redis`, `redis-spin` or
//! `redlock`: each grant's fencing token is checked by the operation's database write.

use contend::BoxFuture;
use contend::fencing::FencingToken;
use contend::lock::{HeldLock, LockService};

use crate::{LockClient, LockGuard, LockOptions, Redlock, SpinGuard, SpinLock};

/// One of the Redis locks with the options every acquisition uses (lease, wait, watchdog).
///
/// ```no_run
/// # async fn demo() -> contend::Result<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use contend::strategy::{Executor, Strategy};
/// use contend_redis::{LockClient, LockOptions, RedisLocks};
/// let client = LockClient::connect("redis://127.0.0.1:6379/0").await?;
/// let options = LockOptions::new().lease(Duration::from_secs(10)).wait(Duration::from_secs(5));
/// let executor: Executor = Executor::new()
///     .lock_service(Strategy::Redis, Arc::new(RedisLocks::single(client, options)));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RedisLocks {
    lock: Kind,
    options: LockOptions,
}

#[derive(Debug, Clone)]
enum Kind {
    Single(LockClient),
    Spin(SpinLock),
    Quorum(Redlock),
}

impl RedisLocks {
    /// The single-node lock (pub/sub waiting, fencing tokens).
    pub fn single(client: LockClient, options: LockOptions) -> RedisLocks {
        RedisLocks {
            lock: Kind::Single(client),
            options,
        }
    }

    /// The spin lock baseline: no fencing token, so its writes are not fenced.
    pub fn spin(lock: SpinLock, options: LockOptions) -> RedisLocks {
        RedisLocks {
            lock: Kind::Spin(lock),
            options,
        }
    }

    /// Redlock over several nodes (quorum, fencing tokens).
    pub fn redlock(lock: Redlock, options: LockOptions) -> RedisLocks {
        RedisLocks {
            lock: Kind::Quorum(lock),
            options,
        }
    }

    /// The options every acquisition uses.
    pub fn options(&self) -> &LockOptions {
        &self.options
    }
}

enum Held {
    Fenced(LockGuard),
    Spin(SpinGuard),
}

impl HeldLock for Held {
    fn fencing_token(&self) -> Option<FencingToken> {
        match self {
            Held::Fenced(guard) => Some(guard.fencing_token()),
            Held::Spin(_) => None,
        }
    }

    /// Raises the counter past the database's token (a Redis node restarted without
    /// persistence counts from 0 again); a spin grant has no token to be refused.
    fn token_refused(&mut self, highest: FencingToken) -> BoxFuture<'_, contend::Result<()>> {
        Box::pin(async move {
            if let Held::Fenced(guard) = self {
                guard.raise_fence(highest).await?;
            }
            Ok(())
        })
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, contend::Result<()>> {
        Box::pin(async move {
            match *self {
                Held::Fenced(guard) => guard.release().await.map(|_| ()),
                Held::Spin(guard) => guard.release().await.map(|_| ()),
            }
        })
    }
}

impl LockService for RedisLocks {
    /// # Cancel safety
    /// As the lock's own `acquire`: a dropped acquisition holds nothing beyond its lease.
    fn acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        Box::pin(async move {
            let held = match &self.lock {
                Kind::Single(c) => Held::Fenced(c.acquire(key, &self.options).await?),
                Kind::Spin(s) => Held::Spin(s.acquire(key, &self.options).await?),
                Kind::Quorum(r) => Held::Fenced(r.acquire(key, &self.options).await?),
            };
            Ok(Box::new(held) as Box<dyn HeldLock>)
        })
    }
}
