//! Concurrent transfers and orders across TWO service instances sharing one database: every
//! database-based strategy keeps the audit consistent, while `none` (anywhere) and `mutex`
//! (across instances) visibly break it under the same load. Also: graceful shutdown during load
//! loses no acknowledged request.

mod common;

use std::collections::BTreeMap;

use common::{ADMIN, Api, Kind, Options, Server, TestDb};
use contend::strategy::Strategy;
use contend_test_support::on_backends;
use rand::Rng;
use serde_json::{Value, json};

const ACCOUNTS: usize = 3;
const OPENING: i64 = 150;
const SEATS: i64 = 4;
const STOCK: i64 = 30;
const TASKS: usize = 24;
const PER_TASK: usize = 6;

struct Round {
    audit: Value,
    statuses: BTreeMap<u16, usize>,
    orders_ok: i64,
    stock_left: i64,
}

/// One round of load: transfers among a few hot accounts and orders of one hot product, sent
/// round robin to `apis`.
async fn round(apis: &[Api]) -> Round {
    let api = apis[0];
    let mut accounts = Vec::new();
    for i in 0..ACCOUNTS {
        accounts.push(api.account(&format!("acct{i}"), OPENING).await);
    }
    let sku = format!("hot-{}", rand::rng().random::<u32>());
    let r = api
        .post(
            "/products",
            ADMIN,
            json!({"sku": sku, "stock": STOCK, "price": 1}),
        )
        .await;
    assert_eq!(r.status, 201);
    let event = api
        .post("/events", ADMIN, json!({"name": "gig", "seats": SEATS}))
        .await
        .id();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let api = apis[t % apis.len()];
        let accounts = accounts.clone();
        let sku = sku.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..PER_TASK {
                let (from, to, amount) = {
                    let mut rng = rand::rng();
                    let f = rng.random_range(0..ACCOUNTS);
                    let to = (f + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
                    (f, to, rng.random_range(1..=40i64))
                };
                let kind = (t + i) % 4;
                let seat = rand::rng().random_range(1..=SEATS);
                let r = if kind == 0 {
                    let (id, token) = &accounts[from];
                    api.post(
                        "/orders",
                        token,
                        json!({"account": id, "sku": sku, "quantity": 1}),
                    )
                    .await
                } else if kind == 1 {
                    let (id, token) = &accounts[from];
                    api.post(
                        &format!("/events/{event}/bookings"),
                        token,
                        json!({"account": id, "seat": seat}),
                    )
                    .await
                } else {
                    let (id, token) = &accounts[from];
                    api.post(
                        "/transfers",
                        token,
                        json!({"from": id, "to": accounts[to].0, "amount": amount}),
                    )
                    .await
                };
                out.push((r.status, r.code_or_empty(), kind == 0));
            }
            out
        }));
    }
    let mut statuses = BTreeMap::new();
    let mut orders_ok = 0;
    for t in tasks {
        for (status, code, order) in t.await.expect("client task") {
            assert!(status != 500, "a request failed with 500");
            assert!(
                matches!(status, 200 | 201 | 409 | 503),
                "unexpected status {status} {code}"
            );
            if status == 409 {
                assert!(
                    ["insufficient_funds", "out_of_stock", "seat_taken"].contains(&code.as_str()),
                    "{code}"
                );
            }
            if order && status == 201 {
                orders_ok += 1;
            }
            *statuses.entry(status).or_insert(0) += 1;
        }
    }
    let stock_left = api.get(&format!("/products/{sku}"), None).await.json()["stock"]
        .as_i64()
        .unwrap();
    Round {
        audit: api.audit().await,
        statuses,
        orders_ok,
        stock_left,
    }
}

async fn cluster(kind: Kind, strategy: Strategy, instances: usize) -> (TestDb, Vec<Server>) {
    let db = TestDb::new(kind).await;
    let namespace = format!("svc-test-{:x}", rand::rng().random::<u64>());
    let mut servers = Vec::new();
    for _ in 0..instances {
        let options = Options {
            strategy,
            allow_header: false,
            max_connections: 12,
            redis_namespace: strategy.needs_lock_service().then(|| namespace.clone()),
        };
        servers.push(Server::start(&db.url, options).await);
    }
    (db, servers)
}

