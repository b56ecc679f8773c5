//! The strategy executor (`contend::strategy::Executor`): one operation, written once, run under
//! every strategy from `tokio::spawn`ed tasks (the futures must be `Send`), on SQLite always and
//! on PostgreSQL and MariaDB when their URLs are set. The unsafe baseline is shown to lose
//! updates under the same load under which every safe strategy keeps the invariant; the fence of
//! a lock-service grant is shown to refuse a holder that had lost its lock.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestDb, on_backends};
use contend::fencing::{self, FencingToken};
use contend::lock::{HeldLock, LockService};
use contend::strategy::{Executor, Operation, Strategy, optimistic};
use contend::{Backend, BoxFuture, Error, Tx};
use sqlx::{AnyConnection, Row};

const WORKERS: usize = 8;
const PER_WORKER: u64 = 25;

#[path = "common/bank.rs"]
mod bank;
use bank::BankError;

/// Withdraw 1 from the hot account, refusing to overdraw.
struct Withdraw {
    table: String,
}

impl Operation for Withdraw {
    type State = (i64, i64);
    type Output = i64;
    type Error = BankError;

    fn keys(&self) -> Vec<String> {
        vec![format!("{}:1", self.table)]
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, Result<(i64, i64), BankError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT balance, version FROM {} WHERE id = 1{lock}",
                self.table
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_one(conn)
                .await?;
            // Another request's turn between the read and the write, as in a real handler.
            tokio::task::yield_now().await;
            Ok((row.try_get(0)?, row.try_get(1)?))
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        state: &'c (i64, i64),
        checked: bool,
    ) -> BoxFuture<'c, Result<i64, BankError>> {
        Box::pin(async move {
            let (balance, version) = *state;
            if balance < 1 {
                return Err(BankError::Insufficient);
            }
            let table = &self.table;
            let sql = if checked {
                format!("UPDATE {table} SET balance = ?, version = ? WHERE id = 1 AND version = ?")
            } else {
                format!("UPDATE {table} SET balance = ?, version = ? WHERE id = 1 AND ? >= 0")
            };
            let q = tx
                .query(&sql)
                .bind(balance - 1)
                .bind(version + 1)
                .bind(version);
            optimistic::check(q.execute(tx.conn()).await?.rows_affected())?;
            Ok(balance - 1)
        })
    }

    fn atomic<'c>(&'c self, tx: &'c mut Tx) -> Option<BoxFuture<'c, Result<i64, BankError>>> {
        Some(Box::pin(async move {
            let sql = format!(
                "UPDATE {} SET balance = balance - 1, version = version + 1 \
                 WHERE id = 1 AND balance >= 1",
                self.table
            );
            if tx.query(&sql).execute(tx.conn()).await?.rows_affected() == 0 {
                return Err(BankError::Insufficient);
            }
            Ok(0)
        }))
    }
}

struct Tally {
    ok: u64,
    refused: u64,
    errors: Vec<String>,
}

/// Runs `WORKERS x PER_WORKER` withdrawals under `strategy`, each worker in `tokio::spawn`.
async fn hammer(t: &TestDb, executor: &Executor, strategy: Strategy, table: &str) -> Tally {
    let ok = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let (db, executor) = (t.db.clone(), executor.clone());
        let (ok, refused, errors) = (ok.clone(), refused.clone(), errors.clone());
        let op = Arc::new(Withdraw {
            table: table.to_string(),
        });
        tasks.push(tokio::spawn(async move {
            let mut session = db.session();
            for _ in 0..PER_WORKER {
                let done = executor.run(strategy, &mut session, op.clone()).await;
                match done.result {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(BankError::Insufficient) => refused.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.lock().unwrap().push(e.to_string());
                        0
                    }
                };
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    let errors = errors.lock().unwrap().clone();
    Tally {
        ok: ok.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        errors,
    }
}

async fn create(t: &mut TestDb, start: i64) -> String {
    let table = t
        .create_table(
            "exec",
            "id BIGINT PRIMARY KEY, balance BIGINT NOT NULL, version BIGINT NOT NULL",
        )
        .await;
    t.db.execute_script(&format!("INSERT INTO {table} VALUES (1, {start}, 0)"))
        .await
        .expect("seed");
    table
}

async fn balance(t: &TestDb, table: &str) -> i64 {
    t.db.query_scalar(&format!("SELECT balance FROM {table} WHERE id = 1"))
        .fetch_one(t.db.pool())
        .await
        .expect("balance")
}

async fn every_strategy_on_one_operation(mut t: TestDb) {
    let executor: Executor = Executor::new().lock_wait(Duration::from_secs(20));
    let total = (WORKERS as u64 * PER_WORKER) as i64;
    // Start with fewer units than requests, so that refusals are part of every run.
    let start = total - 20;
    let mut lost_by_baseline = 0;
    for strategy in [
        Strategy::None,
        Strategy::Mutex,
        Strategy::Atomic,
        Strategy::Pessimistic,
        Strategy::Optimistic,
        Strategy::Serializable,
        Strategy::Advisory,
    ] {
        if executor.check(strategy, t.backend()).is_err() {
            assert_eq!(
                (strategy, t.backend()),
                (Strategy::Advisory, Backend::Sqlite)
            );
            continue;
        }
        let table = create(&mut t, start).await;
        let tally = hammer(&t, &executor, strategy, &table).await;
        let end = balance(&t, &table).await;
        // Each success took one unit: whatever is left beyond that was written over.
        let lost = end - (start - tally.ok as i64);
        if strategy == Strategy::None {
            lost_by_baseline = lost;
            continue;
        }
        assert!(tally.errors.is_empty(), "{strategy}: {:?}", tally.errors);
        assert_eq!(
            lost, 0,
            "{strategy} lost updates (end {end}, ok {})",
            tally.ok
        );
        assert!(end >= 0, "{strategy} overdrew: {end}");
        assert_eq!(tally.ok as i64, start, "{strategy}: every unit sold once");
        assert_eq!(
            tally.refused as i64,
            total - start,
            "{strategy}: the rest refused"
        );
    }
    assert!(
        lost_by_baseline > 0,
        "the unsafe baseline should lose updates under this load ({})",
        t.backend()
    );
    t.cleanup().await;
}

/// A lock service for the test: grants every request at once, with tokens handed out in a
/// fixed order (as a service whose earlier holder was paused past its lease would).
struct Scripted {
    tokens: Mutex<Vec<Option<u64>>>,
    released: AtomicU64,
}

struct ScriptedHeld<'a>(Option<u64>, &'a AtomicU64);

impl HeldLock for ScriptedHeld<'static> {
    fn fencing_token(&self) -> Option<FencingToken> {
        self.0.map(FencingToken::new)
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, contend::Result<()>> {
        self.1.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { Ok(()) })
    }
}

impl LockService for &'static Scripted {
    fn acquire<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        Box::pin(async move {
            let token = self.tokens.lock().unwrap().remove(0);
            Ok(Box::new(ScriptedHeld(token, &self.released)) as Box<dyn HeldLock>)
        })
    }
}

