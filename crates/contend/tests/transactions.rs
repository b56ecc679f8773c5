//! The transaction core on every backend: commit and rollback, savepoints, refused nesting,
//! `on_commit` hooks, isolation levels asked of the server, read-only, timeouts, `Send`, and the
//! errors of bad URLs and unreachable servers.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestDb, on_backends};
use contend::{Backend, ConflictKind, Db, Error, IsolationLevel, RetryPolicy, TxOptions};

on_backends!(
    commit_and_rollback,
    failing_savepoint_keeps_outer_transaction,
    nested_transaction_is_refused,
    hooks_run_after_commit_only,
    hooks_are_discarded_with_their_savepoint,
    hooks_run_once_across_retries,
    failing_hooks_do_not_stop_the_others,
    isolation_level_is_in_effect,
    read_only_refuses_writes,
    transaction_runs_inside_tokio_spawn,
    swallowed_database_error_never_commits_silently,
);

async fn commit_and_rollback(mut t: TestDb) {
    let table = t
        .create_table("commit", "id INTEGER PRIMARY KEY, v INTEGER NOT NULL")
        .await;
    let db = t.db.clone();

    let sql = format!("INSERT INTO {table} (id, v) VALUES (?, ?)");
    let s = sql.clone();
    let n = db
        .transaction(move |tx| {
            let q = tx.query(&s).bind(1_i64).bind(10_i64);
            Box::pin(
                async move { Ok::<_, contend::Error>(q.execute(tx.conn()).await?.rows_affected()) },
            )
        })
        .await
        .expect("commit");
    assert_eq!(n, 1);
    assert_eq!(t.ids(&table).await, [1]);

    // The body's own error rolls back everything it wrote.
    let s = sql.clone();
    let err = db
        .transaction(move |tx| {
            let q = tx.query(&s).bind(2_i64).bind(20_i64);
            Box::pin(async move {
                q.execute(tx.conn()).await?;
                Err::<(), _>(Error::aborted("changed my mind"))
            })
        })
        .await
        .expect_err("aborted");
    assert!(matches!(err, Error::Aborted(_)), "{err:?}");
    assert_eq!(t.ids(&table).await, [1]);

    // A database error (duplicate key) rolls back the earlier write of the same transaction.
    let s = sql.clone();
    let err = db
        .transaction(move |tx| {
            let first = tx.query(&s).bind(3_i64).bind(30_i64);
            let duplicate = tx.query(&s).bind(1_i64).bind(99_i64);
            Box::pin(async move {
                first.execute(tx.conn()).await?;
                duplicate.execute(tx.conn()).await?;
                Ok::<_, contend::Error>(())
            })
        })
        .await
        .expect_err("duplicate key");
    assert!(err.is_unique_violation(), "{err:?}");
    assert_eq!(err.conflict(), None);
    assert_eq!(t.ids(&table).await, [1]);
    t.cleanup().await;
}

async fn failing_savepoint_keeps_outer_transaction(mut t: TestDb) {
    let table = t.create_table("savepoint", "id INTEGER PRIMARY KEY").await;
    let db = t.db.clone();
    let insert = format!("INSERT INTO {table} (id) VALUES (?)");

    let ins = insert.clone();
    let inner_errors = db
        .transaction(move |tx| {
            let ins = ins.clone();
            Box::pin(async move {
                tx.query(&ins).bind(1_i64).execute(tx.conn()).await?;
                // A savepoint whose body gives up.
                let i = ins.clone();
                let aborted = tx
                    .savepoint(move |tx| {
                        Box::pin(async move {
                            assert_eq!(tx.depth(), 1);
                            tx.query(&i).bind(2_i64).execute(tx.conn()).await?;
                            Err::<(), _>(Error::aborted("inner gives up"))
                        })
                    })
                    .await;
                // A savepoint failing on a database error: on PostgreSQL this aborts the whole
                // transaction unless the savepoint is rolled back.
                let i = ins.clone();
                let duplicate = tx
                    .savepoint(move |tx| {
                        Box::pin(async move {
                            tx.query(&i).bind(3_i64).execute(tx.conn()).await?;
                            tx.query(&i).bind(1_i64).execute(tx.conn()).await?;
                            Ok::<_, contend::Error>(())
                        })
                    })
                    .await;
                // Nested savepoints: the inner one fails, the middle one commits its own work.
                let i = ins.clone();
                tx.savepoint(move |tx| {
                    Box::pin(async move {
                        tx.query(&i).bind(4_i64).execute(tx.conn()).await?;
                        let j = i.clone();
                        let deep = tx
                            .savepoint(move |tx| {
                                Box::pin(async move {
                                    assert_eq!(tx.depth(), 2);
                                    tx.query(&j).bind(5_i64).execute(tx.conn()).await?;
                                    Err::<(), _>(Error::aborted("deepest gives up"))
                                })
                            })
                            .await;
                        assert!(deep.is_err());
                        assert_eq!(tx.depth(), 1);
                        Ok::<_, contend::Error>(())
                    })
                })
                .await?;
                assert_eq!(tx.depth(), 0);
                // The outer transaction is still usable.
                tx.query(&ins).bind(6_i64).execute(tx.conn()).await?;
                Ok::<_, contend::Error>((aborted.is_err(), duplicate))
            })
        })
        .await
        .expect("outer transaction commits");
    assert!(inner_errors.0);
    let duplicate = inner_errors
        .1
        .expect_err("duplicate key inside the savepoint");
    assert!(duplicate.is_unique_violation(), "{duplicate:?}");
    assert_eq!(t.ids(&table).await, [1, 4, 6]);
    t.cleanup().await;
}

