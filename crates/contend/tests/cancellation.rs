//! The cancellation test: thousands of transactions, each writing two rows that belong together,
//! are dropped at random points under load (while waiting for a connection, during `BEGIN`, in
//! the body, in a savepoint, during `COMMIT`). Afterwards no server connection may sit idle in a
//! transaction, no pooled connection may be inside one, and every pair must be complete or absent.
//!
//! This is the bug of sqlx 0.9.0's own `begin` (launchbadge/sqlx#4393: a cancelled `begin` leaves
//! the pooled PostgreSQL connection inside a transaction, and the next user's work joins it):
//! `contend::Tx` runs its own `BEGIN` and closes a connection whose transaction did not finish.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{TestDb, on_backends};
use contend::{Backend, Db, TxOptions};
use rand::Rng;

/// How far a transaction body got: 0 not started (waiting for a connection or in `BEGIN`),
/// 1 started, 2 first row written, 3 body finished (so a cancel came during `COMMIT`).
const STAGES: usize = 4;

struct Load {
    transactions: u32,
    workers: usize,
    connections: u32,
}

fn load(backend: Backend) -> Load {
    match backend {
        // One writer at a time: fewer transactions give the same coverage.
        Backend::Sqlite => Load {
            transactions: 4_000,
            workers: 16,
            connections: 4,
        },
        _ => Load {
            transactions: 10_000,
            workers: 32,
            connections: 8,
        },
    }
}

/// Where the load runs: its own PostgreSQL `application_name` or MariaDB database, so that the
/// server-side checks see only this test's connections (other tests share the servers).
struct Target {
    db: Db,
    /// PostgreSQL application name / MariaDB database name of this run.
    tag: String,
}

async fn target(t: &TestDb, connections: u32) -> Target {
    let tag = format!("contend_cancel_{}", common::suffix());
    let url = match t.backend() {
        Backend::Postgres => {
            let sep = if t.url.contains('?') { '&' } else { '?' };
            format!("{}{sep}application_name={tag}", t.url)
        }
        Backend::MySql => {
            t.db.execute_script(&format!("CREATE DATABASE {tag}"))
                .await
                .unwrap();
            with_database(&t.url, &tag)
        }
        _ => t.url.clone(),
    };
    let db = Db::builder(&url)
        .max_connections(connections)
        .connect()
        .await
        .expect("connect");
    Target { db, tag }
}

/// `mysql://user@host:port/db?params` with the database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL with ://");
    let (rest, params) = match rest.split_once('?') {
        Some((r, p)) => (r, format!("?{p}")),
        None => (rest, String::new()),
    };
    let host = rest.split_once('/').map(|(h, _)| h).unwrap_or(rest);
    format!("{scheme}://{host}/{name}{params}")
}

/// Runs one transaction that writes the pair `id` and reports the stage it reached.
async fn pair(
    db: &Db,
    table: &str,
    id: i64,
    stage: Arc<AtomicU8>,
    hooks: Arc<AtomicU32>,
) -> contend::Result<()> {
    let table = table.to_string();
    db.transaction_with(&TxOptions::new(), move |tx| {
        let (table, stage, hooks) = (table.clone(), stage.clone(), hooks.clone());
        Box::pin(async move {
            stage.store(1, Ordering::SeqCst);
            let insert = format!("INSERT INTO {table} (pair_id, side) VALUES (?, ?)");
            tx.query(&insert)
                .bind(id)
                .bind(1_i64)
                .execute(tx.conn())
                .await?;
            stage.store(2, Ordering::SeqCst);
            if id % 3 == 0 {
                // Some pairs finish inside a savepoint, to be cancelled there too.
                let insert = insert.clone();
                tx.savepoint(move |tx| {
                    Box::pin(async move {
                        tx.query(&insert)
                            .bind(id)
                            .bind(2_i64)
                            .execute(tx.conn())
                            .await?;
                        Ok::<_, contend::Error>(())
                    })
                })
                .await?;
            } else {
                tx.query(&insert)
                    .bind(id)
                    .bind(2_i64)
                    .execute(tx.conn())
                    .await?;
            }
            tx.on_commit(move || async move {
                hooks.fetch_add(1, Ordering::SeqCst);
            });
            stage.store(3, Ordering::SeqCst);
            Ok(())
        })
    })
    .await
}

/// Completes after `n` trips through the scheduler.
async fn yields(n: u32) {
    for _ in 0..n {
        tokio::task::yield_now().await;
    }
}

