//! Idempotency keys: a POST with `Idempotency-Key` executes at most once per key and caller;
//! its stored outcome is replayed byte for byte afterwards.
//!
//! The key row is inserted *first*, with an in-flight marker (an owner nonce and a lease), so
//! that concurrent duplicates are told apart by the database's primary key, never by
//! check-then-insert. The request then runs in a task of its own, so a client that disconnects
//! (or the request timeout) cannot stop it halfway.
//!
//! A request that writes stores its success outcome *inside its business transaction*
//! (`store_in_tx`, called by every write path just before `COMMIT`): the key row is updated
//! only while this request still owns it, so either the business change and its stored outcome
//! commit together or neither does. A crash after the commit therefore leaves a completed key
//! (replayed afterwards), never an in-flight one whose lease would expire and let the request
//! run twice; and a request whose lease expired and whose key was taken over by a retry cannot
//! commit its business change any more. Outcomes decided without a committed write (404, 409
//! business conflicts, 422: the transaction rolled back) are stored after it ends, and anything
//! else releases the key (so the same key can be used again). If the process dies while a
//! request is in flight, its lease expires and the key can be claimed again: nothing of the
//! dead request committed.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::error::{ApiError, RETRY_AFTER_SECS, abort};
use crate::extract::Meta;
use crate::{AppState, ReqSession};

/// How long an in-flight marker protects its key: far longer than any request may run.
pub const LEASE: Duration = Duration::from_secs(120);

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

    /// Whether this outcome is stored for replay.
    pub(crate) fn storable(&self) -> bool {
        let s = self.status.as_u16();
        self.status.is_success()
            || s == 404
            || s == 422
            || (s == 409 && self.code != Some("request_in_progress"))
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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The fingerprint of a request: SHA-256 of method, path and body.
pub fn fingerprint(meta: &Meta) -> String {
    let mut h = Sha256::new();
    h.update(meta.method.as_str().as_bytes());
    h.update(b"\n");
    h.update(meta.path.as_bytes());
    h.update(b"\n");
    h.update(&meta.body);
    hex::encode(h.finalize())
}

/// The key the current request task owns.
#[derive(Debug, Clone)]
struct Claimed {
    scope: String,
    key: String,
    owner: String,
}

tokio::task_local! {
    /// Set in the task that runs a keyed request, for [`store_in_tx`].
    static CLAIMED: Claimed;
}

/// Stores `outcome` as the outcome of the current request's idempotency key, in `tx` (the
/// request's business transaction, before it commits), when the request carries a key and the
/// outcome is one that is stored. Without a key (or outside a keyed request's task) it does
/// nothing.
///
/// # Errors
/// Database errors; an abort with 503 `idempotency_key_lost` when this request no longer owns
/// its key (its lease expired and a retry took the key over): the transaction must then roll
/// back, since the retry is the one that executes.
///
/// # Cancel safety
/// One statement inside `tx`: dropping the future drops the transaction, which rolls back.
pub(crate) async fn store_in_tx(tx: &mut contend::Tx, outcome: &Outcome) -> contend::Result<()> {
    let Ok(claimed) = CLAIMED.try_with(Claimed::clone) else {
        return Ok(());
    };
    if !outcome.storable() {
        return Ok(());
    }
    let done = tx
        .query(
            "UPDATE idempotency_keys SET status_code = ?, body = ? \
             WHERE scope = ? AND idem_key = ? AND owner = ? AND status_code IS NULL",
        )
        .bind(i64::from(outcome.status.as_u16()))
        .bind(String::from_utf8_lossy(&outcome.body).into_owned())
        .bind(claimed.scope)
        .bind(claimed.key)
        .bind(claimed.owner)
        .execute(tx.conn())
        .await?;
    if done.rows_affected() != 1 {
        return Err(abort(ApiError::unavailable(
            "idempotency_key_lost",
            "this request's claim on its Idempotency-Key expired and another request took it \
             over; nothing was done here",
        )));
    }
    Ok(())
}

enum Claim {
    /// This request owns the key (nonce).
    Owned(String),
    /// Answer with this without executing.
    Answer(Response),
}

impl<T: Send + 'static> crate::extract::JsonRequest<T> {
    /// Runs a write endpoint's `work` through [`run`] (under the request's idempotency key, if
    /// any), handing it the state, the caller, the body, the strategy chosen for this request and
    /// the request's connection: the prologue every write handler shares.
    pub(crate) async fn run_keyed<F, Fut>(self, state: &AppState, work: F) -> Response
    where
        F: FnOnce(AppState, crate::auth::Authed, T, contend::strategy::Strategy, ReqSession) -> Fut
            + Send
            + 'static,
        Fut: Future<Output = Result<Outcome, ApiError>> + Send + 'static,
    {
        let crate::extract::JsonRequest { auth, body, meta } = self;
        let strategy = state.strategy_for(&meta);
        let scope = auth.scope.clone();
        let st = state.clone();
        run(state, scope, &meta, move |session| {
            work(st, auth, body, strategy, session)
        })
        .await
    }
}

