//! The strategy building blocks under real concurrency, on SQLite always and on PostgreSQL and
//! MariaDB when `CONTEND_PG_URL` / `CONTEND_MYSQL_URL` are set. Every safe strategy is checked
//! against the same load under which the unsafe baseline is shown to lose updates.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{TestDb, on_backends};
use contend::strategy::advisory::{self, SessionLock};
use contend::strategy::atomic::Counter;
use contend::strategy::get_or_create::{GetOrCreate, Method};
use contend::strategy::mutex::KeyedMutex;
use contend::strategy::optimistic::{self, Versioned};
use contend::strategy::pessimistic::LockTarget;
use contend::strategy::{Value, serializable};
use contend::{Backend, BoxFuture, ConflictKind, Db, Error, RetryPolicy, RowLock, TxOptions};
use sqlx::Row;

const TASKS: usize = 16;
const PER_TASK: u64 = 20;

/// What one `hammer` run saw.
#[derive(Debug, Default)]
struct Load {
    ok: u64,
    errors: Vec<String>,
    conflicts: u64,
}

/// Runs `op` `PER_TASK` times on each of `TASKS` tasks; `op` returns the conflicts it retried.
async fn hammer<F>(db: &Db, op: F) -> Load
where
    F: Fn(Db) -> BoxFuture<'static, contend::Result<u64>> + Send + Sync + 'static,
{
    let op = Arc::new(op);
    let ok = Arc::new(AtomicU64::new(0));
    let conflicts = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (db, op, ok, conflicts) = (db.clone(), op.clone(), ok.clone(), conflicts.clone());
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            for _ in 0..PER_TASK {
                match op(db.clone()).await {
                    Ok(c) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        conflicts.fetch_add(c, Ordering::Relaxed);
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.expect("task panicked"));
    }
    Load {
        ok: ok.load(Ordering::Relaxed),
        errors,
        conflicts: conflicts.load(Ordering::Relaxed),
    }
}

/// A counter table with one row (id 1, n 0, version 0).
async fn counter_table(t: &mut TestDb) -> String {
    let name = t
        .create_table(
            "strat",
            "id BIGINT PRIMARY KEY, n BIGINT NOT NULL, version BIGINT NOT NULL",
        )
        .await;
    t.db.execute_script(&format!("INSERT INTO {name} VALUES (1, 0, 0)"))
        .await
        .unwrap();
    name
}

async fn value(db: &Db, table: &str) -> i64 {
    db.query_scalar(&format!("SELECT n FROM {table} WHERE id = 1"))
        .fetch_one(db.pool())
        .await
        .unwrap()
}

/// The unsafe increment: autocommit read, yield, autocommit write.
async fn unsafe_increment(db: Db, table: String) -> contend::Result<u64> {
    let n: i64 = db
        .query_scalar(&format!("SELECT n FROM {table} WHERE id = 1"))
        .fetch_one(db.pool())
        .await?;
    tokio::task::yield_now().await;
    db.query(&format!("UPDATE {table} SET n = ? WHERE id = 1"))
        .bind(n + 1)
        .execute(db.pool())
        .await?;
    Ok(0)
}

/// Increments with `lock` appended to the read, inside one transaction with `options`.
async fn tx_increment(
    db: Db,
    table: String,
    options: TxOptions,
    lock: &'static str,
    advisory_key: Option<String>,
) -> contend::Result<u64> {
    let run = db
        .run(&options, |tx| {
            let (table, key) = (table.clone(), advisory_key.clone());
            Box::pin(async move {
                if let Some(key) = key {
                    advisory::lock_xact(tx, &key, None).await?;
                }
                let n: i64 = tx
                    .query_scalar(&format!("SELECT n FROM {table} WHERE id = 1{lock}"))
                    .fetch_one(tx.conn())
                    .await?;
                tokio::task::yield_now().await;
                tx.query(&format!("UPDATE {table} SET n = ? WHERE id = 1"))
                    .bind(n + 1)
                    .execute(tx.conn())
                    .await?;
                Ok::<_, contend::Error>(())
            })
        })
        .await;
    run.result?;
    Ok(run.conflicts.len() as u64)
}