async fn teardown(db: TestDb, servers: Vec<Server>) {
    for s in servers {
        s.stop().await;
    }
    db.drop_db().await;
}

/// A safe strategy: consistent audit after load on two instances, and the work really happened.
async fn safe(kind: Kind, strategy: Strategy, instances: usize) {
    let (db, servers) = cluster(kind, strategy, instances).await;
    let apis: Vec<Api> = servers.iter().map(|s| s.api()).collect();
    let r = round(&apis).await;
    eprintln!(
        "{kind:?} {strategy} x{instances}: {:?} audit {}",
        r.statuses, r.audit
    );
    assert_eq!(
        r.audit["consistent"], true,
        "{kind:?} {strategy}: {}",
        r.audit
    );
    assert_eq!(
        r.stock_left,
        STOCK - r.orders_ok,
        "{kind:?} {strategy}: stock vs orders"
    );
    assert!(
        r.statuses.get(&201).copied().unwrap_or(0) >= TASKS * PER_TASK / 4,
        "{kind:?} {strategy}: too little succeeded: {:?}",
        r.statuses
    );
    teardown(db, servers).await;
}

/// An unsafe setup: violations must show up (a few rounds at most, on fresh data each time).
async fn unsafe_(kind: Kind, strategy: Strategy, instances: usize) {
    let (db, servers) = cluster(kind, strategy, instances).await;
    let apis: Vec<Api> = servers.iter().map(|s| s.api()).collect();
    let mut broken = None;
    for attempt in 0..5 {
        let r = round(&apis).await;
        eprintln!(
            "{kind:?} {strategy} x{instances} round {attempt}: {:?} audit {}",
            r.statuses, r.audit
        );
        if r.audit["consistent"] == false {
            broken = Some(r.audit);
            break;
        }
    }
    let audit = broken
        .unwrap_or_else(|| panic!("{kind:?} {strategy} x{instances}: no violation in 5 rounds"));
    let counters = [
        "negative_balances",
        "ledger_mismatches",
        "oversold_products",
        "double_booked_seats",
    ];
    assert!(
        counters.iter().any(|c| audit[c].as_i64().unwrap() > 0)
            || audit["total_balance"] != audit["expected_total_balance"],
        "{audit}"
    );
    teardown(db, servers).await;
}

async fn all(kind: Kind) {
    let mut strategies = vec![
        Strategy::Atomic,
        Strategy::Pessimistic,
        Strategy::Optimistic,
        Strategy::Serializable,
        Strategy::Batched,
    ];
    if kind != Kind::Sqlite {
        strategies.push(Strategy::Advisory);
    }
    if common::redis_url().is_some() {
        strategies.push(Strategy::Redis);
    }
    if common::redlock_urls().is_some() {
        strategies.push(Strategy::Redlock);
    }
    if common::etcd_urls().is_some() {
        strategies.push(Strategy::Etcd);
    }
    for s in strategies {
        safe(kind, s, 2).await;
    }
    // In one process the mutex is enough ...
    safe(kind, Strategy::Mutex, 1).await;
    // ... across two it is not, and `none` is not even in one.
    unsafe_(kind, Strategy::Mutex, 2).await;
    unsafe_(kind, Strategy::None, 1).await;
}

on_backends!(two_instances => all only [sqlite postgres mysql] threads 4);

