//! A transfer to an account that does not exist is 404 under every strategy, before a 409
//! (insufficient funds) and before a 422 (amount out of range, same account), and changes
//! nothing. A transfer that would take `to` above 10^15 is 422 before 409, under every strategy;
//! one that takes `to` exactly to 10^15, or `from` exactly to 0, succeeds. (On the way that succeeds, the service does not look `to` up before the write: the
//! write itself finds out, so these paths are checked here for each strategy and backend.)

mod common;

use common::{Api, Kind, Resp, Server, TestDb};
use contend_test_support::on_backends;
use serde_json::json;

/// `POST /transfers` by `token`'s holder under `strategy`.
async fn transfer(api: Api, token: &str, strategy: &str, from: i64, to: i64, amount: i64) -> Resp {
    api.post_with(
        "/transfers",
        token,
        &[("X-Concurrency-Strategy", strategy)],
        json!({"from": from, "to": to, "amount": amount}),
    )
    .await
}

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
    for strategy in strategies.clone() {
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
            let r = transfer(api, &ta, strategy, a, to, amount).await;
            assert_eq!(
                (r.status, r.code()),
                (404, "account_not_found".to_string()),
                "{strategy}, {why}: {}",
                String::from_utf8_lossy(&r.body)
            );
        }
        // The existing pair still works, and 409 / 422 stay what they were.
        let r = transfer(api, &ta, strategy, a, b, 1_000).await;
        assert_eq!(
            (r.status, r.code()),
            (409, "insufficient_funds".to_string()),
            "{strategy}"
        );
        let r = transfer(api, &ta, strategy, a, a, 1).await;
        assert_eq!(
            (r.status, r.code()),
            (422, "same_account".to_string()),
            "{strategy}"
        );
        let r = transfer(api, &ta, strategy, a, b, 1).await;
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

    // Limits on both sides, for every strategy: `full` sits at 10^15 minus 5.
    const MAX: i64 = 1_000_000_000_000_000;
    for strategy in strategies {
        let (full, _) = api.account("full", MAX - 5).await;
        let (poor, tp) = api.account("poor", 10).await;
        let (spare, _) = api.account("spare", 0).await;
        for (to, amount, want, why) in [
            (
                full,
                20,
                (422, "invalid_value"),
                "over the top and insufficient: 422 before 409",
            ),
            (full, 6, (422, "invalid_value"), "one over the top"),
            (
                spare,
                11,
                (409, "insufficient_funds"),
                "one more than the balance",
            ),
        ] {
            let r = transfer(api, &tp, strategy, poor, to, amount).await;
            assert_eq!(
                (r.status, r.code()),
                (want.0, want.1.to_string()),
                "{strategy}, {why}: {}",
                String::from_utf8_lossy(&r.body)
            );
        }
        assert_eq!(api.balance(full).await, MAX - 5, "{strategy}");
        assert_eq!(api.balance(poor).await, 10, "{strategy}");
        let r = transfer(api, &tp, strategy, poor, full, 5).await;
        assert_eq!(r.status, 201, "{strategy}: exactly to 10^15");
        let r = transfer(api, &tp, strategy, poor, spare, 5).await;
        assert_eq!(r.status, 201, "{strategy}: exactly to 0");
        assert_eq!(api.balance(full).await, MAX, "{strategy}");
        assert_eq!(api.balance(poor).await, 0, "{strategy}");
    }
    let audit = api.audit().await;
    assert_eq!(audit["consistent"], true, "{audit}");
    server.stop().await;
    db.drop_db().await;
}

on_backends!(transfer_to_missing_account => missing_to);
