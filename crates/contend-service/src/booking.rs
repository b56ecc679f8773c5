//! Booking: events with numbered seats, and bookings that must never give one seat to two
//! accounts. Bookings have no unique constraint of their own, so that an unsafe strategy can
//! double-book and `/audit` can see it; the `atomic` strategy claims seats in `seat_claims`,
//! whose primary key makes the claim a single conditional write.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use contend::strategy::Operation;
use contend::{Backend, BoxFuture, Tx};
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};
use utoipa::ToSchema;

use crate::AppState;
use crate::bank::{BindValue, insert_returning_id, q};
use crate::engine::{self, Write};
use crate::error::{ApiError, abort};
use crate::extract::{JsonRequest, RawPath, check_range, check_text, path_id};
use crate::idempotency::{self, Outcome};

/// Largest number of seats of an event.
pub const MAX_SEATS: i64 = 100_000;

/// Body of `POST /events`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    /// Name, 1..=128 characters.
    pub name: String,
    /// Number of seats, 1..=100000 (numbered from 1).
    pub seats: i64,
}

/// An event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Event id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Number of seats.
    pub seats: i64,
}

/// Body of `POST /events/{id}/bookings`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBooking {
    /// Booking account (the caller).
    pub account: i64,
    /// Seat number, 1..=seats.
    pub seat: i64,
}

/// A booking.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Booking {
    /// Booking id.
    pub id: i64,
    /// Event id.
    pub event: i64,
    /// Seat number.
    pub seat: i64,
    /// Booking account.
    pub account: i64,
}

/// What a booking decides on: the event's seat count and version, and whether the seat is taken.
struct SeatState {
    version: i64,
    taken: bool,
}

struct BookOp {
    backend: Backend,
    event: i64,
    seat: i64,
    account: i64,
}

fn event_missing(id: i64) -> ApiError {
    ApiError::not_found("event_not_found", format!("event {id} does not exist"))
}

fn seat_taken(seat: i64) -> ApiError {
    ApiError::conflict("seat_taken", format!("seat {seat} is already booked"))
}

impl BookOp {
    async fn record(&self, tx: &mut Tx) -> contend::Result<Booking> {
        let id = insert_returning_id(
            tx,
            "INSERT INTO bookings (event_id, seat, account_id) VALUES (?, ?, ?)",
            &[
                BindValue::Int(self.event),
                BindValue::Int(self.seat),
                BindValue::Int(self.account),
            ],
        )
        .await?;
        Ok(Booking {
            id,
            event: self.event,
            seat: self.seat,
            account: self.account,
        })
    }
}

impl Write for BookOp {}

impl Operation for BookOp {
    type State = SeatState;
    type Output = Booking;
    type Error = contend::Error;

