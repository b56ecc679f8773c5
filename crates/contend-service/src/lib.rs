//! The contend reference HTTP service: a bank (accounts, deposits, withdrawals, transfers), a
//! shop (products with limited stock, orders) and seat booking, every write safe under
//! concurrency with the configured strategy, also with several instances behind one database.
//!
//! # Brief overview
//! - [`Config`] says which database, strategy, admin token and limits; [`AppState::new`] connects
//!   nothing by itself: pass it a connected [`contend::Db`] after [`migrate::run`].
//! - [`app`] builds the axum router with its layers (request id, tracing, metrics, timeout,
//!   panic guard); [`serve`] runs it on a listener until a shutdown future resolves, then
//!   finishes in-flight requests (bounded).
//! - The contract (status codes, check order, idempotency, strategies) is documented in
//!   `API.md` next to this crate's `Cargo.toml`; `/openapi.json` is generated from the handlers.
//!
//! # Layout
//! `conn` (the accept loop and what one client connection may hold: [`Limits`]), `extract`
//! (413/415, 401, 400 in that order), `auth`, `idempotency`, `engine` (one write under any
//! strategy), `bank`, `shop`, `booking`, `audit`, `metrics`, `migrate`, `openapi`, `cli`.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use contend_service::{AppState, Config, serve};
//! let db = contend::Db::connect("sqlite:service.db").await?;
//! contend_service::migrate::run(&db).await?;
//! let state = AppState::new(Config::new(db, "admin-secret"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! serve(listener, state, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

pub mod audit;
pub mod auth;
pub mod bank;
pub mod booking;
pub mod cli;
pub mod conn;
pub(crate) mod engine;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod metrics;
pub mod migrate;
pub mod openapi;
pub mod redis_locks;
pub mod shop;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use contend::Db;
use contend::strategy::{Executor, Strategy};
use futures_util::FutureExt;
use tracing::Instrument;

use crate::error::ApiError;
use crate::extract::Meta;
use crate::metrics::Metrics;
use crate::redis_locks::RedisLocks;

pub use crate::conn::Limits;

/// Settings of one service instance.
#[derive(Debug, Clone)]
pub struct Config {
    /// The database (migrated).
    pub db: Db,
    /// The default strategy.
    pub strategy: Strategy,
    /// Whether `X-Concurrency-Strategy` may pick another one per request.
    pub allow_strategy_header: bool,
    /// The admin bearer token.
    pub admin_token: String,
    /// Longest time a request may take before 503.
    pub request_timeout: Duration,
    /// Longest time in-flight requests get to finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// Single-node Redis lock settings (`--redis-url`).
    pub redis: Option<RedisLocks>,
    /// Redlock settings (`--redlock-urls`).
    pub redlock: Option<RedisLocks>,
    /// The etcd lock service (`--etcd-urls`; `redis_locks::etcd` with the `etcd` feature).
    pub etcd: Option<redis_locks::EtcdLocks>,
    /// How long a successful account-token lookup is remembered ([`auth::TokenCache`]); zero
    /// looks every token up on every request.
    pub token_cache_ttl: Duration,
    /// What one client connection may hold (header, body and idle timeouts, connection cap).
    pub limits: Limits,
    /// How long a claimed Idempotency-Key of an unfinished request protects its key
    /// ([`idempotency::LEASE`] by default); longer than `request_timeout`.
    pub idempotency_lease: Duration,
}

impl Config {
    /// Defaults: strategy `atomic`, no strategy header, 30 s request timeout, 10 s shutdown
    /// grace, no Redis, token lookups remembered for [`TOKEN_CACHE_TTL`], [`Limits::default`].
    pub fn new(db: Db, admin_token: &str) -> Config {
        Config {
            db,
            strategy: Strategy::Atomic,
            allow_strategy_header: false,
            admin_token: admin_token.to_string(),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            redis: None,
            redlock: None,
            etcd: None,
            token_cache_ttl: TOKEN_CACHE_TTL,
            limits: Limits::default(),
            idempotency_lease: idempotency::LEASE,
        }
    }
}

/// Default time to live of remembered account-token lookups.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(30);

/// Most account-token lookups remembered per instance (about 100 bytes each).
pub const TOKEN_CACHE_CAPACITY: usize = 100_000;