async fn nested_transaction_is_refused(mut t: TestDb) {
    let table = t.create_table("nested", "id INTEGER PRIMARY KEY").await;
    let db = t.db.clone();
    let insert = format!("INSERT INTO {table} (id) VALUES (?)");
    let inner_db = db.clone();
    let ins = insert.clone();
    let (direct, in_savepoint) = db
        .transaction(move |tx| {
            let inner_db = inner_db.clone();
            let ins = ins.clone();
            Box::pin(async move {
                tx.query(&ins).bind(1_i64).execute(tx.conn()).await?;
                let direct = inner_db
                    .transaction(|_tx| Box::pin(async { Ok::<_, contend::Error>(()) }))
                    .await;
                let db2 = inner_db.clone();
                let in_savepoint = tx
                    .savepoint(move |_tx| {
                        Box::pin(async move {
                            Ok::<_, contend::Error>(
                                db2.transaction_with(
                                    &TxOptions::new().retry(RetryPolicy::new()),
                                    |_tx| Box::pin(async { Ok::<_, contend::Error>(()) }),
                                )
                                .await,
                            )
                        })
                    })
                    .await?;
                Ok::<_, contend::Error>((direct, in_savepoint))
            })
        })
        .await
        .expect("outer transaction commits");
    assert!(
        matches!(direct, Err(Error::NestedTransaction)),
        "{direct:?}"
    );
    assert!(
        matches!(in_savepoint, Err(Error::NestedTransaction)),
        "{in_savepoint:?}"
    );
    assert_eq!(t.ids(&table).await, [1]);
    // Outside any transaction, `transaction` works again.
    assert!(!contend::tx::in_transaction());
    db.transaction(|_tx| Box::pin(async { Ok::<_, contend::Error>(()) }))
        .await
        .expect("not nested any more");
    t.cleanup().await;
}

/// A hook that appends `n` to `log`.
fn push(log: &Arc<Mutex<Vec<u32>>>, n: u32) -> impl FnOnce() -> std::future::Ready<()> + use<> {
    let log = log.clone();
    move || {
        log.lock().unwrap().push(n);
        std::future::ready(())
    }
}

