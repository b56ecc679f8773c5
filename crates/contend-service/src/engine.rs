//! Runs one write under the chosen concurrency strategy, on the library's strategy executor
//! ([`contend::strategy::Executor`]).
//!
//! Each write of the service (deposit, withdraw, transfer, order, booking) is a
//! [`contend::strategy::Operation`] (lock keys, a read, a write deciding in Rust, and the same
//! effect as conditional SQL) that is also a [`Write`] (its success is the response body).
//! [`execute`] wraps it so that the response is stored with the request's idempotency key in
//! the transaction that writes, and runs it on the instance's one executor: the executor, not
//! the service, decides how each strategy combines the parts.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use contend::strategy::{Executor, Operation, Strategy};
use contend::{BoxFuture, RowLock, Tx};
use contend_axum::IdempotencyKey;
use sqlx::AnyConnection;

use crate::error::ApiError;
use crate::idempotency::{self, Outcome};
use crate::{AppState, ReqSession};

/// How long a request waits for a row, advisory, in-process, Redis or etcd lock before 503.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// One write of the service: an operation whose output is the body of its success response.
pub(crate) trait Write: Operation<Error = contend::Error, Output: serde::Serialize> {
    /// The status of a success.
    fn status(&self) -> StatusCode {
        StatusCode::CREATED
    }
}

/// The service's executor: the lock wait of every request, and the Redis and etcd lock
/// services the instance was given.
pub(crate) fn executor(
    redis: Option<&crate::redis_locks::RedisLocks>,
    redlock: Option<&crate::redis_locks::RedisLocks>,
    etcd: Option<&crate::redis_locks::EtcdLocks>,
) -> Executor {
    let mut executor = Executor::new().lock_wait(LOCK_WAIT);
    if let Some(locks) = redis {
        executor = executor.lock_service(Strategy::Redis, locks.service());
    }
    if let Some(locks) = redlock {
        executor = executor.lock_service(Strategy::Redlock, locks.service());
    }
    if let Some(locks) = etcd {
        executor = executor.lock_service(Strategy::Etcd, locks.0.clone());
    }
    executor
}

/// Checks that `strategy` can run here.
///
/// # Errors
/// 422 `strategy_unsupported` when the backend lacks it, its Redis lock is not configured, or
/// it is `redis-spin` (a baseline the service does not offer).
pub(crate) fn check_supported(state: &AppState, strategy: Strategy) -> Result<(), ApiError> {
    let backend = state.inner.db.backend();
    let why = match state.inner.executor.check_db(strategy, &state.inner.db) {
        Ok(()) if strategy != Strategy::RedisSpin => return Ok(()),
        Ok(()) => "strategy `redis-spin` is not offered by the service".to_string(),
        // On a Galera cluster: `advisory` and `serializable`, with the reason.
        Err(e @ contend::Error::UnsafeOnCluster { .. }) => e.to_string(),
        Err(_) => unmet(strategy, backend, false)
            .unwrap_or_else(|| format!("strategy `{strategy}` is not offered by the service")),
    };
    Err(ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "strategy_unsupported",
        why,
    ))
}

/// What keeps `strategy` from running on `backend`, as far as the server's flags tell: the
/// backend cannot do it, or it is a lock strategy and its lock service was not given
/// (`has_lock_service`). `contend serve` asks this of its flags before it opens anything;
/// [`check_supported`] words its refusal with it.
pub(crate) fn unmet(
    strategy: Strategy,
    backend: contend::Backend,
    has_lock_service: bool,
) -> Option<String> {
    if let Err(why) = strategy.supported_on(backend) {
        return Some(format!(
            "strategy `{strategy}` is not supported here: {why}"
        ));
    }
    let flag = match strategy {
        Strategy::Redis => "--redis-url",
        Strategy::Redlock => "--redlock-urls",
        Strategy::Etcd => "--etcd-urls",
        _ => return None,
    };
    (!has_lock_service)
        .then(|| format!("strategy `{strategy}` needs the server to run with {flag}"))
}

/// A [`Write`] whose success response is stored as the outcome of the request's idempotency
/// key (if any) in the transaction that writes, before it commits.
struct Keyed<W> {
    write: W,
    key: IdempotencyKey,
}

/// The state of a [`Keyed`] write: its write's state and, under `batched` with decisions in
/// memory ([`Operation::apply`]), the responses of the operations decided on it that are
/// stored with their idempotency keys by [`Operation::write_state`], in the batch's
/// transaction.
struct KeyedState<S> {
    inner: S,
    outcomes: Vec<(IdempotencyKey, Outcome)>,
}

impl<W: Write> Keyed<W> {
    /// The response of a success.
    fn outcome(&self, output: &W::Output) -> Outcome {
        Outcome::json(self.write.status(), output)
    }

