//! Authentication: the admin token and per-account tokens (random, 256 bits, stored only as
//! SHA-256 hashes), compared in constant time; and who the caller is ([`Caller`]).

use axum::http::{HeaderMap, header};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::{AppState, ReqSession};

/// Who sent a request, once its bearer token checked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The holder of the admin token.
    Admin,
    /// The holder of this account's token.
    Account(i64),
}

/// An authenticated caller and the scope of its idempotency keys (the hash of its token).
#[derive(Debug, Clone)]
pub struct Authed {
    /// Who it is.
    pub caller: Caller,
    /// Hex SHA-256 of the token: idempotency keys are scoped to it.
    pub scope: String,
}

impl Authed {
    /// 403 unless the caller is the admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.caller {
            Caller::Admin => Ok(()),
            Caller::Account(_) => Err(ApiError::forbidden("this endpoint needs the admin token")),
        }
    }

    /// 403 unless the caller is the holder of `account`'s token (the admin cannot spend for an
    /// account).
    pub fn require_account(&self, account: i64) -> Result<(), ApiError> {
        match self.caller {
            Caller::Account(id) if id == account => Ok(()),
            Caller::Account(_) => Err(ApiError::forbidden(format!(
                "this token does not belong to account {account}"
            ))),
            Caller::Admin => Err(ApiError::forbidden(
                "the admin token cannot act for an account; use the account's token",
            )),
        }
    }

    /// 403 unless the caller is the admin or the holder of `account`'s token.
    pub fn require_admin_or(&self, account: i64) -> Result<(), ApiError> {
        match self.caller {
            Caller::Admin => Ok(()),
            _ => self.require_account(account),
        }
    }
}

/// SHA-256 of a token.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random account token: `acct_` and 64 hex digits (256 random bits).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("acct_{}", hex::encode(bytes))
}

/// Equality of two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// The bearer token of a request, or 401.
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer <token>` header"))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not valid ASCII"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::unauthorized("expected `Authorization: Bearer <token>`"))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(ApiError::unauthorized(
            "expected `Authorization: Bearer <token>`",
        ));
    }
    Ok(token)
}

/// Authenticates a request: the admin token, or an account token looked up by its hash.
///
/// # Errors
/// 401 for a missing, malformed or unknown token; 503 when the database is unavailable.
///
/// # Cancel safety
/// Read-only: safe to drop.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Authed, ApiError> {
    authenticate_on(state, headers, &mut state.session()).await
}

/// [`authenticate`] on `session`'s connection, which the session keeps afterwards: a request
/// that goes on to write reuses it, instead of returning it to the pool (a round trip: sqlx
/// tests every returned connection) and taking another. The token is looked up on every
/// request, never cached, so a token whose account row is gone stops working at once.
///
/// # Errors
/// As [`authenticate`].
///
/// # Cancel safety
/// Read-only; an interrupted lookup closes the session's connection rather than keeping it.
pub(crate) async fn authenticate_on(
    state: &AppState,
    headers: &HeaderMap,
    session: &mut ReqSession,
) -> Result<Authed, ApiError> {
    let token = bearer(headers)?;
    let hash = hash_token(token);
    let scope = hex::encode(hash);
    if constant_time_eq(&hash, &state.inner.admin_hash) {
        return Ok(Authed {
            caller: Caller::Admin,
            scope,
        });
    }
    let query = state
        .inner
        .db
        .query("SELECT id, token_hash FROM accounts WHERE token_hash = ?")
        .bind(scope.clone())
        .try_map(|row: sqlx::any::AnyRow| {
            use sqlx::Row;
            Ok((row.try_get::<i64, _>(0)?, row.try_get::<String, _>(1)?))
        });
    let row: Option<(i64, String)> = session
        .autocommit(move |conn| Box::pin(async move { Ok(query.fetch_optional(conn).await?) }))
        .await?;
    match row {
        Some((id, stored)) if constant_time_eq(stored.as_bytes(), scope.as_bytes()) => Ok(Authed {
            caller: Caller::Account(id),
            scope,
        }),
        _ => Err(ApiError::unauthorized("unknown token")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 5 + 64);
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
