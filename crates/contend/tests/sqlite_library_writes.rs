//! Every write the library makes outside a transaction on a SQLite `Db` takes the writer's turn
//! (`DbBuilder::writer_queue`), as `Session::write_autocommit` does: the building blocks'
//! one-statement forms (`Counter::try_sub_now` / `try_sub_in`, `GetOrCreate::get_or_create`),
//! the idempotency `Store` (claim, take-over, complete, release), and `Db::execute_script`
//! (with `fencing::ensure_schema` and `Store::ensure_schema` on it), each in a test of its own.
//!
//! Each test holds a write transaction (the turn and SQLite's write lock) on a `Db` whose busy
//! timeout is 1 ms, and runs the library's write beside it in a task of its own (so its future
//! must be `Send`). A write beside the queue meets the holder in SQLite's busy handler and, with
//! 1 ms, fails `Busy` at once (with the default 5 s it would sleep 1, 2, 5, 10, ... ms instead):
//! that is the baseline these tests catch. In the writer's turn it waits until the holder
//! commits, then runs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use contend::fencing;
use contend::idempotency::{Claim, Claimed, Fingerprint, Key, Outcome, Store};
use contend::strategy::Value;
use contend::strategy::atomic::Counter;
use contend::strategy::get_or_create::{GetOrCreate, Method};
use contend::{Database, Db, Error};
use tokio::sync::Notify;

#[path = "common/held_write.rs"]
mod held_write;
use held_write::hold_a_write;

/// How long the write beside the held one is given to fail before the holder commits. The
/// outcome after the fix does not depend on it (the write waits for the turn however long it
/// takes); a write that fails `Busy` does so within a few milliseconds.
const GRACE: Duration = Duration::from_millis(200);

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS holder (n INTEGER NOT NULL); \
     INSERT INTO holder SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM holder); \
     CREATE TABLE IF NOT EXISTS account (id INTEGER PRIMARY KEY, balance BIGINT NOT NULL); \
     INSERT OR IGNORE INTO account VALUES (1, 10); \
     CREATE TABLE IF NOT EXISTS tag (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, \
                                     uses BIGINT NOT NULL)";

/// A `Db` on a new SQLite file, busy timeout 1 ms, writer queue on (with its dedicated writer
/// connection), with [`SCHEMA`].
async fn open(dir: &tempfile::TempDir) -> Db {
    let db = Db::builder(&format!("sqlite:{}", dir.path().join("t.db").display()))
        .busy_timeout(Duration::from_millis(1))
        .connect()
        .await
        .unwrap();
    db.execute_script(SCHEMA).await.unwrap();
    db
}

/// A `Db<sqlx::Sqlite>` made with `Db::from_pool` on a SQLite file: its writer queue has no
/// dedicated connection, so writes run on the caller's connection with the turn held.
async fn open_typed(dir: &tempfile::TempDir) -> Db<sqlx::Sqlite> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("typed.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_millis(1));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    let db = Db::from_pool(pool).unwrap();
    db.execute_script(SCHEMA).await.unwrap();
    db
}

/// Runs `write` in a task of its own while a write transaction holds the turn, lets the
/// transaction commit after [`GRACE`], and returns the write's result and whether it was still
/// waiting when the transaction committed.
async fn beside_a_held_write<DB, T, F>(db: &Db<DB>, write: F) -> (Result<T, Error>, bool)
where
    DB: Database,
    T: Send + 'static,
    F: Future<Output = Result<T, Error>> + Send + 'static,
{
    let release = Arc::new(Notify::new());
    let holder = hold_a_write(db, "UPDATE holder SET n = n + 1", release.clone()).await;
    let mut write = tokio::spawn(write);
    let early = tokio::time::timeout(GRACE, &mut write).await;
    let waited = early.is_err();
    release.notify_one();
    holder.await.unwrap().unwrap();
    let result = match early {
        Ok(done) => done.unwrap(),
        Err(_) => write.await.unwrap(),
    };
    (result, waited)
}

