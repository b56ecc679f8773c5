//! The lab's Redis side: the scenario seam's [`KeyLock`] over `contend-redis` for the `redis`
//! (one node, pub/sub waiting, fencing token), `redis-spin` (`SET NX` polled every 10 ms, the
//! baseline; no fencing token) and `redlock` (quorum of N nodes, fencing token) strategies, and
//! the command counter that tells how many Redis commands each run sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use contend::BoxFuture;
use contend::strategy::Strategy;
use contend_redis::{LockClient, LockGuard, LockOptions, Redlock, SpinGuard, SpinLock};

use crate::config::LabConfig;
use crate::db_target::{CommandCounter, LockService, LockServices, missing_redis_reason};
use crate::scenario::{HeldLock, KeyLock};

/// Namespace of the lab's lock keys in Redis (`contend-lab:lock:<key>`, ...).
pub const NAMESPACE: &str = "contend-lab";

/// The lease of every lab lock: far longer than any operation, so a lock never expires under a
/// live holder in a healthy run (fenced rejections then point at a real problem).
pub const LEASE: Duration = Duration::from_secs(10);

/// How long a worker waits for a lock before its operation fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// The spin baseline's sleep between attempts.
pub const SPIN_INTERVAL: Duration = Duration::from_millis(10);

fn options() -> LockOptions {
    LockOptions::new().lease(LEASE).wait(WAIT)
}

/// Counts commands on a set of Redis servers with [`contend_redis::command_count`] (which
/// leaves out `INFO` and the commands the lock scripts run inside Redis).
pub struct RedisCommandCounter {
    urls: Vec<String>,
}

impl CommandCounter for RedisCommandCounter {
    fn total(&self) -> BoxFuture<'_, anyhow::Result<u64>> {
        Box::pin(async move { Ok(contend_redis::command_count(&self.urls).await?) })
    }
}

/// `redis`: [`LockClient`], one node, waiters woken by the release notification.
struct SingleNode {
    client: LockClient,
    options: LockOptions,
}

/// `redis-spin`: [`SpinLock`], `SET NX` in a loop.
struct Spin {
    lock: SpinLock,
    options: LockOptions,
}

/// `redlock`: [`Redlock`] over N nodes.
struct Quorum {
    lock: Redlock,
    options: LockOptions,
}

enum Held {
    Fenced(LockGuard),
    Spin(SpinGuard),
}

impl HeldLock for Held {
    fn fencing_token(&self) -> u64 {
        match self {
            Held::Fenced(guard) => guard.fencing_token().get(),
            // The spin lock has no fencing token: 0 never beats a real one, and the scenarios'
            // fenced writes accept it because nothing else writes the row with a token.
            Held::Spin(_) => 0,
        }
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

impl KeyLock for SingleNode {
    fn lock<'a>(&'a self, key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        Box::pin(async move {
            let guard = self.client.acquire(key, &self.options).await?;
            Ok(Box::new(Held::Fenced(guard)) as Box<dyn HeldLock>)
        })
    }
}

impl KeyLock for Spin {
    fn lock<'a>(&'a self, key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        Box::pin(async move {
            let guard = self.lock.acquire(key, &self.options).await?;
            Ok(Box::new(Held::Spin(guard)) as Box<dyn HeldLock>)
        })
    }
}

impl KeyLock for Quorum {
    fn lock<'a>(&'a self, key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        Box::pin(async move {
            let guard = self.lock.acquire(key, &self.options).await?;
            Ok(Box::new(Held::Fenced(guard)) as Box<dyn HeldLock>)
        })
    }
}

/// The lock services for the Redis strategies `config` asks for: each one connected, or the
/// reason it is skipped (no URL given).
///
/// # Errors
/// A Redis server given on the command line cannot be reached: the lab stops (exit status 2)
/// rather than report every Redis run as failed.
///
/// # Cancel safety
/// Safe to drop: connections made so far are closed.
pub async fn lock_services(config: &LabConfig) -> anyhow::Result<LockServices> {
    let mut services: LockServices = HashMap::new();
    let wanted = |s: Strategy| config.strategies.contains(&s);
    let single = match &config.redis_url {
        Some(url) if wanted(Strategy::Redis) || wanted(Strategy::RedisSpin) => Some(
            LockClient::builder(url)
                .namespace(NAMESPACE)
                .connect()
                .await
                .map_err(|e| anyhow::anyhow!("--redis-url: {e}"))?,
        ),
        _ => None,
    };
    for strategy in [Strategy::Redis, Strategy::RedisSpin, Strategy::Redlock] {
        if !wanted(strategy) {
            continue;
        }
        let service = match (strategy, &single) {
            (Strategy::Redis, Some(client)) => Some(LockService {
                lock: Arc::new(SingleNode {
                    client: client.clone(),
                    options: options(),
                }),
                commands: Some(counter(config.redis_url.iter().cloned().collect())),
            }),
            (Strategy::RedisSpin, Some(client)) => Some(LockService {
                lock: Arc::new(Spin {
                    lock: SpinLock::new(client).retry_interval(SPIN_INTERVAL),
                    options: options(),
                }),
                commands: Some(counter(config.redis_url.iter().cloned().collect())),
            }),
            (Strategy::Redlock, _) if !config.redlock_urls.is_empty() => {
                let lock = Redlock::builder(&config.redlock_urls)
                    .namespace(NAMESPACE)
                    .connect()
                    .await
                    .map_err(|e| anyhow::anyhow!("--redlock-urls: {e}"))?;
                Some(LockService {
                    lock: Arc::new(Quorum {
                        lock,
                        options: options(),
                    }),
                    commands: Some(counter(config.redlock_urls.clone())),
                })
            }
            _ => None,
        };
        services.insert(
            strategy,
            service.ok_or_else(|| missing_redis_reason(strategy)),
        );
    }
    Ok(services)
}

fn counter(urls: Vec<String>) -> Arc<dyn CommandCounter> {
    Arc::new(RedisCommandCounter { urls })
}
