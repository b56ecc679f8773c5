//! Deposits and withdrawals under `batched`, where concurrent requests on one account are
//! decided in memory and written once per batch (`BalanceOp::apply`/`write_state`, with the
//! idempotent responses stored by `Keyed::write_state` in the same transaction): every answer
//! is what the unbatched path gives, refusals fall exactly where they would alone, the books
//! balance and replays answer the stored response; the unsafe `none` loses updates under the
//! same load.

mod common;

use std::collections::BTreeMap;

use common::{ADMIN, Api, Kind, Options, Resp, Server, TestDb};
use contend::strategy::Strategy;
use contend_test_support::on_backends;
use rand::Rng;
use serde_json::json;

const OPENING: i64 = 100;
const CLIENTS: usize = 24;

async fn server(kind: Kind, strategy: Strategy) -> (TestDb, Server) {
    let db = TestDb::new(kind).await;
    let options = Options {
        strategy,
        allow_header: false,
        ..Options::default()
    };
    let server = Server::start(&db.url, options).await;
    (db, server)
}

/// What a client saw: status, `Content-Type`, `Idempotent-Replayed` and the body bytes.
fn seen(r: &Resp) -> (u16, Option<String>, Option<String>, String) {
    (
        r.status,
        r.header("content-type").map(str::to_string),
        r.header("idempotent-replayed").map(str::to_string),
        String::from_utf8_lossy(&r.body).into_owned(),
    )
}

/// One request after the other on a fresh database: deposits and withdrawals that succeed,
/// are refused (409, 422, 404), and replays of keyed ones.
async fn sequence(api: Api) -> Vec<(u16, Option<String>, Option<String>, String)> {
    let (id, token) = api.account("same", 50).await;
    let withdraw = format!("/accounts/{id}/withdraw");
    let deposit = format!("/accounts/{id}/deposit");
    let mut out = Vec::new();
    for (path, token, key, amount) in [
        (&withdraw, token.as_str(), None, 20i64),
        (&withdraw, &token, None, 40), // 409: 30 left
        (&deposit, ADMIN, None, 5),
        (&withdraw, &token, Some("k1"), 35), // 0 left
        (&withdraw, &token, Some("k2"), 1),  // 409, stored
        (&withdraw, &token, None, 0),        // 422
        (&deposit, ADMIN, Some("k3"), 7),
        (&deposit, ADMIN, None, 1_000_000_000_000_000), // 422: above 10^15
        (&withdraw, &token, Some("k1"), 35),            // replay of the 200
        (&withdraw, &token, Some("k2"), 1),             // replay of the 409
        (&withdraw, &token, Some("k4"), 7),             // 0 left
    ] {
        let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
        let r = api
            .post_with(path, token, &headers, json!({ "amount": amount }))
            .await;
        out.push(seen(&r));
    }
    let missing = api
        .post(
            &format!("/accounts/{}/deposit", id + 1000),
            ADMIN,
            json!({"amount": 1}),
        )
        .await;
    out.push(seen(&missing));
    let invalid_missing = api
        .post(
            &format!("/accounts/{}/deposit", id + 1000),
            ADMIN,
            json!({"amount": 0}),
        )
        .await;
    out.push(seen(&invalid_missing));
    let account = api.get(&format!("/accounts/{id}"), Some(ADMIN)).await;
    out.push(seen(&account));
    assert_eq!(api.audit().await["consistent"], true);
    out
}

/// Under `batched`, every answer (status, headers that matter, body bytes) is the one the
/// unbatched strategies give for the same requests on the same data.
async fn same_answers(kind: Kind) {
    let mut answers = Vec::new();
    for strategy in [Strategy::Batched, Strategy::Atomic, Strategy::Pessimistic] {
        let (db, server) = server(kind, strategy).await;
        answers.push((strategy, sequence(server.api()).await));
        server.stop().await;
        db.drop_db().await;
    }
    let (_, batched) = &answers[0];
    let statuses: Vec<u16> = batched.iter().map(|a| a.0).collect();
    assert_eq!(
        statuses,
        [
            200, 409, 200, 200, 409, 422, 200, 422, 200, 409, 200, 404, 404, 200
        ],
        "{batched:#?}"
    );
    assert_eq!(batched[8].2.as_deref(), Some("true"), "a replay");
    assert_eq!(
        batched[8].3, batched[3].3,
        "the replay's body is the stored one"
    );
    for (strategy, other) in &answers[1..] {
        assert_eq!(batched, other, "batched vs {strategy}");
    }
}

