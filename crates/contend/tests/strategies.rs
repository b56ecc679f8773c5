//! The strategy building blocks under real concurrency, on SQLite always and on PostgreSQL and
//! MariaDB when `CONTEND_PG_URL` / `CONTEND_MYSQL_URL` are set. Every safe strategy is checked
//! against the same load under which the unsafe baseline is shown to lose updates.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::TestDb;
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
                Ok(())
            })
        })
        .await;
    run.result?;
    Ok(run.conflicts.len() as u64)
}

const TOTAL: i64 = (TASKS as u64 * PER_TASK) as i64;

/// The baseline loses updates under the load every safe strategy below is tested with.
async fn baseline_loses_updates(mut t: TestDb) {
    let mut lost = 0;
    for _ in 0..3 {
        let table = counter_table(&mut t).await;
        let load = hammer(&t.db, move |db| Box::pin(unsafe_increment(db, table.clone()))).await;
        assert!(load.errors.is_empty(), "{:?}", load.errors);
        lost = TOTAL - value(&t.db, &t.tables_last()).await;
        if lost > 0 {
            break;
        }
    }
    assert!(lost > 0, "{}: the unsafe baseline lost no update in 3 runs", t.backend());
    t.cleanup().await;
}

trait LastTable {
    fn tables_last(&self) -> String;
}

impl LastTable for TestDb {
    /// Not tracked by the harness: recomputed by the callers that need it.
    fn tables_last(&self) -> String {
        LAST.with(|l| l.borrow().clone())
    }
}

thread_local! {
    static LAST: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}
