//! Runs one write under the chosen concurrency strategy.
//!
//! Each write of the service (deposit, withdraw, transfer, order, booking) is an [`Op`] in
//! three parts: `load` (read the rows it decides on, optionally with a row-lock clause),
//! `apply` (decide in Rust and write absolute values, optionally checking versions) and `atomic`
//! (the same effect as conditional SQL computed by the database). [`execute`] combines them:
//!
//! | strategy | how |
//! |---|---|
//! | `none` | `load` on its own connection (autocommit), then `apply` in a transaction: the lost update |
//! | `mutex` | as `none`, inside an in-process lock per key (safe in one process only) |
//! | `atomic` | `atomic` in a transaction |
//! | `pessimistic` | `load` with `FOR UPDATE` (rows in canonical order), then `apply` |
//! | `optimistic` | `load`, then `apply` with version checks; conflicts retried |
//! | `serializable` | `load` + `apply` at SERIALIZABLE; conflicts retried |
//! | `advisory` | database advisory locks per key (sorted), then `load` + `apply` |
//! | `redis`, `redlock` | Redis locks per key with fencing tokens checked in the transaction |

use std::sync::Arc;
use std::time::{Duration, Instant};

use contend::strategy::{Strategy, advisory, optimistic, pessimistic, serializable};
use contend::{Backend, BoxFuture, ConflictKind, RetryPolicy, RowLock, Tx, TxOptions};
use sqlx::AnyConnection;

use crate::error::ApiError;
use contend_axum::IdempotencyKey;

use crate::idempotency::{self, Outcome};
use crate::{AppState, ReqSession};

/// How long a request waits for a row, advisory, in-process or Redis lock before 503.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// One write of the service, in the parts the strategies combine.
pub(crate) trait Op: Send + Sync + 'static {
    /// What `load` reads.
    type State: Send + Sync + 'static;
    /// What the write returns (the response body).
    type Output: serde::Serialize + Send + 'static;

    /// The status of a success.
    fn status(&self) -> axum::http::StatusCode {
        axum::http::StatusCode::CREATED
    }

    /// Lock keys (`account:1`, `product:sku`, ...) in canonical (sorted) order.
    fn lock_keys(&self) -> Vec<String>;

    /// Reads the rows the decision depends on; `lock` is appended to each `SELECT` (empty or a
    /// row-lock clause). Rows are read in canonical order. Business errors (404) abort.
    fn load<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        backend: Backend,
        lock: &'static str,
    ) -> BoxFuture<'c, contend::Result<Self::State>>;

    /// Decides on `state` and writes absolute values; `checked` adds version checks
    /// (zero rows written is a version conflict).
    fn apply<'c>(
        &'c self,
        tx: &'c mut Tx,
        state: &'c Self::State,
        checked: bool,
    ) -> BoxFuture<'c, contend::Result<Self::Output>>;

    /// The same effect, with conditional statements computed by the database.
    fn atomic<'c>(&'c self, tx: &'c mut Tx) -> BoxFuture<'c, contend::Result<Self::Output>>;
}

/// The retry policy of strategies that do not expect conflicts: deadlocks and SQLite busy errors
/// only.
fn base_retry() -> RetryPolicy {
    RetryPolicy::new()
        .max_attempts(20)
        .max_delay(Duration::from_millis(50))
        .max_elapsed(Duration::from_secs(10))
        .only(&[ConflictKind::Deadlock, ConflictKind::Busy])
}

/// Checks that `strategy` can run here.
///
/// # Errors
/// 422 `strategy_unsupported` when the backend lacks it or Redis is not configured.
pub(crate) fn check_supported(state: &AppState, strategy: Strategy) -> Result<(), ApiError> {
    let unsupported = |msg: String| {
        ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "strategy_unsupported",
            msg,
        )
    };
    if let Err(why) = strategy.supported_on(state.inner.db.backend()) {
        return Err(unsupported(format!(
            "strategy `{strategy}` is not supported here: {why}"
        )));
    }
    match strategy {
        Strategy::Redis if state.inner.redis.is_none() => Err(unsupported(
            "strategy `redis` needs the server to run with --redis-url".into(),
        )),
        Strategy::Redlock if state.inner.redlock.is_none() => Err(unsupported(
            "strategy `redlock` needs the server to run with --redlock-urls".into(),
        )),
        Strategy::RedisSpin => Err(unsupported(
            "strategy `redis-spin` is not offered by the service".into(),
        )),
        _ => Ok(()),
    }
}

/// The response of a successful write, stored as the outcome of the request's idempotency key
/// (if any) in `tx`, before it commits. See [`idempotency::store_in_tx`].
pub(crate) async fn conclude<O: Op>(
    op: &O,
    tx: &mut Tx,
    output: O::Output,
    idem: &IdempotencyKey,
) -> contend::Result<Outcome> {
    let outcome = Outcome::json(op.status(), &output);
    idempotency::store_in_tx(tx, idem, &outcome).await?;
    Ok(outcome)
}

