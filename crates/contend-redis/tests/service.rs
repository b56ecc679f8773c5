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

async fn count_after(executor: &Executor, strategy: Strategy) -> (i64, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("t.db").display());
    let db = Db::connect(&url).await.unwrap();
    db.execute_script("CREATE TABLE counter (n INTEGER); INSERT INTO counter VALUES (0)")
        .await
        .unwrap();
    contend::fencing::ensure_schema(&db).await.unwrap();
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
    let n: i64 = db
        .query_scalar("SELECT n FROM counter")
        .fetch_one(db.pool())
        .await
        .unwrap();
    (n, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_redlock_keep_the_count() {
    let (Some(url), Some(urls)) = (common::redis_url(), common::redlock_urls()) else {
        return;
    };
    let options = LockOptions::new()
        .lease(Duration::from_secs(10))
        .wait(Duration::from_secs(20));
    let client = LockClient::builder(&url)
        .namespace(&common::unique_namespace("service"))
        .connect()
        .await
        .unwrap();
    let redlock = Redlock::builder(&urls)
        .namespace(&common::unique_namespace("service-redlock"))
        .connect()
        .await
        .unwrap();
    let executor: Executor = Executor::new()
        .lock_service(
            Strategy::Redis,
            Arc::new(RedisLocks::single(client, options)),
        )
        .lock_service(
            Strategy::Redlock,
            Arc::new(RedisLocks::redlock(redlock, options)),
        );
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
