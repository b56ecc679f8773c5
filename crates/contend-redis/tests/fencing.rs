//! Fenced database writes (`contend::fencing`) on SQLite, and on PostgreSQL and MariaDB when
//! `CONTEND_PG_URL` / `CONTEND_MYSQL_URL` are set: a holder that pauses past its lease has its
//! write rejected every time (while the unfenced write clobbers the new holder's), and
//! concurrent fenced writers are applied in token order without lost updates.

mod common;

use std::sync::Arc;
use std::time::Duration;

use contend::fencing::{self, FencingToken};
use contend::{Backend, Db, Error, RetryPolicy, TxOptions};
use contend_redis::{LockClient, LockOptions};
use rand::seq::SliceRandom;

/// The databases to test: SQLite always, the servers when configured.
async fn databases(dir: &tempfile::TempDir) -> Vec<Db> {
    let mut dbs = Vec::new();
    let path = dir.path().join("fence.db");
    dbs.push(
        Db::connect(&format!("sqlite:{}", path.display()))
            .await
            .unwrap(),
    );
    for var in ["CONTEND_PG_URL", "CONTEND_MYSQL_URL"] {
        if let Some(url) = common::env_url(var) {
            dbs.push(Db::connect(&url).await.unwrap());
        }
    }
    dbs
}

fn table(prefix: &str) -> String {
    format!("redis_lock_{prefix}_{:08x}", rand::random::<u32>())
}

fn retry() -> TxOptions {
    TxOptions::new().retry(
        RetryPolicy::new()
            .max_attempts(50)
            .max_elapsed(Duration::from_secs(20)),
    )
}

#[tokio::test]
async fn fence_semantics_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    for db in databases(&dir).await {
        fencing::ensure_schema(&db).await.unwrap();
        fencing::ensure_schema(&db).await.unwrap(); // idempotent
        let resource = format!("sem-{:016x}", rand::random::<u64>());
        assert_eq!(fencing::highest(&db, &resource).await.unwrap(), None);
        for (token, ok) in [
            (5, true),
            (5, true),
            (9, true),
            (7, false),
            (9, true),
            (10, true),
        ] {
            let r = resource.clone();
            let result = db
                .transaction(move |tx| {
                    let r = r.clone();
                    Box::pin(async move { fencing::fence(tx, &r, FencingToken::new(token)).await })
                })
                .await;
            match (ok, result) {
                (true, Ok(())) => {}
                (
                    false,
                    Err(Error::StaleFencingToken {
                        token: t, highest, ..
                    }),
                ) => {
                    assert_eq!((t, highest), (token, 9), "{}", db.backend());
                }
                (ok, other) => panic!(
                    "{}: token {token} expected ok={ok}, got {other:?}",
                    db.backend()
                ),
            }
        }
        assert_eq!(
            fencing::highest(&db, &resource).await.unwrap(),
            Some(FencingToken::new(10))
        );
        let r = resource.clone();
        let too_big = db
            .transaction(move |tx| {
                let r = r.clone();
                Box::pin(async move { fencing::fence(tx, &r, FencingToken::new(u64::MAX)).await })
            })
            .await;
        assert!(too_big.is_err());
        assert!(fencing::highest(&db, "").await.is_err());
    }
}

/// Writes `body` to the document, fenced by `token` or not.
async fn write_doc(
    db: &Db,
    t: &str,
    resource: &str,
    token: Option<FencingToken>,
    body: &str,
) -> contend::Result<()> {
    let (t, resource, body) = (t.to_string(), resource.to_string(), body.to_string());
    db.transaction_with(&retry(), move |tx| {
        let (t, resource, body) = (t.clone(), resource.clone(), body.clone());
        Box::pin(async move {
            if let Some(token) = token {
                fencing::fence(tx, &resource, token).await?;
            }
            let q = tx
                .query(&format!("UPDATE {t} SET body = ? WHERE id = 1"))
                .bind(body);
            q.execute(tx.conn()).await?;
            Ok(())
        })
    })
    .await
}