/// Runs `op` under `strategy` on `session` (the request's connection); the success response is
/// stored with the request's idempotency key in the same transaction. Before waiting for an
/// in-process or Redis lock, the session lets its connection go, so that waiters do not hold
/// pooled connections that the lock's holder may need.
///
/// # Errors
/// The op's business errors; 503 for unavailable dependencies, lock timeouts and conflicts that
/// retries did not resolve.
///
/// # Cancel safety
/// Dropping the future rolls back the open transaction (its connection is closed) and releases
/// in-process and database locks; nothing half-written becomes visible.
pub(crate) async fn execute<O: Op>(
    state: &AppState,
    strategy: Strategy,
    op: O,
    session: &mut ReqSession,
    idem: &IdempotencyKey,
) -> Result<Outcome, ApiError> {
    let db = state.inner.db.clone();
    let backend = db.backend();
    let op = Arc::new(op);
    let metrics = &state.inner.metrics;
    let base = TxOptions::new().lock_timeout(LOCK_WAIT).retry(base_retry());
    let idem = idem.clone();
    let run = match strategy {
        Strategy::None | Strategy::Mutex => {
            let started = Instant::now();
            let mut guards = Vec::new();
            if strategy == Strategy::Mutex {
                session.discard();
                for key in op.lock_keys() {
                    match tokio::time::timeout(LOCK_WAIT, state.inner.mutexes.lock(&key)).await {
                        Ok(guard) => guards.push(guard),
                        Err(_) => {
                            return Err(contend::Error::LockNotAcquired {
                                key,
                                waited_ms: LOCK_WAIT.as_millis() as u64,
                            }
                            .into());
                        }
                    }
                }
                metrics.lock_wait(strategy, started.elapsed());
            }
            let loader = op.clone();
            let loaded = session
                .autocommit(move |conn| {
                    Box::pin(async move { loader.load(conn, backend, "").await })
                })
                .await?;
            let loaded = Arc::new(loaded);
            let run = session
                .run(&base, move |tx| {
                    let op = op.clone();
                    let idem = idem.clone();
                    let loaded = loaded.clone();
                    Box::pin(async move {
                        let out = op.apply(tx, &loaded, false).await?;
                        conclude(&*op, tx, out, &idem).await
                    })
                })
                .await;
            drop(guards);
            run
        }
        Strategy::Atomic => {
            session
                .run(&base, move |tx| {
                    let op = op.clone();
                    let idem = idem.clone();
                    Box::pin(async move {
                        let out = op.atomic(tx).await?;
                        conclude(&*op, tx, out, &idem).await
                    })
                })
                .await
        }
        Strategy::Pessimistic => {
            let lock = pessimistic::lock_clause(backend, RowLock::Update)?;
            let metrics = state.inner.metrics.clone();
            session
                .run(&base, move |tx| {
                    let op = op.clone();
                    let idem = idem.clone();
                    let metrics = metrics.clone();
                    Box::pin(async move {
                        let started = Instant::now();
                        let loaded = op.load(tx.conn(), backend, lock).await?;
                        metrics.lock_wait(strategy, started.elapsed());
                        let out = op.apply(tx, &loaded, false).await?;
                        conclude(&*op, tx, out, &idem).await
                    })
                })
                .await
        }
        Strategy::Optimistic | Strategy::Serializable => {
            let checked = strategy == Strategy::Optimistic;
            let options = if checked {
                optimistic::options()
            } else {
                serializable::options()
            }
            .lock_timeout(LOCK_WAIT);
            session
                .run(&options, move |tx| {
                    let op = op.clone();
                    let idem = idem.clone();
                    Box::pin(async move {
                        let loaded = op.load(tx.conn(), backend, "").await?;
                        let out = op.apply(tx, &loaded, checked).await?;
                        conclude(&*op, tx, out, &idem).await
                    })
                })
                .await
        }
        Strategy::Advisory => {
            let metrics = state.inner.metrics.clone();
            session
                .run(&base, move |tx| {
                    let op = op.clone();
                    let idem = idem.clone();
                    let metrics = metrics.clone();
                    Box::pin(async move {
                        let started = Instant::now();
                        for key in op.lock_keys() {
                            advisory::lock_xact(tx, &key, None).await?;
                        }
                        metrics.lock_wait(strategy, started.elapsed());
                        let loaded = op.load(tx.conn(), backend, "").await?;
                        let out = op.apply(tx, &loaded, false).await?;
                        conclude(&*op, tx, out, &idem).await
                    })
                })
                .await
        }
        Strategy::Redis | Strategy::Redlock | Strategy::RedisSpin => {
            session.discard();
            return crate::redis_locks::execute(state, strategy, op, session, &idem).await;
        }
        _ => {
            return Err(ApiError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "strategy_unsupported",
                format!("strategy `{strategy}` is not offered by the service"),
            ));
        }
    };
    metrics.transaction(strategy, run.attempts, &run.conflicts);
    Ok(run.result?)
}
