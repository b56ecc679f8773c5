//! `IdempotencyLayer` on the application's own typed pools: a router whose state holds a
//! `Db<sqlx::Postgres>` (or `Sqlite`, `MySql`, each from `Db::from_pool`) and whose handler
//! writes with plain sqlx on `tx.conn()` (`&mut PgConnection`) and stores its outcome in the same
//! `Tx<sqlx::Postgres>`. Concurrent duplicates run once (the same router without the layer runs
//! every one of them), replays are byte for byte, and an outcome stored in a transaction that
//! rolls back is not kept (the key is released and the request may run again).
//!
//! SQLite always; PostgreSQL and MariaDB from `CONTEND_PG_URL` / `CONTEND_MYSQL_URL` (skipped
//! when unset, unless servers are required: `contend_test_support`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use contend::Db;
use contend::idempotency::Store;
use contend_axum::{IdempotencyKey, IdempotencyLayer};
use sqlx::AssertSqlSafe;
use tokio::sync::Barrier;
use tower::ServiceExt;

/// Concurrent duplicates per race.
const RACERS: usize = 8;

/// The server URL in `var`, or `None` (printing "skipped") when it is unset and servers are
/// not required.
fn server_url(var: &str) -> Option<String> {
    contend_test_support::env_url(var)
}

/// A table name unique to this run: process id, clock and a counter (no two tests of any
/// concurrent run share one).
fn table(base: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("axum_{base}_{}_{nanos}_{n}", std::process::id())
}

fn req(key: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post("/orders").header("authorization", "Bearer alice");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Body::from(body.to_string())).unwrap()
}

struct Resp {
    status: StatusCode,
    replayed: bool,
    body: Vec<u8>,
}

async fn send(router: &Router, request: Request<Body>) -> Resp {
    let r = router.clone().oneshot(request).await.unwrap();
    let status = r.status();
    let replayed = r.headers().get("idempotent-replayed").is_some();
    let body = axum::body::to_bytes(r.into_body(), 1 << 20)
        .await
        .unwrap()
        .to_vec();
    Resp {
        status,
        replayed,
        body,
    }
}

