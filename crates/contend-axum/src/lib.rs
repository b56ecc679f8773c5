//! axum integration of contend: [`IdempotencyLayer`], idempotency keys for the routes of an
//! axum router, on the key store of [`contend::idempotency`].
//!
//! # Brief overview
//! A POST that carries `Idempotency-Key` executes at most once per key and caller:
//! - the layer buffers the body (within [`IdempotencyLayer::body_limit`]; 413 above it) and
//!   fingerprints method, path and body;
//! - the key is claimed in the database (inserted first, with an in-flight lease), scoped per
//!   caller by a function the user gives (for example from the `Authorization` header or from
//!   an extension an authentication layer set);
//! - the handler receives an [`IdempotencyKey`] extractor and stores its outcome *inside its
//!   business transaction* ([`IdempotencyKey::store_in_tx`]), so the write and the stored
//!   outcome commit together: a crash after the commit replays, never runs twice;
//! - afterwards, the same request gets the stored status and body byte for byte with
//!   `Idempotent-Replayed: true`; another request under the same key gets 422; a duplicate
//!   while the first still runs gets 409 with `Retry-After`;
//! - outcomes the handler did not store in a transaction are stored after the response when
//!   their status is one that is remembered ([`default_stored`]: 2xx, 404, 409, 422); any other
//!   status releases the key, so the client may use it again;
//! - a keyed request runs in a task of its own: a client that disconnects (or a timeout layer
//!   outside) cannot leave its key half-done.
//!
//! The key store may run on any database contend supports: the application's own typed pool
//! (`Store::new(Db::from_pool(pg_pool)?)`, a `Store<sqlx::Postgres>`) or a `Db` chosen by URL
//! (`Store<sqlx::Any>`). The layer and the extractors have one type whatever the store's
//! database, and [`IdempotencyKey::store_in_tx`] takes the handler's own transaction, for
//! example a `Tx<sqlx::Postgres>` whose `conn()` is a `&mut PgConnection`.
//!
//! The key is claimed before the handler runs, unless [`IdempotencyLayer::claim_in_handler`]
//! defers the claim to the moment the handler extracts [`IdempotencyKey`], which lets a
//! service answer its own validation errors (401, 400) before any idempotency answer (409,
//! 422).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use axum::{Router, routing::post, extract::State, http::StatusCode};
//! use contend::idempotency::Store;
//! use contend_axum::{IdempotencyKey, IdempotencyLayer};
//! use tower::ServiceExt;
//!
//! let db = contend::Db::connect("sqlite::memory:").await?;
//! db.execute_script("CREATE TABLE orders (id INTEGER PRIMARY KEY AUTOINCREMENT)").await?;
//! let store = Store::new(db.clone());
//! store.ensure_schema().await?;
//!
//! // The handler stores its outcome in the transaction that writes the order.
//! async fn order(State(db): State<contend::Db>, key: IdempotencyKey) -> (StatusCode, String) {
//!     let stored = db.transaction(move |tx| {
//!         let key = key.clone();
//!         Box::pin(async move {
//!             tx.query("INSERT INTO orders DEFAULT VALUES").execute(tx.conn()).await?;
//!             let id: i64 = tx.query_scalar("SELECT MAX(id) FROM orders").fetch_one(tx.conn()).await?;
//!             let body = format!("{{\"order\":{id}}}");
//!             key.store_in_tx(tx, StatusCode::CREATED, body.as_bytes()).await?;
//!             Ok::<_, contend::Error>(body)
//!         })
//!     }).await;
//!     match stored {
//!         Ok(body) => (StatusCode::CREATED, body),
//!         Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "{}".into()),
//!     }
//! }
//!
//! // Keys are scoped per caller: here by the Authorization header.
//! let layer = IdempotencyLayer::new(store, contend_axum::scope::authorization_sha256);
//! let app = Router::new().route("/orders", post(order)).layer(layer).with_state(db.clone());
//!
//! let request = || axum::http::Request::post("/orders")
//!     .header("authorization", "Bearer alice")
//!     .header("idempotency-key", "order-1")
//!     .body(axum::body::Body::from("{}"))
//!     .unwrap();
//! let first = app.clone().oneshot(request()).await?;
//! let again = app.clone().oneshot(request()).await?;
//! assert_eq!(first.status(), StatusCode::CREATED);
//! assert_eq!(again.headers()["idempotent-replayed"], "true");
//! let bytes = |r: axum::response::Response| axum::body::to_bytes(r.into_body(), 1 << 20);
//! assert_eq!(bytes(first).await?, bytes(again).await?);
//! let orders: i64 = db.query_scalar("SELECT COUNT(*) FROM orders").fetch_one(db.pool()).await?;
//! assert_eq!(orders, 1, "executed once");
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use contend::Database;
use contend::idempotency::{Claim, Claimed, Fingerprint, InvalidInput, Key, Outcome, Store};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tracing::Instrument;

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header of a replay (`true`).
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The default largest request body the layer buffers: 2 MiB, as axum's `DefaultBodyLimit`.
pub const DEFAULT_BODY_LIMIT: usize = 2 * 1024 * 1024;

