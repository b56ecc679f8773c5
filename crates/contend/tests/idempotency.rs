//! The idempotency key store on every backend: concurrent claims of one key have exactly one
//! winner (and a check-then-insert store under the same race has several), an expired lease is
//! taken over and its old owner can no longer complete, and an outcome stored inside a business
//! transaction rolls back with it. The same on the application's own typed pools
//! (`Db::from_pool` of a `SqlitePool`, a `PgPool`, a `MySqlPool`), with the business write made
//! with sqlx on the database's own connection in the same `Tx<DB>` that stores the outcome.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestDb, on_backends};
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

/// `RACERS` tasks pass a barrier and claim the same key at once, five rounds: exactly one claim
/// wins each round, the others see the key in flight.
async fn assert_one_winner<DB: contend::Database>(store: &Store<DB>) {
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
}

/// All racers pass a barrier, then claim the same key at once: exactly one wins, the others see
/// it in flight. The primary key decides: the losers' INSERTs fail with a unique violation, so
/// there is no window between a check and an insert for a second winner to slip through.
async fn one_winner_among_concurrent_claims(db: TestDb) {
    let store = store_for(&db).await;
    assert_one_winner(&store).await;
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
    // So are scopes (callers) differing in case or trailing spaces: none sees another's key.
    for scope in ["Alice", "alice "] {
        let theirs = Key::new(scope, "k").unwrap();
        assert!(
            matches!(
                store.claim(&theirs, &fp("c")).await.unwrap(),
                Claim::Claimed(_)
            ),
            "`{scope}` must be its own scope"
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

/// The store on the application's own typed pools, wrapped with `Db::from_pool`: claims race
/// on the primary key as on `Any`, and the outcome is stored inside the application's
/// `Tx<sqlx::Postgres>` (or `Sqlite`, `MySql`) beside a business write made with plain sqlx on
/// `tx.conn()`, the database's own connection.
mod typed {
    use super::*;
    use contend::{Backend, Database, Db, Error};
    use sqlx::AssertSqlSafe;

    /// A `Db<sqlx::Sqlite>` on a file (so that several connections race), WAL as contend's own
    /// SQLite pools, and the URL of the same file for an `Any` handle beside it.
    async fn sqlite() -> (Db<sqlx::Sqlite>, String, tempfile::TempDir) {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("typed.db");
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(RACERS as u32)
            .connect_with(options)
            .await
            .expect("sqlite pool");
        let db = Db::from_pool(pool).expect("typed db");
        (db, format!("sqlite:{}", path.display()), dir)
    }

    async fn postgres() -> Option<(Db<sqlx::Postgres>, String)> {
        let url = common::server_url(Backend::Postgres)?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(RACERS as u32)
            .connect(&url)
            .await
            .expect("PgPool");
        Some((Db::from_pool(pool).expect("typed db"), url))
    }

    async fn mysql() -> Option<(Db<sqlx::MySql>, String)> {
        let url = common::server_url(Backend::MySql)?;
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(RACERS as u32)
            .connect(&url)
            .await
            .expect("MySqlPool");
        Some((Db::from_pool(pool).expect("typed db"), url))
    }

    async fn typed_store<DB: Database>(db: &Db<DB>) -> Store<DB> {
        let store = Store::new(db.clone())
            .table(&common::table("idem_typed"))
            .expect("table name");
        store.ensure_schema().await.expect("schema");
        store
    }

    async fn drop_table<DB: Database>(db: &Db<DB>, table: &str) {
        let _ = db
            .execute_script(&format!("DROP TABLE IF EXISTS {table}"))
            .await;
    }

    async fn count<DB: Database>(db: &Db<DB>, table: &str) -> i64 {
        let mut conn = db.acquire().await.expect("connection");
        let sql = format!("SELECT COUNT(*) FROM {table}");
        DB::fetch_i64(&mut conn, db.backend(), &sql, &[])
            .await
            .expect("count")
            .expect("a row")
    }

    /// Concurrent claims of one key on a typed pool: exactly one winner per round (the
    /// check-then-insert baseline above shows several winners under the same race).
    async fn one_winner<DB: Database>(db: Db<DB>) {
        let store = typed_store(&db).await;
        super::assert_one_winner(&store).await;
        drop_table(&db, store.table_name()).await;
    }

    /// The business write: plain sqlx on the transaction's own connection (`&mut PgConnection`
    /// in a `Tx<sqlx::Postgres>`).
    async fn write<DB>(tx: &mut contend::Tx<DB>, sql: &str, id: i64) -> Result<(), sqlx::Error>
    where
        DB: Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        DB::Arguments: sqlx::IntoArguments<DB>,
        i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    {
        sqlx::query::<DB>(AssertSqlSafe(sql.to_string()))
            .bind(id)
            .execute(tx.conn())
            .await
            .map(|_| ())
    }

    /// The outcome stored with `complete_in` in a typed `Tx<DB>` commits and rolls back with a
    /// business write made by plain sqlx on `tx.conn()`; a key claimed through an `Any` handle
    /// on the same database is completed in the typed transaction alike.
    async fn stored_in_typed_tx<DB>(db: Db<DB>, any_url: &str)
    where
        DB: Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        DB::Arguments: sqlx::IntoArguments<DB>,
        i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    {
        let store = typed_store(&db).await;
        let business = common::table("idem_typed_orders");
        let options = db.backend().dialect().table_options();
        db.execute_script(&format!(
            "CREATE TABLE {business} (id BIGINT NOT NULL){options}"
        ))
        .await
        .expect("business table");
        let insert = db
            .backend()
            .sql(&format!("INSERT INTO {business} (id) VALUES (?)"))
            .into_owned();

        // Rolled back: neither the write nor the outcome is kept; the key stays in flight.
        let key = Key::new("caller", "order-1").unwrap();
        let Claim::Claimed(claimed) = store.claim(&key, &fp("a")).await.unwrap() else {
            panic!("claim");
        };
        let ok = Outcome::new(201, "{\"id\":7,\"note\":\"é\"}".as_bytes().to_vec()).unwrap();
        let (c, o, sql) = (claimed.clone(), ok.clone(), insert.clone());
        let failed: contend::Result<()> = db
            .transaction(|tx| {
                Box::pin(async move {
                    write(tx, &sql, 7).await?;
                    c.complete_in(tx, &o).await?;
                    Err(Error::aborted("the business failed after storing"))
                })
            })
            .await;
        assert!(failed.is_err());
        assert_eq!(count(&db, &business).await, 0);
        assert!(matches!(
            store.claim(&key, &fp("a")).await.unwrap(),
            Claim::InFlight { .. }
        ));

        // Committed: the write and the outcome together; replayed byte for byte.
        let (c, o, sql) = (claimed.clone(), ok.clone(), insert.clone());
        db.transaction(|tx| {
            Box::pin(async move {
                write(tx, &sql, 7).await?;
                c.complete_in(tx, &o).await
            })
        })
        .await
        .expect("commit");
        assert_eq!(count(&db, &business).await, 1);
        match store.claim(&key, &fp("a")).await.unwrap() {
            Claim::Completed(o) => assert_eq!(o, ok),
            other => panic!("expected the committed outcome, got {other:?}"),
        }
        assert!(!store.release(&claimed).await.unwrap(), "never released");

        // A key claimed through an `Any` handle on the same database and table, completed in
        // the typed transaction.
        let any = Db::connect(any_url).await.expect("Any handle");
        let any_store = Store::new(any.clone())
            .table(store.table_name())
            .expect("table");
        let key2 = Key::new("caller", "order-2").unwrap();
        let Claim::Claimed(c2) = any_store.claim(&key2, &fp("b")).await.unwrap() else {
            panic!("claim");
        };
        let o2 = Outcome::new(201, b"{\"id\":8}".to_vec()).unwrap();
        let (c, o) = (c2.clone(), o2.clone());
        db.transaction(|tx| {
            Box::pin(async move {
                write(tx, &insert, 8).await?;
                c.complete_in(tx, &o).await
            })
        })
        .await
        .expect("commit");
        match store.claim(&key2, &fp("b")).await.unwrap() {
            Claim::Completed(o) => assert_eq!(o, o2),
            other => panic!("expected the committed outcome, got {other:?}"),
        }
        any.pool().close().await;
        drop_table(&db, &business).await;
        drop_table(&db, store.table_name()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_pool_one_winner() {
        let (db, _, _dir) = sqlite().await;
        one_winner(db).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_pool_stored_in_tx() {
        let (db, url, _dir) = sqlite().await;
        stored_in_typed_tx(db, &url).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg_pool_one_winner() {
        if let Some((db, _)) = postgres().await {
            one_winner(db).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg_pool_stored_in_tx() {
        if let Some((db, url)) = postgres().await {
            stored_in_typed_tx(db, &url).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_pool_one_winner() {
        if let Some((db, _)) = mysql().await {
            one_winner(db).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_pool_stored_in_tx() {
        if let Some((db, url)) = mysql().await {
            stored_in_typed_tx(db, &url).await;
        }
    }

    /// A key claimed in a store on one backend cannot be completed in a transaction on another:
    /// a clear error, and the transaction (with its business write) rolls back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_backend_is_refused() {
        let Some((pg, _)) = postgres().await else {
            return;
        };
        let (lite, _, _dir) = sqlite().await;
        let store = typed_store(&lite).await;
        let key = Key::new("caller", "k").unwrap();
        let Claim::Claimed(claimed) = store.claim(&key, &fp("a")).await.unwrap() else {
            panic!("claim");
        };
        let business = common::table("idem_typed_other");
        pg.execute_script(&format!("CREATE TABLE {business} (id BIGINT NOT NULL)"))
            .await
            .unwrap();
        let sql = format!("INSERT INTO {business} (id) VALUES ($1)");
        let outcome = Outcome::new(201, b"{}".to_vec()).unwrap();
        let err = pg
            .transaction(|tx| {
                Box::pin(async move {
                    let conn: &mut sqlx::PgConnection = tx.conn();
                    sqlx::query(AssertSqlSafe(sql))
                        .bind(1_i64)
                        .execute(conn)
                        .await?;
                    claimed.complete_in(tx, &outcome).await
                })
            })
            .await
            .expect_err("another backend's transaction");
        let expected = InvalidInput::OtherBackend {
            store: Backend::Sqlite,
            tx: Backend::Postgres,
        };
        assert!(
            matches!(&err, Error::Aborted(inner) if inner.downcast_ref::<InvalidInput>() == Some(&expected)),
            "{err}"
        );
        assert_eq!(count(&pg, &business).await, 0, "rolled back");
        assert!(matches!(
            store.claim(&key, &fp("a")).await.unwrap(),
            Claim::InFlight { .. }
        ));
        drop_table(&pg, &business).await;
    }
}
