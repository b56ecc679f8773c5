//! A transfer to an account that does not exist is 404 under every strategy, before a 409
//! (insufficient funds) and before a 422 (amount out of range, same account), and changes
//! nothing. (On the way that succeeds, the service does not look `to` up before the write: the
//! write itself finds out, so these paths are checked here for each strategy and backend.)

mod common;

use common::{Kind, Server, TestDb};
use serde_json::json;

async fn missing_to(kind: Kind) {
    let db = TestDb::new(kind).await;
    let server = Server::start(&db.url, common::Options::default()).await;
    let api = server.api();
    let (a, ta) = api.account("a", 100).await;
    let (b, _) = api.account("b", 0).await;
    let mut strategies = vec![
        "none",
        "mutex",
        "atomic",
        "pessimistic",
        "optimistic",
        "serializable",
    ];
    if kind != Kind::Sqlite {
        strategies.push("advisory");
    }
    let missing = b + 1000;
    let below = a - 1; // 0 or less: never an account id, lower than `a`
    for strategy in strategies {
        let headers = [("X-Concurrency-Strategy", strategy)];
        for (to, amount, why) in [
            (missing, 10, "funds suffice"),
            (missing, 1_000, "insufficient funds: 404 before 409"),
            (missing, 0, "amount out of range: 404 before 422"),
            (
                below,
                10,
                "missing `to` below `from` (the other lock order)",
            ),
            (
                below,
                1_000,
                "missing `to` below `from`, insufficient funds",
            ),
        ] {
            let r = api
                .post_with(
                    "/transfers",
                    &ta,
                    &headers,
                    json!({"from": a, "to": to, "amount": amount}),
                )
                .await;
            assert_eq!(
                (r.status, r.code()),
                (404, "account_not_found".to_string()),
                "{strategy}, {why}: {}",
                String::from_utf8_lossy(&r.body)
            );
        }
        // The existing pair still works, and 409 / 422 stay what they were.
        let r = api
            .post_with(
                "/transfers",
                &ta,
                &headers,
                json!({"from": a, "to": b, "amount": 1_000}),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (409, "insufficient_funds".to_string()),
            "{strategy}"
        );
        let r = api
            .post_with(
                "/transfers",
                &ta,
                &headers,
                json!({"from": a, "to": a, "amount": 1}),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (422, "same_account".to_string()),
            "{strategy}"
        );
        let r = api
            .post_with(
                "/transfers",
                &ta,
                &headers,
                json!({"from": a, "to": b, "amount": 1}),
            )
            .await;
        assert_eq!(
            r.status,
            201,
            "{strategy}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert_eq!(
        api.balance(b).await,
        if kind == Kind::Sqlite { 6 } else { 7 }
    );
    let audit = api.audit().await;
    assert_eq!(audit["consistent"], true, "{audit}");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_to_missing_account_sqlite() {
    missing_to(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_to_missing_account_postgres() {
    if common::kinds().contains(&Kind::Postgres) {
        missing_to(Kind::Postgres).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_to_missing_account_mysql() {
    if common::kinds().contains(&Kind::MySql) {
        missing_to(Kind::MySql).await;
    }
}