/// The largest response body stored after the response (16 MiB, the MariaDB column's size).
pub const RESPONSE_LIMIT: usize = 16 * 1024 * 1024;

/// Attempts to store or release a key after the response before it is left to its lease.
const FINISH_ATTEMPTS: u32 = 5;

/// Ready-made caller scopes for [`IdempotencyLayer::new`].
pub mod scope {
    use axum::http::header;
    use axum::http::request::Parts;
    use sha2::{Digest, Sha256};

    /// The hex SHA-256 of the `Authorization` header (any scheme): callers with different
    /// credentials never share keys, and no credential is stored. `None` without the header, and
    /// with more than one: which of them the application authenticates is not known here, and
    /// scoping by another one would let two callers share keys.
    pub fn authorization_sha256(parts: &Parts) -> Option<String> {
        let mut values = parts.headers.get_all(header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return None;
        };
        Some(hex::encode(Sha256::digest(value.as_bytes())))
    }
}

/// The `Idempotency-Key` of a request, checked: `None` without one; [`Rejection::InvalidKey`]
/// unless it is one header of 1 to [`contend::idempotency::MAX_KEY_LEN`] printable ASCII
/// characters. For services that check it among their own validations, in their own order.
///
/// ```
/// use axum::http::HeaderMap;
/// let mut headers = HeaderMap::new();
/// assert!(matches!(contend_axum::key_header(&headers), Ok(None)));
/// headers.insert("idempotency-key", "order-1".parse().unwrap());
/// assert!(matches!(contend_axum::key_header(&headers), Ok(Some("order-1"))));
/// headers.append("idempotency-key", "order-2".parse().unwrap());
/// assert!(contend_axum::key_header(&headers).is_err());
/// ```
///
/// # Errors
/// [`Rejection::InvalidKey`] as above.
pub fn key_header(headers: &HeaderMap) -> Result<Option<&str>, Rejection> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Rejection::InvalidKey);
    }
    let raw = value.to_str().map_err(|_| Rejection::InvalidKey)?;
    let valid = !raw.is_empty()
        && raw.len() <= contend::idempotency::MAX_KEY_LEN
        && raw.bytes().all(|b| (0x20..=0x7e).contains(&b));
    if !valid {
        return Err(Rejection::InvalidKey);
    }
    Ok(Some(raw))
}

/// Which statuses are stored (and replayed) by default: 2xx, 404, 409 and 422, the outcomes a
/// retry would meet again. Everything else (400, 401, 403, 413, 415, 5xx...) releases the key.
pub fn default_stored(status: StatusCode) -> bool {
    status.is_success() || matches!(status.as_u16(), 404 | 409 | 422)
}

/// Why the layer answered instead of the handler (or besides it). Rendered by the function
/// given to [`IdempotencyLayer::on_rejection`]; by default as
/// `{"error": {"code": .., "message": ..}}` ([`Rejection::into_response`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum Rejection {
    /// 400: `Idempotency-Key` is not one header of 1 to 255 printable ASCII characters.
    InvalidKey,
    /// 401: the caller-scope function found no caller.
    NoScope,
    /// 413: the body is larger than the layer buffers.
    BodyTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// 422: the key was used for a different request (method, path or body).
    Mismatch,
    /// 409: the same request still runs; retry after this many seconds.
    InProgress {
        /// Seconds for `Retry-After`.
        retry_after_secs: u32,
    },
    /// The key store failed: 503 when it is unavailable or the key's row kept changing, else 500.
    Store(contend::Error),
    /// 500: the handler's task panicked, or its response could not be read for storing.
    Internal(&'static str),
}

