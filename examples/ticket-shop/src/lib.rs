//! # ticket-shop: contend in a service you already have
//!
//! A small axum service on a typed `sqlx::PgPool` with UUID keys, NUMERIC prices and TIMESTAMPTZ
//! columns, selling a limited number of tickets per event. The purchase is written once, as a
//! [`contend::strategy::Operation`], and runs under any strategy (chosen per request with the
//! `X-Strategy` header); every `POST` honours `Idempotency-Key` through
//! [`contend_axum::IdempotencyLayer`], with the outcome stored in the purchase's own
//! transaction. Nothing here casts a UUID, a NUMERIC or a timestamp: the transaction hands out a
//! `&mut PgConnection`.
//!
//! Run with `DATABASE_URL=postgres://... cargo run -p ticket-shop` (see `main.rs`), then:
//!
//! ```text
//! curl -s -X POST localhost:8080/events -H 'Content-Type: application/json' \
//!      -d '{"name": "concert", "price": "49.90", "tickets": 2}'
//! curl -s -X POST localhost:8080/events/$ID/tickets -H 'Idempotency-Key: order-1' \
//!      -H 'X-Strategy: pessimistic' -H 'Content-Type: application/json' -d '{"buyer": "ann"}'
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use contend::idempotency::Store;
use contend::strategy::{Executor, Operation, Strategy, optimistic};
use contend::{BoxFuture, ConflictKind, Db, Tx, TxError};
use contend_axum::{IdempotencyKey, IdempotencyLayer};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres};
use time::OffsetDateTime;
use uuid::Uuid;

/// The application's tables (the key store creates its own).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS event (
    id UUID PRIMARY KEY, name TEXT NOT NULL, price NUMERIC(10, 2) NOT NULL,
    tickets_left INTEGER NOT NULL, version BIGINT NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS ticket (
    id UUID PRIMARY KEY, event_id UUID NOT NULL REFERENCES event (id), buyer TEXT NOT NULL,
    price NUMERIC(10, 2) NOT NULL, sold_at TIMESTAMPTZ NOT NULL DEFAULT now());";

/// The shop's own errors; the library's convert into [`ShopError::Db`] and stay recognisable
/// as conflicts (so they are retried).
#[derive(Debug, thiserror::Error)]
pub enum ShopError {
    /// No event with that id.
    #[error("no such event")]
    NotFound,
    /// No ticket left.
    #[error("sold out")]
    SoldOut,
    /// Bad input: the message says what.
    #[error("{0}")]
    Invalid(String),
    /// From the database or the strategy.
    #[error(transparent)]
    Db(#[from] contend::Error),
}

impl From<sqlx::Error> for ShopError {
    fn from(e: sqlx::Error) -> Self {
        ShopError::Db(e.into())
    }
}

impl TxError for ShopError {
    fn conflict(&self) -> Option<ConflictKind> {
        match self {
            ShopError::Db(e) => e.conflict(),
            _ => None,
        }
    }
}

impl IntoResponse for ShopError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ShopError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ShopError::SoldOut => (StatusCode::CONFLICT, "sold_out"),
            ShopError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ShopError::Db(e) if e.is_unavailable() || e.conflict().is_some() => {
                (StatusCode::SERVICE_UNAVAILABLE, "busy")
            }
            ShopError::Db(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let message = match status {
            StatusCode::INTERNAL_SERVER_ERROR => "internal error".to_string(),
            _ => self.to_string(),
        };
        let body = serde_json::json!({ "error": { "code": code, "message": message } });
        (status, Json(body)).into_response()
    }
}

/// A sold ticket, as the client sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ticket {
    /// The ticket's id.
    pub id: Uuid,
    /// The event.
    pub event: Uuid,
    /// Who bought it.
    pub buyer: String,
    /// What it cost (NUMERIC, as a string in JSON).
    pub price: Decimal,
    /// When it was sold.
    #[serde(with = "time::serde::rfc3339")]
    pub sold_at: OffsetDateTime,
}

/// Buying one ticket: the read-decide-write that races.
struct Buy {
    event: Uuid,
    buyer: String,
    key: IdempotencyKey,
}

impl Buy {
    /// Records the sale and stores the response with the request's idempotency key, in the
    /// purchase's transaction.
    async fn sell(&self, tx: &mut Tx<Postgres>, price: Decimal) -> Result<Ticket, ShopError> {
        let (id, sold_at): (Uuid, OffsetDateTime) = sqlx::query_as(
            "INSERT INTO ticket (id, event_id, buyer, price) VALUES ($1, $2, $3, $4) \
             RETURNING id, sold_at",
        )
        .bind(Uuid::new_v4())
        .bind(self.event)
        .bind(&self.buyer)
        .bind(price)
        .fetch_one(tx.conn())
        .await?;
        let ticket = Ticket {
            id,
            event: self.event,
            buyer: self.buyer.clone(),
            price,
            sold_at,
        };
        let body = serde_json::to_vec(&ticket).map_err(contend::Error::aborted)?;
        self.key.store_in_tx(tx, StatusCode::CREATED, &body).await?;
        Ok(ticket)
    }
}

impl Operation<Postgres> for Buy {
    type State = (i32, Decimal, i64);
    type Output = Ticket;
    type Error = ShopError;

