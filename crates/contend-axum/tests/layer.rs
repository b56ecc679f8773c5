//! `IdempotencyLayer` on a small router over SQLite: concurrent duplicates run once, replays are
//! byte for byte, other requests under a used key get 422, statuses that are not stored release
//! the key, a panic or a dropped client leaves no key in flight, an outcome committed by the
//! handler's transaction is the one kept, and a deferred claim lets the handler answer first.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::routing::post;
use contend::idempotency::Store;
use contend_axum::{IdempotencyKey, IdempotencyLayer, PendingKey};
use tower::ServiceExt;

#[derive(Clone)]
struct App {
    db: contend::Db,
    runs: Arc<AtomicUsize>,
}

struct Env {
    app: App,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("layer.db").display());
    let db = contend::Db::connect(&url).await.unwrap();
    db.execute_script("CREATE TABLE orders (id INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT)")
        .await
        .unwrap();
    Store::new(db.clone()).ensure_schema().await.unwrap();
    Env {
        app: App {
            db,
            runs: Arc::new(AtomicUsize::new(0)),
        },
        _dir: dir,
    }
}

/// Writes an order and stores `201 {"order":N}` in the same transaction; the body's text picks
/// other behaviours: `slow` sleeps first, `status:NNN` answers NNN without writing, `panic`
/// panics, `lie` stores one body and answers another.
async fn order(State(app): State<App>, key: IdempotencyKey, body: String) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    if body.contains("slow") {
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    if let Some(code) = body.strip_prefix("status:") {
        let status = StatusCode::from_u16(code.trim().parse().unwrap()).unwrap();
        return response(status, format!("{{\"status\":{code}}}"));
    }
    assert!(!body.contains("panic"), "the handler panicked on purpose");
    let lie = body.contains("lie");
    let stored = app
        .db
        .transaction(move |tx| {
            let key = key.clone();
            Box::pin(async move {
                tx.query("INSERT INTO orders (note) VALUES ('x')")
                    .execute(tx.conn())
                    .await?;
                let id: i64 = tx
                    .query_scalar("SELECT MAX(id) FROM orders")
                    .fetch_one(tx.conn())
                    .await?;
                let body = format!("{{\"order\":{id}}}");
                key.store_in_tx(tx, StatusCode::CREATED, body.as_bytes())
                    .await?;
                Ok::<_, contend::Error>(body)
            })
        })
        .await
        .unwrap();
    if lie {
        return response(StatusCode::CREATED, "{\"order\":\"other\"}".into());
    }
    response(StatusCode::CREATED, stored)
}

fn response(status: StatusCode, body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r
}

fn router(app: &App, layer: IdempotencyLayer) -> Router {
    Router::new()
        .route("/orders", post(order))
        .layer(layer)
        .with_state(app.clone())
}

fn layer(app: &App) -> IdempotencyLayer {
    IdempotencyLayer::new(
        Store::new(app.db.clone()),
        contend_axum::scope::authorization_sha256,
    )
}

fn req(who: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post("/orders").header("authorization", format!("Bearer {who}"));
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Body::from(body.to_string())).unwrap()
}

struct Resp {
    status: StatusCode,
    replayed: bool,
    retry_after: Option<String>,
    body: Vec<u8>,
}

async fn send(router: &Router, request: Request<Body>) -> Resp {
    let r = router.clone().oneshot(request).await.unwrap();
    let status = r.status();
    let replayed = r.headers().get("idempotent-replayed").is_some();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = axum::body::to_bytes(r.into_body(), 1 << 20)
        .await
        .unwrap()
        .to_vec();
    Resp {
        status,
        replayed,
        retry_after,
        body,
    }
}

async fn keys_in_flight(db: &contend::Db) -> i64 {
    db.query_scalar("SELECT COUNT(*) FROM idempotency_keys WHERE status_code IS NULL")
        .fetch_one(db.pool())
        .await
        .unwrap()
}