#[derive(Default)]
struct Tally {
    committed: Vec<i64>,
    cancelled_at: [usize; STAGES],
    errors: Vec<String>,
}

async fn run_load(target: &Target, table: &str, load: &Load) -> Tally {
    let next = Arc::new(AtomicU32::new(0));
    let hooks = Arc::new(AtomicU32::new(0));
    let mut workers = Vec::new();
    for _ in 0..load.workers {
        let (db, table, next, hooks) = (
            target.db.clone(),
            table.to_string(),
            next.clone(),
            hooks.clone(),
        );
        let total = load.transactions;
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            loop {
                let id = next.fetch_add(1, Ordering::SeqCst);
                if id >= total {
                    return tally;
                }
                let id = i64::from(id);
                let stage = Arc::new(AtomicU8::new(0));
                let fut = pair(&db, &table, id, stage.clone(), hooks.clone());
                // Three ways to end: run to the end, drop after a random tiny time, or drop after
                // a random number of scheduler trips (precise points, independent of the timer).
                let (mode, micros, trips) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..3u8),
                        rng.random_range(0..2_500u64),
                        rng.random_range(0..40u32),
                    )
                };
                let outcome = match mode {
                    0 => Some(fut.await),
                    1 => tokio::time::timeout(Duration::from_micros(micros), fut)
                        .await
                        .ok(),
                    _ => tokio::select! {
                        biased;
                        r = fut => Some(r),
                        () = yields(trips) => None,
                    },
                };
                match outcome {
                    Some(Ok(())) => tally.committed.push(id),
                    Some(Err(e)) => tally.errors.push(e.to_string()),
                    None => tally.cancelled_at[usize::from(stage.load(Ordering::SeqCst))] += 1,
                }
            }
        }));
    }
    let mut all = Tally::default();
    for w in workers {
        let t = w.await.expect("worker");
        all.committed.extend(t.committed);
        all.errors.extend(t.errors);
        for (a, b) in all.cancelled_at.iter_mut().zip(t.cancelled_at) {
            *a += b;
        }
    }
    // Hooks run for committed transactions only (never more often than commits).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let hooks = hooks.load(Ordering::SeqCst) as usize;
    assert!(
        hooks >= all.committed.len(),
        "hooks {hooks} < committed {}",
        all.committed.len()
    );
    all
}

/// Server connections of this run that are inside a transaction but idle: the bug's symptom.
async fn idle_in_transaction(observer: &Db, target: &Target) -> i64 {
    match observer.backend() {
        Backend::Postgres => observer
            .query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity \
                 WHERE application_name = ? AND state LIKE 'idle in transaction%'",
            )
            .bind(target.tag.clone())
            .fetch_one(observer.pool())
            .await
            .unwrap(),
        Backend::MySql => observer
            .query_scalar(
                "SELECT COUNT(*) FROM information_schema.innodb_trx t \
                 JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id \
                 WHERE p.db = ?",
            )
            .bind(target.tag.clone())
            .fetch_one(observer.pool())
            .await
            .unwrap(),
        _ => 0,
    }
}

/// Server connections of this run (to show that the check above looks at the right ones).
async fn connections_of_run(observer: &Db, target: &Target) -> i64 {
    let sql = match observer.backend() {
        Backend::Postgres => "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = ?",
        Backend::MySql => "SELECT COUNT(*) FROM information_schema.processlist WHERE db = ?",
        _ => return 1,
    };
    observer
        .query_scalar(sql)
        .bind(target.tag.clone())
        .fetch_one(observer.pool())
        .await
        .unwrap()
}

/// Takes every connection the pool can hand out at once and asks each whether it is inside a
/// transaction. Returns how many are.
async fn pooled_in_transaction(db: &Db, connections: u32) -> usize {
    let mut held = Vec::new();
    let mut inside = 0;
    for _ in 0..connections {
        let mut conn = db.acquire().await.expect("acquire");
        let in_tx = match db.backend() {
            // SAVEPOINT outside a transaction block fails with 25P01 no_active_sql_transaction.
            Backend::Postgres => {
                use sqlx::Executor;
                match conn.execute("SAVEPOINT contend_probe").await {
                    Ok(_) => true,
                    Err(e) => {
                        let code = e.as_database_error().and_then(|d| d.code());
                        assert_eq!(code.as_deref(), Some("25P01"), "{e}");
                        false
                    }
                }
            }
            Backend::MySql => {
                let n: i64 = sqlx::query_scalar("SELECT CAST(@@in_transaction AS SIGNED)")
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap();
                n != 0
            }
            _ => {
                // BEGIN inside a transaction is an error in SQLite.
                use sqlx::Executor;
                match conn.execute("BEGIN").await {
                    Ok(_) => {
                        conn.execute("ROLLBACK").await.unwrap();
                        false
                    }
                    Err(_) => true,
                }
            }
        };
        inside += usize::from(in_tx);
        held.push(conn);
    }
    inside
}

