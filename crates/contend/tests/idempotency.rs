//! The idempotency key store on every backend: concurrent claims of one key have exactly one
//! winner (and a check-then-insert store under the same race has several), an expired lease is
//! taken over and its old owner can no longer complete, and an outcome stored inside a business
//! transaction rolls back with it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestDb;
use contend::idempotency::{Claim, Fingerprint, InvalidInput, Key, Outcome, Store, is_key_lost};
use tokio::sync::Barrier;

/// Racing claimants per test.
const RACERS: usize = 8;

async fn store_for(db: &TestDb) -> Store {
    let table = common::table("idem");
    let store = Store::new(db.db.clone()).table(&table).expect("table name");
    store.ensure_schema().await.expect("schema");
    store
}

/// Drops the store's table, then what the harness created.
async fn finish(db: TestDb, store: &Store) {
    let _ = db
        .db
        .execute_script(&format!("DROP TABLE IF EXISTS {}", store.table_name()))
        .await;
    db.cleanup().await;
}

fn fp(body: &str) -> Fingerprint {
    Fingerprint::request("POST", "/orders", body.as_bytes())
}

/// All racers pass a barrier, then claim the same key at once: exactly one wins, the others see
/// it in flight. The primary key decides: the losers' INSERTs fail with a unique violation, so
/// there is no window between a check and an insert for a second winner to slip through.
async fn one_winner_among_concurrent_claims(db: TestDb) {
    let store = store_for(&db).await;
    for round in 0..5 {
        let key = Key::new("caller", format!("race-{round}")).unwrap();
        let barrier = Arc::new(Barrier::new(RACERS));
        let mut tasks = Vec::new();
        for _ in 0..RACERS {
            let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                store.claim(&key, &fp("{}")).await.expect("claim")
            }));
        }
        let mut winners = 0;
        for t in tasks {
            match t.await.unwrap() {
                Claim::Claimed(_) => winners += 1,
                Claim::InFlight { lease_left } => assert!(lease_left > Duration::ZERO),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(winners, 1, "round {round}: exactly one claim must win");
    }
    finish(db, &store).await;
}

