//! Real conflicts on real servers, retried to success: a PostgreSQL SERIALIZABLE write skew
//! (serialization failure) and two transactions locking two rows in opposite order (deadlock) on
//! PostgreSQL and MariaDB. Each also shows the failure without the safety net, so that the test
//! can fail.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{TestDb, on_backends};
use contend::{Attempted, Backend, ConflictKind, Error, IsolationLevel, RetryPolicy, TxOptions};
use tokio::sync::Barrier;

/// Write skew: two doctors on call; each goes off call if at least two are on call. Run at the
/// same time, both see two on call and both leave: the invariant "at least one on call" breaks
/// unless the database serializes them. Returns both runs and the number left on call.
async fn write_skew(t: &TestDb, table: &str, options: &TxOptions) -> (Vec<Attempted<bool>>, i64) {
    t.db.execute_script(&format!(
        "DELETE FROM {table}; INSERT INTO {table} (id, on_call) VALUES (1, 1), (2, 1)"
    ))
    .await
    .unwrap();
    // Both first attempts read before either writes; retries do not wait.
    let barrier = Arc::new(Barrier::new(2));
    let mut tasks = Vec::new();
    for me in [1_i64, 2] {
        let (db, table, barrier, options) = (
            t.db.clone(),
            table.to_string(),
            barrier.clone(),
            options.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let attempts = Arc::new(AtomicU32::new(0));
            db.run(&options, move |tx| {
                let (table, barrier, attempts) = (table.clone(), barrier.clone(), attempts.clone());
                Box::pin(async move {
                    let on_call: i64 = tx
                        .query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE on_call = 1"))
                        .fetch_one(tx.conn())
                        .await?;
                    if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                        barrier.wait().await;
                    }
                    if on_call < 2 {
                        return Ok(false);
                    }
                    tx.query(&format!("UPDATE {table} SET on_call = 0 WHERE id = ?"))
                        .bind(me)
                        .execute(tx.conn())
                        .await?;
                    Ok(true)
                })
            })
            .await
        }));
    }
    let mut runs = Vec::new();
    for task in tasks {
        runs.push(task.await.unwrap());
    }
    let left =
        t.db.query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE on_call = 1"))
            .fetch_one(t.db.pool())
            .await
            .unwrap();
    (runs, left)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_write_skew_serialization_failure_is_retried() {
    let Some(mut t) = TestDb::open(Backend::Postgres).await else {
        return;
    };
    let table = t
        .create_table(
            "writeskew",
            "id INTEGER PRIMARY KEY, on_call INTEGER NOT NULL",
        )
        .await;

    // Baseline: READ COMMITTED lets both leave; nobody stays on call.
    let read_committed = TxOptions::new().isolation(IsolationLevel::ReadCommitted);
    let (runs, left) = write_skew(&t, &table, &read_committed).await;
    assert!(runs.iter().all(|r| matches!(r.result, Ok(true))));
    assert_eq!(left, 0, "READ COMMITTED shows the write skew");

    // SERIALIZABLE without retry: one of them fails with a serialization failure.
    let serializable = TxOptions::new().isolation(IsolationLevel::Serializable);
    let (runs, left) = write_skew(&t, &table, &serializable).await;
    assert_eq!(left, 1);
    let failed: Vec<_> = runs
        .iter()
        .filter_map(|r| r.result.as_ref().err())
        .collect();
    assert_eq!(failed.len(), 1, "{runs:?}");
    assert_eq!(
        failed[0].conflict(),
        Some(ConflictKind::Serialization),
        "{}",
        failed[0]
    );

    // SERIALIZABLE with retry: the loser runs again, sees one on call, and stays.
    let retried = serializable.retry(RetryPolicy::new().max_attempts(5));
    let (runs, left) = write_skew(&t, &table, &retried).await;
    assert_eq!(left, 1);
    assert!(runs.iter().all(|r| r.result.is_ok()), "{runs:?}");
    let attempts: u32 = runs.iter().map(|r| r.attempts).sum();
    let conflicts: Vec<ConflictKind> = runs.iter().flat_map(|r| r.conflicts.clone()).collect();
    assert_eq!(attempts, 3, "{runs:?}");
    assert_eq!(conflicts, [ConflictKind::Serialization]);
    let left_call: Vec<bool> = runs.iter().map(|r| *r.result.as_ref().unwrap()).collect();
    assert!(
        left_call.contains(&true) && left_call.contains(&false),
        "{left_call:?}"
    );
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_serializable_write_skew_deadlocks_and_is_retried() {
    let Some(mut t) = TestDb::open(Backend::MySql).await else {
        return;
    };
    let table = t
        .create_table(
            "writeskew",
            "id INTEGER PRIMARY KEY, on_call INTEGER NOT NULL",
        )
        .await;
    let (runs, left) = write_skew(&t, &table, &TxOptions::new()).await;
    assert_eq!(left, 0, "REPEATABLE READ shows the write skew");
    assert!(runs.iter().all(|r| r.attempts == 1));

    // InnoDB SERIALIZABLE reads take shared locks: the two writers deadlock, one is retried.
    let retried = TxOptions::new()
        .isolation(IsolationLevel::Serializable)
        .retry(RetryPolicy::new().max_attempts(5));
    let (runs, left) = write_skew(&t, &table, &retried).await;
    assert_eq!(left, 1, "{runs:?}");
    assert!(runs.iter().all(|r| r.result.is_ok()), "{runs:?}");
    let attempts: u32 = runs.iter().map(|r| r.attempts).sum();
    let conflicts: Vec<ConflictKind> = runs.iter().flat_map(|r| r.conflicts.clone()).collect();
    assert_eq!(attempts, 3, "{runs:?}");
    assert_eq!(conflicts, [ConflictKind::Deadlock]);
    t.cleanup().await;
}

/// Two transactions each add 1 to rows 1 and 2, one in the order 1, 2 and the other 2, 1, both
/// holding their first lock before either takes the second. Returns both runs, the final values
/// and how many `on_commit` hooks ran.
async fn opposite_order(
    t: &TestDb,
    table: &str,
    options: &TxOptions,
) -> (Vec<Attempted<()>>, Vec<i64>, u32) {
    t.db.execute_script(&format!(
        "DELETE FROM {table}; INSERT INTO {table} (id, v) VALUES (1, 0), (2, 0)"
    ))
    .await
    .unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let hooks = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for order in [[1_i64, 2], [2, 1]] {
        let (db, table, barrier, options, hooks) = (
            t.db.clone(),
            table.to_string(),
            barrier.clone(),
            options.clone(),
            hooks.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let attempts = Arc::new(AtomicU32::new(0));
            db.run(&options, move |tx| {
                let (table, barrier, attempts, hooks) = (
                    table.clone(),
                    barrier.clone(),
                    attempts.clone(),
                    hooks.clone(),
                );
                Box::pin(async move {
                    let update = format!("UPDATE {table} SET v = v + 1 WHERE id = ?");
                    tx.query(&update).bind(order[0]).execute(tx.conn()).await?;
                    if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                        barrier.wait().await;
                    }
                    tx.query(&update).bind(order[1]).execute(tx.conn()).await?;
                    tx.on_commit(move || async move {
                        hooks.fetch_add(1, Ordering::SeqCst);
                    });
                    Ok(())
                })
            })
            .await
        }));
    }
    let mut runs = Vec::new();
    for task in tasks {
        runs.push(task.await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let values =
        t.db.query_scalar(&format!("SELECT v FROM {table} ORDER BY id"))
            .fetch_all(t.db.pool())
            .await
            .unwrap();
    (runs, values, hooks.load(Ordering::SeqCst))
}

async fn deadlock_is_retried(mut t: TestDb) {
    let backend = t.backend();
    let table = t
        .create_table("deadlock", "id INTEGER PRIMARY KEY, v INTEGER NOT NULL")
        .await;

    // Without retry: one transaction is the deadlock victim and its work is rolled back.
    let (runs, values, hooks) = opposite_order(&t, &table, &TxOptions::new()).await;
    let failed: Vec<&Error> = runs
        .iter()
        .filter_map(|r| r.result.as_ref().err())
        .collect();
    assert_eq!(failed.len(), 1, "{backend}: {runs:?}");
    assert_eq!(
        failed[0].conflict(),
        Some(ConflictKind::Deadlock),
        "{}",
        failed[0]
    );
    assert_eq!(
        values,
        [1, 1],
        "{backend}: only the survivor's work is there"
    );
    assert_eq!(hooks, 1, "the victim's hook must not run");

    // With retry: the victim runs again and both commit.
    let options = TxOptions::new().retry(RetryPolicy::new().max_attempts(5));
    let (runs, values, hooks) = opposite_order(&t, &table, &options).await;
    assert!(runs.iter().all(|r| r.result.is_ok()), "{backend}: {runs:?}");
    let attempts: u32 = runs.iter().map(|r| r.attempts).sum();
    let conflicts: Vec<ConflictKind> = runs.iter().flat_map(|r| r.conflicts.clone()).collect();
    assert_eq!(attempts, 3, "{backend}: {runs:?}");
    assert_eq!(conflicts, [ConflictKind::Deadlock]);
    assert_eq!(
        values,
        [2, 2],
        "{backend}: both transactions applied exactly once"
    );
    assert_eq!(
        hooks, 2,
        "one hook per committed transaction, none for the failed attempt"
    );
    t.cleanup().await;
}

on_backends!(deadlock_is_retried only [postgres mysql]);