async fn read_doc(db: &Db, t: &str) -> String {
    db.query_scalar::<String>(&format!("SELECT body FROM {t} WHERE id = 1"))
        .fetch_one(db.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_paused_past_its_lease_is_rejected_every_time() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let ns = common::unique_namespace("pause");
    let locks = LockClient::builder(&url)
        .namespace(&ns)
        .connect()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lease = Duration::from_millis(100);
    for db in databases(&dir).await {
        fencing::ensure_schema(&db).await.unwrap();
        let t = table("doc");
        db.execute_script(&format!(
            "CREATE TABLE {t} (id INT PRIMARY KEY, body VARCHAR(64) NOT NULL)"
        ))
        .await
        .unwrap();
        db.execute_script(&format!("INSERT INTO {t} (id, body) VALUES (1, 'initial')"))
            .await
            .unwrap();
        let resource = format!("{t}:1");
        for round in 0..5 {
            for fenced in [true, false] {
                let key = format!("doc-{round}-{fenced}");
                let a = locks
                    .acquire(&key, &LockOptions::new().lease(lease))
                    .await
                    .unwrap();
                // A stops (a GC pause, a swapped-out VM) for longer than its lease...
                tokio::time::sleep(lease * 2).await;
                // ...and B gets the lock meanwhile and writes.
                let b = locks
                    .acquire(&key, &LockOptions::new().wait(Duration::from_secs(2)))
                    .await
                    .unwrap();
                assert!(b.fencing_token() > a.fencing_token());
                let (ta, tb) = (Some(a.fencing_token()), Some(b.fencing_token()));
                let (ta, tb) = if fenced { (ta, tb) } else { (None, None) };
                write_doc(&db, &t, &resource, tb, &format!("B{round}"))
                    .await
                    .unwrap();
                b.release().await.unwrap();
                // A wakes up, still believing it holds the lock, and writes.
                let stale = write_doc(&db, &t, &resource, ta, &format!("A{round}")).await;
                let body = read_doc(&db, &t).await;
                if fenced {
                    assert!(
                        matches!(stale, Err(Error::StaleFencingToken { .. })),
                        "{}: stale write not rejected: {stale:?}",
                        db.backend()
                    );
                    assert_eq!(body, format!("B{round}"), "{}", db.backend());
                } else {
                    // Baseline: without the fence the stale holder clobbers B's write.
                    stale.unwrap();
                    assert_eq!(body, format!("A{round}"), "{}", db.backend());
                }
                assert!(
                    !a.release().await.unwrap(),
                    "the stale holder released B's lock"
                );
            }
        }
        db.execute_script(&format!("DROP TABLE {t}")).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fenced_writers_apply_in_token_order_without_lost_updates() {
    let dir = tempfile::tempdir().unwrap();
    for db in databases(&dir).await {
        fencing::ensure_schema(&db).await.unwrap();
        let t = table("race");
        let log = format!("{t}_log");
        db.execute_script(&format!(
            "CREATE TABLE {t} (id INT PRIMARY KEY, n BIGINT NOT NULL); \
             CREATE TABLE {log} (seq BIGINT PRIMARY KEY, token BIGINT NOT NULL)"
        ))
        .await
        .unwrap();
        db.execute_script(&format!("INSERT INTO {t} (id, n) VALUES (1, 0)"))
            .await
            .unwrap();
        for fenced in [true, false] {
            db.execute_script(&format!(
                "UPDATE {t} SET n = 0 WHERE id = 1; DELETE FROM {log}"
            ))
            .await
            .unwrap();
            let resource = format!("{t}:{fenced}");
            let mut tokens: Vec<u64> = (1..=16).collect();
            tokens.shuffle(&mut rand::rng());
            let db = Arc::new(db.clone());
            let mut tasks = Vec::new();
            for token in tokens {
                let (db, t, log, resource) = (db.clone(), t.clone(), log.clone(), resource.clone());
                tasks.push(tokio::spawn(async move {
                    db.transaction_with(&retry(), move |tx| {
                        let (t, log, resource) = (t.clone(), log.clone(), resource.clone());
                        Box::pin(async move {
                            if fenced {
                                fencing::fence(tx, &resource, FencingToken::new(token)).await?;
                            }
                            // Read, decide, write: safe only if fenced writers are serialized.
                            let q =
                                tx.query_scalar::<i64>(&format!("SELECT n FROM {t} WHERE id = 1"));
                            let n = q.fetch_one(tx.conn()).await?;
                            tokio::time::sleep(Duration::from_millis(3)).await;
                            let q = tx
                                .query(&format!("UPDATE {t} SET n = ? WHERE id = 1"))
                                .bind(n + 1);
                            q.execute(tx.conn()).await?;
                            if fenced {
                                let q = tx
                                    .query(&format!("INSERT INTO {log} (seq, token) VALUES (?, ?)"))
                                    .bind(n + 1)
                                    .bind(token as i64);
                                q.execute(tx.conn()).await?;
                            }
                            Ok(())
                        })
                    })
                    .await
                }));
            }
            let mut applied = 0_i64;
            for task in tasks {
                match task.await.unwrap() {
                    Ok(()) => applied += 1,
                    Err(Error::StaleFencingToken { .. }) if fenced => {}
                    Err(e) => panic!("{}: {e}", db.backend()),
                }
            }
            let n: i64 = db
                .query_scalar(&format!("SELECT n FROM {t} WHERE id = 1"))
                .fetch_one(db.pool())
                .await
                .unwrap();
            if fenced {
                assert!(applied >= 1);
                assert_eq!(
                    n,
                    applied,
                    "{}: lost updates among fenced writers",
                    db.backend()
                );
                let order: Vec<i64> = db
                    .query_scalar(&format!("SELECT token FROM {log} ORDER BY seq"))
                    .fetch_all(db.pool())
                    .await
                    .unwrap();
                assert_eq!(order.len() as i64, applied);
                assert!(
                    order.windows(2).all(|w| w[0] < w[1]),
                    "{}: writes applied out of token order: {order:?}",
                    db.backend()
                );
                let highest = fencing::highest(&db, &resource).await.unwrap().unwrap();
                assert_eq!(highest.get() as i64, *order.last().unwrap());
            } else if db.backend() != Backend::Sqlite {
                // Baseline: the same read-decide-write without the fence loses updates on the
                // servers (SQLite's BEGIN IMMEDIATE already runs writers one at a time).
                assert_eq!(applied, 16);
                assert!(
                    n < 16,
                    "{}: the unfenced baseline should lose updates",
                    db.backend()
                );
            }
        }
        db.execute_script(&format!("DROP TABLE {t}; DROP TABLE {log}"))
            .await
            .unwrap();
    }
}
