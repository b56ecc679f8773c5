//! The ticket shop against PostgreSQL (`CONTEND_PG_URL`), each test in a schema of its own:
//! concurrent buyers never oversell under any safe strategy while the unsafe baseline does under
//! the same load, a retried purchase with the same key runs once, and bad input changes nothing.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use ticket_shop::Ticket;
use tower::ServiceExt;

/// A pool whose connections use a fresh schema, and the shop on it.
async fn shop() -> Option<(Router, PgPool)> {
    let url = contend_test_support::env_url("CONTEND_PG_URL")?;
    let schema = format!("shop_{}", contend_test_support::suffix());
    let admin = PgPool::connect(&url).await.expect("connect");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("schema");
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .after_connect(move |conn, _| {
            let set = format!("SET search_path TO {schema}");
            Box::pin(async move {
                sqlx::raw_sql(sqlx::AssertSqlSafe(set))
                    .execute(conn)
                    .await?;
                Ok(())
            })
        })
        .connect(&url)
        .await
        .expect("pool");
    let app = ticket_shop::app(pool.clone(), contend::strategy::Strategy::Pessimistic)
        .await
        .expect("app");
    Some((app, pool))
}

async fn post(
    app: &Router,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, Vec<u8>) {
    let mut request = Request::post(path).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, bytes.to_vec())
}

async fn event(app: &Router, tickets: i32) -> String {
    let body = format!(r#"{{"name": "concert", "price": "49.90", "tickets": {tickets}}}"#);
    let (status, bytes) = post(app, "/events", &[], &body).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// `buyers` concurrent purchases of one event under `strategy`: (sold, sold out, other).
async fn rush(
    app: &Router,
    id: &str,
    strategy: &str,
    buyers: usize,
) -> (usize, usize, Vec<String>) {
    let mut tasks = Vec::new();
    for n in 0..buyers {
        let (app, path, strategy) = (
            app.clone(),
            format!("/events/{id}/tickets"),
            strategy.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            let key = format!("{strategy}-{n}");
            let headers = [
                ("x-strategy", strategy.as_str()),
                ("idempotency-key", key.as_str()),
            ];
            post(
                &app,
                &path,
                &headers,
                &format!(r#"{{"buyer": "buyer {n}"}}"#),
            )
            .await
        }));
    }
    let (mut sold, mut sold_out, mut other) = (0, 0, Vec::new());
    for task in tasks {
        match task.await.unwrap() {
            (StatusCode::CREATED, _) => sold += 1,
            (StatusCode::CONFLICT, _) => sold_out += 1,
            (status, body) => other.push(format!("{status}: {}", String::from_utf8_lossy(&body))),
        }
    }
    (sold, sold_out, other)
}

async fn tickets_of(pool: &PgPool, id: &str) -> (i64, i32) {
    let id: uuid::Uuid = id.parse().unwrap();
    let sold: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ticket WHERE event_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    let left: i32 = sqlx::query_scalar("SELECT tickets_left FROM event WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    (sold, left)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_buyers_never_oversell() {
    let Some((app, pool)) = shop().await else {
        return;
    };
    const TICKETS: i32 = 10;
    const BUYERS: usize = 40;
    for strategy in [
        "atomic",
        "pessimistic",
        "optimistic",
        "serializable",
        "advisory",
        "mutex",
    ] {
        let id = event(&app, TICKETS).await;
        let (sold, sold_out, other) = rush(&app, &id, strategy, BUYERS).await;
        assert!(other.is_empty(), "{strategy}: {other:?}");
        assert_eq!(
            (sold, sold_out),
            (TICKETS as usize, BUYERS - TICKETS as usize),
            "{strategy}"
        );
        assert_eq!(
            tickets_of(&pool, &id).await,
            (i64::from(TICKETS), 0),
            "{strategy}"
        );
    }
    // The unsafe baseline under the same load: reads outside the transaction, writes blindly.
    // A race is a matter of scheduling, so it gets three rushes (on fresh events) to show it.
    let mut oversold = Vec::new();
    for _ in 0..3 {
        let id = event(&app, TICKETS).await;
        let (sold, _, other) = rush(&app, &id, "none", BUYERS).await;
        assert!(other.is_empty(), "none: {other:?}");
        let (tickets, _) = tickets_of(&pool, &id).await;
        assert_eq!(tickets, sold as i64);
        oversold.push(tickets);
        if tickets > i64::from(TICKETS) {
            return;
        }
    }
    panic!("none should oversell: {oversold:?} tickets for {TICKETS} seats in three rushes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_purchase_runs_once() {
    let Some((app, pool)) = shop().await else {
        return;
    };
    let id = event(&app, 5).await;
    let path = format!("/events/{id}/tickets");
    let headers = [("idempotency-key", "order-42")];
    let body = r#"{"buyer": "ann"}"#;
    // The client retries at once, several times, while the first attempt may still run.
    let app = Arc::new(app);
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let (app, path) = (app.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            post(&app, &path, &headers, body).await
        }));
    }
    let mut created = Vec::new();
    for task in tasks {
        let (status, bytes) = task.await.unwrap();
        match status {
            StatusCode::CREATED => created.push(bytes),
            // A duplicate that arrived while the first ran: "in flight, retry later".
            StatusCode::CONFLICT => assert!(
                String::from_utf8_lossy(&bytes).contains("in_progress")
                    || String::from_utf8_lossy(&bytes).contains("flight"),
                "{}",
                String::from_utf8_lossy(&bytes)
            ),
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&bytes)),
        }
    }
    let (status, again) = post(&app, &path, &headers, body).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(
        created.iter().all(|b| *b == again),
        "every success is the same response, byte for byte"
    );
    let ticket: Ticket = serde_json::from_slice(&again).unwrap();
    assert_eq!(ticket.buyer, "ann");
    assert_eq!(ticket.price.to_string(), "49.90");
    assert_eq!(tickets_of(&pool, &id).await, (1, 4), "one ticket sold");
    // The same key with another request is refused, and changes nothing.
    let (status, _) = post(&app, &path, &headers, r#"{"buyer": "ben"}"#).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(tickets_of(&pool, &id).await, (1, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let Some((app, pool)) = shop().await else {
        return;
    };
    let id = event(&app, 1).await;
    let path = format!("/events/{id}/tickets");
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, StatusCode);
    let cases: [Case; 3] = [
        (
            &[("x-strategy", "bogus")],
            r#"{"buyer": "ann"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (&[], r#"{"buyer": 42}"#, StatusCode::UNPROCESSABLE_ENTITY),
        // A strategy this shop has no lock service for: refused as input, not a server error.
        (
            &[("x-strategy", "redis")],
            r#"{"buyer": "ann"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (headers, body, expected) in cases {
        let (status, bytes) = post(&app, &path, headers, body).await;
        assert_eq!(status, expected, "{}", String::from_utf8_lossy(&bytes));
    }
    let missing = format!("/events/{}/tickets", uuid::Uuid::new_v4());
    let (status, _) = post(&app, &missing, &[], r#"{"buyer": "ann"}"#).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = post(
        &app,
        "/events/not-a-uuid/tickets",
        &[],
        r#"{"buyer": "ann"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = post(
        &app,
        "/events",
        &[],
        r#"{"name": "x", "price": "-1", "tickets": 1}"#,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(tickets_of(&pool, &id).await, (0, 1));
}