/// The baseline: a store that checks for the key and then inserts it (no primary key to stop a
/// second insert) lets every racer that checked before the first insert win. The barrier
/// between check and insert makes that interleaving happen every time; without it, it happens
/// only sometimes, which is the bug.
async fn check_then_insert_baseline_has_many_winners(mut db: TestDb) {
    let table = db
        .create_table(
            "idem_naive",
            "scope VARCHAR(64) NOT NULL, idem_key VARCHAR(255) NOT NULL",
        )
        .await;
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for _ in 0..RACERS {
        let (db, table, barrier) = (db.db.clone(), table.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let seen: i64 = db
                .query_scalar(&format!(
                    "SELECT COUNT(*) FROM {table} WHERE scope = 'caller' AND idem_key = 'k'"
                ))
                .fetch_one(db.pool())
                .await
                .expect("check");
            barrier.wait().await;
            if seen > 0 {
                return false;
            }
            db.query(&format!(
                "INSERT INTO {table} (scope, idem_key) VALUES ('caller', 'k')"
            ))
            .execute(db.pool())
            .await
            .expect("insert");
            true
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert!(
        winners > 1,
        "check-then-insert must let several racers win ({winners})"
    );
    assert_eq!(db.count(&table).await, i64::try_from(winners).unwrap());
    db.cleanup().await;
}

/// A claim whose lease expired is taken over by the next claim of the same request; the old
/// owner then can neither complete the key in its transaction (which rolls back) nor release
/// it, and the new owner's outcome is the one replayed.
async fn expired_lease_is_taken_over(mut db: TestDb) {
    let store = store_for(&db).await.lease(Duration::from_millis(200));
    let business = db.create_table("idem_orders", "id BIGINT NOT NULL").await;
    let key = Key::new("caller", "slow").unwrap();
    let Claim::Claimed(old) = store.claim(&key, &fp("{}")).await.unwrap() else {
        panic!("first claim must win");
    };
    assert!(matches!(
        store.claim(&key, &fp("{}")).await.unwrap(),
        Claim::InFlight { .. }
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Claim::Claimed(new) = store.claim(&key, &fp("{}")).await.unwrap() else {
        panic!("an expired lease must be taken over");
    };

    let insert = format!("INSERT INTO {business} (id) VALUES (1)");
    let outcome = Outcome::new(201, b"{\"by\":\"old\"}".to_vec()).unwrap();
    let (o, sql) = (old.clone(), insert.clone());
    let late = db
        .db
        .transaction(move |tx| {
            let (o, outcome, sql) = (o.clone(), outcome.clone(), sql.clone());
            Box::pin(async move {
                tx.query(&sql).execute(tx.conn()).await?;
                o.complete_in(tx, &outcome).await
            })
        })
        .await;
    let err = late.expect_err("the old owner must not complete");
    assert!(is_key_lost(&err), "{err}");
    assert_eq!(
        db.count(&business).await,
        0,
        "its business write rolled back"
    );
    assert!(!store.release(&old).await.unwrap(), "nor release");
    let theirs = Outcome::new(200, b"{\"by\":\"old\"}".to_vec()).unwrap();
    assert!(
        !store.complete(&old, &theirs).await.unwrap(),
        "nor complete later"
    );

    let mine = Outcome::new(201, b"{\"by\":\"new\"}".to_vec()).unwrap();
    let (n, m) = (new.clone(), mine.clone());
    db.db
        .transaction(move |tx| {
            let (n, m, sql) = (n.clone(), m.clone(), insert.clone());
            Box::pin(async move {
                tx.query(&sql).execute(tx.conn()).await?;
                n.complete_in(tx, &m).await
            })
        })
        .await
        .expect("the new owner completes");
    assert_eq!(db.count(&business).await, 1);
    match store.claim(&key, &fp("{}")).await.unwrap() {
        Claim::Completed(o) => assert_eq!(o, mine),
        other => panic!("expected the new owner's outcome, got {other:?}"),
    }
    finish(db, &store).await;
}

/// The outcome stored inside a business transaction is part of it: when the transaction rolls
/// back, the key stays in flight (no outcome, nothing replayed), and the same owner can still
/// complete it afterwards; when it commits, the outcome is there and is never overwritten.
async fn outcome_rolls_back_with_the_transaction(mut db: TestDb) {
    let store = store_for(&db).await;
    let business = db.create_table("idem_orders", "id BIGINT NOT NULL").await;
    let key = Key::new("caller", "order-1").unwrap();
    let Claim::Claimed(claimed) = store.claim(&key, &fp("a")).await.unwrap() else {
        panic!("claim");
    };
    let ok = Outcome::new(201, "{\"id\":1,\"note\":\"é\"}".as_bytes().to_vec()).unwrap();
    let insert = format!("INSERT INTO {business} (id) VALUES (1)");
    let (c, o, sql) = (claimed.clone(), ok.clone(), insert.clone());
    let failed: contend::Result<()> = db
        .db
        .transaction(move |tx| {
            let (c, o, sql) = (c.clone(), o.clone(), sql.clone());
            Box::pin(async move {
                tx.query(&sql).execute(tx.conn()).await?;
                c.complete_in(tx, &o).await?;
                Err(contend::Error::aborted(
                    "the business decided to fail after storing",
                ))
            })
        })
        .await;
    assert!(failed.is_err());
    assert_eq!(db.count(&business).await, 0);
    assert!(
        matches!(
            store.claim(&key, &fp("a")).await.unwrap(),
            Claim::InFlight { .. }
        ),
        "the stored outcome must roll back with the transaction"
    );

    // The failure is stored afterwards (a business error that must be remembered).
    let refused = Outcome::new(409, b"{\"error\":\"sold out\"}".to_vec()).unwrap();
    assert!(store.complete(&claimed, &refused).await.unwrap());
    match store.claim(&key, &fp("a")).await.unwrap() {
        Claim::Completed(o) => assert_eq!(o, refused),
        other => panic!("expected the stored 409, got {other:?}"),
    }

    // Committed: stored with the write, replayed byte for byte, never overwritten or released.
    let key2 = Key::new("caller", "order-2").unwrap();
    let Claim::Claimed(c2) = store.claim(&key2, &fp("b")).await.unwrap() else {
        panic!("claim");
    };
    let (c, o) = (c2.clone(), ok.clone());
    db.db
        .transaction(move |tx| {
            let (c, o, sql) = (c.clone(), o.clone(), insert.clone());
            Box::pin(async move {
                tx.query(&sql).execute(tx.conn()).await?;
                c.complete_in(tx, &o).await
            })
        })
        .await
        .expect("commit");
    assert_eq!(db.count(&business).await, 1);
    assert!(!store.complete(&c2, &refused).await.unwrap());
    assert!(!store.release(&c2).await.unwrap());
    match store.claim(&key2, &fp("b")).await.unwrap() {
        Claim::Completed(o) => assert_eq!(o.body(), ok.body()),
        other => panic!("expected the committed outcome, got {other:?}"),
    }
    finish(db, &store).await;
}

/// Another fingerprint under a used key is refused; a released key can be claimed again; keys
/// are scoped; bad input is refused before any SQL.
async fn mismatch_release_and_scopes(db: TestDb) {
    let store = store_for(&db).await;
    let key = Key::new("alice", "k").unwrap();
    let Claim::Claimed(first) = store.claim(&key, &fp("a")).await.unwrap() else {
        panic!("claim");
    };
    assert!(matches!(
        store.claim(&key, &fp("b")).await.unwrap(),
        Claim::Mismatch
    ));
    // Same key, another caller: its own key.
    let bobs = Key::new("bob", "k").unwrap();
    assert!(matches!(
        store.claim(&bobs, &fp("b")).await.unwrap(),
        Claim::Claimed(_)
    ));
    // Released: usable again, even for another request.
    assert!(store.release(&first).await.unwrap());
    assert!(matches!(
        store.claim(&key, &fp("b")).await.unwrap(),
        Claim::Claimed(_)
    ));
    // Keys differing in case or trailing spaces are different keys.
    for k in ["K", "k "] {
        let other = Key::new("alice", k).unwrap();
        assert!(
            matches!(
                store.claim(&other, &fp("b")).await.unwrap(),
                Claim::Claimed(_)
            ),
            "`{k}` must be its own key"
        );
    }
    finish(db, &store).await;
}

on_backends!(
    one_winner_among_concurrent_claims,
    check_then_insert_baseline_has_many_winners,
    expired_lease_is_taken_over,
    outcome_rolls_back_with_the_transaction,
    mismatch_release_and_scopes,
);

#[test]
fn bad_input_is_refused() {
    assert_eq!(Key::new("s", "").unwrap_err(), InvalidInput::Key);
    assert_eq!(
        Key::new("s", "x".repeat(256)).unwrap_err(),
        InvalidInput::Key
    );
    assert_eq!(Key::new("s", "tab\there").unwrap_err(), InvalidInput::Key);
    assert_eq!(Key::new("s", "é").unwrap_err(), InvalidInput::Key);
    assert!(Key::new("s", "x".repeat(255)).is_ok());
    assert_eq!(
        Key::new("s".repeat(65), "k").unwrap_err(),
        InvalidInput::Scope
    );
    assert_eq!(
        Outcome::new(200, vec![0xff, 0xfe]).unwrap_err(),
        InvalidInput::BodyNotUtf8
    );
    let db_free = |name: &str| {
        // A table name is checked before anything touches a database.
        matches!(validate_table(name), Err(InvalidInput::Table(_)))
    };
    assert!(db_free("keys; DROP TABLE x"));
    assert!(db_free("1keys"));
    assert!(db_free(""));
    assert!(!db_free("my_keys_2"));
}

fn validate_table(name: &str) -> Result<(), InvalidInput> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = contend::Db::connect("sqlite::memory:").await.unwrap();
        Store::new(db).table(name).map(|_| ())
    })
}
