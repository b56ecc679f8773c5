//! Request extractors that enforce the contract's check order: body size and content type
//! (413/415), then authentication (401), then the body and headers (400). Authorization, existence,
//! value ranges and conflicts are the handlers' business, in that order.

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::AsHeaderName;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use contend::strategy::Strategy;
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::auth::{Authed, authenticate};
use crate::error::ApiError;

/// Largest accepted request body: 64 KiB.
pub const BODY_LIMIT: usize = 64 * 1024;

/// The header that names an idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The header that picks a strategy for one request (with `--allow-strategy-header`).
pub const STRATEGY_HEADER: &str = "x-concurrency-strategy";

/// The strategy names of the contract, in its order.
pub const STRATEGY_NAMES: [&str; 11] = [
    "none",
    "mutex",
    "atomic",
    "pessimistic",
    "optimistic",
    "serializable",
    "advisory",
    "redis",
    "redlock",
    "etcd",
    "batched",
];

/// What a POST carries besides its typed body: used for idempotency and strategy choice.
#[derive(Debug, Clone)]
pub struct Meta {
    /// Request method.
    pub method: Method,
    /// Request path (and query), as sent.
    pub path: String,
    /// The raw body bytes.
    pub body: Bytes,
    /// The `Idempotency-Key`, validated.
    pub idempotency_key: Option<String>,
    /// The strategy picked by the header, if any (already known and allowed).
    pub strategy: Option<Strategy>,
}

/// An authenticated JSON request with a strictly typed body.
#[derive(Debug)]
pub struct JsonRequest<T> {
    /// The caller.
    pub auth: Authed,
    /// The typed body.
    pub body: T,
    /// Everything else.
    pub meta: Meta,
    /// The request's idempotency key, claimed by `run_keyed` (after the handler's own checks of
    /// the path).
    pub(crate) pending: contend_axum::PendingKey,
}

/// An authenticated request without a body (GETs).
#[derive(Debug, Clone)]
pub struct Auth(pub Authed);

/// A request header the service reads one value of.
pub(crate) enum OneHeader<'h> {
    /// Not sent.
    Absent,
    /// Sent once.
    One(&'h HeaderValue),
    /// Sent more than once: refused, not decided by whichever copy comes first (a proxy in
    /// front may have read another one).
    Repeated,
}

/// Header `name` of `headers`, as [`OneHeader`].
pub(crate) fn one_header<K: AsHeaderName>(headers: &HeaderMap, name: K) -> OneHeader<'_> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => OneHeader::Absent,
        (Some(value), None) => OneHeader::One(value),
        (Some(_), Some(_)) => OneHeader::Repeated,
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    // One Content-Type only: with two, which one the body follows is anyone's guess.
    let OneHeader::One(value) = one_header(headers, header::CONTENT_TYPE) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

pub(crate) fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request bodies are limited to {BODY_LIMIT} bytes"),
    )
}

/// Parses a JSON body strictly: no unknown fields (the types say `deny_unknown_fields`), no
/// nulls, no floats for integers, no numbers beyond i64, nothing after the value.
///
/// # Errors
/// 400 `invalid_body` naming what is wrong.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid_body(format!("invalid JSON body: {e}")))
}

/// Validates an `Idempotency-Key`: one header of 1..=255 printable ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    Ok(contend_axum::key_header(headers)?.map(str::to_string))
}

/// The strategy chosen by `X-Concurrency-Strategy`, if any.
fn strategy_header(state: &AppState, headers: &HeaderMap) -> Result<Option<Strategy>, ApiError> {
    let value = match one_header(headers, STRATEGY_HEADER) {
        OneHeader::Absent => return Ok(None),
        sent => sent,
    };
    if !state.inner.allow_strategy_header {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "strategy_header_not_allowed",
            "X-Concurrency-Strategy is only accepted when the server runs with --allow-strategy-header",
        ));
    }
    let OneHeader::One(value) = value else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_strategy",
            "more than one X-Concurrency-Strategy header; send one",
        ));
    };
    let name = value.to_str().unwrap_or("").trim();
    if !STRATEGY_NAMES.contains(&name) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_strategy",
            format!(
                "unknown strategy `{}`; expected one of: {}",
                name.escape_default(),
                STRATEGY_NAMES.join(", ")
            ),
        ));
    }
    name.parse::<Strategy>()
        .map(Some)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "unknown_strategy", e.to_string()))
}

