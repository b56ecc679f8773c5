//! Crash windows and overflow: an idempotent request's outcome commits in its business
//! transaction (so a crash after the commit cannot let it run twice, and a request that lost
//! its key cannot commit), and `/audit` sums balances beyond the range of i64 exactly.

mod common;

use std::time::Duration;

use common::{ADMIN, Kind, Server, TestDb};
use contend_test_support::on_backends;
use serde_json::json;
use sqlx::Row;

/// 9,300 accounts of 10^15 each: 9.3 * 10^18, beyond i64::MAX (9.22 * 10^18).
const BIG_ACCOUNTS: i64 = 9_300;
const BIG_BALANCE: i64 = 1_000_000_000_000_000;

async fn audit_beyond_i64(kind: Kind) {
    let db = TestDb::new(kind).await;
    let server = Server::start(&db.url, common::Options::default()).await;
    let api = server.api();
    let (a, _) = api.account("small", 5).await;
    // One INSERT each for the accounts and their opening ledger rows (the API would take long).
    let rows = match kind {
        Kind::Postgres => format!("SELECT i FROM generate_series(1, {BIG_ACCOUNTS}) AS g(i)"),
        _ => format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {BIG_ACCOUNTS}) \
             SELECT i FROM n"
        ),
    };
    let direct = contend::Db::connect(&db.url).await.expect("connect");
    let hash = match kind {
        Kind::Sqlite => "'big-hash-' || i",
        _ => "CONCAT('big-hash-', i)",
    };
    direct
        .execute_script(&format!(
            "INSERT INTO accounts (owner, balance, version, token_hash) \
             SELECT 'big', {BIG_BALANCE}, 0, {hash} FROM ({rows}) r"
        ))
        .await
        .expect("insert accounts");
    direct
        .execute_script(
            "INSERT INTO ledger (account_id, amount, kind, ref_id) \
             SELECT id, balance, 'open', NULL FROM accounts WHERE owner = 'big'",
        )
        .await
        .expect("insert ledger");
    direct.pool().close().await;

    let r = api.get("/audit", Some(ADMIN)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let audit = r.json();
    let want = u64::try_from(BIG_ACCOUNTS * (BIG_BALANCE / 1000)).unwrap() * 1000 + 5;
    assert!(want > i64::MAX as u64, "the test must exceed i64");
    assert_eq!(audit["total_balance"].as_u64(), Some(want), "{audit}");
    assert_eq!(
        audit["expected_total_balance"].as_u64(),
        Some(want),
        "{audit}"
    );
    assert_eq!(
        audit["accounts"].as_i64(),
        Some(BIG_ACCOUNTS + 1),
        "{audit}"
    );
    assert_eq!(audit["consistent"], true, "{audit}");

    // And it still notices a difference: a withdrawal written around the ledger.
    let direct = contend::Db::connect(&db.url).await.expect("connect");
    direct
        .execute_script(&format!("UPDATE accounts SET balance = 4 WHERE id = {a}"))
        .await
        .expect("tamper");
    direct.pool().close().await;
    let audit = api.audit().await;
    assert_eq!(audit["total_balance"].as_u64(), Some(want - 1), "{audit}");
    assert_eq!(audit["ledger_mismatches"].as_i64(), Some(1), "{audit}");
    assert_eq!(audit["consistent"], false, "{audit}");
    server.stop().await;
    db.drop_db().await;
}

on_backends!(audit_sums_beyond_i64 => audit_beyond_i64 only [sqlite postgres]);

