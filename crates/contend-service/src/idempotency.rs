//! Idempotency keys: a POST with `Idempotency-Key` executes at most once per key and caller;
//! its stored outcome is replayed byte for byte afterwards.
//!
//! The service uses the public pieces a user has: the key store of [`contend::idempotency`]
//! and the [`IdempotencyLayer`] of `contend-axum` on its routes (`layer`). What is left here
//! adapts them to the service: keys are scoped to the hash of the caller's token (put into the
//! request by [`crate::extract::JsonRequest`] once the caller is authenticated), the claim waits
//! until the request passed the contract's earlier checks (413/415, 401, 400), the layer's own
//! answers are [`ApiError`]s, and `store_in_tx` stores an [`Outcome`] in the business
//! transaction (every write path calls it just before `COMMIT`), so a crash after the commit
//! replays and a request whose key was taken over cannot commit (503 `idempotency_key_lost`).

use std::future::Future;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use contend_axum::{IdempotencyKey, IdempotencyLayer, Rejection};
use serde::Serialize;

use crate::error::{ApiError, RETRY_AFTER_SECS, abort};
use crate::extract::BODY_LIMIT;
use crate::{AppState, ReqSession};

/// How long an in-flight marker protects its key by default (`--idempotency-lease-secs`): far
/// longer than any request may run.
pub const LEASE: Duration = contend::idempotency::DEFAULT_LEASE;

/// A finished response: status and exact body bytes.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// HTTP status.
    pub status: StatusCode,
    /// JSON body bytes.
    pub body: Vec<u8>,
    /// The error code, for error outcomes.
    pub code: Option<&'static str>,
    /// `Retry-After` seconds, if any.
    pub retry_after: Option<u32>,
}

impl Outcome {
    /// A success with a JSON body.
    pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Outcome {
        match serde_json::to_vec(value) {
            Ok(body) => Outcome {
                status,
                body,
                code: None,
                retry_after: None,
            },
            Err(e) => ApiError::internal(e).into(),
        }
    }

    /// The HTTP response; `replayed` adds `Idempotent-Replayed: true`.
    pub fn into_response_with(self, replayed: bool) -> Response {
        let mut response = (self.status, self.body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if replayed {
            headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        response
    }
}

impl From<ApiError> for Outcome {
    fn from(err: ApiError) -> Self {
        Outcome {
            status: err.status,
            body: err.body_bytes(),
            code: Some(err.code),
            retry_after: err.retry_after,
        }
    }
}

impl From<Result<Outcome, ApiError>> for Outcome {
    fn from(result: Result<Outcome, ApiError>) -> Self {
        result.unwrap_or_else(Outcome::from)
    }
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        self.into_response_with(false)
    }
}

/// The scope of the caller's idempotency keys (the hex SHA-256 of its token), inserted into the
/// request's extensions once it is authenticated; read by the layer's scope function.
#[derive(Debug, Clone)]
pub(crate) struct CallerScope(pub(crate) String);

/// The idempotency layer of the service's routes: keys in the `idempotency_keys` table of `db`
/// (created by the migrations), scoped by [`CallerScope`], claimed when the handler's
/// [`crate::extract::JsonRequest`] has passed its checks, bodies up to [`BODY_LIMIT`].
pub(crate) fn layer(db: &contend::Db, lease: Duration) -> IdempotencyLayer {
    let store = contend::idempotency::Store::new(db.clone()).lease(lease);
    IdempotencyLayer::new(store, |parts| {
        parts
            .extensions
            .get::<CallerScope>()
            .map(|scope| scope.0.clone())
    })
    .body_limit(BODY_LIMIT)
    .retry_after(Duration::from_secs(u64::from(RETRY_AFTER_SECS)))
    .on_rejection(|rejection| ApiError::from(rejection).into_response())
    .claim_in_handler()
}

impl From<Rejection> for ApiError {
    /// The layer's answers with the contract's codes and messages (those of
    /// [`Rejection::message`], `Retry-After` on 409 and 503); a failing store as any database
    /// failure; a body over the limit as the extractor's 413.
    fn from(rejection: Rejection) -> Self {
        match rejection {
            Rejection::BodyTooLarge { .. } => crate::extract::too_large(),
            Rejection::Store(e) if e.conflict().is_none() => ApiError::from(e),
            Rejection::Internal(what) => ApiError::internal(what),
            other => {
                let mut err = ApiError::new(other.status(), other.code(), other.message());
                err.retry_after = other.retry_after();
                err
            }
        }
    }
}

impl<T> crate::extract::JsonRequest<T> {
    /// Runs a write endpoint's `work` once the request's idempotency key (if any) is claimed,
    /// handing it the state, the caller, the body, the strategy chosen for this request, the
    /// request's connection and the claimed key: the prologue every write handler shares. A
    /// replay, 409 `request_in_progress` or 422 `idempotency_key_reused` answers instead.
    ///
    /// `work` gets its request session ([`AppState::session`]) only once the key is claimed
    /// (through the pool, not a session); it must do all its database work through that
    /// session, or drop it first: a request never holds two, which could starve them.
    pub(crate) async fn run_keyed<F, Fut>(self, state: &AppState, work: F) -> Response
    where
        F: FnOnce(
            AppState,
            crate::auth::Authed,
            T,
            contend::strategy::Strategy,
            ReqSession,
            IdempotencyKey,
        ) -> Fut,
        Fut: Future<Output = Result<Outcome, ApiError>>,
    {
        let crate::extract::JsonRequest {
            auth,
            body,
            meta,
            pending,
        } = self;
        let strategy = state.strategy_for(&meta);
        let key = match pending.claim().await {
            Ok(key) => key,
            Err(answer) => return answer,
        };
        let outcome = match state.session().await {
            Ok(session) => {
                Outcome::from(work(state.clone(), auth, body, strategy, session, key).await)
            }
            Err(e) => Outcome::from(e),
        };
        outcome.into_response()
    }
}

/// Stores `outcome` as the outcome of the request's idempotency key, in `tx` (the request's
/// business transaction, before it commits), when the request has a key and the outcome is one
/// that is stored. Without a key it does nothing.
///
/// # Errors
/// Database errors; an abort with 503 `idempotency_key_lost` when this request no longer owns
/// its key (its lease expired and a retry took the key over): the transaction must then roll
/// back, since the retry is the one that executes.
///
/// # Cancel safety
/// One statement inside `tx`: dropping the future drops the transaction, which rolls back.
pub(crate) async fn store_in_tx(
    tx: &mut contend::Tx,
    key: &IdempotencyKey,
    outcome: &Outcome,
) -> contend::Result<()> {
    match key.store_in_tx(tx, outcome.status, &outcome.body).await {
        Err(e) if contend::idempotency::is_key_lost(&e) => Err(abort(ApiError::unavailable(
            "idempotency_key_lost",
            "this request's claim on its Idempotency-Key expired and another request took it \
             over; nothing was done here",
        ))),
        other => other,
    }
}