on_backends!(same_answers_as_unbatched => same_answers);

/// One client's request and what it got.
struct Sent {
    amount: i64,
    key: Option<String>,
    answer: Resp,
}

/// `CLIENTS` concurrent withdrawals of 5..=12 from one account of `OPENING` (so at least one
/// is refused), every other one with an Idempotency-Key.
async fn rush(api: Api, id: i64, token: &str) -> Vec<Sent> {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let run = format!("{:x}", rand::rng().random::<u32>());
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (barrier, token, run) = (barrier.clone(), token.to_string(), run.clone());
        tasks.push(tokio::spawn(async move {
            let amount = rand::rng().random_range(5..=12i64);
            let key = (i % 2 == 0).then(|| format!("w-{run}-{i}"));
            let headers: Vec<(&str, &str)> = key
                .as_deref()
                .map(|k| ("Idempotency-Key", k))
                .into_iter()
                .collect();
            barrier.wait().await;
            let answer = api
                .post_with(
                    &format!("/accounts/{id}/withdraw"),
                    &token,
                    &headers,
                    json!({ "amount": amount }),
                )
                .await;
            Sent {
                amount,
                key,
                answer,
            }
        }));
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(t.await.expect("client task"));
    }
    sent
}

/// Concurrent withdrawals under `batched`: refusals among successes, each success's answer a
/// step of one sequential history, the books consistent, replays answering the stored
/// responses without withdrawing again.
async fn concurrent(kind: Kind) {
    let (db, server) = server(kind, Strategy::Batched).await;
    let api = server.api();
    for round in 0..3 {
        let (id, token) = api.account(&format!("hot{round}"), OPENING).await;
        let sent = rush(api, id, &token).await;
        let mut statuses = BTreeMap::new();
        let mut history = Vec::new();
        let mut refused = Vec::new();
        for s in &sent {
            *statuses.entry(s.answer.status).or_insert(0) += 1;
            match s.answer.status {
                200 => {
                    let v = s.answer.json();
                    assert_eq!(v["id"], id);
                    assert_eq!(v["owner"], format!("hot{round}"));
                    history.push((
                        v["version"].as_i64().unwrap(),
                        v["balance"].as_i64().unwrap(),
                        s.amount,
                    ));
                }
                409 => {
                    assert_eq!(s.answer.code(), "insufficient_funds");
                    refused.push(s.amount);
                }
                other => panic!(
                    "{kind:?}: unexpected {other}: {}",
                    String::from_utf8_lossy(&s.answer.body)
                ),
            }
        }
        eprintln!("{kind:?} batched round {round}: {statuses:?}");
        assert!(!refused.is_empty() && !history.is_empty(), "{statuses:?}");
        // The successes are one sequential history: versions 1..=n, each balance the one
        // before minus its own amount.
        history.sort();
        let mut balance = OPENING;
        for (i, &(version, after, amount)) in history.iter().enumerate() {
            assert_eq!(version, i as i64 + 1, "{history:?}");
            balance -= amount;
            assert_eq!(after, balance, "{history:?}");
        }
        // A refusal is decided on the balance of its moment, which only goes down: so it
        // would be refused at the end too, and nothing that fits was refused.
        for amount in &refused {
            assert!(
                *amount > balance,
                "{amount} refused, but {balance} is left: {history:?}"
            );
        }
        assert_eq!(api.balance(id).await, balance);
        let audit = api.audit().await;
        assert_eq!(audit["consistent"], true, "{audit}");
        // Replays: the stored answer byte for byte, and no second withdrawal.
        for s in sent.iter().filter(|s| s.key.is_some()) {
            let key = s.key.as_deref().unwrap();
            let again = api
                .post_with(
                    &format!("/accounts/{id}/withdraw"),
                    &token,
                    &[("Idempotency-Key", key)],
                    json!({ "amount": s.amount }),
                )
                .await;
            assert_eq!(again.status, s.answer.status, "replay of {key}");
            assert_eq!(again.body, s.answer.body, "replay of {key}");
            assert_eq!(again.header("idempotent-replayed"), Some("true"));
        }
        assert_eq!(api.balance(id).await, balance, "replays withdrew again");
    }
    server.stop().await;
    db.drop_db().await;
}