/// Runs `work` at most once per `(scope, Idempotency-Key)` (the scope is the hash of the
/// caller's token); without a key, just runs it.
///
/// `work` gets a request session ([`AppState::session`]); with a key, only once the key is
/// claimed (through the pool, not a session). `work` must do all its database work through the
/// session it gets, or drop it first: a request never holds two, which could starve them.
///
/// # Cancel safety
/// With a key, `work` runs in a task of its own: dropping this future does not stop it, and its
/// outcome is stored (or its key released) when it ends.
pub(crate) async fn run<F, Fut>(state: &AppState, scope: String, meta: &Meta, work: F) -> Response
where
    F: FnOnce(ReqSession) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Outcome, ApiError>> + Send + 'static,
{
    let Some(key) = meta.idempotency_key.clone() else {
        return with_session(state, work).await.into_response();
    };
    let fp = fingerprint(meta);
    let owner = match claim(state, &scope, &key, &fp).await {
        Ok(Claim::Owned(owner)) => owner,
        Ok(Claim::Answer(response)) => return response,
        Err(e) => return e.into_response(),
    };
    let state2 = state.clone();
    let claimed = Claimed {
        scope: scope.clone(),
        key,
        owner,
    };
    let task = tokio::spawn(CLAIMED.scope(claimed.clone(), async move {
        let outcome = with_session(&state2, work).await;
        finish(&state2, &claimed, &outcome).await;
        outcome
    }));
    match task.await {
        Ok(outcome) => outcome.into_response(),
        Err(join) => {
            // The work panicked (a bug): release the key so it does not stay in flight.
            let key = meta.idempotency_key.clone().unwrap_or_default();
            release_any(state, &scope, &key, &fp).await;
            ApiError::internal(format!("request task failed: {join}")).into_response()
        }
    }
}

/// `work`'s outcome on a request session, or 503 when none became free.
async fn with_session<F, Fut>(state: &AppState, work: F) -> Outcome
where
    F: FnOnce(ReqSession) -> Fut,
    Fut: Future<Output = Result<Outcome, ApiError>>,
{
    match state.session().await {
        Ok(session) => Outcome::from(work(session).await),
        Err(e) => Outcome::from(e),
    }
}

