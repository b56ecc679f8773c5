//! `RedisLocks` as the executor's lock service, against real Redis: a hot-row read-decide-write
//! under `redis` and `redlock` loses no update where the same operation under `none` does, and
//! every grant is fenced in the write's transaction.

mod common;

use std::sync::Arc;
use std::time::Duration;

use contend::strategy::{Executor, Operation, Strategy};
use contend::{BoxFuture, Db, Error, Tx};
use contend_redis::{LockClient, LockOptions, RedisLocks, Redlock};

/// Add 1 to the counter, read and written separately (the lost-update shape).
struct Increment;

impl Operation for Increment {
    type State = i64;
    type Output = ();
    type Error = Error;

    fn keys(&self) -> Vec<String> {
        vec!["counter".into()]
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut sqlx::AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, Result<i64, Error>> {
        Box::pin(async move {
            let sql = format!("SELECT n FROM counter{lock}");
            let n = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(conn)
                .await?;
            // A handler's work between read and write: wide enough that, unguarded, another
            // worker reads the same value even on a loaded machine.
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(n)
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        n: &'c i64,
        _checked: bool,
    ) -> BoxFuture<'c, Result<(), Error>> {
        Box::pin(async move {
            tx.query("UPDATE counter SET n = ?")
                .bind(n + 1)
                .execute(tx.conn())
                .await?;
            Ok(())
        })
    }
}

/// A SQLite file with the counter at 0 and the fence table (the folder lives as long as the
/// returned guard).
async fn counter_db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("t.db").display());
    let db = Db::connect(&url).await.unwrap();
    db.execute_script("CREATE TABLE counter (n INTEGER); INSERT INTO counter VALUES (0)")
        .await
        .unwrap();
    contend::fencing::ensure_schema(&db).await.unwrap();
    (dir, db)
}

async fn counter(db: &Db) -> i64 {
    db.query_scalar("SELECT n FROM counter")
        .fetch_one(db.pool())
        .await
        .unwrap()
}

/// The single-node lock and Redlock on the test servers, each in a namespace of its own, with
/// that namespace and the URLs of its nodes; `None` when the servers are not configured.
async fn both_locks(test: &str) -> Option<[(RedisLocks, String, Vec<String>); 2]> {
    let (url, urls) = (common::redis_url()?, common::redlock_urls()?);
    let options = LockOptions::new()
        .lease(Duration::from_secs(10))
        .wait(Duration::from_secs(20));
    let single_ns = common::unique_namespace(test);
    let quorum_ns = common::unique_namespace(&format!("{test}-redlock"));
    let client = LockClient::builder(&url)
        .namespace(&single_ns)
        .connect()
        .await
        .unwrap();
    let redlock = Redlock::builder(&urls)
        .namespace(&quorum_ns)
        .connect()
        .await
        .unwrap();
    Some([
        (RedisLocks::single(client, options), single_ns, vec![url]),
        (RedisLocks::redlock(redlock, options), quorum_ns, urls),
    ])
}

async fn count_after(executor: &Executor, strategy: Strategy) -> (i64, Vec<String>) {
    let (_dir, db) = counter_db().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (db, executor) = (db.clone(), executor.clone());
        tasks.push(tokio::spawn(async move {
            let mut session = db.session();
            let mut errors = Vec::new();
            for _ in 0..15 {
                let done = executor
                    .run(strategy, &mut session, Arc::new(Increment))
                    .await;
                if let Err(e) = done.result {
                    errors.push(e.to_string());
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    (counter(&db).await, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_redlock_keep_the_count() {
    let Some([(single, ..), (quorum, ..)]) = both_locks("service").await else {
        return;
    };
    let executor: Executor = Executor::new()
        .lock_service(Strategy::Redis, Arc::new(single))
        .lock_service(Strategy::Redlock, Arc::new(quorum));
    let (baseline, errors) = count_after(&executor, Strategy::None).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(
        baseline < 120,
        "the unsafe baseline should lose increments, got {baseline}"
    );
    for strategy in [Strategy::Redis, Strategy::Redlock] {
        let (n, errors) = count_after(&executor, strategy).await;
        assert!(errors.is_empty(), "{strategy}: {errors:?}");
        assert_eq!(n, 120, "{strategy} lost increments");
    }
}

/// A Redis node restarted without persistence counts its fencing counters from 0 again, while
/// the database remembers the highest token it accepted. The first grant after that is refused
/// (its token is stale); the refusal raises the counter past the database's token, so the next
/// grant writes. Without the raise every grant would be refused until the counter caught up by
/// itself (here: the next four).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_that_went_back_is_raised_past_the_database() {
    let Some(cases) = both_locks("raise").await else {
        return;
    };
    for (locks, namespace, nodes) in cases {
        let executor: Executor = Executor::new().lock_service(Strategy::Redis, Arc::new(locks));
        let (_dir, db) = counter_db().await;
        let mut session = db.session();
        let mut run = async || {
            executor
                .run(Strategy::Redis, &mut session, Arc::new(Increment))
                .await
        };
        for _ in 0..5 {
            run().await.result.expect("tokens 1 to 5 write");
        }
        // The restart without persistence: every node forgets the key's counter.
        for node in &nodes {
            common::forget(node, &format!("{namespace}:fence:counter")).await;
        }
        let refused = run().await;
        assert!(
            refused.fenced,
            "{namespace}: token 1 after the reset is stale"
        );
        assert!(
            matches!(
                refused.result,
                Err(Error::StaleFencingToken { highest: 5, .. })
            ),
            "{namespace}: {:?}",
            refused.result
        );
        let next = run().await;
        assert!(
            next.result.is_ok() && !next.fenced,
            "{namespace}: the grant after the refusal writes: {:?}",
            next.result
        );
        assert_eq!(
            counter(&db).await,
            6,
            "{namespace}: the refused write did not apply"
        );
    }
}