async fn hooks_run_after_commit_only(mut t: TestDb) {
    let table = t.create_table("hooks", "id INTEGER PRIMARY KEY").await;
    let db = t.db.clone();
    let log = Arc::new(Mutex::new(Vec::new()));
    let insert = format!("INSERT INTO {table} (id) VALUES (?)");

    // Committed: the hooks run after the COMMIT, in registration order, once the row is visible.
    let (l, ins, pool) = (log.clone(), insert.clone(), db.clone());
    let seen = Arc::new(Mutex::new(None));
    let s = seen.clone();
    let count_sql = format!("SELECT COUNT(*) FROM {table}");
    db.transaction(move |tx| {
        let (l, ins, pool, s, count_sql) = (
            l.clone(),
            ins.clone(),
            pool.clone(),
            s.clone(),
            count_sql.clone(),
        );
        Box::pin(async move {
            tx.query(&ins).bind(1_i64).execute(tx.conn()).await?;
            tx.on_commit(push(&l, 1));
            tx.on_commit(move || async move {
                // Runs after the commit: another connection sees the row.
                let n: i64 = pool.query_scalar(&count_sql).fetch_one(pool.pool()).await?;
                *s.lock().unwrap() = Some(n);
                Ok::<(), Error>(())
            });
            tx.on_commit(push(&l, 3));
            assert!(
                l.lock().unwrap().is_empty(),
                "no hook may run before the commit"
            );
            Ok::<_, contend::Error>(())
        })
    })
    .await
    .expect("commit");
    assert_eq!(*log.lock().unwrap(), [1, 3]);
    assert_eq!(
        *seen.lock().unwrap(),
        Some(1),
        "the hook ran after the commit was visible"
    );

    // Rolled back (body error): no hook runs.
    let (l, ins) = (log.clone(), insert.clone());
    let err = db
        .transaction(move |tx| {
            let (l, ins) = (l.clone(), ins.clone());
            Box::pin(async move {
                tx.query(&ins).bind(2_i64).execute(tx.conn()).await?;
                tx.on_commit(push(&l, 10));
                Err::<(), _>(Error::aborted("no"))
            })
        })
        .await;
    assert!(err.is_err());
    // Rolled back after a database error (duplicate key): no hook runs.
    let (l, ins) = (log.clone(), insert.clone());
    let err: Result<_, contend::Error> = db
        .transaction(move |tx| {
            let (l, ins) = (l.clone(), ins.clone());
            Box::pin(async move {
                tx.on_commit(push(&l, 11));
                tx.query(&ins).bind(1_i64).execute(tx.conn()).await?;
                Ok(())
            })
        })
        .await;
    assert!(err.is_err());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(*log.lock().unwrap(), [1, 3]);
    assert_eq!(t.ids(&table).await, [1]);
    t.cleanup().await;
}

async fn hooks_are_discarded_with_their_savepoint(t: TestDb) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    t.db.transaction(move |tx| {
        let l = l.clone();
        Box::pin(async move {
            tx.on_commit(push(&l, 1));
            let l2 = l.clone();
            let _ = tx
                .savepoint(move |tx| {
                    Box::pin(async move {
                        tx.on_commit(push(&l2, 2));
                        Err::<(), _>(Error::aborted("savepoint fails"))
                    })
                })
                .await;
            let l3 = l.clone();
            tx.savepoint(move |tx| {
                Box::pin(async move {
                    tx.on_commit(push(&l3, 3));
                    let l4 = l3.clone();
                    let _ = tx
                        .savepoint(move |tx| {
                            Box::pin(async move {
                                tx.on_commit(push(&l4, 4));
                                Err::<(), _>(Error::aborted("inner fails"))
                            })
                        })
                        .await;
                    Ok::<_, contend::Error>(())
                })
            })
            .await?;
            tx.on_commit(push(&l, 5));
            Ok::<_, contend::Error>(())
        })
    })
    .await
    .expect("commit");
    assert_eq!(*log.lock().unwrap(), [1, 3, 5]);
    t.cleanup().await;
}

async fn hooks_run_once_across_retries(mut t: TestDb) {
    let table = t.create_table("retryhooks", "id INTEGER PRIMARY KEY").await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicU32::new(0));
    let (l, c) = (log.clone(), calls.clone());
    let insert = format!("INSERT INTO {table} (id) VALUES (?)");
    let options = TxOptions::new().retry(RetryPolicy::new().base_delay(Duration::ZERO));
    // The first two attempts write, register a hook, then hit a conflict: they are rolled back
    // and their hooks discarded; the third commits and its hook runs once.
    let run =
        t.db.run(&options, move |tx| {
            let (l, c, ins) = (l.clone(), c.clone(), insert.clone());
            Box::pin(async move {
                let attempt = c.fetch_add(1, Ordering::SeqCst) + 1;
                tx.query(&ins)
                    .bind(i64::from(attempt))
                    .execute(tx.conn())
                    .await?;
                tx.on_commit(push(&l, attempt));
                if attempt < 3 {
                    return Err(Error::Conflict {
                        kind: ConflictKind::Serialization,
                        source: None,
                    });
                }
                Ok(attempt)
            })
        })
        .await;
    assert_eq!(run.result.expect("third attempt commits"), 3);
    assert_eq!(run.attempts, 3);
    assert_eq!(run.conflicts, [ConflictKind::Serialization; 2]);
    assert_eq!(*log.lock().unwrap(), [3]);
    assert_eq!(t.ids(&table).await, [3], "failed attempts were rolled back");

    // Without a retry policy the conflict is returned after one attempt.
    let run =
        t.db.run(&TxOptions::new(), |_tx| {
            Box::pin(async {
                Err::<(), _>(Error::Conflict {
                    kind: ConflictKind::Deadlock,
                    source: None,
                })
            })
        })
        .await;
    assert_eq!(run.attempts, 1);
    assert_eq!(run.conflicts, [ConflictKind::Deadlock]);
    assert_eq!(
        run.result.unwrap_err().conflict(),
        Some(ConflictKind::Deadlock)
    );
    t.cleanup().await;
}