on_backends!(concurrent_withdrawals => concurrent only [sqlite postgres mysql] threads 4);

/// The same rush under the unsafe `none`: the read happens outside the transaction, so
/// concurrent withdrawals overwrite each other's balance and the books stop balancing.
async fn unsafe_none(kind: Kind) {
    let (db, server) = server(kind, Strategy::None).await;
    let api = server.api();
    let mut broken = None;
    for round in 0..5 {
        let (id, token) = api.account(&format!("hot{round}"), OPENING).await;
        let sent = rush(api, id, &token).await;
        let withdrawn: i64 = sent
            .iter()
            .filter(|s| s.answer.status == 200)
            .map(|s| s.amount)
            .sum();
        let balance = api.balance(id).await;
        let audit = api.audit().await;
        eprintln!(
            "{kind:?} none round {round}: balance {balance}, withdrawn {withdrawn}, audit {audit}"
        );
        if audit["consistent"] == false {
            broken = Some((balance, withdrawn, audit));
            break;
        }
    }
    let (balance, withdrawn, audit) =
        broken.unwrap_or_else(|| panic!("{kind:?} none: no lost update in 5 rounds"));
    assert!(audit["ledger_mismatches"].as_i64().unwrap() > 0, "{audit}");
    assert_ne!(balance, OPENING - withdrawn, "{audit}");
    server.stop().await;
    db.drop_db().await;
}

on_backends!(none_loses_updates => unsafe_none only [sqlite postgres mysql] threads 4);

/// A batched request waits for its batch without holding one of the instance's request
/// sessions (their number is three quarters of `--max-connections`), so batches grow past it:
/// with a pool of 4 connections (3 sessions) and 32 concurrent withdrawals, `/metrics` must
/// show a committed batch larger than 3. Holding the session while waiting capped every batch
/// at 3.
async fn batches_outgrow_sessions(kind: Kind) {
    let db = TestDb::new(kind).await;
    let options = Options {
        strategy: Strategy::Batched,
        allow_header: false,
        max_connections: 4,
        ..Options::default()
    };
    let server = Server::start(&db.url, options).await;
    let api = server.api();
    let (id, token) = api.account("hot", 1_000_000).await;
    let mut largest = 0;
    let mut rounds = 0;
    for _round in 0..5 {
        rounds += 1;
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(32));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (barrier, token) = (barrier.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                api.post(
                    &format!("/accounts/{id}/withdraw"),
                    &token,
                    json!({ "amount": 1 }),
                )
                .await
                .status
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("client task"), 200);
        }
        let metrics = api.get("/metrics", None).await;
        assert_eq!(metrics.status, 200);
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        largest = text
            .lines()
            .find_map(|l| l.strip_prefix("contend_batch_largest "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no contend_batch_largest in /metrics:\n{text}"));
        if largest > 3 {
            break;
        }
    }
    assert!(
        largest > 3,
        "no batch held more operations than the instance has request sessions (largest {largest})"
    );
    assert_eq!(api.balance(id).await, 1_000_000 - 32 * rounds);
    server.stop().await;
    db.drop_db().await;
}

on_backends!(batches_grow_past_the_sessions => batches_outgrow_sessions only [sqlite postgres mysql] threads 4);