const TOTAL: i64 = (TASKS as u64 * PER_TASK) as i64;

/// Runs `make(table)` as the increment under the common load and returns the updates lost.
async fn lost_updates<F>(t: &mut TestDb, make: F) -> (i64, Load)
where
    F: Fn(Db, String) -> BoxFuture<'static, contend::Result<u64>> + Send + Sync + 'static,
{
    let table = counter_table(t).await;
    let name = table.clone();
    let load = hammer(&t.db, move |db| make(db, name.clone())).await;
    (TOTAL - value(&t.db, &table).await, load)
}

/// The baseline loses updates under the load every safe strategy below is tested with: the
/// checks below can fail.
async fn baseline_loses_updates(mut t: TestDb) {
    let mut lost = 0;
    for _ in 0..3 {
        let (l, load) =
            lost_updates(&mut t, |db, table| Box::pin(unsafe_increment(db, table))).await;
        assert!(load.errors.is_empty(), "{:?}", load.errors);
        lost = l;
        if lost > 0 {
            break;
        }
    }
    assert!(
        lost > 0,
        "{}: the unsafe baseline lost no update in 3 runs",
        t.backend()
    );
    t.cleanup().await;
}

/// Asserts that a safe strategy lost nothing and failed nothing; returns the conflicts retried.
fn assert_safe(backend: Backend, what: &str, lost: i64, load: &Load) -> u64 {
    assert!(
        load.errors.is_empty(),
        "{backend} {what}: errors {:?}",
        &load.errors[..load.errors.len().min(3)]
    );
    assert_eq!(lost, 0, "{backend} {what}: lost {lost} updates");
    assert_eq!(load.ok, TOTAL as u64);
    load.conflicts
}

async fn mutex_serializes_in_process(mut t: TestDb) {
    let locks = KeyedMutex::new();
    let (lost, load) = lost_updates(&mut t, move |db, table| {
        let locks = locks.clone();
        Box::pin(async move {
            let _guard = locks.lock(&table).await;
            unsafe_increment(db, table.clone()).await
        })
    })
    .await;
    assert_safe(t.backend(), "mutex", lost, &load);
    t.cleanup().await;
}

async fn atomic_counter_never_oversells(mut t: TestDb) {
    // 320 attempts at a balance of 200: exactly 200 succeed, the balance ends at 0.
    let table = counter_table(&mut t).await;
    t.db.execute_script(&format!("UPDATE {table} SET n = 200"))
        .await
        .unwrap();
    let counter = Counter::new(&table, "id", "n").unwrap();
    let applied = Arc::new(AtomicU64::new(0));
    let seen = applied.clone();
    let load = hammer(&t.db, move |db| {
        let (counter, applied) = (counter.clone(), applied.clone());
        Box::pin(async move {
            if counter.try_sub_now(&db, 1, 1).await? {
                applied.fetch_add(1, Ordering::Relaxed);
            }
            Ok(0)
        })
    })
    .await;
    assert!(load.errors.is_empty(), "{:?}", load.errors);
    assert_eq!(seen.load(Ordering::Relaxed), 200);
    assert_eq!(value(&t.db, &table).await, 0);
    // In a transaction, with RETURNING (or the MariaDB read-back): the new value.
    let counter = Counter::new(&table, "id", "n").unwrap();
    t.db.execute_script(&format!("UPDATE {table} SET n = 5"))
        .await
        .unwrap();
    let left =
        t.db.transaction(|tx| {
            let counter = counter.clone();
            Box::pin(async move {
                Ok::<_, contend::Error>((
                    counter.try_sub(tx, 1, 2).await?,
                    counter.try_sub(tx, 1, 9).await?,
                ))
            })
        })
        .await
        .unwrap();
    assert_eq!(left, (Some(3), None));
    assert!(
        counter.try_sub_now(&t.db, 1, 0).await.is_err(),
        "a non-positive amount is refused"
    );
    t.cleanup().await;
}