    fn keys(&self) -> Vec<String> {
        vec![format!("seat:{}:{}", self.event, self.seat)]
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, contend::Result<SeatState>> {
        Box::pin(async move {
            let backend = self.backend;
            // Locking the event row serializes the bookings of one event (pessimistic).
            let sql = format!("SELECT version FROM events WHERE id = ?{lock}");
            let version: Option<i64> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(backend.sql(&sql).into_owned()))
                    .bind(self.event)
                    .fetch_optional(&mut *conn)
                    .await?;
            let version = version.ok_or_else(|| abort(event_missing(self.event)))?;
            let row = q(
                backend,
                "SELECT COUNT(*) FROM bookings WHERE event_id = ? AND seat = ?",
            )
            .bind(self.event)
            .bind(self.seat)
            .fetch_one(&mut *conn)
            .await?;
            let count: i64 = row.try_get(0)?;
            Ok(SeatState {
                version,
                taken: count > 0,
            })
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        state: &'c SeatState,
        checked: bool,
    ) -> BoxFuture<'c, contend::Result<Booking>> {
        Box::pin(async move {
            if state.taken {
                return Err(abort(seat_taken(self.seat)));
            }
            if checked {
                let done = tx
                    .query("UPDATE events SET version = version + 1 WHERE id = ? AND version = ?")
                    .bind(self.event)
                    .bind(state.version)
                    .execute(tx.conn())
                    .await?;
                contend::strategy::optimistic::check(done.rows_affected())?;
            }
            self.record(tx).await
        })
    }

    fn atomic<'c>(&'c self, tx: &'c mut Tx) -> Option<BoxFuture<'c, contend::Result<Booking>>> {
        Some(Box::pin(async move {
            // The claim's primary key decides between concurrent `atomic` bookings; the other
            // strategies book without a claim, so a seat they booked counts as taken too (a
            // service may change its strategy, or take it per request from the header).
            let sql = match tx.backend() {
                Backend::MySql => {
                    "INSERT IGNORE INTO seat_claims (event_id, seat) SELECT ?, ? FROM DUAL \
                     WHERE NOT EXISTS (SELECT 1 FROM bookings WHERE event_id = ? AND seat = ?)"
                }
                _ => {
                    "INSERT INTO seat_claims (event_id, seat) SELECT ?, ? \
                     WHERE NOT EXISTS (SELECT 1 FROM bookings WHERE event_id = ? AND seat = ?) \
                     ON CONFLICT DO NOTHING"
                }
            };
            let done = tx
                .query(sql)
                .bind(self.event)
                .bind(self.seat)
                .bind(self.event)
                .bind(self.seat)
                .execute(tx.conn())
                .await?;
            if done.rows_affected() == 0 {
                return Err(abort(seat_taken(self.seat)));
            }
            self.record(tx).await
        }))
    }
}

/// `POST /events`
#[utoipa::path(post, path = "/events", request_body = NewEvent, security(("bearer" = [])),
    responses((status = 201, body = Event), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 422, body = crate::error::ErrorBody)))]
pub async fn create_event(State(state): State<AppState>, req: JsonRequest<NewEvent>) -> Response {
    req.run_keyed(
        &state,
        move |st, auth, body, strategy, mut session, key| async move {
            auth.require_admin()?;
            engine::check_supported(&st, strategy)?;
            check_text("name", &body.name, 1, 128)?;
            check_range("seats", body.seats, 1, MAX_SEATS)?;
            let (name, seats) = (body.name.clone(), body.seats);
            let run = session
                .run(&contend::TxOptions::new(), move |tx| {
                    let name = name.clone();
                    let key = key.clone();
                    Box::pin(async move {
                        let id = insert_returning_id(
                            tx,
                            "INSERT INTO events (name, seats, version) VALUES (?, ?, 0)",
                            &[BindValue::Text(name.clone()), BindValue::Int(seats)],
                        )
                        .await?;
                        let outcome =
                            Outcome::json(StatusCode::CREATED, &Event { id, name, seats });
                        idempotency::store_in_tx(tx, &key, &outcome).await?;
                        Ok(outcome)
                    })
                })
                .await;
            Ok(run.result?)
        },
    )
    .await
}

/// `POST /events/{id}/bookings`
#[utoipa::path(post, path = "/events/{id}/bookings", params(("id" = i64, Path, description = "event id")),
    request_body = NewBooking, security(("bearer" = [])),
    responses((status = 201, body = Booking), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody, description = "event_not_found"),
              (status = 409, body = crate::error::ErrorBody, description = "seat_taken"),
              (status = 422, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn create_booking(
    State(state): State<AppState>,
    id: RawPath,
    req: JsonRequest<NewBooking>,
) -> Response {
    let event = match path_id(id, "event id") {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    req.run_keyed(
        &state,
        move |st, auth, body, strategy, session, key| async move {
            // This path reads through the pool first: let the request's connection go.
            drop(session);
            auth.require_account(body.account)?;
            let db = &st.inner.db;
            let query = db
                .query_scalar("SELECT seats FROM events WHERE id = ?")
                .bind(event);
            let seats: Option<i64> = db
                .session()
                .autocommit(|c| {
                    Box::pin(async move { Ok::<_, contend::Error>(query.fetch_optional(c).await?) })
                })
                .await?;
            let seats = seats.ok_or_else(|| event_missing(event))?;
            engine::check_supported(&st, strategy)?;
            check_range("seat", body.seat, 1, seats)?;
            let op = BookOp {
                backend: st.inner.db.backend(),
                event,
                seat: body.seat,
                account: body.account,
            };
            engine::execute(&st, strategy, op, &mut st.session().await?, &key).await
        },
    )
    .await
}