/// Shared state of one instance. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) db: Db,
    pub(crate) strategy: Strategy,
    pub(crate) allow_strategy_header: bool,
    pub(crate) admin_hash: [u8; 32],
    pub(crate) tokens: auth::TokenCache,
    pub(crate) request_timeout: Duration,
    pub(crate) idempotency_lease: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) limits: Limits,
    pub(crate) metrics: Arc<Metrics>,
    /// Runs every write under its strategy: one per instance, so that the `mutex` strategy's
    /// in-process locks are shared by all requests.
    pub(crate) executor: Executor,
    /// The request sessions: see [`AppState::session`].
    pub(crate) sessions: Sessions,
}

/// How long an idle request session keeps its connection for the next request (without the
/// pool's test round trip); older ones go back to the pool, which tests them.
pub(crate) const WARM_FOR: Duration = Duration::from_secs(1);

/// How long a request waits for a session before 503 `database_busy`.
pub(crate) const SESSION_WAIT: Duration = Duration::from_secs(5);

/// The requests' database sessions: at most `permits` requests use one at a time, and the
/// sessions of finished requests wait, with their connections, for the next requests.
///
/// Why not just sqlx's pool: it tests every connection returned to it with a round trip, so a
/// connection handed from one request to the next directly saves a round trip per request. And
/// why fewer sessions than connections: the rest of the pool stays free for what does not run on
/// a request session (idempotency keys, reads, health checks); and when there are more concurrent
/// requests than sessions, they queue here for a connection that is already warm, which keeps
/// each PostgreSQL backend busy instead of waking one per request (measured: see
/// `bench/service-vs-pgbench.sh`).
pub(crate) struct Sessions {
    /// Sessions of finished requests, newest last, with the time they were given back.
    idle: std::sync::Mutex<Vec<(Instant, contend::Session)>>,
    /// One per request session.
    permits: Arc<tokio::sync::Semaphore>,
    /// Whether finished sessions keep their connections: not with a pool of one connection,
    /// which the pool's other users would then wait for.
    keep: bool,
}

impl Sessions {
    /// Sessions for a pool of `pool_size` connections: a quarter of them (at least one, when
    /// there are two or more) stays for the pool's other users. With a pool of one connection
    /// (in-memory SQLite), finished sessions give their connection back to the pool.
    fn new(pool_size: usize) -> Sessions {
        let reserve = if pool_size >= 2 {
            (pool_size / 4).max(1)
        } else {
            0
        };
        Sessions {
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(
                pool_size.saturating_sub(reserve).max(1),
            )),
            keep: reserve > 0,
        }
    }
}

/// A request's database session; given back to its instance's [`Sessions`] when dropped.
///
/// A session keeps its connection only when its last operation finished (an interrupted one
/// closes it), so what is given back is always in a clean state. A kept connection that the
/// server dropped meanwhile (a restart) fails the one request that uses it with 503, and is then
/// replaced.
pub(crate) struct ReqSession {
    session: Option<contend::Session>,
    state: AppState,
    /// Dropped after the session is given back, so the next request finds it; `None` once
    /// the request gave its turn up ([`ReqSession::give_up_turn`]).
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl ReqSession {
    /// Gives this request's turn at a session to the next request, for a request that waits
    /// without a connection of its own: under `batched` the operation waits for its batch,
    /// whose transaction runs on the combiner's connection, and the library gives the
    /// request's connection back to the pool meanwhile. Holding the turn while it waits would
    /// cap every batch at the number of sessions (measured with
    /// `bench/service-batched-vs-pgbench.sh`). What the request still does on its session
    /// afterwards takes a pooled connection, bounded by the pool.
    pub(crate) fn give_up_turn(&mut self) {
        self.permit = None;
    }

    /// Lets the connection go back to the pool (which tests it and drops it if it is dead);
    /// the request goes on with a new session that connects on first use.
    pub(crate) fn discard(&mut self) {
        self.session = Some(self.state.inner.db.session());
    }

    /// Whether an error says nothing about the connection (a business error carried through
    /// the transaction); after any other, the connection is not kept for the next request.
    fn keeps_connection(err: &contend::Error) -> bool {
        matches!(err, contend::Error::Aborted(_))
    }

    /// [`contend::Session::run`]; after an error other than a business one, the connection
    /// goes back to the pool rather than to the next request.
    ///
    /// # Cancel safety
    /// As [`contend::Session::run`].
    pub(crate) async fn run<T, F>(
        &mut self,
        options: &contend::TxOptions,
        body: F,
    ) -> contend::Attempted<T>
    where
        T: Send,
        F: for<'c> FnMut(&'c mut contend::Tx) -> contend::BoxFuture<'c, contend::Result<T>> + Send,
    {
        let run = std::ops::DerefMut::deref_mut(self).run(options, body).await;
        if let Err(e) = &run.result
            && !Self::keeps_connection(e)
        {
            self.discard();
        }
        run
    }