impl<T: DeserializeOwned + Send> FromRequest<AppState> for JsonRequest<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        // 413 / 415.
        if let Some(len) = parts.headers.get(header::CONTENT_LENGTH)
            && let Some(len) = len.to_str().ok().and_then(|s| s.parse::<u64>().ok())
            && len > BODY_LIMIT as u64
        {
            return Err(too_large());
        }
        if !is_json(&parts.headers) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "request bodies must be sent with one `Content-Type: application/json` header",
            ));
        }
        let bytes = axum::body::to_bytes(body, BODY_LIMIT)
            .await
            .map_err(|_| too_large())?;
        // 401.
        let auth = authenticate(state, &parts.headers).await?;
        let mut parts = parts;
        // 400.
        let typed = parse_body::<T>(&bytes)?;
        let idempotency_key = idempotency_key(&parts.headers)?;
        let strategy = strategy_header(state, &parts.headers)?;
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| parts.uri.path().to_string());
        // Keys are scoped to the caller's token; claimed later, by `run_keyed`.
        parts
            .extensions
            .insert(crate::idempotency::CallerScope(auth.scope.clone()));
        let Ok(pending) = contend_axum::PendingKey::from_request_parts(&mut parts, state).await;
        Ok(JsonRequest {
            auth,
            pending,
            body: typed,
            meta: Meta {
                method: parts.method,
                path,
                body: bytes,
                idempotency_key,
                strategy,
            },
        })
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        authenticate(state, &parts.headers).await.map(Auth)
    }
}

/// A path parameter as the router found it: the text, or why it could not be read (such as
/// percent-escapes that do not decode to UTF-8). Handlers take it unread and check it with
/// [`path_text`] or [`path_id`] in the contract's order (after authentication and the body).
pub type RawPath = Result<Path<String>, PathRejection>;

/// The text of a path parameter.
///
/// # Errors
/// 400 `invalid_path` when it cannot be read (not UTF-8 once decoded).
pub fn path_text(raw: RawPath, what: &str) -> Result<String, ApiError> {
    raw.map(|Path(text)| text)
        .map_err(|e| ApiError::invalid_path(format!("{what} cannot be read: {}", e.body_text())))
}

/// A numeric path id ([`path_text`], then [`parse_id`]).
///
/// # Errors
/// 400 `invalid_path` when it cannot be read or is not an integer.
pub fn path_id(raw: RawPath, what: &str) -> Result<i64, ApiError> {
    parse_id(&path_text(raw, what)?, what)
}

/// Parses a numeric path id, written as the service writes ids: decimal digits with an optional
/// `-`, no `+`, no leading zeros. Other spellings of a number (`+1`, `01`, `-0`) would name the
/// same resource under another path, and so under another idempotency fingerprint.
///
/// ```
/// use contend_service::extract::parse_id;
/// assert_eq!(parse_id("42", "id").unwrap(), 42);
/// assert_eq!(parse_id("-7", "id").unwrap(), -7);
/// for bad in ["+1", "01", "-0", "1.5", "", "x"] {
///     assert!(parse_id(bad, "id").is_err(), "{bad}");
/// }
/// ```
///
/// # Errors
/// 400 `invalid_path` when it is not an integer in that form.
pub fn parse_id(raw: &str, what: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| id.to_string() == raw)
        .ok_or_else(|| {
            ApiError::invalid_path(format!(
                "{what} must be an integer (decimal digits, no sign `+`, no leading zeros), got `{}`",
                raw.escape_default()
            ))
        })
}

/// A text field must have `min..=max` characters and no NUL (databases cannot store it).
///
/// # Errors
/// 422 `invalid_value` naming the field.
pub fn check_text(field: &str, value: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let n = value.chars().count();
    if n < min || n > max {
        return Err(ApiError::invalid_value(
            field,
            &format!("must have {min} to {max} characters, got {n}"),
        ));
    }
    if value.contains('\0') {
        return Err(ApiError::invalid_value(
            field,
            "must not contain NUL characters",
        ));
    }
    Ok(())
}

/// An integer field must lie in `min..=max`.
///
/// # Errors
/// 422 `invalid_value` naming the field.
pub fn check_range(field: &str, value: i64, min: i64, max: i64) -> Result<(), ApiError> {
    if value < min || value > max {
        return Err(ApiError::invalid_value(
            field,
            &format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(())
}