async fn failing_hooks_do_not_stop_the_others(t: TestDb) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    t.db.transaction(move |tx| {
        let l = l.clone();
        Box::pin(async move {
            tx.on_commit(push(&l, 1));
            tx.on_commit(|| async {
                let fail = true;
                if fail {
                    panic!("a hook panics (expected in this test)");
                }
            });
            tx.on_commit(|| async { Err::<(), _>("a hook fails (expected in this test)") });
            tx.on_commit(push(&l, 4));
            Ok::<_, contend::Error>(())
        })
    })
    .await
    .expect("a failing hook does not fail the committed transaction");
    assert_eq!(*log.lock().unwrap(), [1, 4]);
    t.cleanup().await;
}

/// How long `information_schema.innodb_trx` may lag behind (its cache refresh interval, 100 ms).
const INNODB_TRX_CACHE: Duration = Duration::from_millis(150);

/// What the server says the current transaction's isolation level is, in upper case.
async fn server_isolation(tx: &mut contend::Tx, probe_table: &str) -> contend::Result<String> {
    match tx.backend() {
        Backend::Postgres => {
            let level: String = tx
                .query_scalar("SHOW transaction_isolation")
                .fetch_one(tx.conn())
                .await?;
            Ok(level.to_uppercase())
        }
        Backend::MySql => {
            // InnoDB registers the transaction at its first read.
            tx.query(&format!("SELECT COUNT(*) FROM {probe_table}"))
                .execute(tx.conn())
                .await?;
            // `information_schema.innodb_trx` is served from a cache that InnoDB refreshes at most
            // every 100 ms: read sooner, it can still describe the previous transaction.
            tokio::time::sleep(INNODB_TRX_CACHE).await;
            let level: String = tx
                .query_scalar(
                    "SELECT trx_isolation_level FROM information_schema.innodb_trx \
                     WHERE trx_mysql_thread_id = CONNECTION_ID()",
                )
                .fetch_one(tx.conn())
                .await?;
            Ok(level.to_uppercase())
        }
        _ => {
            // SQLite runs every transaction serializable (see `contend::isolation`).
            Ok("SERIALIZABLE".into())
        }
    }
}

async fn isolation_level_is_in_effect(mut t: TestDb) {
    let probe = t.create_table("isolation", "id INTEGER PRIMARY KEY").await;
    // One connection, so that a level leaking into the next transaction would be seen.
    let db = t.reopen(|b| b.max_connections(1)).await;
    let backend = db.backend();
    for level in IsolationLevel::ALL {
        let p = probe.clone();
        let seen = db
            .transaction_with(&TxOptions::new().isolation(level), move |tx| {
                let p = p.clone();
                Box::pin(async move { server_isolation(tx, &p).await })
            })
            .await
            .unwrap_or_else(|e| panic!("{level}: {e}"));
        let expected = match backend {
            Backend::Sqlite => "SERIALIZABLE",
            _ => level.sql(),
        };
        assert_eq!(seen, expected, "{backend} at {level}");
        // The next transaction without a level gets the server default again.
        let p = probe.clone();
        let default = db
            .transaction(move |tx| {
                let p = p.clone();
                Box::pin(async move { server_isolation(tx, &p).await })
            })
            .await
            .expect("default level");
        let expected_default = match backend {
            Backend::Postgres => "READ COMMITTED",
            Backend::MySql => "REPEATABLE READ",
            _ => "SERIALIZABLE",
        };
        assert_eq!(
            default, expected_default,
            "{backend}: level leaked after {level}"
        );
    }
    if backend == Backend::Postgres {
        let read_only: String = db
            .transaction_with(&TxOptions::new().read_only(true), |tx| {
                Box::pin(async move {
                    Ok::<_, contend::Error>(
                        tx.query_scalar("SHOW transaction_read_only")
                            .fetch_one(tx.conn())
                            .await?,
                    )
                })
            })
            .await
            .expect("read-only transaction");
        assert_eq!(read_only, "on");
    }
    db.pool().close().await;
    t.cleanup().await;
}