impl Rejection {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::InvalidKey => StatusCode::BAD_REQUEST,
            Rejection::NoScope => StatusCode::UNAUTHORIZED,
            Rejection::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::Mismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Rejection::InProgress { .. } => StatusCode::CONFLICT,
            Rejection::Store(e) if e.is_unavailable() || e.conflict().is_some() => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Rejection::Store(_) | Rejection::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::InvalidKey => "invalid_idempotency_key",
            Rejection::NoScope => "unauthorized",
            Rejection::BodyTooLarge { .. } => "payload_too_large",
            Rejection::Mismatch => "idempotency_key_reused",
            Rejection::InProgress { .. } => "request_in_progress",
            Rejection::Store(e) if e.conflict().is_some() => "contention",
            Rejection::Store(e) if e.is_unavailable() => "unavailable",
            Rejection::Store(_) | Rejection::Internal(_) => "internal",
        }
    }

    /// A human-readable message (never SQL or internals).
    pub fn message(&self) -> String {
        match self {
            Rejection::InvalidKey => {
                "Idempotency-Key must be one header of 1 to 255 printable ASCII characters".into()
            }
            Rejection::NoScope => "this request names no caller to scope its key to".into(),
            Rejection::BodyTooLarge { limit } => {
                format!("request bodies are limited to {limit} bytes")
            }
            Rejection::Mismatch => {
                "this Idempotency-Key was used for a different request (method, path or body)"
                    .into()
            }
            Rejection::InProgress { .. } => {
                "a request with this Idempotency-Key is still being processed; retry later".into()
            }
            Rejection::Store(e) if e.conflict().is_some() => {
                "could not claim the Idempotency-Key under contention; try again".into()
            }
            Rejection::Store(e) if e.is_unavailable() => {
                "the idempotency key store is unavailable; try again".into()
            }
            Rejection::Store(_) | Rejection::Internal(_) => {
                "internal error (this is a bug; see the server log)".into()
            }
        }
    }

    /// Seconds for `Retry-After`, when the client should try again later.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Rejection::InProgress { retry_after_secs } => Some(*retry_after_secs),
            _ if self.status() == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status(), self.code(), self.message())
    }
}

impl IntoResponse for Rejection {
    /// `{"error": {"code": .., "message": ..}}` with the status, and `Retry-After` when due.
    fn into_response(self) -> Response {
        if let Rejection::Store(e) = &self {
            tracing::warn!(error = %e, "idempotency key store failed");
        }
        let body = serde_json::json!({"error": {"code": self.code(), "message": self.message()}});
        let mut response = (self.status(), body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

type ScopeFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;
type RenderFn = dyn Fn(Rejection) -> Response + Send + Sync;

/// A [`Store`] of any database, behind one type: the layer, its service and the extractors do
/// not name the database, so a handler's [`IdempotencyKey`] finds the layer's claim whatever
/// pool the store runs on.
trait KeyStore: Send + Sync {
    fn table_name(&self) -> &str;
    fn claim<'a>(
        &'a self,
        key: &'a Key,
        fp: &'a Fingerprint,
    ) -> BoxFuture<'a, contend::Result<Claim>>;
    fn complete<'a>(
        &'a self,
        claimed: &'a Claimed,
        outcome: &'a Outcome,
    ) -> BoxFuture<'a, contend::Result<bool>>;
    fn release<'a>(&'a self, claimed: &'a Claimed) -> BoxFuture<'a, contend::Result<bool>>;
}

impl<DB: Database> KeyStore for Store<DB> {
    fn table_name(&self) -> &str {
        Store::table_name(self)
    }