/// Two instances on PostgreSQL through pgbouncer in transaction pooling mode
/// (`?pgbouncer=true`; the migrations on the direct URL): every database strategy keeps the
/// audit consistent under the same load as above, with no 500 and no failed request but
/// business refusals and 503s (lock waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_through_pgbouncer() {
    let Some(bouncer) = contend_test_support::env_url("CONTEND_PGBOUNCER_URL") else {
        return;
    };
    if !common::enabled(Kind::Postgres) {
        return;
    }
    let mut strategies = vec![
        Strategy::Atomic,
        Strategy::Pessimistic,
        Strategy::Optimistic,
        Strategy::Serializable,
        Strategy::Advisory,
        Strategy::Batched,
    ];
    if common::redis_url().is_some() {
        strategies.push(Strategy::Redis);
    }
    for strategy in strategies {
        let db = TestDb::new(Kind::Postgres).await;
        let through = db.url_through(&bouncer);
        let sep = if through.contains('?') { '&' } else { '?' };
        let url = format!("{through}{sep}pgbouncer=true");
        let namespace = format!("svc-test-{:x}", rand::rng().random::<u64>());
        let mut servers = Vec::new();
        for _ in 0..2 {
            let options = Options {
                strategy,
                allow_header: false,
                max_connections: 12,
                redis_namespace: strategy.needs_redis().then(|| namespace.clone()),
            };
            servers.push(Server::start_migrated_on(&url, Some(&db.url), options).await);
        }
        let apis: Vec<Api> = servers.iter().map(|s| s.api()).collect();
        let r = round(&apis).await;
        eprintln!(
            "pgbouncer {strategy} x2: {:?} audit {}",
            r.statuses, r.audit
        );
        assert_eq!(
            r.audit["consistent"], true,
            "pgbouncer {strategy}: {}",
            r.audit
        );
        assert_eq!(r.stock_left, STOCK - r.orders_ok, "pgbouncer {strategy}");
        assert!(
            r.statuses.get(&201).copied().unwrap_or(0) >= TASKS * PER_TASK / 4,
            "pgbouncer {strategy}: too little succeeded: {:?}",
            r.statuses
        );
        teardown(db, servers).await;
    }
}

/// Graceful shutdown in the middle of load: every acknowledged transfer is in the database, the
/// audit is consistent, and the server returns.
async fn shutdown_during_load(kind: Kind) {
    let db = TestDb::new(kind).await;
    let mut server = Server::start(&db.url, Options::default()).await;
    let api = server.api();
    let mut accounts = Vec::new();
    for i in 0..4 {
        accounts.push(api.account(&format!("s{i}"), 1_000_000).await);
    }
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<i64>::new()));
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..16 {
        let accounts = accounts.clone();
        let acked = acked.clone();
        let failed = failed.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                let (from, token) = &accounts[(t + i) % 4];
                let to = accounts[(t + i + 1) % 4].0;
                let body =
                    serde_json::to_vec(&json!({"from": from, "to": to, "amount": 1})).unwrap();
                match api
                    .send("POST", "/transfers", Some(token), &[], Some(&body))
                    .await
                {
                    Ok(r) if r.status == 201 => acked.lock().unwrap().push(r.id()),
                    Ok(r) => assert!(r.status != 500, "500 during shutdown"),
                    Err(_) => {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Let some requests complete, then begin the shutdown while others are in flight.
    while acked.lock().unwrap().len() < 60 {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    server.begin_shutdown();
    for t in tasks {
        t.await.unwrap();
    }
    server.join().await;
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    assert!(
        failed.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the shutdown happened mid-load"
    );
    // Restart on the same database and check every acknowledged transfer.
    let server = Server::start(&db.url, Options::default()).await;
    let api = server.api();
    let mut stored = std::collections::BTreeSet::new();
    for (id, _) in &accounts {
        for t in api
            .get(&format!("/accounts/{id}/transfers"), Some(ADMIN))
            .await
            .json()
            .as_array()
            .unwrap()
        {
            stored.insert(t["id"].as_i64().unwrap());
        }
    }
    for id in &acked {
        assert!(stored.contains(id), "acknowledged transfer {id} was lost");
    }
    let audit = api.audit().await;
    assert_eq!(audit["consistent"], true, "{audit}");
    server.stop().await;
    db.drop_db().await;
}

on_backends!(graceful_shutdown => shutdown_during_load only [sqlite postgres] threads 4);