/// PostgreSQL: the key's outcome is written by the very transaction that writes the transfer
/// (same transaction id), not by a statement after it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_outcome_commits_with_the_write_postgres() {
    if !common::enabled(Kind::Postgres) {
        return;
    }
    let db = TestDb::new(Kind::Postgres).await;
    let server = Server::start(&db.url, common::Options::default()).await;
    let api = server.api();
    let (a, ta) = api.account("a", 100).await;
    let (b, _) = api.account("b", 0).await;
    let direct = contend::Db::connect(&db.url).await.expect("connect");
    direct
        .execute_script(
            "CREATE TABLE xid_log (what TEXT NOT NULL, xid BIGINT NOT NULL);
             CREATE FUNCTION log_transfer() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN INSERT INTO xid_log VALUES ('transfer', txid_current()); RETURN NEW; END $$;
             CREATE FUNCTION log_outcome() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 IF NEW.status_code IS NOT NULL AND OLD.status_code IS NULL THEN
                   INSERT INTO xid_log VALUES ('outcome', txid_current());
                 END IF;
                 RETURN NEW;
               END $$;
             CREATE TRIGGER t_transfer AFTER INSERT ON transfers FOR EACH ROW EXECUTE FUNCTION log_transfer();
             CREATE TRIGGER t_outcome AFTER UPDATE ON idempotency_keys FOR EACH ROW EXECUTE FUNCTION log_outcome();",
        )
        .await
        .expect("triggers");
    for strategy in [
        "atomic",
        "pessimistic",
        "optimistic",
        "serializable",
        "advisory",
    ] {
        direct
            .execute_script("DELETE FROM xid_log")
            .await
            .expect("clear");
        let key = format!("durable-{strategy}");
        let r = api
            .post_with(
                "/transfers",
                &ta,
                &[
                    ("Idempotency-Key", &key),
                    ("X-Concurrency-Strategy", strategy),
                ],
                json!({"from": a, "to": b, "amount": 1}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let rows = direct
            .query("SELECT what, xid FROM xid_log ORDER BY what")
            .fetch_all(direct.pool())
            .await
            .expect("xid_log");
        let log: Vec<(String, i64)> = rows
            .iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
            .collect();
        assert_eq!(log.len(), 2, "{strategy}: {log:?}");
        assert_eq!(log[0].0, "outcome");
        assert_eq!(log[1].0, "transfer");
        assert_eq!(
            log[0].1, log[1].1,
            "{strategy}: the outcome must commit in the transfer's transaction"
        );
        // And it replays.
        let again = api
            .post_with(
                "/transfers",
                &ta,
                &[
                    ("Idempotency-Key", &key),
                    ("X-Concurrency-Strategy", strategy),
                ],
                json!({"from": a, "to": b, "amount": 1}),
            )
            .await;
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        assert_eq!(again.body, r.body);
    }
    assert_eq!(api.balance(a).await, 95);
    direct.pool().close().await;
    server.stop().await;
    db.drop_db().await;
}

/// A request whose key was taken over while it waited (its lease expired and a retry claimed the
/// key) must not commit its write: the retry is the one that executes. Simulated by holding a
/// row lock on the paying account, moving the key to another owner meanwhile, then letting go.
async fn lost_key_cannot_commit(kind: Kind) {
    let db = TestDb::new(kind).await;
    let server = Server::start(&db.url, common::Options::default()).await;
    let api = server.api();
    let (a, ta) = api.account("a", 100).await;
    let (b, _) = api.account("b", 0).await;
    let direct = contend::Db::connect(&db.url).await.expect("connect");
    let mut holder = direct.acquire().await.expect("conn");
    let begin = if kind == Kind::Postgres {
        "BEGIN"
    } else {
        "START TRANSACTION"
    };
    sqlx::query(begin)
        .execute(&mut *holder)
        .await
        .expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT balance FROM accounts WHERE id = {a} FOR UPDATE"
    )))
    .fetch_one(&mut *holder)
    .await
    .expect("lock");

    let key = "lost-key";
    let request = tokio::spawn(async move {
        api.post_with(
            "/transfers",
            &ta,
            &[("Idempotency-Key", key)],
            json!({"from": a, "to": b, "amount": 10}),
        )
        .await
    });
    // Wait until the request has claimed its key (and is waiting for the row lock).
    let mut claimed = false;
    for _ in 0..100 {
        let n: i64 = direct
            .query_scalar("SELECT COUNT(*) FROM idempotency_keys WHERE idem_key = 'lost-key'")
            .fetch_one(direct.pool())
            .await
            .expect("count");
        if n == 1 {
            claimed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(claimed, "the request never claimed its key");
    tokio::time::sleep(Duration::from_millis(100)).await;
    direct
        .execute_script(
            "UPDATE idempotency_keys SET owner = 'taken-over-by-a-retry' WHERE idem_key = 'lost-key'",
        )
        .await
        .expect("take over");
    sqlx::query("COMMIT")
        .execute(&mut *holder)
        .await
        .expect("commit");
    drop(holder);

    let r = request.await.expect("request task");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.code(), "idempotency_key_lost");
    assert_eq!(api.balance(a).await, 100, "the write must not commit");
    assert_eq!(api.balance(b).await, 0);
    let row = direct
        .query("SELECT owner, status_code FROM idempotency_keys WHERE idem_key = 'lost-key'")
        .fetch_one(direct.pool())
        .await
        .expect("key row");
    assert_eq!(row.get::<String, _>(0), "taken-over-by-a-retry");
    assert_eq!(
        row.get::<Option<i64>, _>(1),
        None,
        "the new owner's key stays in flight"
    );
    assert_eq!(api.audit().await["consistent"], true);
    direct.pool().close().await;
    server.stop().await;
    db.drop_db().await;
}

on_backends!(lost_key_cannot_commit only [postgres mysql]);

/// Requests keep their connection between requests (warm sessions, see `ReqSession`). When the
/// server drops every connection (a restart, an idle kill), a request that meets a dead one
/// gets 503 with `Retry-After` (never a 500), and the instance recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_connections_are_killed_postgres() {
    if !common::enabled(Kind::Postgres) {
        return;
    }
    let db = TestDb::new(Kind::Postgres).await;
    let server = Server::start(&db.url, common::Options::default()).await;
    let api = server.api();
    let (a, ta) = api.account("a", 1_000).await;
    let (b, _) = api.account("b", 0).await;
    let transfer = || async {
        api.post("/transfers", &ta, json!({"from": a, "to": b, "amount": 1}))
            .await
    };
    let name = db.url.rsplit('/').next().unwrap().to_string();
    let kill = || async {
        let admin = contend::Db::connect(&std::env::var("CONTEND_PG_URL").unwrap())
            .await
            .expect("connect");
        admin
            .execute_script(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            ))
            .await
            .expect("terminate");
        admin.pool().close().await;
    };
    let warm_up = || async {
        let warm: Vec<_> = (0..8).map(|_| transfer()).collect();
        for r in futures_util::future::join_all(warm).await {
            assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        }
    };
    // Connections killed while idle for longer than the warm window: nobody notices.
    warm_up().await;
    kill().await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    for _ in 0..10 {
        let r = transfer().await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }
    // Killed right away: a request may meet a dead warm connection (503), never a 500.
    warm_up().await;
    kill().await;
    let (mut ok, mut unavailable) = (0, 0);
    for _ in 0..40 {
        let r = transfer().await;
        match r.status {
            201 => ok += 1,
            503 => {
                assert!(r.header("retry-after").is_some());
                unavailable += 1;
            }
            s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    assert!(
        ok >= 30,
        "did not recover: {ok} ok, {unavailable} unavailable"
    );
    assert_eq!(api.balance(b).await, 8 + 10 + 8 + ok);
    assert_eq!(api.audit().await["consistent"], true);
    server.stop().await;
    db.drop_db().await;
}