    fn claim<'a>(
        &'a self,
        key: &'a Key,
        fp: &'a Fingerprint,
    ) -> BoxFuture<'a, contend::Result<Claim>> {
        Box::pin(Store::claim(self, key, fp))
    }

    fn complete<'a>(
        &'a self,
        claimed: &'a Claimed,
        outcome: &'a Outcome,
    ) -> BoxFuture<'a, contend::Result<bool>> {
        Box::pin(Store::complete(self, claimed, outcome))
    }

    fn release<'a>(&'a self, claimed: &'a Claimed) -> BoxFuture<'a, contend::Result<bool>> {
        Box::pin(Store::release(self, claimed))
    }
}

#[derive(Clone)]
struct Config {
    store: Arc<dyn KeyStore>,
    scope: Arc<ScopeFn>,
    render: Arc<RenderFn>,
    stored: fn(StatusCode) -> bool,
    body_limit: usize,
    methods: Vec<Method>,
    content_type: HeaderValue,
    retry_after_secs: u32,
    claim_in_handler: bool,
}

/// A tower [`Layer`](tower::Layer) that gives the routes it wraps idempotency keys (see the
/// crate docs). Configuration only; cheap to clone.
///
/// It works with a [`Store`] on any database ([`IdempotencyLayer::new`] is generic) and is
/// itself not generic: the layer of a `Store<sqlx::Postgres>` and that of a
/// `Store<sqlx::Any>` have the same type, and so do their [`IdempotencyKey`]s, so a handler
/// can never ask for the key of a store type the layer does not have (and silently get none).
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("table", &self.config.store.table_name())
            .field("body_limit", &self.config.body_limit)
            .field("methods", &self.config.methods)
            .field("claim_in_handler", &self.config.claim_in_handler)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// Keys in `store`, scoped per caller by `scope`: a function of the request's head that
    /// names the caller (hash credentials rather than storing them: a scope is at most 64
    /// printable ASCII characters), or `None` when there is none ([`Rejection::NoScope`]). It
    /// may read an extension that an authentication layer or extractor inserted.
    ///
    /// `store` may be on any database: `Store<sqlx::Any>` (from [`contend::Db::connect`]) or
    /// the application's typed pool (`Store::new(Db::from_pool(pg_pool)?)`); handlers then
    /// store their outcome in their own `Tx<sqlx::Postgres>` ([`IdempotencyKey::store_in_tx`]).
    ///
    /// Defaults: `POST` only, [`DEFAULT_BODY_LIMIT`], [`default_stored`], replays with
    /// `Content-Type: application/json`, `Retry-After: 1` on 409, the claim before the handler.
    pub fn new<DB, F>(store: Store<DB>, scope: F) -> IdempotencyLayer
    where
        DB: Database,
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        IdempotencyLayer {
            config: Arc::new(Config {
                store: Arc::new(store),
                scope: Arc::new(scope),
                render: Arc::new(Rejection::into_response),
                stored: default_stored,
                body_limit: DEFAULT_BODY_LIMIT,
                methods: vec![Method::POST],
                content_type: HeaderValue::from_static("application/json"),
                retry_after_secs: 1,
                claim_in_handler: false,
            }),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(Arc::make_mut(&mut self.config));
        self
    }

    /// The largest body buffered for the fingerprint; larger bodies are refused with 413
    /// ([`Rejection::BodyTooLarge`]), also when a body-limit layer in front of this one (such as
    /// tower-http's `RequestBodyLimitLayer`) stops the body first. Match it to the limit of the
    /// handlers' body extractors.
    pub fn body_limit(self, bytes: usize) -> Self {
        self.with(|c| c.body_limit = bytes)
    }

    /// The methods whose requests may carry a key (default `POST`); others pass through.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods: Vec<Method> = methods.into_iter().collect();
        self.with(|c| c.methods = methods)
    }

    /// Which response statuses are stored and replayed (default [`default_stored`]); any other
    /// releases the key.
    pub fn store_if(self, stored: fn(StatusCode) -> bool) -> Self {
        self.with(|c| c.stored = stored)
    }

    /// How the layer's own answers ([`Rejection`]) are rendered, to match the service's error
    /// format.
    pub fn on_rejection<F>(self, render: F) -> Self
    where
        F: Fn(Rejection) -> Response + Send + Sync + 'static,
    {
        let render: Arc<RenderFn> = Arc::new(render);
        self.with(|c| c.render = render)
    }

    /// The `Content-Type` of replays (only status and body are stored).
    pub fn replay_content_type(self, value: HeaderValue) -> Self {
        self.with(|c| c.content_type = value)
    }

    /// `Retry-After` of the 409 answered while the same request still runs (default 1 s).
    pub fn retry_after(self, wait: Duration) -> Self {
        let secs = u32::try_from(wait.as_secs().max(1)).unwrap_or(u32::MAX);
        self.with(|c| c.retry_after_secs = secs)
    }

    /// Claims the key when the handler extracts [`IdempotencyKey`] (or calls
    /// [`PendingKey::claim`]) instead of before the handler: the handler's earlier extractors and
    /// checks answer first (401, 400...). A handler that never claims runs without idempotency.
    pub fn claim_in_handler(self) -> Self {
        self.with(|c| c.claim_in_handler = true)
    }
}