async fn read_only_refuses_writes(mut t: TestDb) {
    let table = t.create_table("readonly", "id INTEGER PRIMARY KEY").await;
    let db = t.reopen(|b| b.max_connections(1)).await;
    let insert = format!("INSERT INTO {table} (id) VALUES (?)");
    let ins = insert.clone();
    let options = TxOptions::new().read_only(true);
    let err = db
        .transaction_with(&options, move |tx| {
            let q = tx.query(&ins).bind(1_i64);
            Box::pin(async move {
                q.execute(tx.conn()).await?;
                Ok(())
            })
        })
        .await
        .expect_err("a read-only transaction refuses writes");
    assert!(matches!(err, Error::Database(_)), "{err:?}");
    assert_eq!(err.conflict(), None);
    // Reads work in a read-only transaction.
    let count_sql = format!("SELECT COUNT(*) FROM {table}");
    let n: i64 = db
        .transaction_with(&options, move |tx| {
            let q = tx.query_scalar(&count_sql);
            Box::pin(async move { Ok::<_, contend::Error>(q.fetch_one(tx.conn()).await?) })
        })
        .await
        .expect("read");
    assert_eq!(n, 0);
    // The same (only) connection writes again in a normal transaction: nothing leaked.
    db.transaction(move |tx| {
        let q = tx.query(&insert).bind(2_i64);
        Box::pin(async move {
            q.execute(tx.conn()).await?;
            Ok::<_, contend::Error>(())
        })
    })
    .await
    .expect("read-write again");
    assert_eq!(t.ids(&table).await, [2]);
    db.pool().close().await;
    t.cleanup().await;
}

