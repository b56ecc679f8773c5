//! Authentication: the admin token and per-account tokens (random, 256 bits, stored only as
//! SHA-256 hashes), compared in constant time; and who the caller is ([`Caller`]).
//!
//! Account tokens are looked up by hash in the database, and a successful lookup is remembered
//! for a short while ([`TokenCache`]): a request that writes then needs no round trip of its own
//! for its token. Only successes are remembered, so a new account's token works on every instance
//! at once; and no API removes an account or changes its token, so a remembered answer can only
//! go stale if rows are deleted or changed by hand, and then for at most the cache's time to live.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{OneHeader, one_header};

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

/// Account-token lookups that succeeded, kept for a time to live: token hash to account id.
///
/// Bounded: at `capacity` entries, expired ones are dropped, and if none had expired the whole
/// map is emptied (a burst of more distinct tokens than the capacity within one time to live then
/// costs lookups, never memory). A time to live of zero turns it off.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use contend_service::auth::TokenCache;
///
/// let cache = TokenCache::new(Duration::from_secs(30), 2);
/// let hash = [7u8; 32];
/// assert_eq!(cache.get(&hash), None);
/// cache.insert(hash, 42);
/// assert_eq!(cache.get(&hash), Some(42));
///
/// let off = TokenCache::new(Duration::ZERO, 2);
/// off.insert(hash, 42);
/// assert_eq!(off.get(&hash), None);
/// ```
#[derive(Debug)]
pub struct TokenCache {
    ttl: Duration,
    capacity: usize,
    map: Mutex<HashMap<[u8; 32], (i64, Instant)>>,
}

impl TokenCache {
    /// A cache keeping each entry for `ttl`, with at most `capacity` entries.
    pub fn new(ttl: Duration, capacity: usize) -> TokenCache {
        TokenCache {
            ttl,
            capacity: capacity.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The account of `hash`, if a lookup found it less than the time to live ago.
    pub fn get(&self, hash: &[u8; 32]) -> Option<i64> {
        if self.ttl.is_zero() {
            return None;
        }
        let map = self.map.lock().ok()?;
        let (id, at) = map.get(hash)?;
        (at.elapsed() < self.ttl).then_some(*id)
    }

    /// Remembers that `hash` is the token of account `id`.
    pub fn insert(&self, hash: [u8; 32], id: i64) {
        if self.ttl.is_zero() {
            return;
        }
        let Ok(mut map) = self.map.lock() else {
            return;
        };
        if map.len() >= self.capacity && !map.contains_key(&hash) {
            let ttl = self.ttl;
            map.retain(|_, (_, at)| at.elapsed() < ttl);
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(hash, (id, Instant::now()));
    }
}

/// The bearer token of a request, or 401.
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = match one_header(headers, header::AUTHORIZATION) {
        OneHeader::One(value) => value,
        OneHeader::Absent => {
            return Err(ApiError::unauthorized(
                "missing `Authorization: Bearer <token>` header",
            ));
        }
        // Which one would count is ambiguous (a proxy may check one, this service another).
        OneHeader::Repeated => {
            return Err(ApiError::unauthorized(
                "more than one Authorization header; send exactly one",
            ));
        }
    };
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

/// Authenticates a request: the admin token, or an account token, remembered in the
/// [`TokenCache`] or looked up by its hash on a request session of its own (given back at once,
/// so that the request never holds two).
///
/// # Errors
/// 401 for a missing, malformed or unknown token; 503 when the database is unavailable.
///
/// # Cancel safety
/// Read-only; an interrupted lookup closes its connection rather than keeping it.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Authed, ApiError> {
    let token = bearer(headers)?;
    let hash = hash_token(token);
    let scope = hex::encode(hash);
    if constant_time_eq(&hash, &state.inner.admin_hash) {
        return Ok(Authed {
            caller: Caller::Admin,
            scope,
        });
    }
    if let Some(id) = state.inner.tokens.get(&hash) {
        return Ok(Authed {
            caller: Caller::Account(id),
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
    let row: Option<(i64, String)> = state
        .session()
        .await?
        .autocommit(move |conn| Box::pin(async move { Ok(query.fetch_optional(conn).await?) }))
        .await?;
    match row {
        Some((id, stored)) if constant_time_eq(stored.as_bytes(), scope.as_bytes()) => {
            state.inner.tokens.insert(hash, id);
            Ok(Authed {
                caller: Caller::Account(id),
                scope,
            })
        }
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
    fn token_cache_forgets_after_its_time_to_live() {
        let cache = TokenCache::new(Duration::from_millis(50), 10);
        cache.insert([1; 32], 1);
        assert_eq!(cache.get(&[1; 32]), Some(1));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(cache.get(&[1; 32]), None);
    }

    #[test]
    fn token_cache_stays_within_its_capacity() {
        let cache = TokenCache::new(Duration::from_secs(60), 3);
        for i in 0..10u8 {
            cache.insert([i; 32], i64::from(i));
            assert!(cache.map.lock().unwrap().len() <= 3);
            assert_eq!(
                cache.get(&[i; 32]),
                Some(i64::from(i)),
                "the newest is kept"
            );
        }
        // Updating a present entry never evicts.
        let before = cache.map.lock().unwrap().len();
        cache.insert([9; 32], 9);
        assert_eq!(cache.map.lock().unwrap().len(), before);
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