async fn cancelled_transactions_leave_nothing_behind(mut t: TestDb) {
    let backend = t.backend();
    let load = load(backend);
    let target = target(&t, load.connections).await;
    let table = common::table("cancel");
    target
        .db
        .execute_script(&format!(
            "CREATE TABLE {table} (pair_id INTEGER NOT NULL, side INTEGER NOT NULL, \
             PRIMARY KEY (pair_id, side))"
        ))
        .await
        .unwrap();

    let started = Instant::now();
    let tally = run_load(&target, &table, &load).await;
    let elapsed = started.elapsed();
    let cancelled: usize = tally.cancelled_at.iter().sum();
    println!(
        "{backend}: {} transactions in {elapsed:.2?}: {} committed, {cancelled} cancelled \
         (by stage reached: waiting/BEGIN {}, body {}, first row {}, COMMIT {}), {} errors",
        load.transactions,
        tally.committed.len(),
        tally.cancelled_at[0],
        tally.cancelled_at[1],
        tally.cancelled_at[2],
        tally.cancelled_at[3],
        tally.errors.len(),
    );
    assert!(
        tally.errors.is_empty(),
        "{backend}: unexpected errors: {:?}",
        &tally.errors[..tally.errors.len().min(5)]
    );
    assert!(
        tally.committed.len() > 100,
        "{backend}: too few commits to mean anything"
    );
    let [waiting, body, first_row, commit] = tally.cancelled_at;
    assert!(
        waiting > 0 && body + first_row > 0 && commit > 0,
        "{backend}: cancellation did not reach every stage: {:?}",
        tally.cancelled_at
    );

    assert!(
        connections_of_run(&t.db, &target).await > 0,
        "{backend}: the server does not list this run's connections"
    );
    // 1. No server connection of this run sits idle inside a transaction. Closed connections
    // take a moment to go away; a connection left in a transaction never does.
    // (MariaDB serves `innodb_trx` from a cache refreshed at most every 100 ms: wait that out.)
    tokio::time::sleep(Duration::from_millis(150)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut idle = idle_in_transaction(&t.db, &target).await;
    while idle > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(150)).await;
        idle = idle_in_transaction(&t.db, &target).await;
    }
    assert_eq!(
        idle, 0,
        "{backend}: connections idle in a transaction after the load"
    );

    // 2. No pooled connection is inside a transaction.
    let inside = pooled_in_transaction(&target.db, load.connections).await;
    assert_eq!(
        inside, 0,
        "{backend}: pooled connections inside a transaction"
    );

    // 3. Every pair is complete or absent, and every committed one is there.
    let partial: Vec<i64> =
        t.db.query_scalar(&format!(
            "SELECT pair_id FROM {table} GROUP BY pair_id HAVING COUNT(*) <> 2"
        ))
        .fetch_all(target.db.pool())
        .await
        .unwrap();
    assert!(
        partial.is_empty(),
        "{backend}: partial pairs visible: {partial:?}"
    );
    let present: Vec<i64> = target
        .db
        .query_scalar(&format!(
            "SELECT DISTINCT pair_id FROM {table} ORDER BY pair_id"
        ))
        .fetch_all(target.db.pool())
        .await
        .unwrap();
    let missing = tally
        .committed
        .iter()
        .filter(|id| present.binary_search(id).is_err())
        .count();
    assert_eq!(missing, 0, "{backend}: committed pairs missing");
    let visible_after_cancel = present.len() - tally.committed.len();
    println!(
        "{backend}: {visible_after_cancel} pairs committed by transactions cancelled during COMMIT"
    );

    let _ = target
        .db
        .execute_script(&format!("DROP TABLE {table}"))
        .await;
    target.db.pool().close().await;
    if backend == Backend::MySql {
        let _ =
            t.db.execute_script(&format!("DROP DATABASE {}", target.tag))
                .await;
    }
    let _ = &mut t;
    t.cleanup().await;
}

on_backends!(cancelled_transactions_leave_nothing_behind);