async fn transaction_runs_inside_tokio_spawn(mut t: TestDb) {
    let table = t.create_table("spawn", "id INTEGER PRIMARY KEY").await;
    let db = t.db.clone();
    let hooks = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for id in 0..4_i64 {
        let (db, table, hooks) = (db.clone(), table.clone(), hooks.clone());
        // `tokio::spawn` requires a `Send + 'static` future: this must compile.
        tasks.push(tokio::spawn(async move {
            let options = TxOptions::new().retry(RetryPolicy::new());
            db.transaction_with(&options, move |tx| {
                let (table, hooks) = (table.clone(), hooks.clone());
                Box::pin(async move {
                    let sql = format!("INSERT INTO {table} (id) VALUES (?)");
                    tx.savepoint(|tx| {
                        let q = tx.query(&sql).bind(id);
                        Box::pin(
                            async move { Ok::<_, contend::Error>(q.execute(tx.conn()).await?) },
                        )
                    })
                    .await?;
                    tx.on_commit(move || async move {
                        hooks.fetch_add(1, Ordering::SeqCst);
                    });
                    Ok::<_, contend::Error>(id)
                })
            })
            .await
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("transaction");
    }
    assert_eq!(hooks.load(Ordering::SeqCst), 4);
    assert_eq!(t.ids(&table).await, [0, 1, 2, 3]);
    t.cleanup().await;
}

/// A body that swallows a database error and returns `Ok`. PostgreSQL has aborted the
/// transaction: its COMMIT would silently roll back, so contend reports it instead, and the hooks
/// do not run. MariaDB and SQLite roll back only the failed statement: the rest commits.
async fn swallowed_database_error_never_commits_silently(mut t: TestDb) {
    let table = t.create_table("swallowed", "id INTEGER PRIMARY KEY").await;
    let backend = t.backend();
    let hooks = Arc::new(AtomicU32::new(0));
    let (h, ins) = (
        hooks.clone(),
        format!("INSERT INTO {table} (id) VALUES (?)"),
    );
    let result =
        t.db.transaction(move |tx| {
            let (h, ins) = (h.clone(), ins.clone());
            Box::pin(async move {
                tx.query(&ins).bind(1_i64).execute(tx.conn()).await?;
                let duplicate = tx.query(&ins).bind(1_i64).execute(tx.conn()).await;
                assert!(duplicate.is_err());
                tx.on_commit(move || async move {
                    h.fetch_add(1, Ordering::SeqCst);
                });
                Ok(())
            })
        })
        .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    if backend == Backend::Postgres {
        let err = result.expect_err("PostgreSQL rolled the transaction back");
        assert!(matches!(err, Error::TransactionBroken(_)), "{err:?}");
        assert!(
            err.to_string().contains("rolled back, not committed"),
            "{err}"
        );
        assert_eq!(hooks.load(Ordering::SeqCst), 0, "no commit, no hook");
        assert_eq!(t.ids(&table).await, Vec::<i64>::new());
        // The connection is fine afterwards.
        t.db.transaction(|_tx| Box::pin(async { Ok::<_, contend::Error>(()) }))
            .await
            .expect("next transaction");
    } else {
        result.expect("statement-level rollback: the transaction goes on");
        assert_eq!(hooks.load(Ordering::SeqCst), 1);
        assert_eq!(t.ids(&table).await, [1]);
    }
    t.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Timeouts.

on_backends!(lock_timeout_surfaces_as_its_kind);

async fn lock_timeout_surfaces_as_its_kind(mut t: TestDb) {
    let table = t
        .create_table("locktimeout", "id INTEGER PRIMARY KEY, v INTEGER NOT NULL")
        .await;
    let backend = t.backend();
    t.db.execute_script(&format!("INSERT INTO {table} (id, v) VALUES (1, 0)"))
        .await
        .unwrap();
    let update = format!("UPDATE {table} SET v = v + 1 WHERE id = 1");

    // A holder takes the row lock (SQLite: the database write lock) and keeps it until told.
    let locked = Arc::new(tokio::sync::Barrier::new(2));
    let release = Arc::new(tokio::sync::Notify::new());
    let holder = {
        let (db, update, locked, release) = (
            t.db.clone(),
            update.clone(),
            locked.clone(),
            release.clone(),
        );
        tokio::spawn(async move {
            db.transaction(move |tx| {
                let (update, locked, release) = (update.clone(), locked.clone(), release.clone());
                Box::pin(async move {
                    tx.query(&update).execute(tx.conn()).await?;
                    locked.wait().await;
                    release.notified().await;
                    Ok::<_, contend::Error>(())
                })
            })
            .await
        })
    };
    locked.wait().await;

    let options = TxOptions::new().lock_timeout(Duration::from_millis(200));
    let u = update.clone();
    let run =
        t.db.run(&options, move |tx| {
            let q = tx.query(&u);
            Box::pin(async move {
                q.execute(tx.conn()).await?;
                Ok::<_, contend::Error>(())
            })
        })
        .await;
    release.notify_one();
    holder.await.unwrap().expect("holder commits");
    let err = run.result.expect_err("the lock is held");
    let expected = match backend {
        Backend::Sqlite => ConflictKind::Busy,
        _ => ConflictKind::LockTimeout,
    };
    assert_eq!(err.conflict(), Some(expected), "{err}");
    assert_eq!(run.conflicts, [expected]);

    // The per-transaction timeout does not stay on the pooled connection.
    let db = t.reopen(|b| b.max_connections(1)).await;
    let u = update.clone();
    db.transaction_with(&options, move |tx| {
        let q = tx.query(&u);
        Box::pin(async move {
            q.execute(tx.conn()).await?;
            Ok::<_, contend::Error>(())
        })
    })
    .await
    .expect("uncontended");
    let (session, default): (i64, i64) = match backend {
        Backend::MySql => {
            let row: (i64, i64) = sqlx::query_as(
                "SELECT CAST(@@SESSION.innodb_lock_wait_timeout AS SIGNED), \
                        CAST(@@GLOBAL.innodb_lock_wait_timeout AS SIGNED)",
            )
            .fetch_one(db.pool())
            .await
            .unwrap();
            row
        }
        Backend::Sqlite => {
            let ms: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
                .fetch_one(db.pool())
                .await
                .unwrap();
            (ms, 5_000)
        }
        _ => {
            let ms: String = sqlx::query_scalar("SHOW lock_timeout")
                .fetch_one(db.pool())
                .await
                .unwrap();
            (i64::from(ms != "0"), 0)
        }
    };
    assert_eq!(
        session, default,
        "{backend}: lock timeout leaked onto the connection"
    );
    db.pool().close().await;
    t.cleanup().await;
}

#[tokio::test]
async fn sqlite_statement_timeout_is_unsupported() {
    let t = TestDb::open(Backend::Sqlite).await.unwrap();
    let options = TxOptions::new().statement_timeout(Duration::from_secs(1));
    let ran = Arc::new(AtomicU32::new(0));
    let r = ran.clone();
    let err =
        t.db.transaction_with(&options, move |_tx| {
            r.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        })
        .await
        .expect_err("SQLite has no statement timeout");
    assert!(
        matches!(&err, Error::Unsupported { backend: Backend::Sqlite, what } if what.contains("statement timeout")),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("SQLite does not support a statement timeout"),
        "{err}"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the body must not run");
    // The refused option did not leave a connection in a transaction.
    t.db.transaction(|_tx| Box::pin(async { Ok::<_, contend::Error>(()) }))
        .await
        .expect("next transaction");
}

#[tokio::test]
async fn postgres_statement_timeout_cancels_slow_statements() {
    let Some(t) = TestDb::open(Backend::Postgres).await else {
        return;
    };
    let options = TxOptions::new().statement_timeout(Duration::from_millis(100));
    let err =
        t.db.transaction_with(&options, |tx| {
            Box::pin(async move {
                tx.query("SELECT pg_sleep(5)").execute(tx.conn()).await?;
                Ok::<_, contend::Error>(())
            })
        })
        .await
        .expect_err("statement timeout");
    assert!(err.to_string().contains("statement timeout"), "{err}");
    assert_eq!(err.conflict(), None);
}

// ---------------------------------------------------------------------------------------------
// Connection errors.

#[tokio::test]
async fn bad_urls_are_clear_errors() {
    for url in [
        "oracle://scott@127.0.0.1/x",
        "",
        "not a url",
        "http://127.0.0.1/",
    ] {
        let err = Db::connect(url).await.expect_err(url);
        assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err:?}");
        assert!(
            err.to_string().contains("expected a URL starting with"),
            "{err}"
        );
    }
    let err = Db::connect("postgres://app:secret@127.0.0.1:notaport/app")
        .await
        .expect_err("bad port");
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
    assert!(
        !err.to_string().contains("secret"),
        "the password leaked: {err}"
    );
}

/// A 127.0.0.1 port that nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn unreachable_servers_report_the_real_cause() {
    for (scheme, name) in [
        ("postgres", "PostgreSQL"),
        ("mysql", "MySQL/MariaDB"),
        ("mariadb", "MySQL/MariaDB"),
    ] {
        let port = closed_port();
        let url = format!("{scheme}://app:secret@127.0.0.1:{port}/app");
        let started = std::time::Instant::now();
        let err = Db::builder(&url)
            .connect_timeout(Duration::from_secs(20))
            .connect()
            .await
            .expect_err("nothing listens there");
        let message = err.to_string();
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
        assert!(err.is_unavailable());
        assert!(message.contains(name), "{message}");
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        assert!(message.to_lowercase().contains("refused"), "{message}");
        assert!(!message.contains("secret"), "{message}");
        // The real cause comes at once, not after the pool's timeout.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
    let err = Db::connect("sqlite:/nonexistent-contend-dir/x/y.db")
        .await
        .expect_err("no such folder");
    let message = err.to_string();
    assert!(
        message.contains("SQLite") && message.contains("/nonexistent-contend-dir/x/y.db"),
        "{message}"
    );
}

#[tokio::test]
async fn wrong_credentials_are_reported() {
    let Some(url) = common::server_url(Backend::MySql) else {
        return;
    };
    // Same server, a user that does not exist.
    let rest = url.split_once('@').map(|(_, r)| r).unwrap();
    let bad = format!("mysql://contend_no_such_user:pw@{rest}");
    let err = Db::connect(&bad).await.expect_err("unknown user");
    let message = err.to_string();
    assert!(message.contains("MySQL/MariaDB"), "{message}");
    assert!(message.contains("Access denied"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Behaviour, not just the server's report: only the READ UNCOMMITTED transactions see another
/// transaction's uncommitted row, and the level does not carry over to the next transaction on
/// the same connection.
async fn mariadb_read_uncommitted_is_in_effect_and_does_not_leak() {
    let Some(mut t) = TestDb::open(Backend::MySql).await else {
        return;
    };
    let table = t.create_table("dirty", "id INTEGER PRIMARY KEY").await;
    // A writer inserts a row and keeps its transaction open.
    let inserted = Arc::new(tokio::sync::Barrier::new(2));
    let release = Arc::new(tokio::sync::Notify::new());
    let writer = {
        let (db, table, inserted, release) = (
            t.db.clone(),
            table.clone(),
            inserted.clone(),
            release.clone(),
        );
        tokio::spawn(async move {
            db.transaction(move |tx| {
                let (table, inserted, release) = (table.clone(), inserted.clone(), release.clone());
                Box::pin(async move {
                    tx.query(&format!("INSERT INTO {table} (id) VALUES (1)"))
                        .execute(tx.conn())
                        .await?;
                    inserted.wait().await;
                    release.notified().await;
                    Err::<(), _>(Error::aborted("roll back"))
                })
            })
            .await
        })
    };
    inserted.wait().await;
    let db = t.reopen(|b| b.max_connections(1)).await;
    let count = format!("SELECT COUNT(*) FROM {table}");
    let mut seen = Vec::new();
    for options in [
        TxOptions::new().isolation(IsolationLevel::ReadUncommitted),
        TxOptions::new(),
        TxOptions::new().isolation(IsolationLevel::ReadUncommitted),
        TxOptions::new().isolation(IsolationLevel::ReadCommitted),
    ] {
        let c = count.clone();
        let n: i64 = db
            .transaction_with(&options, move |tx| {
                let q = tx.query_scalar(&c);
                Box::pin(async move { Ok::<_, contend::Error>(q.fetch_one(tx.conn()).await?) })
            })
            .await
            .unwrap();
        seen.push(n);
    }
    release.notify_one();
    let _ = writer.await;
    assert_eq!(
        seen,
        [1, 0, 1, 0],
        "dirty reads: READ UNCOMMITTED, default, READ UNCOMMITTED, READ COMMITTED"
    );
    db.pool().close().await;
    t.cleanup().await;
}

/// A `BEGIN IMMEDIATE` refused as busy leaves the connection usable: it goes back to the pool
/// instead of being closed (seen by a TEMP table, which lives as long as its connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_busy_begin_keeps_the_connection() {
    let t = TestDb::open(Backend::Sqlite).await.unwrap();
    t.db.execute_script("CREATE TABLE t (v INTEGER)")
        .await
        .unwrap();
    let db = t.reopen(|b| b.max_connections(1)).await;
    db.execute_script("CREATE TEMP TABLE marker (v INTEGER)")
        .await
        .unwrap();

    let locked = Arc::new(tokio::sync::Barrier::new(2));
    let release = Arc::new(tokio::sync::Notify::new());
    let holder = {
        let (db, locked, release) = (t.db.clone(), locked.clone(), release.clone());
        tokio::spawn(async move {
            db.transaction(move |tx| {
                let (locked, release) = (locked.clone(), release.clone());
                Box::pin(async move {
                    tx.query("INSERT INTO t VALUES (1)")
                        .execute(tx.conn())
                        .await?;
                    locked.wait().await;
                    release.notified().await;
                    Ok::<_, contend::Error>(())
                })
            })
            .await
        })
    };
    locked.wait().await;
    let options = TxOptions::new().lock_timeout(Duration::from_millis(50));
    let err = db
        .transaction_with(&options, |_tx| {
            Box::pin(async { Ok::<_, contend::Error>(()) })
        })
        .await
        .expect_err("busy");
    assert_eq!(err.conflict(), Some(ConflictKind::Busy), "{err}");
    release.notify_one();
    holder.await.unwrap().expect("holder commits");

    // Same connection (the TEMP table is still there), busy timeout back to the default.
    let marker: i64 = db
        .query_scalar("SELECT COUNT(*) FROM temp.marker")
        .fetch_one(db.pool())
        .await
        .expect("the connection was kept");
    assert_eq!(marker, 0);
    let busy: i64 = db
        .query_scalar("PRAGMA busy_timeout")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(busy, 5_000);
    db.transaction(|tx| {
        Box::pin(async move {
            tx.query("INSERT INTO t VALUES (2)")
                .execute(tx.conn())
                .await?;
            Ok::<_, contend::Error>(())
        })
    })
    .await
    .expect("the kept connection works");
}
