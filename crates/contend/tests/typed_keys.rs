//! The building blocks (`atomic::Counter`, `pessimistic::LockTarget`, `optimistic::Versioned`,
//! `get_or_create::GetOrCreate`) on the application's own typed pool with its own key type:
//! a `PgPool` with `uuid::Uuid` keys (when `CONTEND_PG_URL` is set) and a `SqlitePool` with
//! `i64` keys (always). Under 16 concurrent tasks each keeps its invariant; the versioned
//! increment is set against the same read followed by an unchecked write, which loses updates.

mod common;

use std::sync::Arc;
use std::time::Duration;

use contend::strategy::BlockDatabase;
use contend::strategy::Value;
use contend::strategy::atomic::Counter;
use contend::strategy::get_or_create::{GetOrCreate, Method};
use contend::strategy::optimistic::{self, Versioned};
use contend::strategy::pessimistic::LockTarget;
use contend::{Db, RowLock, TxOptions};

const TASKS: usize = 16;
const PER_TASK: i64 = 10;

/// The suite for one typed database `$db` (a `Db<$db>` made by `$open`) and key type `$key`
/// (three distinct keys from `$keys`), with the column type `$key_sql` and the id column
/// definition `$serial` of a table with a generated id.
macro_rules! typed_suite {
    ($name:ident, $db:ty, $key:ty, $open:expr, $keys:expr, $key_sql:expr, $serial:expr) => {
        mod $name {
            use super::*;

            type D = $db;

            async fn open() -> Option<Db<D>> {
                $open.await
            }

            fn keys() -> [$key; 3] {
                $keys
            }

            fn table(base: &str) -> String {
                common::table(base)
            }

            /// A table of accounts `(id KEY, n BIGINT, version BIGINT)` with `keys` at `n`.
            async fn accounts(db: &Db<D>, keys: &[$key], n: i64) -> String {
                let t = table("typed");
                db.execute_script(&format!(
                    "CREATE TABLE {t} (id {} PRIMARY KEY, n BIGINT NOT NULL, \
                     version BIGINT NOT NULL)",
                    $key_sql
                ))
                .await
                .unwrap();
                for key in keys {
                    let sql = db
                        .backend()
                        .sql(&format!("INSERT INTO {t} VALUES (?, ?, 0)"))
                        .into_owned();
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(key.clone())
                        .bind(n)
                        .execute(db.pool())
                        .await
                        .unwrap();
                }
                t
            }

            async fn n_of(db: &Db<D>, t: &str, key: &$key) -> i64 {
                let sql = db
                    .backend()
                    .sql(&format!("SELECT n FROM {t} WHERE id = ?"))
                    .into_owned();
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(key.clone())
                    .fetch_one(db.pool())
                    .await
                    .unwrap()
            }

            /// `Counter::try_sub_now` and `try_sub` with typed keys: of 160 concurrent
            /// withdrawals of 1 from 100, exactly 100 apply and the balance ends at 0.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn counter_never_overdraws() {
                let Some(db) = open().await else { return };
                let [key, ..] = keys();
                let t = accounts(&db, std::slice::from_ref(&key), 100).await;
                let counter = Counter::new(&t, "id", "n").unwrap();
                let mut tasks = Vec::new();
                for task in 0..TASKS {
                    let (db, counter, key) = (db.clone(), counter.clone(), key.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut applied = 0;
                        for i in 0..PER_TASK {
                            let ok = if (task as i64 + i) % 2 == 0 {
                                counter.try_sub_now(&db, key.clone(), 1).await.unwrap()
                            } else {
                                let (counter, key) = (counter.clone(), key.clone());
                                let left = db
                                    .transaction(|tx| {
                                        Box::pin(async move { counter.try_sub(tx, key, 1).await })
                                    })
                                    .await
                                    .unwrap();
                                if let Some(left) = left {
                                    assert!(left >= 0, "went below zero: {left}");
                                }
                                left.is_some()
                            };
                            applied += i64::from(ok);
                        }
                        applied
                    }));
                }
                let mut applied = 0;
                for task in tasks {
                    applied += task.await.unwrap();
                }
                assert_eq!(applied, 100);
                assert_eq!(n_of(&db, &t, &key).await, 0);
            }

            /// One increment: read the version (= n), then write n + 1, checked (`Versioned`,
            /// retried on version conflicts) or unchecked (the lost update).
            async fn increment(db: &Db<D>, t: &str, key: $key, checked: bool) {
                let versioned = Versioned::new(t, "id", "version").unwrap();
                let options = if checked {
                    optimistic::options()
                } else {
                    TxOptions::new()
                };
                if checked {
                    db.transaction_with(&options, |tx| {
                        let (versioned, key) = (versioned.clone(), key.clone());
                        Box::pin(async move {
                            let v = versioned.version(tx, key.clone()).await?.expect("row");
                            tokio::task::yield_now().await;
                            versioned
                                .update(tx, key, v, &[("n", Value::Int(v + 1))])
                                .await
                        })
                    })
                    .await
                    .unwrap();
                    return;
                }
                // Unchecked: the read in one transaction, the write in another.
                let k = key.clone();
                let v = db
                    .transaction(|tx| Box::pin(async move { versioned.version(tx, k).await }))
                    .await
                    .unwrap()
                    .expect("row");
                tokio::task::yield_now().await;
                let sql = format!("UPDATE {t} SET n = ?, version = ? WHERE id = ?");
                db.transaction(|tx| {
                    Box::pin(async move {
                        let q = tx.query(&sql);
                        let q = D::bind_value(q, &Value::Int(v + 1));
                        let q = D::bind_value(q, &Value::Int(v + 1)).bind(key);
                        D::execute_query(tx.conn(), q).await?;
                        Ok::<_, contend::Error>(())
                    })
                })
                .await
                .unwrap();
            }

            async fn increments(db: &Db<D>, checked: bool) -> i64 {
                let [key, ..] = keys();
                let t = Arc::new(accounts(db, std::slice::from_ref(&key), 0).await);
                let mut tasks = Vec::new();
                for _ in 0..TASKS {
                    let (db, t, key) = (db.clone(), t.clone(), key.clone());
                    tasks.push(tokio::spawn(async move {
                        for _ in 0..PER_TASK {
                            increment(&db, &t, key.clone(), checked).await;
                        }
                    }));
                }
                for task in tasks {
                    tokio::time::timeout(Duration::from_secs(120), task)
                        .await
                        .expect("an increment hung")
                        .unwrap();
                }
                n_of(db, &t, &key).await
            }

            /// `Versioned` with typed keys keeps every concurrent increment; the same read with
            /// an unchecked write loses some (in at least one of 3 runs).
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn versioned_keeps_increments_unchecked_loses_them() {
                let Some(db) = open().await else { return };
                let total = TASKS as i64 * PER_TASK;
                assert_eq!(increments(&db, true).await, total);
                let mut lost = false;
                for _ in 0..3 {
                    if increments(&db, false).await < total {
                        lost = true;
                        break;
                    }
                }
                assert!(
                    lost,
                    "the unchecked write lost no update in 3 runs: the test cannot tell"
                );
            }

            /// `LockTarget::lock_many` with typed keys: transfers in both directions between
            /// three accounts, from 16 tasks, lock in key order: the total is conserved and no
            /// transfer fails (no deadlock).
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lock_many_transfers_conserve_money() {
                let Some(db) = open().await else { return };
                let keys = keys();
                let t = accounts(&db, &keys, 1_000).await;
                let target = LockTarget::new(&t, "id", &["n"]).unwrap();
                let counter = Counter::new(&t, "id", "n").unwrap();
                let mut tasks = Vec::new();
                for task in 0..TASKS {
                    let (db, target, counter, keys) =
                        (db.clone(), target.clone(), counter.clone(), keys.clone());
                    tasks.push(tokio::spawn(async move {
                        for i in 0..PER_TASK as usize {
                            let from = keys[(task + i) % 3].clone();
                            let to = keys[(task + i + 1 + task % 2) % 3].clone();
                            let (target, counter) = (target.clone(), counter.clone());
                            let options = TxOptions::new().lock_timeout(Duration::from_secs(10));
                            db.transaction_with(&options, move |tx| {
                                let (target, counter) = (target.clone(), counter.clone());
                                let (from, to) = (from.clone(), to.clone());
                                Box::pin(async move {
                                    let rows = target
                                        .lock_many(tx, &[to.clone(), from.clone()], RowLock::Update)
                                        .await?;
                                    assert_eq!(rows.len(), 2);
                                    let mut sorted = [from.clone(), to.clone()];
                                    sorted.sort();
                                    assert_eq!(rows[0].0, sorted[0], "locked in key order");
                                    let balance = rows
                                        .iter()
                                        .find(|(k, _)| *k == from)
                                        .map(|(_, row)| D::get_i64(row, 0))
                                        .expect("from row")?;
                                    if balance >= 7 {
                                        counter.add(tx, from, -7).await?;
                                        counter.add(tx, to, 7).await?;
                                    }
                                    Ok::<_, contend::Error>(())
                                })
                            })
                            .await
                            .unwrap();
                        }
                    }));
                }
                for task in tasks {
                    task.await.unwrap();
                }
                let mut total = 0;
                for key in &keys {
                    total += n_of(&db, &t, key).await;
                }
                assert_eq!(total, 3_000);
            }

            /// `GetOrCreate` with typed keys, autocommit and in a transaction, from 16 tasks:
            /// one row per key, and every caller gets that row's id.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn get_or_create_one_row_per_key() {
                let Some(db) = open().await else { return };
                let t = table("typed_goc");
                db.execute_script(&format!(
                    "CREATE TABLE {t} (id {}, k {} NOT NULL UNIQUE, uses BIGINT NOT NULL)",
                    $serial, $key_sql
                ))
                .await
                .unwrap();
                let goc = GetOrCreate::new(&t, "id", "k").unwrap();
                let keys = keys();
                let mut tasks = Vec::new();
                for task in 0..TASKS {
                    let (db, goc, keys) = (db.clone(), goc.clone(), keys.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut seen = Vec::new();
                        for i in 0..PER_TASK as usize {
                            let key = keys[(task + i) % 3].clone();
                            let defaults = [("uses", Value::Int(0))];
                            let found = match i % 3 {
                                0 => {
                                    goc.get_or_create(
                                        &db,
                                        key.clone(),
                                        &defaults,
                                        Method::OnConflict,
                                    )
                                    .await
                                }
                                1 => {
                                    goc.get_or_create(
                                        &db,
                                        key.clone(),
                                        &defaults,
                                        Method::CatchUnique,
                                    )
                                    .await
                                }
                                _ => {
                                    let (goc, k) = (goc.clone(), key.clone());
                                    db.transaction_with(
                                        &TxOptions::new().retry(contend::RetryPolicy::new()),
                                        move |tx| {
                                            let (goc, k) = (goc.clone(), k.clone());
                                            Box::pin(async move {
                                                goc.get_or_create_in(
                                                    tx,
                                                    k,
                                                    &[("uses", Value::Int(0))],
                                                    Method::CatchUnique,
                                                )
                                                .await
                                            })
                                        },
                                    )
                                    .await
                                }
                            };
                            seen.push((key, found.unwrap().id));
                        }
                        seen
                    }));
                }
                let mut ids = std::collections::BTreeMap::new();
                for task in tasks {
                    for (key, id) in task.await.unwrap() {
                        let first = *ids.entry(key.clone()).or_insert(id);
                        assert_eq!(first, id, "two ids for key {key:?}");
                    }
                }
                assert_eq!(ids.len(), 3);
                let rows: i64 =
                    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {t}")))
                        .fetch_one(db.pool())
                        .await
                        .unwrap();
                assert_eq!(rows, 3, "one row per key");
            }
        }
    };
}

typed_suite!(
    postgres_uuid,
    sqlx::Postgres,
    uuid::Uuid,
    async {
        let url = common::server_url(contend::Backend::Postgres)?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await
            .expect("connect to PostgreSQL");
        Some(Db::from_pool(pool).expect("Db from the PgPool"))
    },
    [
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4()
    ],
    "UUID",
    "BIGSERIAL PRIMARY KEY"
);

typed_suite!(
    sqlite_i64,
    sqlx::Sqlite,
    i64,
    async {
        let dir = Box::leak(Box::new(tempfile::tempdir().expect("temporary folder")));
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("typed.db"))
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("open SQLite");
        Some(Db::from_pool(pool).expect("Db from the SqlitePool"))
    },
    [3_i64, 1, 2],
    "BIGINT",
    "INTEGER PRIMARY KEY"
);
