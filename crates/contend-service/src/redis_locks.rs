//! The `redis` and `redlock` strategies: a Redis lock per key (single node, or a Redlock quorum),
//! taken in canonical order, and the lock's fencing token checked by the database write
//! ([`contend::fencing::fence`]) in the same transaction, so a holder whose lease ran out while
//! it was paused cannot overwrite the next holder's work.

use std::sync::Arc;
use std::time::{Duration, Instant};

use contend::fencing::{self, FencingToken};
use contend::strategy::Strategy;
use contend::{ConflictKind, RetryPolicy, TxOptions};
use contend_redis::{LockClient, LockGuard, LockOptions, Redlock};

use crate::AppState;
use crate::engine::{LOCK_WAIT, Op, conclude};
use crate::error::ApiError;
use crate::idempotency::Outcome;

/// How long a Redis lock lives if its holder dies without releasing it.
pub const LEASE: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
enum Locks {
    Single(LockClient),
    Quorum(Redlock),
}

/// A connected Redis lock service (one node, or several for Redlock).
#[derive(Debug, Clone)]
pub struct RedisLocks {
    locks: Locks,
}

impl RedisLocks {
    /// Connects to one Redis node; `namespace` prefixes every Redis key (instances that share
    /// data must share it).
    ///
    /// # Errors
    /// A bad URL or an unreachable server.
    ///
    /// # Cancel safety
    /// Safe to drop: nothing is held yet.
    pub async fn single(url: &str, namespace: &str) -> contend::Result<RedisLocks> {
        let client = LockClient::builder(url)
            .namespace(namespace)
            .connect()
            .await?;
        Ok(RedisLocks {
            locks: Locks::Single(client),
        })
    }

    /// Connects to the Redlock nodes.
    ///
    /// # Errors
    /// Bad URLs, or too few reachable nodes.
    ///
    /// # Cancel safety
    /// Safe to drop: nothing is held yet.
    pub async fn redlock<S: AsRef<str>>(
        urls: &[S],
        namespace: &str,
    ) -> contend::Result<RedisLocks> {
        let redlock = Redlock::builder(urls)
            .namespace(namespace)
            .connect()
            .await?;
        Ok(RedisLocks {
            locks: Locks::Quorum(redlock),
        })
    }

    async fn acquire(&self, key: &str) -> contend::Result<LockGuard> {
        let options = LockOptions::new().lease(LEASE).wait(LOCK_WAIT);
        match &self.locks {
            Locks::Single(c) => c.acquire(key, &options).await,
            Locks::Quorum(r) => r.acquire(key, &options).await,
        }
    }
}

/// The fence resource of a lock key.
fn resource(key: &str) -> String {
    format!("svc:{key}")
}

/// Runs `op` under Redis locks on its keys, with fenced writes.
///
/// # Errors
/// As [`crate::engine`]: business errors, and 503 when Redis or the database is unavailable, a
/// lock is not had within the wait, or the lock was lost before the write (stale token).
///
/// # Cancel safety
/// Dropped, the transaction rolls back and the guards release their locks (in spawned tasks).
pub(crate) async fn execute<O: Op>(
    state: &AppState,
    strategy: Strategy,
    op: Arc<O>,
    session: &mut crate::ReqSession,
    idem: &contend_axum::IdempotencyKey,
) -> Result<Outcome, ApiError> {
    let locks = match strategy {
        Strategy::Redis => state.inner.redis.as_ref(),
        Strategy::Redlock => state.inner.redlock.as_ref(),
        _ => None,
    };
    let Some(locks) = locks else {
        return Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "strategy_unsupported",
            format!("strategy `{strategy}` needs Redis, which this server was not given"),
        ));
    };
    let started = Instant::now();
    let mut guards = Vec::new();
    let mut fences: Vec<(String, FencingToken)> = Vec::new();
    for key in op.lock_keys() {
        let guard = locks.acquire(&key).await?;
        fences.push((resource(&key), guard.fencing_token()));
        guards.push(guard);
    }
    state.inner.metrics.lock_wait(strategy, started.elapsed());
    let fences = Arc::new(fences);
    let backend = state.inner.db.backend();
    let options = TxOptions::new().lock_timeout(LOCK_WAIT).retry(
        RetryPolicy::new()
            .max_attempts(20)
            .max_delay(Duration::from_millis(50))
            .max_elapsed(Duration::from_secs(10))
            .only(&[ConflictKind::Deadlock, ConflictKind::Busy]),
    );
    let run = session
        .run(&options, move |tx| {
            let op = op.clone();
            let fences = fences.clone();
            let idem = idem.clone();
            Box::pin(async move {
                for (resource, token) in fences.iter() {
                    fencing::fence(tx, resource, *token).await?;
                }
                let loaded = op.load(tx.conn(), backend, "").await?;
                let out = op.apply(tx, &loaded, false).await?;
                conclude(&*op, tx, out, &idem).await
            })
        })
        .await;
    state
        .inner
        .metrics
        .transaction(strategy, run.attempts, &run.conflicts);
    for guard in guards {
        if let Err(e) = guard.release().await {
            tracing::warn!(error = %e, "releasing a Redis lock failed; its lease will expire");
        }
    }
    Ok(run.result?)
}