async fn orders(db: &contend::Db) -> i64 {
    db.query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(db.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_run_once() {
    let env = env().await;
    let router = router(&env.app, layer(&env.app));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let router = router.clone();
        tasks.push(tokio::spawn(async move {
            send(&router, req("alice", Some("dup"), "slow")).await
        }));
    }
    let mut originals = Vec::new();
    let mut in_progress = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::CREATED if !r.replayed => originals.push(r.body),
            StatusCode::CREATED => {}
            StatusCode::CONFLICT => {
                assert_eq!(r.retry_after.as_deref(), Some("1"));
                in_progress += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(originals.len(), 1, "exactly one execution");
    assert!(in_progress > 0, "the duplicates overlapped the first");
    assert_eq!(env.app.runs.load(Ordering::SeqCst), 1);
    assert_eq!(orders(&env.app.db).await, 1);
    let again = send(&router, req("alice", Some("dup"), "slow")).await;
    assert!(again.replayed);
    assert_eq!(again.body, originals[0], "byte for byte");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_scopes_and_stored_statuses() {
    let env = env().await;
    let router = router(&env.app, layer(&env.app));
    let runs = || env.app.runs.load(Ordering::SeqCst);
    let first = send(&router, req("alice", Some("k"), "a")).await;
    assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));
    // Another request under the key: 422, nothing runs.
    let other = send(&router, req("alice", Some("k"), "b")).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(String::from_utf8_lossy(&other.body).contains("idempotency_key_reused"));
    // Another caller, same key: its own.
    let bob = send(&router, req("bob", Some("k"), "b")).await;
    assert_eq!((bob.status, bob.replayed), (StatusCode::CREATED, false));
    assert_eq!(runs(), 2);
    // Without a key, every request runs.
    send(&router, req("alice", None, "a")).await;
    send(&router, req("alice", None, "a")).await;
    assert_eq!(runs(), 4);

    // 404 and 409 are stored after the response and replayed; 400 and 500 release the key.
    for (code, stored) in [
        (404, true),
        (409, true),
        (422, true),
        (400, false),
        (500, false),
    ] {
        let key = format!("status-{code}");
        let body = format!("status:{code}");
        let before = runs();
        let r1 = send(&router, req("alice", Some(&key), &body)).await;
        let r2 = send(&router, req("alice", Some(&key), &body)).await;
        assert_eq!(r1.status.as_u16(), code);
        assert_eq!(r2.status.as_u16(), code);
        if stored {
            assert!(r2.replayed, "{code} must be stored");
            assert_eq!(r1.body, r2.body);
            assert_eq!(runs(), before + 1);
        } else {
            assert!(!r2.replayed, "{code} must not be stored");
            assert_eq!(runs(), before + 2);
        }
    }
    assert_eq!(keys_in_flight(&env.app.db).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_outcome_is_the_one_kept() {
    let env = env().await;
    let router = router(&env.app, layer(&env.app));
    // The handler stores {"order":1} in its transaction, then answers something else: the
    // stored outcome is never overwritten after the response.
    let first = send(&router, req("alice", Some("lie"), "lie")).await;
    assert_eq!(first.body, b"{\"order\":\"other\"}");
    let again = send(&router, req("alice", Some("lie"), "lie")).await;
    assert!(again.replayed);
    assert_eq!(again.body, b"{\"order\":1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_and_dropped_clients_leave_no_key_in_flight() {
    let env = env().await;
    let router = router(&env.app, layer(&env.app));
    let r = send(&router, req("alice", Some("p"), "panic")).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        keys_in_flight(&env.app.db).await,
        0,
        "released after the panic"
    );

    // The client goes away while the handler runs: it still finishes and stores its outcome.
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        send(&router, req("alice", Some("gone"), "slow")),
    )
    .await;
    assert!(dropped.is_err(), "the client gave up first");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(orders(&env.app.db).await, 1, "the request ran to the end");
    let retry = send(&router, req("alice", Some("gone"), "slow")).await;
    assert!(retry.replayed);
    assert_eq!(retry.body, b"{\"order\":1}");
    assert_eq!(env.app.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_claim_nothing() {
    let env = env().await;
    let router = router(&env.app, layer(&env.app).body_limit(16));
    let big = send(&router, req("alice", Some("big"), &"x".repeat(17))).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    let bad_key = send(&router, req("alice", Some(""), "a")).await;
    assert_eq!(bad_key.status, StatusCode::BAD_REQUEST);
    let anonymous = Request::post("/orders")
        .header("idempotency-key", "k")
        .body(Body::from("a"))
        .unwrap();
    assert_eq!(
        send(&router, anonymous).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Two Authorization headers: which caller it is depends on who reads which; no scope.
    let mut twice = req("alice", Some("k"), "a");
    twice
        .headers_mut()
        .append("authorization", "Bearer bob".parse().unwrap());
    let twice = send(&router, twice).await;
    assert_eq!(twice.status, StatusCode::UNAUTHORIZED);
    assert!(String::from_utf8_lossy(&twice.body).contains("\"unauthorized\""));
    assert_eq!(env.app.runs.load(Ordering::SeqCst), 0);
    let keys: i64 = env
        .app
        .db
        .query_scalar("SELECT COUNT(*) FROM idempotency_keys")
        .fetch_one(env.app.db.pool())
        .await
        .unwrap();
    assert_eq!(keys, 0);
}

/// With a deferred claim, the handler's own checks answer before any idempotency answer: here a
/// request under a used key but without permission gets the handler's 403, not 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_claim_lets_the_handler_answer_first() {
    async fn guarded(State(app): State<App>, pending: PendingKey, body: String) -> Response {
        if body.contains("forbidden") {
            return response(StatusCode::FORBIDDEN, "{}".into());
        }
        let key = match pending.claim().await {
            Ok(key) => key,
            Err(answer) => return answer,
        };
        order(State(app), key, body).await
    }
    let env = env().await;
    let router = Router::new()
        .route("/orders", post(guarded))
        .layer(layer(&env.app).claim_in_handler())
        .with_state(env.app.clone());
    let first = send(&router, req("alice", Some("d"), "a")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let forbidden = send(&router, req("alice", Some("d"), "forbidden")).await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    let reused = send(&router, req("alice", Some("d"), "b")).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    let replay = send(&router, req("alice", Some("d"), "a")).await;
    assert!(replay.replayed);
    assert_eq!(replay.body, first.body);
}