impl<S> tower::Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The [`tower::Service`] of [`IdempotencyLayer`].
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService").finish_non_exhaustive()
    }
}

impl<S> tower::Service<Request> for IdempotencyService<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The clone that was made ready is the one that serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        if !config.methods.contains(req.method()) || !req.headers().contains_key(IDEMPOTENCY_KEY) {
            return Box::pin(inner.call(req));
        }
        Box::pin(keyed(config, inner, req))
    }
}

/// Whether a declared `Content-Length` is over the limit.
fn too_long(content_length: Option<u64>, limit: usize) -> bool {
    content_length.is_some_and(|n| n > limit as u64)
}

async fn keyed<S>(config: Arc<Config>, mut inner: S, req: Request) -> Result<Response, Infallible>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let (mut parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        Ok((config.render)(Rejection::BodyTooLarge {
            limit: config.body_limit,
        }))
    };
    if too_long(declared, config.body_limit) {
        return too_large();
    }
    let Ok(bytes) = axum::body::to_bytes(body, config.body_limit).await else {
        return too_large();
    };
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or_else(|| parts.uri.path());
    let fp = Fingerprint::request(parts.method.as_str(), target, &bytes);
    let render = config.render.clone();
    let pending = Pending(Arc::new(PendingInner {
        config: config.clone(),
        fp,
        slot: tokio::sync::Mutex::new(None),
    }));
    parts.extensions.insert(pending.clone());
    let req = Request::from_parts(parts, Body::from(bytes));
    // Everything from the claim on runs in a task of its own: a client that goes away (or a
    // timeout layer outside) cannot stop a request between its claim and its finish.
    let task = tokio::spawn(
        async move {
            let (parts, body) = req.into_parts();
            if !config.claim_in_handler
                && let Err(answer) = pending.claim(pending.key(&parts)).await
            {
                return answer;
            }
            let req = Request::from_parts(parts, body);
            match AssertUnwindSafe(inner.call(req)).catch_unwind().await {
                Ok(Ok(response)) => pending.finish(response).await,
                Ok(Err(never)) => match never {},
                Err(panic) => {
                    // A bug in the handler: release its key so it does not stay in flight.
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(panic = %what, "the handler of an idempotent request panicked");
                    if let Some(active) = pending.active().await {
                        release(config.store.as_ref(), &active.claimed).await;
                    }
                    (config.render)(Rejection::Internal("request task failed"))
                }
            }
        }
        .in_current_span(),
    );
    Ok(task.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "the task of an idempotent request did not finish");
        (render)(Rejection::Internal("request task failed"))
    }))
}

/// What the layer leaves in a keyed request's extensions for [`IdempotencyKey`].
#[derive(Clone)]
struct Pending(Arc<PendingInner>);

struct PendingInner {
    config: Arc<Config>,
    fp: Fingerprint,
    /// The claim, once made.
    slot: tokio::sync::Mutex<Option<Arc<Active>>>,
}

/// A key this request owns.
struct Active {
    claimed: Claimed,
    stored: fn(StatusCode) -> bool,
    /// Set once a transaction that stored the outcome committed.
    committed: Arc<AtomicBool>,
}

impl Pending {
    async fn active(&self) -> Option<Arc<Active>> {
        self.0.slot.lock().await.clone()
    }

