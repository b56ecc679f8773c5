//! The lab's distributed locks and what they cost: the `redis` (one node, pub/sub waiting,
//! fencing token), `redis-spin` (`SET NX` polled every 10 ms, the baseline; no fencing token)
//! and `redlock` (quorum of N nodes, fencing token) lock services ([`contend_redis::RedisLocks`],
//! built by [`lock_services`]); a [`contend::lock::LockService`] wrapper that counts grants and
//! measures handoff (release to the next waiter's grant) per run; and the command counter that
//! tells how many Redis commands each run sent. The `etcd` strategy (`contend_etcd::EtcdLocks`,
//! `--etcd-urls`) is built here too, with the same lease and wait; its counter is the number of
//! requests the lab's etcd client sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contend::BoxFuture;
use contend::fencing::FencingToken;
use contend::lock::{HeldLock, LockService as Service};
use contend::strategy::Strategy;
#[cfg(feature = "etcd")]
use contend_etcd::EtcdLocks;
use contend_redis::{LockClient, LockOptions, RedisLocks, Redlock, SpinLock};
use hdrhistogram::Histogram;

use crate::config::LabConfig;
use crate::db_target::{CommandCounter, LockService, LockServices, missing_redis_reason};

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

fn counter(urls: Vec<String>) -> Option<Arc<dyn CommandCounter>> {
    Some(Arc::new(RedisCommandCounter { urls }))
}

/// The lock services for the Redis and etcd strategies `config` asks for: each one connected,
/// or the reason it is skipped (no URL given).
///
/// # Errors
/// A Redis server or etcd cluster given on the command line cannot be reached: the lab stops (exit status 2)
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
    let single_urls = || config.redis_url.iter().cloned().collect();
    for strategy in [Strategy::Redis, Strategy::RedisSpin, Strategy::Redlock] {
        if !wanted(strategy) {
            continue;
        }
        let service = match (strategy, &single) {
            (Strategy::Redis, Some(client)) => Some(LockService {
                lock: Arc::new(RedisLocks::single(client.clone(), options())),
                commands: counter(single_urls()),
            }),
            (Strategy::RedisSpin, Some(client)) => Some(LockService {
                lock: Arc::new(RedisLocks::spin(
                    SpinLock::new(client).retry_interval(SPIN_INTERVAL),
                    options(),
                )),
                commands: counter(single_urls()),
            }),
            (Strategy::Redlock, _) if !config.redlock_urls.is_empty() => {
                check_redlock_majority(&config.redlock_urls).await?;
                let lock = Redlock::builder(&config.redlock_urls)
                    .namespace(NAMESPACE)
                    .connect()
                    .await
                    .map_err(|e| anyhow::anyhow!("--redlock-urls: {e}"))?;
                Some(LockService {
                    lock: Arc::new(RedisLocks::redlock(lock, options())),
                    commands: counter(config.redlock_urls.clone()),
                })
            }
            _ => None,
        };
        services.insert(
            strategy,
            service.ok_or_else(|| missing_redis_reason(strategy)),
        );
    }
    if wanted(Strategy::Etcd) {
        services.insert(Strategy::Etcd, etcd_service(config).await?);
    }
    Ok(services)
}

/// Refuses to start the `redlock` runs when fewer than a majority of its servers answer: every
/// acquisition would fail, and the runs would only count errors (as an unreachable
/// `--redis-url` is refused before the runs).
async fn check_redlock_majority(urls: &[String]) -> anyhow::Result<()> {
    let answers = futures_util::future::join_all(
        urls.iter()
            .map(|url| contend_redis::command_count(std::slice::from_ref(url))),
    )
    .await;
    let answering = answers.iter().filter(|a| a.is_ok()).count();
    let majority = urls.len() / 2 + 1;
    if answering < majority {
        anyhow::bail!(
            "--redlock-urls: {answering} of {} servers answer; Redlock needs a majority ({majority})",
            urls.len()
        );
    }
    Ok(())
}

/// The lock service of the `etcd` strategy, or why there is none (no `--etcd-urls`).
#[cfg(feature = "etcd")]
async fn etcd_service(config: &LabConfig) -> anyhow::Result<Result<LockService, String>> {
    Ok(if config.etcd_urls.is_empty() {
        Err(missing_redis_reason(Strategy::Etcd))
    } else {
        let locks = EtcdLocks::builder(&config.etcd_urls)
            .namespace(NAMESPACE)
            .lease_ttl(LEASE)
            .wait(WAIT)
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("--etcd-urls: {e}"))?;
        Ok(LockService {
            lock: Arc::new(locks.clone()),
            commands: Some(Arc::new(EtcdRequestCounter(locks))),
        })
    })
}

/// Without the `etcd` feature: the strategy is skipped, saying how to get it.
#[cfg(not(feature = "etcd"))]
async fn etcd_service(_config: &LabConfig) -> anyhow::Result<Result<LockService, String>> {
    Ok(Err(NO_ETCD.to_string()))
}