/// `RACERS` identical requests under `key`, released together.
async fn race(router: &Router, key: &str) -> Vec<Resp> {
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for _ in 0..RACERS {
        let (router, barrier, key) = (router.clone(), barrier.clone(), key.to_string());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            send(&router, req(Some(&key), "slow")).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// One module per typed database: its app state, its handler (plain sqlx on the database's own
/// connection type `$conn`, placeholders `$values`) and the tests.
macro_rules! typed_layer_tests {
    ($module:ident, $db:ty, $conn:ty, $values:literal, $open:expr) => {
        mod $module {
            use super::*;

            #[derive(Clone)]
            struct App {
                db: Db<$db>,
                orders: String,
                runs: Arc<AtomicUsize>,
            }

            struct Env {
                app: App,
                store: Store<$db>,
                server: bool,
                _dir: Option<tempfile::TempDir>,
            }

            async fn env() -> Option<Env> {
                let (db, dir): (Db<$db>, Option<tempfile::TempDir>) = $open?;
                let orders = table("orders");
                let engine = db.backend().dialect().table_options();
                db.execute_script(&format!(
                    "CREATE TABLE {orders} (id BIGINT NOT NULL, note TEXT NOT NULL){engine}"
                ))
                .await
                .expect("orders table");
                let store = Store::new(db.clone()).table(&table("idem")).unwrap();
                store.ensure_schema().await.expect("key table");
                Some(Env {
                    server: dir.is_none(),
                    app: App {
                        db,
                        orders,
                        runs: Arc::new(AtomicUsize::new(0)),
                    },
                    store,
                    _dir: dir,
                })
            }

            impl Env {
                fn router(&self, layered: bool) -> Router {
                    let router = Router::new().route("/orders", post(order));
                    let router = if layered {
                        router.layer(IdempotencyLayer::new(
                            self.store.clone(),
                            contend_axum::scope::authorization_sha256,
                        ))
                    } else {
                        router
                    };
                    router.with_state(self.app.clone())
                }

                async fn count(&self, sql: String) -> i64 {
                    sqlx::query_scalar::<$db, i64>(AssertSqlSafe(sql))
                        .fetch_one(self.app.db.pool())
                        .await
                        .expect("count")
                }

                async fn orders(&self) -> i64 {
                    self.count(format!("SELECT COUNT(*) FROM {}", self.app.orders))
                        .await
                }

                async fn keys(&self) -> i64 {
                    self.count(format!("SELECT COUNT(*) FROM {}", self.store.table_name()))
                        .await
                }

                fn runs(&self) -> usize {
                    self.app.runs.load(Ordering::SeqCst)
                }

                async fn cleanup(self) {
                    if self.server {
                        for t in [self.app.orders.as_str(), self.store.table_name()] {
                            let _ = self
                                .app
                                .db
                                .execute_script(&format!("DROP TABLE IF EXISTS {t}"))
                                .await;
                        }
                    }
                    self.app.db.pool().close().await;
                }
            }

            /// Writes an order with plain sqlx on the transaction's own connection and stores
            /// `201 {"order":N}` in the same transaction. `slow` sleeps first (so that
            /// duplicates overlap); `fail` fails the transaction after storing (503).
            async fn order(State(app): State<App>, key: IdempotencyKey, body: String) -> Response {
                let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
                let id = i64::try_from(run).unwrap();
                if body.contains("slow") {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let fail = body.contains("fail");
                let sql = format!("INSERT INTO {} (id, note) VALUES {}", app.orders, $values);
                let done = app
                    .db
                    .transaction(move |tx| {
                        Box::pin(async move {
                            let conn: &mut $conn = tx.conn();
                            sqlx::query(AssertSqlSafe(sql))
                                .bind(id)
                                .bind(body)
                                .execute(conn)
                                .await?;
                            let out = format!("{{\"order\":{id}}}");
                            key.store_in_tx(tx, StatusCode::CREATED, out.as_bytes())
                                .await?;
                            if fail {
                                return Err(contend::Error::aborted("failed after storing"));
                            }
                            Ok(out)
                        })
                    })
                    .await;
                match done {
                    Ok(out) => (StatusCode::CREATED, out).into_response(),
                    Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "{}").into_response(),
                }
            }

            /// Without the layer every duplicate runs; with it, exactly one, and the others
            /// are told it is in progress or get its replay; later retries replay byte for byte.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_duplicates_run_once() {
                let Some(env) = env().await else {
                    return;
                };
                let bare = race(&env.router(false), "dup").await;
                assert!(bare.iter().all(|r| r.status == StatusCode::CREATED));
                assert_eq!(env.runs(), RACERS, "without the layer every duplicate runs");
                assert_eq!(env.orders().await, RACERS as i64);

                let router = env.router(true);
                let layered = race(&router, "dup").await;
                let originals: Vec<&Resp> = layered
                    .iter()
                    .filter(|r| r.status == StatusCode::CREATED && !r.replayed)
                    .collect();
                assert_eq!(originals.len(), 1, "exactly one execution");
                for r in &layered {
                    assert!(
                        r.status == StatusCode::CONFLICT || r.status == StatusCode::CREATED,
                        "unexpected {}",
                        r.status
                    );
                }
                assert_eq!(env.runs(), RACERS + 1);
                assert_eq!(env.orders().await, RACERS as i64 + 1);
                let again = send(&router, req(Some("dup"), "slow")).await;
                assert!(again.replayed);
                assert_eq!(again.body, originals[0].body, "byte for byte");
                assert_eq!(env.runs(), RACERS + 1);
                env.cleanup().await;
            }

            /// An outcome stored in a transaction that rolls back goes with it: the 503 is not
            /// remembered, the key is released, and the same request runs again; once it
            /// commits, its outcome is replayed.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn outcome_rolls_back_with_the_typed_transaction() {
                let Some(env) = env().await else {
                    return;
                };
                let router = env.router(true);
                for attempt in 1..=2 {
                    let r = send(&router, req(Some("f"), "fail")).await;
                    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
                    assert!(!r.replayed);
                    assert_eq!(env.runs(), attempt, "released: the retry runs");
                }
                assert_eq!(env.orders().await, 0, "rolled back");
                assert_eq!(env.keys().await, 0, "no key kept");

                let first = send(&router, req(Some("ok"), "a")).await;
                assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));
                let replay = send(&router, req(Some("ok"), "a")).await;
                assert!(replay.replayed);
                assert_eq!(replay.body, first.body);
                let other = send(&router, req(Some("ok"), "b")).await;
                assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
                assert_eq!(env.runs(), 3);
                assert_eq!(env.orders().await, 1);
                env.cleanup().await;
            }
        }
    };
}

typed_layer_tests!(sqlite, sqlx::Sqlite, sqlx::SqliteConnection, "(?, ?)", {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
    let dir = tempfile::tempdir().expect("temporary folder");
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("typed.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(RACERS as u32)
        .connect_with(options)
        .await
        .expect("SqlitePool");
    Some((Db::from_pool(pool).expect("typed db"), Some(dir)))
});

typed_layer_tests!(postgres, sqlx::Postgres, sqlx::PgConnection, "($1, $2)", {
    match server_url("CONTEND_PG_URL") {
        Some(url) => {
            let pool = sqlx::PgPool::connect(&url).await.expect("PgPool");
            Some((Db::from_pool(pool).expect("typed db"), None))
        }
        None => None,
    }
});

typed_layer_tests!(mysql, sqlx::MySql, sqlx::MySqlConnection, "(?, ?)", {
    match server_url("CONTEND_MYSQL_URL") {
        Some(url) => {
            let pool = sqlx::MySqlPool::connect(&url).await.expect("MySqlPool");
            Some((Db::from_pool(pool).expect("typed db"), None))
        }
        None => None,
    }
});