    /// [`contend::Session::autocommit`], with [`ReqSession::run`]'s rule for errors.
    ///
    /// # Cancel safety
    /// As [`contend::Session::autocommit`].
    pub(crate) async fn autocommit<T, F>(&mut self, body: F) -> contend::Result<T>
    where
        F: for<'c> FnOnce(
            &'c mut sqlx::AnyConnection,
        ) -> contend::BoxFuture<'c, contend::Result<T>>,
    {
        let result = std::ops::DerefMut::deref_mut(self).autocommit(body).await;
        if let Err(e) = &result
            && !Self::keeps_connection(e)
        {
            self.discard();
        }
        result
    }
}

impl std::ops::Deref for ReqSession {
    type Target = contend::Session;
    fn deref(&self) -> &contend::Session {
        self.session.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for ReqSession {
    fn deref_mut(&mut self) -> &mut contend::Session {
        self.session.as_mut().expect("present until dropped")
    }
}

impl std::fmt::Debug for ReqSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReqSession").finish_non_exhaustive()
    }
}

impl Drop for ReqSession {
    fn drop(&mut self) {
        if let Some(session) = self.session.take()
            && self.permit.is_some()
            && self.state.inner.sessions.keep
            && let Ok(mut idle) = self.state.inner.sessions.idle.lock()
        {
            idle.push((Instant::now(), session));
        }
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("db", &self.inner.db.url())
            .field("strategy", &self.inner.strategy)
            .finish()
    }
}

impl AppState {
    /// The state of an instance with `config`.
    pub fn new(config: Config) -> AppState {
        let pool_size = config.db.pool().options().get_max_connections() as usize;
        AppState {
            inner: Arc::new(Inner {
                admin_hash: auth::hash_token(&config.admin_token),
                tokens: auth::TokenCache::new(config.token_cache_ttl, TOKEN_CACHE_CAPACITY),
                db: config.db,
                strategy: config.strategy,
                allow_strategy_header: config.allow_strategy_header,
                request_timeout: config.request_timeout,
                idempotency_lease: config.idempotency_lease,
                shutdown_grace: config.shutdown_grace,
                limits: config.limits,
                metrics: Arc::new(Metrics::default()),
                executor: engine::executor(
                    config.redis.as_ref(),
                    config.redlock.as_ref(),
                    config.etcd.as_ref(),
                ),
                sessions: Sessions::new(pool_size),
            }),
        }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// A session for one request: the most recently given back one (holding a connection
    /// that needs no test) if there is one, else a new one that connects on first use. Waits
    /// while as many requests as there are sessions hold one.
    ///
    /// # Errors
    /// 503 `database_busy` after [`SESSION_WAIT`].
    ///
    /// # Cancel safety
    /// Safe to drop: a request that stops waiting takes nothing.
    pub(crate) async fn session(&self) -> Result<ReqSession, ApiError> {
        let sessions = &self.inner.sessions;
        let permit = match sessions.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let started = Instant::now();
                let permit =
                    tokio::time::timeout(SESSION_WAIT, sessions.permits.clone().acquire_owned())
                        .await;
                self.inner.metrics.session_wait(started.elapsed());
                match permit {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        return Err(ApiError::unavailable(
                            "database_busy",
                            format!(
                                "no database session became free within {} s",
                                SESSION_WAIT.as_secs()
                            ),
                        ));
                    }
                }
            }
        };
        let mut stale = Vec::new();
        let warm = sessions.idle.lock().ok().and_then(|mut idle| {
            // The newest is at the end; anything older than WARM_FOR goes back to the pool.
            let fresh = idle.partition_point(|(since, _)| since.elapsed() > WARM_FOR);
            stale.extend(idle.drain(..fresh));
            idle.pop()
        });
        drop(stale);
        Ok(ReqSession {
            session: Some(
                warm.map(|(_, s)| s)
                    .unwrap_or_else(|| self.inner.db.session()),
            ),
            state: self.clone(),
            permit: Some(permit),
        })
    }

    /// The strategy of one request: the header's (already validated) or the default.
    pub(crate) fn strategy_for(&self, meta: &Meta) -> Strategy {
        meta.strategy.unwrap_or(self.inner.strategy)
    }
}