async fn pessimistic_row_lock_serializes(mut t: TestDb) {
    let backend = t.backend();
    let lock = contend::strategy::pessimistic::lock_clause(backend, RowLock::Update).unwrap();
    let (lost, load) = lost_updates(&mut t, move |db, table| {
        let options = TxOptions::new().retry(RetryPolicy::new().max_attempts(20));
        Box::pin(tx_increment(db, table, options, lock, None))
    })
    .await;
    assert_safe(backend, "pessimistic", lost, &load);
    t.cleanup().await;
}

async fn optimistic_version_check_retries(mut t: TestDb) {
    let backend = t.backend();
    let (lost, load) = lost_updates(&mut t, |db, table| {
        Box::pin(async move {
            let rows = Versioned::new(&table, "id", "version").unwrap();
            let run = db
                .run(&optimistic::options(), |tx| {
                    let (rows, table) = (rows.clone(), table.clone());
                    Box::pin(async move {
                        let row = tx
                            .query(&format!("SELECT n, version FROM {table} WHERE id = 1"))
                            .fetch_one(tx.conn())
                            .await?;
                        let (n, version): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
                        tokio::task::yield_now().await;
                        rows.update(tx, 1, version, &[("n", Value::Int(n + 1))])
                            .await?;
                        Ok::<_, contend::Error>(())
                    })
                })
                .await;
            if let Some(kind) = run.conflicts.first() {
                assert_eq!(*kind, ConflictKind::Version);
            }
            run.result?;
            Ok(run.conflicts.len() as u64)
        })
    })
    .await;
    let conflicts = assert_safe(backend, "optimistic", lost, &load);
    if backend != Backend::Sqlite {
        // SQLite's BEGIN IMMEDIATE already serializes the read; servers really race.
        assert!(
            conflicts > 0,
            "{backend}: no version conflict under a hot row"
        );
    }
    t.cleanup().await;
}

async fn optimistic_stale_version_is_a_conflict(mut t: TestDb) {
    let table = counter_table(&mut t).await;
    let rows = Versioned::new(&table, "id", "version").unwrap();
    let result =
        t.db.transaction(|tx| {
            let rows = rows.clone();
            Box::pin(async move {
                assert_eq!(rows.version(tx, 1).await?, Some(0));
                rows.update(tx, 1, 0, &[("n", Value::Int(7))]).await?;
                Ok::<_, contend::Error>(rows.update(tx, 1, 0, &[("n", Value::Int(8))]).await)
            })
        })
        .await
        .unwrap();
    assert_eq!(result.unwrap_err().conflict(), Some(ConflictKind::Version));
    assert_eq!(value(&t.db, &table).await, 7);
    t.cleanup().await;
}

async fn serializable_prevents_lost_update(mut t: TestDb) {
    let backend = t.backend();
    let (lost, load) = lost_updates(&mut t, |db, table| {
        Box::pin(tx_increment(db, table, serializable::options(), "", None))
    })
    .await;
    let conflicts = assert_safe(backend, "serializable", lost, &load);
    if backend != Backend::Sqlite {
        assert!(
            conflicts > 0,
            "{backend}: SERIALIZABLE never aborted a racing transaction"
        );
    }
    t.cleanup().await;
}