async fn stale_lock_holder_is_fenced(mut t: TestDb) {
    fencing::ensure_schema(&t.db).await.expect("fence table");
    let table = create(&mut t, 10).await;
    // Grants in the order 2, 1 (the holder of 1 lost its lock to the holder of 2), then two
    // grants without tokens (a baseline lock service): nothing stops the late write there.
    let service: &'static Scripted = Box::leak(Box::new(Scripted {
        tokens: Mutex::new(vec![Some(2), Some(1), None, None]),
        released: AtomicU64::new(0),
    }));
    let executor: Executor = Executor::new().lock_service(Strategy::Redis, Arc::new(service));
    let op = Arc::new(Withdraw {
        table: table.clone(),
    });
    let mut session = t.db.session();
    let first = executor
        .run(Strategy::Redis, &mut session, op.clone())
        .await;
    assert_eq!(first.result.expect("token 2 writes"), 9);
    assert!(!first.fenced);
    let late = executor
        .run(Strategy::Redis, &mut session, op.clone())
        .await;
    assert!(late.fenced, "the stale holder is fenced");
    assert!(
        matches!(
            late.result,
            Err(BankError::Db(Error::StaleFencingToken {
                token: 1,
                highest: 2,
                ..
            }))
        ),
        "{:?}",
        late.result
    );
    assert_eq!(
        balance(&t, &table).await,
        9,
        "the stale write did not apply"
    );
    // Without tokens, the same late write goes through: the fence is what refused it.
    for _ in 0..2 {
        let unfenced = executor
            .run(Strategy::Redis, &mut session, op.clone())
            .await;
        assert!(unfenced.result.is_ok() && !unfenced.fenced);
    }
    assert_eq!(balance(&t, &table).await, 7);
    assert_eq!(
        service.released.load(Ordering::Relaxed),
        4,
        "every grant released"
    );
    let resource = format!("{table}:1");
    assert_eq!(
        fencing::highest(&t.db, &resource).await.unwrap(),
        Some(FencingToken::new(2))
    );
    t.db.execute_script(&format!(
        "DELETE FROM {} WHERE resource = '{resource}'",
        fencing::FENCE_TABLE
    ))
    .await
    .expect("clean fence row");
    drop(session);
    t.cleanup().await;
}

async fn unsupported_is_refused_before_any_work(mut t: TestDb) {
    let table = create(&mut t, 5).await;
    let executor: Executor = Executor::new();
    let mut session = t.db.session();
    let op = Arc::new(Withdraw {
        table: table.clone(),
    });
    let done = executor.run(Strategy::Redlock, &mut session, op).await;
    assert_eq!(done.attempts, 0);
    assert!(
        matches!(done.result, Err(BankError::Db(Error::Unsupported { .. }))),
        "{:?}",
        done.result
    );
    assert_eq!(balance(&t, &table).await, 5);
    drop(session);
    t.cleanup().await;
}

on_backends!(
    every_strategy_on_one_operation,
    stale_lock_holder_is_fenced,
    unsupported_is_refused_before_any_work
);