    /// Stores the response of `output` in `tx` ([`idempotency::store_in_tx`]).
    async fn conclude(&self, tx: &mut Tx, output: W::Output) -> contend::Result<Outcome> {
        let outcome = self.outcome(&output);
        idempotency::store_in_tx(tx, &self.key, &outcome).await?;
        Ok(outcome)
    }
}

impl<W: Write> Operation for Keyed<W> {
    type State = KeyedState<W::State>;
    type Output = Outcome;
    type Error = contend::Error;

    fn keys(&self) -> Vec<String> {
        self.write.keys()
    }

    fn row_lock(&self) -> RowLock {
        self.write.row_lock()
    }

    fn batch_domain(&self) -> Option<String> {
        self.write.batch_domain()
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, contend::Result<Self::State>> {
        Box::pin(async move {
            Ok(KeyedState {
                inner: self.write.read(conn, lock).await?,
                outcomes: Vec::new(),
            })
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        state: &'c Self::State,
        checked: bool,
    ) -> BoxFuture<'c, contend::Result<Outcome>> {
        Box::pin(async move {
            let output = self.write.write(tx, &state.inner, checked).await?;
            self.conclude(tx, output).await
        })
    }

    fn atomic<'c>(&'c self, tx: &'c mut Tx) -> Option<BoxFuture<'c, contend::Result<Outcome>>> {
        Some(Box::pin(async move {
            let backend = tx.backend();
            let Some(write) = self.write.atomic(tx) else {
                return Err(contend::Error::Unsupported {
                    backend,
                    what: "strategy `atomic` for an operation without a conditional-statement \
                           form"
                        .into(),
                });
            };
            let output = write.await?;
            self.conclude(tx, output).await
        }))
    }

    /// The write's decision in memory; a success's response is queued with the request's key
    /// (when it has one), to be stored by [`Operation::write_state`].
    fn apply(&self, state: &mut Self::State) -> Option<contend::Result<Outcome>> {
        let decided = self.write.apply(&mut state.inner)?;
        Some(decided.map(|output| {
            let outcome = self.outcome(&output);
            if self.key.claimed().is_some() {
                state.outcomes.push((self.key.clone(), outcome.clone()));
            }
            outcome
        }))
    }

    /// The write's state, then the queued responses with their keys, in the same transaction
    /// ([`idempotency::store_in_tx`], one statement per key): a key that was taken over fails
    /// the batch, which is then retried and split, so that only that request fails (503
    /// `idempotency_key_lost`).
    fn write_state<'c>(
        &'c self,
        tx: &'c mut Tx,
        state: &'c Self::State,
    ) -> Option<BoxFuture<'c, contend::Result<()>>> {
        Some(Box::pin(async move {
            let backend = tx.backend();
            let Some(write) = self.write.write_state(tx, &state.inner) else {
                return Err(contend::Error::Unsupported {
                    backend,
                    what: "`Operation::apply` without `Operation::write_state`".into(),
                });
            };
            write.await?;
            for (key, outcome) in &state.outcomes {
                idempotency::store_in_tx(tx, key, outcome).await?;
            }
            Ok(())
        }))
    }
}

/// Runs `write` under `strategy` on `session` (the request's connection) with the instance's
/// executor; the success response is stored with the request's idempotency key in the same
/// transaction. After an error other than a business one, the session's connection goes back
/// to the pool rather than to the next request.
///
/// # Errors
/// The write's business errors; 422 when the strategy cannot run here; 503 for unavailable
/// dependencies, lock timeouts, lost locks and conflicts that retries did not resolve.
///
/// # Cancel safety
/// As [`Executor::run`]: dropping the future rolls back the open transaction and releases the
/// locks; nothing half-written becomes visible.
pub(crate) async fn execute<W: Write>(
    state: &AppState,
    strategy: Strategy,
    write: W,
    session: &mut ReqSession,
    key: &IdempotencyKey,
) -> Result<Outcome, ApiError> {
    check_supported(state, strategy)?;
    let op = Arc::new(Keyed {
        write,
        key: key.clone(),
    });
    if strategy == Strategy::Batched {
        session.give_up_turn();
    }
    let done = state.inner.executor.run(strategy, session, op).await;
    if let Err(e) = &done.result
        && !ReqSession::keeps_connection(e)
    {
        session.discard();
    }
    if done.attempts > 0 {
        let metrics = &state.inner.metrics;
        metrics.transaction(strategy, done.attempts, &done.conflicts);
        if strategy.takes_locks() {
            metrics.lock_wait(strategy, done.lock_wait);
        }
    }
    Ok(done.result?)
}