async fn advisory_xact_lock_serializes(mut t: TestDb) {
    let backend = t.backend();
    if backend == Backend::Sqlite {
        let err = t
            .db
            .transaction(|tx| Box::pin(async move { advisory::lock_xact(tx, "k", None).await }))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        let err = SessionLock::acquire(&t.db, "k", Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        return;
    }
    let key = format!("strat-{}", common::suffix());
    let (lost, load) = lost_updates(&mut t, move |db, table| {
        let options = TxOptions::new().retry(RetryPolicy::new().max_attempts(20));
        Box::pin(tx_increment(db, table, options, "", Some(key.clone())))
    })
    .await;
    assert_safe(backend, "advisory", lost, &load);
    // Released at commit (MariaDB: on the same connection, right after COMMIT) and rollback.
    let key = format!("strat-{}", common::suffix());
    for fail in [false, true] {
        let k = key.clone();
        let _ =
            t.db.transaction(move |tx| {
                let k = k.clone();
                Box::pin(async move {
                    advisory::lock_xact(tx, &k, Some(Duration::from_secs(2))).await?;
                    if fail {
                        return Err(Error::aborted("roll back"));
                    }
                    Ok(())
                })
            })
            .await;
        let lock = SessionLock::acquire(&t.db, &key, Duration::from_millis(200))
            .await
            .unwrap_or_else(|e| {
                panic!("{backend}: lock still held after the transaction (fail={fail}): {e}")
            });
        lock.release().await.unwrap();
    }
    t.cleanup().await;
}

async fn advisory_session_lock(t: TestDb) {
    if t.backend() == Backend::Sqlite {
        return; // covered by advisory_xact_lock_serializes
    }
    let key = format!("strat-{}", common::suffix());
    let held = SessionLock::acquire(&t.db, &key, Duration::from_secs(1))
        .await
        .unwrap();
    let err = SessionLock::acquire(&t.db, &key, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LockNotAcquired { .. }), "{err}");
    // A transaction-scoped lock on the same key times out as a retryable conflict.
    let k = key.clone();
    let err =
        t.db.transaction(move |tx| {
            let k = k.clone();
            Box::pin(
                async move { advisory::lock_xact(tx, &k, Some(Duration::from_millis(100))).await },
            )
        })
        .await
        .unwrap_err();
    assert_eq!(err.conflict(), Some(ConflictKind::LockTimeout), "{err}");
    held.release().await.unwrap();
    // Dropped without release (an error or a cancelled request): the connection is closed and
    // the server frees the lock.
    let dropped = SessionLock::acquire(&t.db, &key, Duration::from_secs(1))
        .await
        .unwrap();
    drop(dropped);
    let again = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match SessionLock::acquire(&t.db, &key, Duration::from_millis(100)).await {
                Ok(lock) => return lock,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("the dropped lock was never released");
    again.release().await.unwrap();
    t.cleanup().await;
}

/// A two-account table: ids 1 and 2 with 1000 each.
async fn accounts(t: &mut TestDb) -> String {
    let name = t
        .create_table(
            "strat_acc",
            "id BIGINT PRIMARY KEY, balance BIGINT NOT NULL",
        )
        .await;
    t.db.execute_script(&format!("INSERT INTO {name} VALUES (1, 1000), (2, 1000)"))
        .await
        .unwrap();
    name
}

/// Transfers A→B and B→A at the same time. Locking in argument order deadlocks (proven with a
/// barrier, on the servers); `lock_many`'s canonical order never does, without any retry.
async fn opposite_transfers_do_not_deadlock(mut t: TestDb) {
    let backend = t.backend();
    let table = accounts(&mut t).await;
    let target = LockTarget::new(&table, "id", &["balance"]).unwrap();
    if backend != Backend::Sqlite {
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let mut tasks = Vec::new();
        for (from, to) in [(1_i64, 2_i64), (2, 1)] {
            let (db, target, barrier) = (t.db.clone(), target.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                db.transaction(move |tx| {
                    let (target, barrier) = (target.clone(), barrier.clone());
                    Box::pin(async move {
                        target.lock(tx, from, RowLock::Update).await?;
                        barrier.wait().await;
                        target.lock(tx, to, RowLock::Update).await?;
                        Ok::<_, contend::Error>(())
                    })
                })
                .await
            }));
        }
        let mut deadlocks = 0;
        for task in tasks {
            if let Err(e) = task.await.unwrap() {
                assert_eq!(e.conflict(), Some(ConflictKind::Deadlock), "{e}");
                deadlocks += 1;
            }
        }
        assert_eq!(
            deadlocks, 1,
            "{backend}: locking in opposite orders must deadlock"
        );
    }
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let (db, target, table, errors) =
            (t.db.clone(), target.clone(), table.clone(), errors.clone());
        let (from, to) = if i % 2 == 0 { (1_i64, 2_i64) } else { (2, 1) };
        tasks.push(tokio::spawn(async move {
            for _ in 0..PER_TASK {
                // No retry policy: a deadlock would surface as an error.
                let result: Result<_, contend::Error> = db
                    .transaction(|tx| {
                        let (target, table) = (target.clone(), table.clone());
                        Box::pin(async move {
                            let rows = target.lock_many(tx, &[from, to], RowLock::Update).await?;
                            assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2]);
                            tokio::task::yield_now().await;
                            let sql =
                                format!("UPDATE {table} SET balance = balance + ? WHERE id = ?");
                            tx.query(&sql)
                                .bind(-1_i64)
                                .bind(from)
                                .execute(tx.conn())
                                .await?;
                            tx.query(&sql)
                                .bind(1_i64)
                                .bind(to)
                                .execute(tx.conn())
                                .await?;
                            Ok(())
                        })
                    })
                    .await;
                if let Err(e) = result {
                    eprintln!("{e}");
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "{backend}: a transfer failed"
    );
    let total: i64 =
        t.db.query_scalar(&format!(
            "SELECT CAST(SUM(balance) AS {}) FROM {table}",
            if backend == Backend::MySql {
                "SIGNED"
            } else {
                "BIGINT"
            }
        ))
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    assert_eq!(total, 2000);
    t.cleanup().await;
}

/// `NOWAIT` fails at once on a held row and `SKIP LOCKED` passes it by (servers only: SQLite
/// has one writer at a time, so no other writer can hold a row).
async fn nowait_and_skip_locked(mut t: TestDb) {
    let backend = t.backend();
    let table = accounts(&mut t).await;
    let target = LockTarget::new(&table, "id", &["balance"]).unwrap();
    if backend == Backend::Sqlite {
        assert_eq!(
            contend::strategy::pessimistic::lock_clause(backend, RowLock::UpdateNowait).unwrap(),
            ""
        );
        return;
    }
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let (db, target) = (t.db.clone(), target.clone());
        let mut signal = Some((locked_tx, done_rx));
        tokio::spawn(async move {
            db.transaction(move |tx| {
                let target = target.clone();
                let (locked, done) = signal.take().expect("runs once");
                Box::pin(async move {
                    target.lock(tx, 1, RowLock::Update).await?;
                    let _ = locked.send(());
                    let _ = done.await;
                    Ok::<_, contend::Error>(())
                })
            })
            .await
        })
    };
    locked_rx.await.unwrap();
    let target2 = target.clone();
    let err =
        t.db.transaction(move |tx| {
            let target = target2.clone();
            Box::pin(async move {
                Ok::<_, contend::Error>(target.lock(tx, 1, RowLock::UpdateNowait).await?.is_some())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.conflict(), Some(ConflictKind::LockTimeout), "{err}");
    let target3 = target.clone();
    let (skipped, free) =
        t.db.transaction(move |tx| {
            let target = target3.clone();
            Box::pin(async move {
                let skipped = target
                    .lock(tx, 1, RowLock::UpdateSkipLocked)
                    .await?
                    .is_some();
                let free = target
                    .lock(tx, 2, RowLock::UpdateSkipLocked)
                    .await?
                    .is_some();
                Ok::<_, contend::Error>((skipped, free))
            })
        })
        .await
        .unwrap();
    assert!(!skipped, "{backend}: SKIP LOCKED returned a locked row");
    assert!(free, "{backend}: SKIP LOCKED skipped a free row");
    let _ = done_tx.send(());
    holder.await.unwrap().unwrap();
    t.cleanup().await;
}

/// Many callers race to create the same key: exactly one row, one creator, the same id for all,
/// no error, with both methods, in autocommit and inside transactions. Without the helper
/// (select, then insert, no constraint) the same race creates duplicates.
async fn get_or_create_race_makes_one_row(mut t: TestDb) {
    let backend = t.backend();
    let id = match backend {
        Backend::Postgres => "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        Backend::MySql => "id BIGINT AUTO_INCREMENT PRIMARY KEY",
        _ => "id INTEGER PRIMARY KEY",
    };
    // Baseline: no constraint, select then insert.
    let mut duplicated = false;
    for _ in 0..3 {
        let plain = t
            .create_table(
                "strat_goc_plain",
                &format!("{id}, name VARCHAR(64) NOT NULL"),
            )
            .await;
        let mut tasks = Vec::new();
        for _ in 0..TASKS {
            let (db, plain) = (t.db.clone(), plain.clone());
            tasks.push(tokio::spawn(async move {
                let found: Option<i64> = db
                    .query_scalar(&format!("SELECT id FROM {plain} WHERE name = 'k'"))
                    .fetch_optional(db.pool())
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
                if found.is_none() {
                    db.execute_script(&format!("INSERT INTO {plain} (name) VALUES ('k')"))
                        .await
                        .unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        if t.count(&plain).await > 1 {
            duplicated = true;
            break;
        }
    }
    assert!(
        duplicated,
        "{backend}: the unguarded select-then-insert never duplicated"
    );

    for method in [Method::OnConflict, Method::CatchUnique] {
        for in_tx in [false, true] {
            let table = t
                .create_table(
                    "strat_goc",
                    &format!("{id}, name VARCHAR(64) NOT NULL UNIQUE, hits BIGINT NOT NULL"),
                )
                .await;
            let helper = GetOrCreate::new(&table, "id", "name").unwrap();
            let mut tasks = Vec::new();
            for _ in 0..TASKS {
                let (db, helper) = (t.db.clone(), helper.clone());
                tasks.push(tokio::spawn(async move {
                    let defaults = [("hits", Value::Int(0))];
                    if in_tx {
                        let options = TxOptions::new().retry(RetryPolicy::new().max_attempts(20));
                        db.transaction_with(&options, move |tx| {
                            let helper = helper.clone();
                            Box::pin(async move {
                                let defaults = [("hits", Value::Int(0))];
                                helper.get_or_create_in(tx, "k", &defaults, method).await
                            })
                        })
                        .await
                    } else {
                        helper.get_or_create(&db, "k", &defaults, method).await
                    }
                }));
            }
            let mut found = Vec::new();
            for task in tasks {
                let result = task.await.unwrap();
                found.push(
                    result.unwrap_or_else(|e| panic!("{backend} {method:?} in_tx={in_tx}: {e}")),
                );
            }
            assert_eq!(
                t.count(&table).await,
                1,
                "{backend} {method:?} in_tx={in_tx}"
            );
            let ids = t.ids(&table).await;
            assert!(
                found.iter().all(|f| f.id == ids[0]),
                "{backend} {method:?}: {found:?}"
            );
            assert_eq!(
                found.iter().filter(|f| f.created).count(),
                1,
                "{backend} {method:?} in_tx={in_tx}: {found:?}"
            );
        }
    }
    t.cleanup().await;
}

on_backends!(
    baseline_loses_updates,
    mutex_serializes_in_process,
    atomic_counter_never_oversells,
    pessimistic_row_lock_serializes,
    optimistic_version_check_retries,
    optimistic_stale_version_is_a_conflict,
    serializable_prevents_lost_update,
    advisory_xact_lock_serializes,
    advisory_session_lock,
    opposite_transfers_do_not_deadlock,
    nowait_and_skip_locked,
    get_or_create_race_makes_one_row,
);
