//! [`ApiError`]: every failure the service answers with, as a status, a snake_case code and a
//! message, rendered as `{"error": {"code", "message"}}` (plus `Retry-After` on 503).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Seconds a client is told to wait (`Retry-After`) after a 503 or a 409 `request_in_progress`.
pub const RETRY_AFTER_SECS: u32 = 1;

/// An error response of the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code clients can match on.
    pub code: &'static str,
    /// Human-readable explanation (never SQL or internals).
    pub message: String,
    /// Seconds for `Retry-After`, when the client should try again later.
    pub retry_after: Option<u32>,
}

/// The JSON body of an error: `{"error": {"code": .., "message": ..}}`.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inner object of [`ErrorBody`].
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code.
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 `invalid_body`.
    pub fn invalid_body(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_body", message)
    }

    /// 400 `invalid_path`: a path parameter of the wrong type.
    pub fn invalid_path(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_path", message)
    }

    /// 400 `invalid_query`: a query string that cannot be read, or a parameter of the wrong type.
    pub fn invalid_query(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_query", message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 with a specific code (`account_not_found`, ...).
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 422 `invalid_value` naming the field.
    pub fn invalid_value(field: &str, rule: &str) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            format!("`{field}` {rule}"),
        )
    }

    /// 409 with a business conflict code.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 503 `unavailable` with `Retry-After`.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(RETRY_AFTER_SECS),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// 500 `internal`: a bug. The details are logged, not sent.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(%detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error (this is a bug; see the server log)",
        )
    }

    /// The JSON body bytes of this error.
    pub fn body_bytes(&self) -> Vec<u8> {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
            },
        };
        serde_json::to_vec(&body).unwrap_or_else(|_| {
            b"{\"error\":{\"code\":\"internal\",\"message\":\"serialization failed\"}}".to_vec()
        })
    }
}

impl From<contend::Error> for ApiError {
    /// Maps library errors: a business error carried through a transaction comes back as itself;
    /// unavailable dependencies, exhausted retries and lock timeouts are 503; anything else is a bug.
    fn from(err: contend::Error) -> Self {
        match err {
            contend::Error::Aborted(inner) => match inner.downcast::<ApiError>() {
                Ok(api) => *api,
                Err(other) => ApiError::internal(other),
            },
            e if e.is_unavailable() || connection_lost(&e) => {
                tracing::warn!(error = %e, "dependency unavailable");
                ApiError::unavailable(
                    "unavailable",
                    "a dependency (database or Redis) is unavailable; try again",
                )
            }
            contend::Error::Conflict { kind, .. } => {
                tracing::info!(%kind, "conflict not resolved by retries");
                ApiError::unavailable(
                    "contention",
                    format!(
                        "the request kept conflicting with concurrent requests ({kind}); try again"
                    ),
                )
            }
            contend::Error::LockNotAcquired { waited_ms, .. } => ApiError::unavailable(
                "lock_timeout",
                format!("a lock was not acquired within {waited_ms} ms; try again"),
            ),
            contend::Error::StaleFencingToken { .. } => ApiError::unavailable(
                "lock_lost",
                "the lock expired before the write; nothing was written; try again",
            ),
            other => ApiError::internal(other),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        ApiError::from(contend::Error::from(err))
    }
}

impl IntoResponse for ApiError {
    /// The same response as the error's [`Outcome`](crate::idempotency::Outcome).
    fn into_response(self) -> Response {
        crate::idempotency::Outcome::from(self).into_response()
    }
}

/// Wraps a business error so that a transaction body can return it (rolled back, not retried).
/// Whether the server ended the connection (PostgreSQL SQLSTATE class 08, connection
/// exception, or 57P01..57P03, shut down or terminated by an administrator): the database is
/// (or was) unavailable, not a bug.
fn connection_lost(err: &contend::Error) -> bool {
    match err {
        contend::Error::Database(sqlx::Error::Database(db)) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

pub(crate) fn abort(err: ApiError) -> contend::Error {
    contend::Error::aborted(err)
}
