//! Request sessions on a small pool: with 2 connections (one request session, one connection
//! left for idempotency keys and reads), sustained mixed load for longer than the pool's acquire
//! timeout (3 s) answers every request: transfers with and without idempotency keys, account
//! reads and audits. Requests queue for the one session instead of failing, and the books
//! balance. If request sessions could hold every connection of the pool, the reads and key
//! claims that go through the pool would wait for the acquire timeout and answer 503: that is
//! what this test would catch.

mod common;

use std::time::{Duration, Instant};

use common::{ADMIN, Kind, Options, Server, TestDb};
use contend_test_support::on_backends;
use serde_json::json;

const LOAD_FOR: Duration = Duration::from_secs(4);
const TASKS: usize = 8;

async fn small_pool(kind: Kind) {
    let db = TestDb::new(kind).await;
    let server = Server::start(
        &db.url,
        Options {
            max_connections: 2,
            ..Options::default()
        },
    )
    .await;
    let api = server.api();
    let mut accounts = Vec::new();
    for i in 0..4 {
        accounts.push(api.account(&format!("small{i}"), 1_000_000).await);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let accounts = accounts.clone();
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut n = 0usize;
            while started.elapsed() < LOAD_FOR {
                n += 1;
                let (from, token) = &accounts[(t + n) % accounts.len()];
                let (to, _) = &accounts[(t + n + 1) % accounts.len()];
                let body = json!({"from": from, "to": to, "amount": 1});
                let r = match n % 4 {
                    0 => {
                        let key = format!("small-{t}-{n}");
                        api.post_with("/transfers", token, &[("Idempotency-Key", &key)], body)
                            .await
                    }
                    1 => api.get(&format!("/accounts/{from}"), Some(token)).await,
                    2 if t == 0 => api.get("/audit", Some(ADMIN)).await,
                    _ => api.post("/transfers", token, body).await,
                };
                statuses.push((r.status, String::from_utf8_lossy(&r.body).into_owned()));
            }
            statuses
        }));
    }
    let mut answered = 0;
    for task in tasks {
        for (status, body) in task.await.expect("load task") {
            assert!(
                status == 200 || status == 201,
                "{kind:?}: every request is answered, got {status}: {body}"
            );
            answered += 1;
        }
    }
    assert!(answered > TASKS * 4, "{kind:?}: only {answered} requests");
    let audit = api.audit().await;
    assert_eq!(audit["consistent"], true, "{kind:?}: {audit}");
    let metrics = api.get("/metrics", None).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let waits: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("contend_session_wait_seconds_count "))
        .and_then(|n| n.trim().parse().ok())
        .expect("session wait metric");
    assert!(
        waits > 0,
        "{kind:?}: with one request session and {TASKS} clients, requests queued"
    );
    server.stop().await;
    db.drop_db().await;
}

on_backends!(small_pool);