/// The router with every endpoint and layer.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/accounts", post(bank::create_account))
        .route("/accounts/{id}", get(bank::get_account))
        .route("/accounts/{id}/deposit", post(bank::deposit))
        .route("/accounts/{id}/withdraw", post(bank::withdraw))
        .route("/accounts/{id}/transfers", get(bank::list_transfers))
        .route("/transfers", post(bank::create_transfer))
        .route("/products", post(shop::create_product))
        .route("/products/{sku}", get(shop::get_product))
        .route("/orders", post(shop::create_order))
        .route("/events", post(booking::create_event))
        .route("/events/{id}/bookings", post(booking::create_booking))
        .route("/audit", get(audit::audit))
        .route("/healthz", get(audit::healthz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi::openapi_json))
        .route_layer(idempotency::layer(
            &state.inner.db,
            state.inner.idempotency_lease,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), edge))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

/// `GET /metrics`
#[utoipa::path(get, path = "/metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics_text(State(state): State<AppState>) -> Response {
    let mut text = state.inner.metrics.render();
    text.push_str(&metrics::render_batches(
        &state.inner.executor.batch_stats(),
    ));
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(0);

fn request_id(req: &Request) -> String {
    if let Some(id) = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        && !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_graphic())
    {
        return id.to_string();
    }
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let n = REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}-{n}", PID.get_or_init(std::process::id))
}

/// The outer layer of every request: request id, tracing span, body deadline, timeout, panic
/// guard, metrics.
async fn edge(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(&req);
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let span = tracing::info_span!("request", id = %id, method = %method, route = %route);
    let timeout = state.inner.request_timeout;
    let body_limit = state.inner.limits.body_timeout;
    let body_expired = Arc::new(AtomicBool::new(false));
    let req = if axum::body::HttpBody::is_end_stream(req.body()) {
        req
    } else {
        let expired = body_expired.clone();
        req.map(|body| axum::body::Body::new(conn::DeadlineBody::new(body, body_limit, expired)))
    };
    let work = AssertUnwindSafe(next.run(req)).catch_unwind();
    let mut response = match tokio::time::timeout(timeout, work)
        .instrument(span.clone())
        .await
    {
        Ok(Ok(response)) => response,
        Ok(Err(panic)) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            span.in_scope(|| ApiError::internal(format!("handler panicked: {what}")))
                .into_response()
        }
        Err(_) => ApiError::unavailable(
            "timeout",
            format!(
                "the request did not finish within {} ms; try again",
                timeout.as_millis()
            ),
        )
        .into_response(),
    };
    if body_expired.load(Ordering::Relaxed) {
        // Whatever the handler made of its failed body (the extractor says 413), the cause is
        // the clock.
        response = conn::body_timeout(body_limit);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    state
        .inner
        .metrics
        .request(&method, &route, status, elapsed);
    span.in_scope(|| tracing::info!(status, ms = elapsed.as_secs_f64() * 1e3, "request done"));
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// Serves `state` on `listener` until `shutdown` resolves; then stops accepting, closes idle
/// connections, lets in-flight requests finish for at most the configured grace period, and
/// returns. Each connection is held to the configured [`Limits`] (see [`conn`]).
///
/// # Errors
/// None today: accept errors are logged and retried (after 100 ms when they are not about one
/// connection, such as running out of file descriptors).
///
/// # Cancel safety
/// Dropping the future stops accepting; connections already accepted run on tasks of their
/// own until they end (their limits still apply) or the runtime shuts down.
pub async fn serve<S>(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: S,
) -> std::io::Result<()>
where
    S: Future<Output = ()> + Send + 'static,
{
    let grace = state.inner.shutdown_grace;
    let limits = state.inner.limits;
    conn::run(listener, app(state), limits, grace, shutdown).await
}