    /// The request's key in its caller's scope, or why there is none.
    fn key(&self, parts: &Parts) -> Result<Key, Rejection> {
        let raw = key_header(&parts.headers)?.ok_or(Rejection::InvalidKey)?;
        let scope = (self.0.config.scope)(parts).ok_or(Rejection::NoScope)?;
        Key::new(scope, raw).map_err(|e| match e {
            InvalidInput::Scope => {
                tracing::error!("the caller-scope function returned an invalid scope");
                Rejection::Internal("invalid caller scope")
            }
            _ => Rejection::InvalidKey,
        })
    }

    /// Claims `key` (once per request); `Err` is the answer instead of the handler's.
    async fn claim(&self, key: Result<Key, Rejection>) -> Result<IdempotencyKey, Response> {
        let config = &self.0.config;
        let mut slot = self.0.slot.lock().await;
        if let Some(active) = &*slot {
            return Ok(IdempotencyKey {
                active: Some(active.clone()),
            });
        }
        let reject = |r: Rejection| (config.render)(r);
        let key = key.map_err(reject)?;
        match config.store.claim(&key, &self.0.fp).await {
            Ok(Claim::Claimed(claimed)) => {
                let active = Arc::new(Active {
                    claimed,
                    stored: config.stored,
                    committed: Arc::new(AtomicBool::new(false)),
                });
                *slot = Some(active.clone());
                Ok(IdempotencyKey {
                    active: Some(active),
                })
            }
            Ok(Claim::Completed(outcome)) => Err(replay(config, outcome)),
            Ok(Claim::InFlight { .. }) => Err(reject(Rejection::InProgress {
                retry_after_secs: config.retry_after_secs,
            })),
            Ok(Claim::Mismatch) => Err(reject(Rejection::Mismatch)),
            Err(e) => Err(reject(Rejection::Store(e))),
        }
    }

    /// After the handler: stores an outcome that no committed transaction stored, when its
    /// status is remembered; else releases the key. Both touch the key only while this request
    /// owns it and it is in flight, so a committed outcome is never overwritten or released
    /// (also when the response turned into an error after the commit: a retry replays it).
    async fn finish(&self, response: Response) -> Response {
        let Some(active) = self.active().await else {
            return response; // never claimed: nothing to finish
        };
        if active.committed.load(Ordering::Acquire) {
            return response;
        }
        let store = self.0.config.store.as_ref();
        let status = response.status();
        if !(active.stored)(status) {
            release(store, &active.claimed).await;
            return response;
        }
        let (head, body) = response.into_parts();
        let bytes: Bytes = match axum::body::to_bytes(body, RESPONSE_LIMIT).await {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(error = %e, "could not read a response to store it");
                release(store, &active.claimed).await;
                return (self.0.config.render)(Rejection::Internal("unreadable response body"));
            }
        };
        match Outcome::new(status.as_u16(), bytes.to_vec()) {
            Ok(outcome) => {
                retrying("store", || store.complete(&active.claimed, &outcome)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "response not stored for its idempotency key");
                release(store, &active.claimed).await;
            }
        }
        Response::from_parts(head, Body::from(bytes))
    }
}

async fn release(store: &dyn KeyStore, claimed: &Claimed) {
    retrying("release", || store.release(claimed)).await;
}

/// Runs `op` up to [`FINISH_ATTEMPTS`] times: a key left in flight blocks its retries until its
/// lease expires.
async fn retrying<F, Fut>(what: &str, mut op: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = contend::Result<bool>>,
{
    for attempt in 0..FINISH_ATTEMPTS {
        match op().await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "could not {what} an idempotency key; retrying");
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
        }
    }
    tracing::error!("idempotency key left in flight until its lease expires");
}