/// Asserts that `result` succeeded after waiting for the turn (not `Busy` from the busy
/// handler), and returns its value.
fn took_the_turn<T: std::fmt::Debug>(what: &str, (result, waited): (Result<T, Error>, bool)) -> T {
    let value = match result {
        Ok(value) => value,
        Err(e) => panic!(
            "{what} ran beside the writer queue and met its writer in the busy handler \
             (conflict {:?}): {e}",
            e.conflict()
        ),
    };
    assert!(
        waited,
        "{what} waits for the turn while a transaction holds it"
    );
    value
}

async fn balance<DB: Database>(db: &Db<DB>) -> i64 {
    let mut conn = db.acquire().await.unwrap();
    let sql = "SELECT balance FROM account WHERE id = 1";
    DB::fetch_i64(&mut conn, db.backend(), sql, &[])
        .await
        .unwrap()
        .expect("the account exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_try_sub_now_takes_the_writer_turn() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir).await;
    let counter = Counter::new("account", "id", "balance").unwrap();
    let (d, c) = (db.clone(), counter.clone());
    let applied = took_the_turn(
        "Counter::try_sub_now",
        beside_a_held_write(&db, async move { c.try_sub_now(&d, 1_i64, 3).await }).await,
    );
    assert!(applied);
    assert_eq!(balance(&db).await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_try_sub_in_takes_the_writer_turn() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir).await;
    let counter = Counter::new("account", "id", "balance").unwrap();
    let mut session = db.session();
    let c = counter.clone();
    let (applied, mut session) = took_the_turn(
        "Counter::try_sub_in",
        beside_a_held_write(&db, async move {
            let applied = c.try_sub_in(&mut session, 1_i64, 4).await?;
            Ok((applied, session))
        })
        .await,
    );
    assert!(applied);
    // Refused on the same session: 6 left, 7 asked.
    assert!(!counter.try_sub_in(&mut session, 1_i64, 7).await.unwrap());
    assert_eq!(balance(&db).await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_try_sub_now_takes_the_turn_without_a_dedicated_writer() {
    // `Db::from_pool`: the write runs on a pooled connection of the caller, in the turn.
    let dir = tempfile::tempdir().unwrap();
    let db = open_typed(&dir).await;
    let counter = Counter::new("account", "id", "balance").unwrap();
    let (d, c) = (db.clone(), counter.clone());
    let applied = took_the_turn(
        "Counter::try_sub_now on Db::from_pool",
        beside_a_held_write(&db, async move { c.try_sub_now(&d, 1_i64, 3).await }).await,
    );
    assert!(applied);
    assert_eq!(balance(&db).await, 7);
}

/// `GetOrCreate::get_or_create` with `method`, beside a held write, then again (found).
async fn get_or_create_beside_a_held_write(method: Method) {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir).await;
    let tags = GetOrCreate::new("tag", "id", "name").unwrap();
    let (d, t) = (db.clone(), tags.clone());
    let found = took_the_turn(
        &format!("GetOrCreate::get_or_create ({method:?})"),
        beside_a_held_write(&db, async move {
            t.get_or_create(&d, "rust", &[("uses", Value::Int(0))], method)
                .await
        })
        .await,
    );
    assert!(found.created);
    // Found again (the insert meets the row): the same id.
    let again = tags
        .get_or_create(&db, "rust", &[("uses", Value::Int(0))], method)
        .await
        .unwrap();
    assert_eq!((again.id, again.created), (found.id, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_create_on_conflict_takes_the_writer_turn() {
    get_or_create_beside_a_held_write(Method::OnConflict).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_create_catch_unique_takes_the_writer_turn() {
    get_or_create_beside_a_held_write(Method::CatchUnique).await;
}

/// A store on a new database, with its table, and a request's fingerprint.
async fn store(dir: &tempfile::TempDir) -> (Db, Store, Fingerprint) {
    let db = open(dir).await;
    let store = Store::new(db.clone());
    store.ensure_schema().await.unwrap();
    (db, store, Fingerprint::request("POST", "/orders", b"{}"))
}

/// Claims `key`, which must be free.
async fn claimed(store: &Store, key: &Key, fp: &Fingerprint) -> Claimed {
    match store.claim(key, fp).await.unwrap() {
        Claim::Claimed(claimed) => claimed,
        other => panic!("the first claim wins: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_claim_takes_the_writer_turn() {
    // The INSERT of the key row.
    let dir = tempfile::tempdir().unwrap();
    let (db, store, fp) = store(&dir).await;
    let key = Key::new("caller", "k1").unwrap();
    let (s, k, f) = (store.clone(), key.clone(), fp.clone());
    let claim = took_the_turn(
        "Store::claim",
        beside_a_held_write(&db, async move { s.claim(&k, &f).await }).await,
    );
    assert!(matches!(claim, Claim::Claimed(_)), "{claim:?}");
    assert!(matches!(
        store.claim(&key, &fp).await.unwrap(),
        Claim::InFlight { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_take_over_takes_the_writer_turn() {
    // A key whose lease expired is taken over by the next claim: its INSERT meets the row,
    // then a conditional UPDATE takes it. (The INSERT comes first and waits for the turn, so
    // this cannot tell the UPDATE's turn from the INSERT's; both go the same way.)
    let dir = tempfile::tempdir().unwrap();
    let (db, _, fp) = store(&dir).await;
    let expired = Store::new(db.clone()).lease(Duration::ZERO);
    let key = Key::new("caller", "k3").unwrap();
    claimed(&expired, &key, &fp).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (s, k, f) = (expired.clone(), key.clone(), fp.clone());
    let taken = took_the_turn(
        "Store::claim taking over an expired key",
        beside_a_held_write(&db, async move { s.claim(&k, &f).await }).await,
    );
    assert!(matches!(taken, Claim::Claimed(_)), "{taken:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_complete_takes_the_writer_turn() {
    // The UPDATE storing an outcome outside a business transaction.
    let dir = tempfile::tempdir().unwrap();
    let (db, store, fp) = store(&dir).await;
    let key = Key::new("caller", "k1").unwrap();
    let claimed = claimed(&store, &key, &fp).await;
    let outcome = Outcome::new(201, b"{}".to_vec()).unwrap();
    let (s, o) = (store.clone(), outcome.clone());
    let stored = took_the_turn(
        "Store::complete",
        beside_a_held_write(&db, async move { s.complete(&claimed, &o).await }).await,
    );
    assert!(stored);
    assert!(matches!(store.claim(&key, &fp).await.unwrap(), Claim::Completed(o) if o == outcome));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_release_takes_the_writer_turn() {
    // The DELETE of an in-flight key.
    let dir = tempfile::tempdir().unwrap();
    let (db, store, fp) = store(&dir).await;
    let key = Key::new("caller", "k2").unwrap();
    let claimed = claimed(&store, &key, &fp).await;
    let s = store.clone();
    let released = took_the_turn(
        "Store::release",
        beside_a_held_write(&db, async move { s.release(&claimed).await }).await,
    );
    assert!(released);
    // Released: the key can be claimed again.
    assert!(matches!(
        store.claim(&key, &fp).await.unwrap(),
        Claim::Claimed(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_script_takes_the_writer_turn() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir).await;
    let d = db.clone();
    took_the_turn(
        "Db::execute_script",
        beside_a_held_write(&db, async move {
            d.execute_script("UPDATE account SET balance = balance + 5")
                .await
        })
        .await,
    );
    assert_eq!(balance(&db).await, 15);

    // One `SELECT` (a health check's ping) cannot write: it runs at once, beside the queue.
    let d = db.clone();
    let (pinged, waited) =
        beside_a_held_write(&db, async move { d.execute_script("SELECT 1").await }).await;
    pinged.unwrap();
    assert!(!waited, "a ping does not wait for the writers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_schema_takes_the_writer_turn() {
    // `fencing::ensure_schema` and `Store::ensure_schema` run on `Db::execute_script`.
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir).await;
    let d = db.clone();
    took_the_turn(
        "fencing::ensure_schema",
        beside_a_held_write(&db, async move { fencing::ensure_schema(&d).await }).await,
    );
    assert_eq!(fencing::highest(&db, "doc:1").await.unwrap(), None);
    let store = Store::new(db.clone());
    let s = store.clone();
    took_the_turn(
        "Store::ensure_schema",
        beside_a_held_write(&db, async move { s.ensure_schema().await }).await,
    );
    let key = Key::new("caller", "k").unwrap();
    let fp = Fingerprint::request("GET", "/", b"");
    claimed(&store, &key, &fp).await;
}