/// Why the `etcd` strategy is missing from a build without the `etcd` feature.
#[cfg(not(feature = "etcd"))]
pub const NO_ETCD: &str = "this contend was built without etcd support: build it with \
     `--features etcd` (needs protoc: Debian `protobuf-compiler`)";

/// Counts the requests the lab's etcd client sent (`EtcdLocks::requests`): its lock
/// transactions, ranges, watches, deletes and lease keepalives.
#[cfg(feature = "etcd")]
pub struct EtcdRequestCounter(EtcdLocks);

#[cfg(feature = "etcd")]
impl CommandCounter for EtcdRequestCounter {
    fn total(&self) -> BoxFuture<'_, anyhow::Result<u64>> {
        Box::pin(async move { Ok(self.0.requests()) })
    }
}

/// Grants and handoffs of one run.
#[derive(Debug)]
pub struct LockCounters {
    acquisitions: AtomicU64,
    state: Mutex<HandoffState>,
}

#[derive(Debug)]
struct HandoffState {
    /// When the last release of each key started.
    last_release: HashMap<String, Instant>,
    /// Handoff times in microseconds.
    handoffs: Histogram<u64>,
}

impl Default for LockCounters {
    fn default() -> Self {
        LockCounters {
            acquisitions: AtomicU64::new(0),
            state: Mutex::new(HandoffState {
                last_release: HashMap::new(),
                handoffs: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .expect("valid histogram bounds"),
            }),
        }
    }
}

impl LockCounters {
    /// Locks granted so far.
    pub fn acquisitions(&self) -> u64 {
        self.acquisitions.load(Ordering::Relaxed)
    }

    /// Median handoff in milliseconds (0 when no waiter was ever handed a lock).
    pub fn handoff_p50_ms(&self) -> f64 {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.handoffs.is_empty() {
            0.0
        } else {
            state.handoffs.value_at_quantile(0.5) as f64 / 1000.0
        }
    }

    /// How many handoffs were measured.
    pub fn handoffs(&self) -> u64 {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.handoffs.len()
    }

    fn granted(&self, key: &str, wait_started: Instant, granted: Instant) {
        self.acquisitions.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // A handoff: this caller was already waiting when the previous holder began to release.
        if let Some(&released) = state.last_release.get(key)
            && wait_started <= released
            && released <= granted
        {
            let us = granted.duration_since(released).as_micros() as u64;
            state.handoffs.saturating_record(us.max(1));
        }
    }

    fn releasing(&self, key: &str) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.last_release.get_mut(key) {
            Some(t) => *t = now,
            None => {
                state.last_release.insert(key.to_string(), now);
            }
        }
    }
}

/// A lock service that counts what the service underneath does, run by run: the lab's executor
/// holds one per lock-based strategy for the whole lab, and each run starts fresh counters
/// ([`CountingLock::start_run`]; runs follow one another).
pub struct CountingLock {
    inner: Arc<dyn Service>,
    counters: Mutex<Arc<LockCounters>>,
}

impl CountingLock {
    /// Wraps `inner`; read the counts from [`CountingLock::start_run`]'s counters.
    pub fn new(inner: Arc<dyn Service>) -> Self {
        CountingLock {
            inner,
            counters: Mutex::new(Arc::default()),
        }
    }

    /// Starts counting a new run: grants from now on go to the returned counters.
    pub fn start_run(&self) -> Arc<LockCounters> {
        let fresh = Arc::new(LockCounters::default());
        *self.counters.lock().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
        fresh
    }

    fn counters(&self) -> Arc<LockCounters> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Service for CountingLock {
    /// # Cancel safety
    /// As the wrapped service's `acquire`.
    fn acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        Box::pin(async move {
            let counters = self.counters();
            let started = Instant::now();
            let held = self.inner.acquire(key).await?;
            counters.granted(key, started, Instant::now());
            Ok(Box::new(CountedHeld {
                inner: held,
                key: key.to_string(),
                counters,
            }) as Box<dyn HeldLock>)
        })
    }
}

struct CountedHeld {
    inner: Box<dyn HeldLock>,
    key: String,
    counters: Arc<LockCounters>,
}

impl HeldLock for CountedHeld {
    fn fencing_token(&self) -> Option<FencingToken> {
        self.inner.fencing_token()
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, contend::Result<()>> {
        let CountedHeld {
            inner,
            key,
            counters,
        } = *self;
        counters.releasing(&key);
        inner.release()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoff_counted_only_for_waiters() {
        let c = LockCounters::default();
        let t0 = Instant::now();
        c.granted("k", t0, t0);
        c.releasing("k");
        let after = Instant::now();
        // Started waiting before the release: a handoff.
        c.granted("k", t0, after);
        // Started after the release: not a handoff.
        c.granted("k", Instant::now(), Instant::now());
        assert_eq!(c.acquisitions(), 3);
        assert_eq!(c.handoffs(), 1);
    }
}