/// The stored response again: status, body byte for byte, the replay content type and
/// `Idempotent-Replayed: true`.
fn replay(config: &Config, outcome: Outcome) -> Response {
    let Ok(status) = StatusCode::from_u16(outcome.status()) else {
        tracing::error!(
            status = outcome.status(),
            "stored status is not an HTTP status"
        );
        return (config.render)(Rejection::Internal("invalid stored status"));
    };
    let mut response = Response::new(Body::from(outcome.into_body()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, config.content_type.clone());
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

/// The idempotency key of the current request, for the handler: store the outcome inside the
/// business transaction with [`IdempotencyKey::store_in_tx`]. Requests without a key (or
/// outside [`IdempotencyLayer`]) get an empty one whose methods do nothing. Cheap to clone.
///
/// As an extractor it claims the key if the layer has not yet
/// ([`IdempotencyLayer::claim_in_handler`]); its rejection is the layer's answer instead of
/// the handler's: a replay, 409, 422, or an error.
#[derive(Clone, Default)]
pub struct IdempotencyKey {
    active: Option<Arc<Active>>,
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyKey")
            .field("key", &self.claimed().map(|c| c.key()))
            .finish()
    }
}

impl IdempotencyKey {
    /// The claimed key, if the request has one.
    pub fn claimed(&self) -> Option<&Claimed> {
        self.active.as_ref().map(|a| &a.claimed)
    }

    /// Stores `status` and `body` as the key's outcome in `tx`, the request's business
    /// transaction, before it commits, when the request has a key and `status` is one the layer
    /// stores; otherwise does nothing. Respond with exactly these status and body.
    ///
    /// `tx` is a transaction of any database type on the store's database: a handler on a
    /// `Db<sqlx::Postgres>` passes its `Tx<sqlx::Postgres>`.
    ///
    /// # Errors
    /// [`contend::idempotency::KeyLost`] (in [`contend::Error::Aborted`]) when this request's
    /// lease expired and another took the key over: return it so the transaction rolls back.
    /// [`InvalidInput::BodyNotUtf8`] (in [`contend::Error::Aborted`]) for a body that is not
    /// UTF-8: it could not be replayed, so the request must not commit.
    /// [`InvalidInput::OtherBackend`] (in [`contend::Error::Aborted`]) when `tx` runs on another
    /// backend than the layer's store. Database errors.
    ///
    /// # Cancel safety
    /// One statement inside `tx`: dropping the future drops the transaction, which rolls back.
    pub async fn store_in_tx<DB: Database>(
        &self,
        tx: &mut contend::Tx<DB>,
        status: StatusCode,
        body: &[u8],
    ) -> contend::Result<()> {
        let Some(active) = &self.active else {
            return Ok(());
        };
        if !(active.stored)(status) {
            return Ok(());
        }
        let outcome =
            Outcome::new(status.as_u16(), body.to_vec()).map_err(contend::Error::aborted)?;
        active.claimed.complete_in(tx, &outcome).await?;
        let committed = active.committed.clone();
        tx.on_commit(move || async move { committed.store(true, Ordering::Release) });
        Ok(())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Ok(pending) = PendingKey::from_request_parts(parts, state).await;
        pending.claim().await
    }
}

/// The key of the current request, not claimed yet (with
/// [`IdempotencyLayer::claim_in_handler`]): for a handler that must check more (a path
/// parameter, a permission) before any idempotency answer. [`PendingKey::claim`] claims it.
/// The caller's scope is taken when it is extracted.
pub struct PendingKey {
    pending: Option<(Pending, Result<Key, Rejection>)>,
}

impl fmt::Debug for PendingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingKey")
            .field("key", &self.pending.as_ref().map(|(_, k)| k))
            .finish()
    }
}

impl PendingKey {
    /// Claims the key (or gets the claim the layer or an earlier extraction made).
    ///
    /// # Errors
    /// The answer to send instead of running the handler: a byte-identical replay, 409 while
    /// the same request runs elsewhere, 422 for another request under the key, 400 for an
    /// invalid key, or the store's failure, rendered by [`IdempotencyLayer::on_rejection`].
    ///
    /// # Cancel safety
    /// As [`Store::claim`]: dropped after the key's row was inserted, the key stays in flight
    /// until its lease expires.
    pub async fn claim(self) -> Result<IdempotencyKey, Response> {
        match self.pending {
            Some((pending, key)) => pending.claim(key).await,
            None => Ok(IdempotencyKey::default()),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for PendingKey {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(PendingKey {
            pending: parts.extensions.get::<Pending>().cloned().map(|p| {
                let key = p.key(parts);
                (p, key)
            }),
        })
    }
}