    fn keys(&self) -> Vec<String> {
        vec![format!("event:{}", self.event)]
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, Result<Self::State, ShopError>> {
        Box::pin(async move {
            let sql = format!("SELECT tickets_left, price, version FROM event WHERE id = $1{lock}");
            sqlx::query_as(AssertSqlSafe(sql))
                .bind(self.event)
                .fetch_optional(conn)
                .await?
                .ok_or(ShopError::NotFound)
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx<Postgres>,
        &(left, price, version): &'c Self::State,
        checked: bool,
    ) -> BoxFuture<'c, Result<Ticket, ShopError>> {
        Box::pin(async move {
            if left < 1 {
                return Err(ShopError::SoldOut);
            }
            let done = sqlx::query(
                "UPDATE event SET tickets_left = $1, version = version + 1 \
                 WHERE id = $2 AND (NOT $3 OR version = $4)",
            )
            .bind(left - 1)
            .bind(self.event)
            .bind(checked)
            .bind(version)
            .execute(tx.conn())
            .await?;
            optimistic::check(done.rows_affected())?;
            self.sell(tx, price).await
        })
    }

    fn atomic<'c>(
        &'c self,
        tx: &'c mut Tx<Postgres>,
    ) -> Option<BoxFuture<'c, Result<Ticket, ShopError>>> {
        Some(Box::pin(async move {
            let price: Option<Decimal> = sqlx::query_scalar(
                "UPDATE event SET tickets_left = tickets_left - 1, version = version + 1 \
                 WHERE id = $1 AND tickets_left > 0 RETURNING price",
            )
            .bind(self.event)
            .fetch_optional(tx.conn())
            .await?;
            match price {
                Some(price) => self.sell(tx, price).await,
                None => Err(self
                    .read(tx.conn(), "")
                    .await
                    .err()
                    .unwrap_or(ShopError::SoldOut)),
            }
        }))
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct App {
    db: Db<Postgres>,
    executor: Executor<Postgres>,
    strategy: Strategy,
}

/// `POST /events` body.
#[derive(Debug, Deserialize)]
pub struct NewEvent {
    name: String,
    price: Decimal,
    tickets: i32,
}

async fn create_event(
    State(app): State<App>,
    Json(new): Json<NewEvent>,
) -> Result<(StatusCode, Json<serde_json::Value>), ShopError> {
    if new.name.trim().is_empty() || new.price.is_sign_negative() || new.tickets < 0 {
        return Err(ShopError::Invalid(
            "name must not be empty, price and tickets not negative".into(),
        ));
    }
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO event (id, name, price, tickets_left) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(&new.name)
        .bind(new.price)
        .bind(new.tickets)
        .execute(app.db.pool())
        .await?;
    let body = serde_json::json!({ "id": id, "name": new.name, "price": new.price, "tickets": new.tickets });
    Ok((StatusCode::CREATED, Json(body)))
}

/// `POST /events/{id}/tickets` body.
#[derive(Debug, Deserialize)]
pub struct Purchase {
    buyer: String,
}

async fn buy(
    State(app): State<App>,
    Path(event): Path<Uuid>,
    headers: HeaderMap,
    key: IdempotencyKey,
    Json(purchase): Json<Purchase>,
) -> Result<(StatusCode, Json<Ticket>), ShopError> {
    let strategy = match headers.get("x-strategy").map(|v| v.to_str()) {
        None => app.strategy,
        Some(Ok(name)) => name
            .parse()
            .map_err(|e| ShopError::Invalid(format!("{e}")))?,
        Some(Err(_)) => return Err(ShopError::Invalid("X-Strategy is not text".into())),
    };
    app.executor
        .check(strategy, app.db.backend())
        .map_err(|e| ShopError::Invalid(e.to_string()))?;
    let op = Arc::new(Buy {
        event,
        buyer: purchase.buyer,
        key,
    });
    let mut session = app.db.session();
    let done = app.executor.run(strategy, &mut session, op).await;
    Ok((StatusCode::CREATED, Json(done.result?)))
}

/// The shop's router on the application's own pool: creates its tables and the idempotency
/// key table if they are missing. `strategy` is the default when a request names none.
///
/// # Errors
/// Database errors while creating the tables; [`contend::Error::Unsupported`] for a default
/// strategy that cannot run here.
///
/// # Cancel safety
/// Safe to drop: `CREATE TABLE IF NOT EXISTS` either ran or did not.
pub async fn app(pool: PgPool, strategy: Strategy) -> Result<Router, contend::Error> {
    let db = Db::from_pool(pool)?;
    db.execute_script(SCHEMA).await?;
    let store = Store::new(db.clone());
    store.ensure_schema().await?;
    let executor = Executor::new().lock_wait(Duration::from_secs(5));
    executor.check(strategy, db.backend())?;
    // One shop, no accounts: every caller shares one key scope.
    let keys = IdempotencyLayer::new(store, |_: &axum::http::request::Parts| {
        Some("shop".to_string())
    });
    let state = App {
        db,
        executor,
        strategy,
    };
    Ok(Router::new()
        .route("/events", post(create_event))
        .route("/events/{id}/tickets", post(buy))
        .route_layer(keys)
        .with_state(state))
}