async fn claim(state: &AppState, scope: &str, key: &str, fp: &str) -> Result<Claim, ApiError> {
    let db = &state.inner.db;
    for _ in 0..5 {
        let mut nonce = [0u8; 16];
        rand::rng().fill_bytes(&mut nonce);
        let owner = hex::encode(nonce);
        let lease_until = now_ms() + LEASE.as_millis() as i64;
        let inserted = db
            .query(
                "INSERT INTO idempotency_keys (scope, idem_key, fingerprint, owner, status_code, body, lease_until) \
                 VALUES (?, ?, ?, ?, NULL, NULL, ?)",
            )
            .bind(scope.to_string())
            .bind(key.to_string())
            .bind(fp.to_string())
            .bind(owner.clone())
            .bind(lease_until)
            .execute(db.pool())
            .await;
        match inserted {
            Ok(_) => return Ok(Claim::Owned(owner)),
            Err(e) => {
                let e = contend::Error::from(e);
                if !e.is_unique_violation() {
                    return Err(e.into());
                }
            }
        }
        let row = db
            .query(
                "SELECT fingerprint, owner, status_code, body, lease_until FROM idempotency_keys \
                 WHERE scope = ? AND idem_key = ?",
            )
            .bind(scope.to_string())
            .bind(key.to_string())
            .fetch_optional(db.pool())
            .await?;
        let Some(row) = row else {
            continue; // released meanwhile: try to insert again
        };
        let stored_fp: String = row.try_get(0)?;
        let stored_owner: String = row.try_get(1)?;
        let status: Option<i64> = row.try_get(2)?;
        let body: Option<String> = row.try_get(3)?;
        let stored_lease: i64 = row.try_get(4)?;
        if stored_fp != fp {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request (method, path or body)",
            ));
        }
        if let Some(status) = status {
            let status = u16::try_from(status)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .ok_or_else(|| ApiError::internal(format!("stored status {status} is invalid")))?;
            let outcome = Outcome {
                status,
                body: body.unwrap_or_default().into_bytes(),
                code: None,
                retry_after: None,
            };
            return Ok(Claim::Answer(outcome.into_response_with(true)));
        }
        if stored_lease > now_ms() {
            let mut err = ApiError::conflict(
                "request_in_progress",
                "a request with this Idempotency-Key is still being processed; retry later",
            );
            err.retry_after = Some(RETRY_AFTER_SECS);
            return Ok(Claim::Answer(err.into_response()));
        }
        // The lease expired (its process died): take the key over, atomically.
        let mut nonce = [0u8; 16];
        rand::rng().fill_bytes(&mut nonce);
        let owner = hex::encode(nonce);
        let taken = db
            .query(
                "UPDATE idempotency_keys SET owner = ?, lease_until = ? \
                 WHERE scope = ? AND idem_key = ? AND owner = ? AND status_code IS NULL",
            )
            .bind(owner.clone())
            .bind(now_ms() + LEASE.as_millis() as i64)
            .bind(scope.to_string())
            .bind(key.to_string())
            .bind(stored_owner)
            .execute(db.pool())
            .await?;
        if taken.rows_affected() == 1 {
            return Ok(Claim::Owned(owner));
        }
    }
    Err(ApiError::unavailable(
        "contention",
        "could not claim the Idempotency-Key under contention; try again",
    ))
}

/// After the request: stores a storable outcome that its transaction did not store already
/// (404, 409 and 422 decided by a transaction that rolled back), or releases the key. Both
/// touch the key only while it is still in flight and owned by this request, so an outcome
/// stored by a committed transaction is never overwritten or released, even when the response
/// turned into an error afterwards (a commit whose answer was lost): a retry replays it.
/// Retried briefly: a key left in flight blocks its retries until the lease expires.
async fn finish(state: &AppState, claimed: &Claimed, outcome: &Outcome) {
    let db = &state.inner.db;
    let Claimed { scope, key, owner } = claimed;
    for attempt in 0..5u32 {
        let result = if outcome.storable() {
            db.query(
                "UPDATE idempotency_keys SET status_code = ?, body = ? \
                 WHERE scope = ? AND idem_key = ? AND owner = ? AND status_code IS NULL",
            )
            .bind(i64::from(outcome.status.as_u16()))
            .bind(String::from_utf8_lossy(&outcome.body).into_owned())
            .bind(scope.clone())
            .bind(key.clone())
            .bind(owner.clone())
            .execute(db.pool())
            .await
        } else {
            db.query(
                "DELETE FROM idempotency_keys WHERE scope = ? AND idem_key = ? AND owner = ? \
                 AND status_code IS NULL",
            )
            .bind(scope.clone())
            .bind(key.clone())
            .bind(owner.clone())
            .execute(db.pool())
            .await
        };
        match result {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "could not finish an idempotency key; retrying");
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
        }
    }
    tracing::error!(
        key,
        "idempotency key left in flight until its lease expires"
    );
}

/// Releases an in-flight key whose owner is unknown here (the task that owned it panicked).
async fn release_any(state: &AppState, scope: &str, key: &str, fp: &str) {
    let db = &state.inner.db;
    let _ = db
        .query(
            "DELETE FROM idempotency_keys WHERE scope = ? AND idem_key = ? AND fingerprint = ? \
             AND status_code IS NULL",
        )
        .bind(scope.to_string())
        .bind(key.to_string())
        .bind(fp.to_string())
        .execute(db.pool())
        .await;
}
