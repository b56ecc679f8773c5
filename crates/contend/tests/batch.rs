//! The `batched` strategy (`contend::batch`), on SQLite always and on PostgreSQL and MariaDB when
//! their URLs are set, from `tokio::spawn`ed tasks: the hot-row withdraw keeps its invariant
//! where the unsafe baseline breaks under the same load, a refusal inside a batch fails only its
//! own operation, a failed batch (an injected conflict, a killed connection) answers nobody
//! "done" and applies every write once, callers that go away do not cancel their batch, and two
//! processes batching on the same row keep the invariant.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestDb, on_backends};
use contend::batch::BatchOptions;
use contend::strategy::{Executor, Operation, Strategy};
use contend::{Backend, BoxFuture, ConflictKind, Db, Error, Tx, TxError};
use sqlx::{AnyConnection, Row};
use tokio::sync::oneshot;

const WORKERS: usize = 8;
const PER_WORKER: u64 = 25;

#[path = "common/bank.rs"]
mod bank;
use bank::BankError;

/// What a test operation does besides withdrawing.
#[derive(Clone)]
enum Twist {
    /// Nothing.
    Plain,
    /// Decided in memory (`Operation::apply`) and written per group (`write_state`): no log.
    Combined,
    /// Writes, then fails with this conflict every time.
    AlwaysConflict(ConflictKind),
    /// Writes, then refuses with its own (non-conflict) error: only its savepoint rolls back.
    WriteThenRefuse,
    /// Writes, then fails with a deadlock the first time only.
    ConflictOnce(Arc<AtomicBool>),
    /// The first time: after the locking read, reports its connection's id and stalls, so that
    /// the test can kill the connection while the batch holds the row lock.
    Stall(Arc<Mutex<Option<oneshot::Sender<i64>>>>),
}

/// Withdraw `amount` from account 1 of `table`, refusing to overdraw, and log it in
/// `{table}_log` (so that lost updates show: the balance must equal start minus the log).
struct Withdraw {
    table: String,
    amount: i64,
    twist: Twist,
}

impl Withdraw {
    fn plain(table: &str, amount: i64) -> Withdraw {
        Withdraw {
            table: table.to_string(),
            amount,
            twist: Twist::Plain,
        }
    }
}

impl Operation for Withdraw {
    type State = i64;
    type Output = i64;
    type Error = BankError;

    fn keys(&self) -> Vec<String> {
        vec![format!("{}:1", self.table)]
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, Result<i64, BankError>> {
        Box::pin(async move {
            let sql = format!("SELECT balance FROM {} WHERE id = 1{lock}", self.table);
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_one(&mut *conn)
                .await?;
            if let Twist::Stall(report) = &self.twist {
                let report = report.lock().unwrap().take();
                if let Some(report) = report {
                    let id: i64 = if conn.backend_name() == "PostgreSQL" {
                        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                            .fetch_one(&mut *conn)
                            .await?;
                        i64::from(pid)
                    } else {
                        sqlx::query_scalar("SELECT CAST(CONNECTION_ID() AS SIGNED)")
                            .fetch_one(&mut *conn)
                            .await?
                    };
                    let _ = report.send(id);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            // Another request's turn between the read and the write, as in a real handler.
            tokio::task::yield_now().await;
            Ok(row.try_get(0)?)
        })
    }

    fn apply(&self, balance: &mut i64) -> Option<Result<i64, BankError>> {
        if !matches!(self.twist, Twist::Combined) {
            return None;
        }
        if *balance < self.amount {
            return Some(Err(BankError::Insufficient));
        }
        *balance -= self.amount;
        Some(Ok(*balance))
    }

    fn write_state<'c>(
        &'c self,
        tx: &'c mut Tx,
        balance: &'c i64,
    ) -> Option<BoxFuture<'c, Result<(), BankError>>> {
        Some(Box::pin(async move {
            let sql = format!("UPDATE {} SET balance = ? WHERE id = 1", self.table);
            tx.query(&sql).bind(*balance).execute(tx.conn()).await?;
            Ok(())
        }))
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        balance: &'c i64,
        _checked: bool,
    ) -> BoxFuture<'c, Result<i64, BankError>> {
        Box::pin(async move {
            if *balance < self.amount {
                return Err(BankError::Insufficient);
            }
            let table = &self.table;
            let q = tx
                .query(&format!("UPDATE {table} SET balance = ? WHERE id = 1"))
                .bind(balance - self.amount);
            q.execute(tx.conn()).await?;
            let q = tx
                .query(&format!("INSERT INTO {table}_log (amount) VALUES (?)"))
                .bind(self.amount);
            q.execute(tx.conn()).await?;
            match &self.twist {
                Twist::AlwaysConflict(kind) => {
                    return Err(Error::Conflict {
                        kind: *kind,
                        source: None,
                    }
                    .into());
                }
                Twist::WriteThenRefuse => return Err(BankError::Insufficient),
                Twist::ConflictOnce(done) if !done.swap(true, Ordering::SeqCst) => {
                    return Err(Error::Conflict {
                        kind: ConflictKind::Deadlock,
                        source: None,
                    }
                    .into());
                }
                _ => {}
            }
            Ok(balance - self.amount)
        })
    }
}

async fn create(t: &mut TestDb, start: i64) -> String {
    let table = t
        .create_table("batch", "id BIGINT PRIMARY KEY, balance BIGINT NOT NULL")
        .await;
    let log = format!("{table}_log");
    let engine = if t.backend() == Backend::MySql {
        " ENGINE=InnoDB"
    } else {
        ""
    };
    t.db.execute_script(&format!(
        "INSERT INTO {table} VALUES (1, {start}); CREATE TABLE {log} (amount BIGINT NOT NULL){engine}"
    ))
    .await
    .expect("seed");
    table
}

async fn drop_log(t: &TestDb, table: &str) {
    t.db.execute_script(&format!("DROP TABLE IF EXISTS {table}_log"))
        .await
        .expect("drop log");
}

async fn balance(db: &Db, table: &str) -> i64 {
    db.query_scalar(&format!("SELECT balance FROM {table} WHERE id = 1"))
        .fetch_one(db.pool())
        .await
        .expect("balance")
}

/// The sum of the logged withdrawals: what committed.
async fn committed(db: &Db, table: &str) -> i64 {
    let amounts: Vec<i64> = db
        .query_scalar(&format!("SELECT amount FROM {table}_log"))
        .fetch_all(db.pool())
        .await
        .expect("log");
    amounts.iter().sum()
}

#[derive(Default)]
struct Tally {
    ok: u64,
    refused: u64,
    errors: Vec<String>,
}

/// `workers x per_worker` withdrawals of 1 under `strategy` on `db`, each worker a task.
async fn hammer(
    db: &Db,
    executor: &Executor,
    strategy: Strategy,
    table: &str,
    workers: usize,
    per_worker: u64,
    twist: Twist,
) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (db, executor, tally) = (db.clone(), executor.clone(), tally.clone());
        let op = Arc::new(Withdraw {
            twist: twist.clone(),
            ..Withdraw::plain(table, 1)
        });
        tasks.push(tokio::spawn(async move {
            let mut session = db.session();
            for _ in 0..per_worker {
                let done = executor.run(strategy, &mut session, op.clone()).await;
                let mut tally = tally.lock().unwrap();
                match done.result {
                    Ok(_) => tally.ok += 1,
                    Err(BankError::Insufficient) => tally.refused += 1,
                    Err(e) => tally.errors.push(e.to_string()),
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    Arc::try_unwrap(tally)
        .ok()
        .expect("workers done")
        .into_inner()
        .unwrap()
}

fn executor() -> Executor {
    Executor::new().lock_wait(Duration::from_secs(20))
}

/// An executor whose batches wait (up to 5 s) until they hold `size` operations.
fn collecting(size: usize) -> Executor {
    executor().batch(
        BatchOptions::new()
            .max_size(size)
            .max_wait(Duration::from_secs(5)),
    )
}

async fn batched_keeps_the_invariant_where_none_breaks(mut t: TestDb) {
    let total = (WORKERS as u64 * PER_WORKER) as i64;
    let start = total - 20;
    let executor = executor();

    let table = create(&mut t, start).await;
    let base = hammer(
        &t.db,
        &executor,
        Strategy::None,
        &table,
        WORKERS,
        PER_WORKER,
        Twist::Plain,
    )
    .await;
    let lost = balance(&t.db, &table).await - (start - committed(&t.db, &table).await);
    assert!(
        lost > 0,
        "the unsafe baseline should lose updates under this load ({}; ok {})",
        t.backend(),
        base.ok
    );
    drop_log(&t, &table).await;

    let table = create(&mut t, start).await;
    let tally = hammer(
        &t.db,
        &executor,
        Strategy::Batched,
        &table,
        WORKERS,
        PER_WORKER,
        Twist::Plain,
    )
    .await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    let end = balance(&t.db, &table).await;
    assert_eq!(
        end,
        start - committed(&t.db, &table).await,
        "no lost update"
    );
    assert_eq!(end, 0, "every unit sold");
    assert_eq!(tally.ok as i64, start, "every unit sold once");
    assert_eq!(tally.refused as i64, total - start, "the rest refused");
    let stats = executor.batch_stats();
    assert_eq!(stats.operations, total as u64, "{stats:?}");
    assert!(
        stats.largest > 1 && stats.commits < stats.operations,
        "operations were combined: {stats:?}"
    );
    drop_log(&t, &table).await;

    // Decided in memory and written once per group, under the same load.
    let table = create(&mut t, start).await;
    let executor = self::executor();
    let tally = hammer(
        &t.db,
        &executor,
        Strategy::Batched,
        &table,
        WORKERS,
        PER_WORKER,
        Twist::Combined,
    )
    .await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(balance(&t.db, &table).await, 0, "every unit sold");
    assert_eq!(tally.ok as i64, start, "every unit sold once");
    assert_eq!(tally.refused as i64, total - start, "the rest refused");
    let stats = executor.batch_stats();
    assert!(
        stats.largest > 1 && stats.commits < stats.operations,
        "{stats:?}"
    );
    drop_log(&t, &table).await;
    t.cleanup().await;
}

async fn combined_operations_share_one_read_and_write(mut t: TestDb) {
    let table = create(&mut t, 10).await;
    let executor = collecting(5);
    let amounts = [3, 3, 100, 3, 1];
    let mut ops: Vec<Withdraw> = amounts
        .iter()
        .map(|a| Withdraw {
            twist: Twist::Combined,
            ..Withdraw::plain(&table, *a)
        })
        .collect();
    // One operation of the same type without the in-memory form: decided on its own read.
    ops[4].twist = Twist::Plain;
    let results = run_all(&t.db, &executor, ops).await;
    for (amount, (result, _)) in amounts.iter().zip(&results) {
        if *amount == 100 {
            assert!(matches!(result, Err(BankError::Insufficient)), "{result:?}");
        } else {
            assert!(result.is_ok(), "{result:?}");
        }
    }
    assert_eq!(balance(&t.db, &table).await, 0, "10 - 3 - 3 - 3 - 1");
    let stats = executor.batch_stats();
    assert_eq!(
        (stats.commits, stats.operations, stats.largest),
        (1, 5, 5),
        "{stats:?}"
    );
    drop_log(&t, &table).await;
    t.cleanup().await;
}

/// Runs `ops` concurrently (one task each) and returns their results in order, with the
/// attempts of each.
async fn run_all(
    db: &Db,
    executor: &Executor,
    ops: Vec<Withdraw>,
) -> Vec<(Result<i64, BankError>, u32)> {
    let mut tasks = Vec::new();
    for op in ops {
        let (db, executor) = (db.clone(), executor.clone());
        tasks.push(tokio::spawn(async move {
            let mut session = db.session();
            let done = executor
                .run(Strategy::Batched, &mut session, Arc::new(op))
                .await;
            (done.result, done.attempts)
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("task"));
    }
    out
}

async fn refusal_fails_only_its_own_operation(mut t: TestDb) {
    let table = create(&mut t, 10).await;
    let executor = collecting(5);
    let amounts = [3, 3, 100, 3, 1];
    let mut ops: Vec<Withdraw> = amounts
        .iter()
        .map(|a| Withdraw::plain(&table, *a))
        .collect();
    // The last one refuses after its writes: they must be rolled back, and only they.
    ops[4].twist = Twist::WriteThenRefuse;
    let results = run_all(&t.db, &executor, ops).await;
    for (amount, (result, _)) in amounts.iter().zip(&results) {
        if *amount == 100 || *amount == 1 {
            assert!(matches!(result, Err(BankError::Insufficient)), "{result:?}");
        } else {
            assert!(result.is_ok(), "{result:?}");
        }
    }
    assert_eq!(balance(&t.db, &table).await, 1);
    assert_eq!(
        committed(&t.db, &table).await,
        9,
        "the refused writes left nothing"
    );
    let stats = executor.batch_stats();
    assert_eq!(
        (stats.commits, stats.operations, stats.largest),
        (1, 5, 5),
        "one commit for all five: {stats:?}"
    );
    drop_log(&t, &table).await;
    t.cleanup().await;
}

async fn failed_batch_is_retried_then_split(mut t: TestDb) {
    // A conflict once: the whole batch runs again, and commits once.
    let table = create(&mut t, 100).await;
    let executor = collecting(4);
    let mut ops: Vec<Withdraw> = (0..3).map(|_| Withdraw::plain(&table, 1)).collect();
    ops.push(Withdraw {
        table: table.clone(),
        amount: 1,
        twist: Twist::ConflictOnce(Arc::new(AtomicBool::new(false))),
    });
    let results = run_all(&t.db, &executor, ops).await;
    for (result, attempts) in &results {
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(*attempts, 2, "the batch ran twice");
    }
    assert_eq!(balance(&t.db, &table).await, 96, "each write applied once");
    assert_eq!(committed(&t.db, &table).await, 4);
    let stats = executor.batch_stats();
    assert_eq!(
        (stats.commits, stats.largest, stats.retries, stats.splits),
        (1, 4, 1, 0),
        "{stats:?}"
    );

    // A conflict every time (a kind the policy does not retry): the batch is split, the bad
    // operation gets its conflict, its neighbours commit.
    let executor = collecting(4);
    let mut ops: Vec<Withdraw> = (0..3).map(|_| Withdraw::plain(&table, 1)).collect();
    ops.insert(
        1,
        Withdraw {
            table: table.clone(),
            amount: 5,
            twist: Twist::AlwaysConflict(ConflictKind::Version),
        },
    );
    let results = run_all(&t.db, &executor, ops).await;
    for (i, (result, _)) in results.iter().enumerate() {
        if i == 1 {
            assert!(
                matches!(result, Err(e) if e.conflict() == Some(ConflictKind::Version)),
                "{result:?}"
            );
        } else {
            assert!(result.is_ok(), "{result:?}");
        }
    }
    assert_eq!(
        balance(&t.db, &table).await,
        93,
        "the bad write left nothing"
    );
    assert_eq!(committed(&t.db, &table).await, 7);
    let stats = executor.batch_stats();
    assert_eq!((stats.commits, stats.splits), (3, 1), "{stats:?}");
    drop_log(&t, &table).await;
    t.cleanup().await;
}

async fn killed_connection_answers_nobody_done(mut t: TestDb) {
    let table = create(&mut t, 100).await;
    let executor = collecting(4);
    let (report, pid) = oneshot::channel();
    let mut ops: Vec<Withdraw> = (0..3).map(|_| Withdraw::plain(&table, 1)).collect();
    ops.push(Withdraw {
        table: table.clone(),
        amount: 1,
        twist: Twist::Stall(Arc::new(Mutex::new(Some(report)))),
    });
    let (db, ex) = (t.db.clone(), executor.clone());
    let running = tokio::spawn(async move { run_all(&db, &ex, ops).await });
    let pid = pid.await.expect("the batch reports its connection");
    assert!(pid > 0);
    let kill = match t.backend() {
        Backend::Postgres => format!("SELECT pg_terminate_backend({pid})"),
        _ => format!("KILL {pid}"),
    };
    t.db.execute_script(&kill)
        .await
        .expect("kill the batch's connection");
    assert!(
        !running.is_finished(),
        "nobody answered before the batch ended"
    );
    let results = running.await.expect("callers");
    for (result, attempts) in &results {
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(*attempts, 2, "answered from the second attempt");
    }
    assert_eq!(balance(&t.db, &table).await, 96, "each write applied once");
    assert_eq!(committed(&t.db, &table).await, 4);
    let stats = executor.batch_stats();
    assert_eq!(
        (stats.commits, stats.retries, stats.unknown),
        (1, 1, 0),
        "{stats:?}"
    );
    drop_log(&t, &table).await;
    t.cleanup().await;
}

async fn dropped_callers_do_not_cancel_their_batch(mut t: TestDb) {
    let total = (WORKERS as u64 * PER_WORKER) as i64;
    let start = total - 20;
    let table = create(&mut t, start).await;
    let executor = executor();
    let (ok, dropped) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let (db, executor, table) = (t.db.clone(), executor.clone(), table.clone());
        let (ok, dropped) = (ok.clone(), dropped.clone());
        tasks.push(tokio::spawn(async move {
            let mut session = db.session();
            for i in 0..PER_WORKER {
                let op = Arc::new(Withdraw::plain(&table, 1));
                let run = executor.run(Strategy::Batched, &mut session, op);
                if i % 2 == 0 {
                    // Go away right after joining the queue.
                    match tokio::time::timeout(Duration::from_micros(100), run).await {
                        Ok(done) if done.result.is_ok() => _ = ok.fetch_add(1, Ordering::Relaxed),
                        Ok(_) => {}
                        Err(_) => _ = dropped.fetch_add(1, Ordering::Relaxed),
                    }
                } else if run.await.result.is_ok() {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    // Batches of one key run in arrival order: when this one is answered, every operation
    // queued before it has been decided.
    let mut session = t.db.session();
    let last = executor
        .run(
            Strategy::Batched,
            &mut session,
            Arc::new(Withdraw::plain(&table, 0)),
        )
        .await;
    assert!(last.result.is_ok(), "{:?}", last.result);
    drop(session);
    let dropped = dropped.load(Ordering::Relaxed);
    let ok = ok.load(Ordering::Relaxed) as i64;
    assert!(dropped > 0, "some callers went away mid-batch");
    let end = balance(&t.db, &table).await;
    let sold = committed(&t.db, &table).await;
    assert_eq!(end, start - sold, "no lost update, nothing half-applied");
    assert!(end >= 0, "overdrawn: {end}");
    assert!(
        sold > ok,
        "operations of callers that went away still committed (sold {sold}, answered ok {ok})"
    );
    let stats = executor.batch_stats();
    assert_eq!(
        stats.operations,
        total as u64 + 1,
        "every operation decided: {stats:?}"
    );
    drop_log(&t, &table).await;
    t.cleanup().await;
}

async fn two_processes_batch_on_the_same_row(mut t: TestDb) {
    let total = (2 * WORKERS as u64 * PER_WORKER) as i64;
    let start = total - 40;
    let table = create(&mut t, start).await;
    // Two pools and two executors: two processes sharing the database.
    let other = t.reopen(|b| b).await;
    let (one, two) = (executor(), executor());
    let (a, b) = tokio::join!(
        hammer(
            &t.db,
            &one,
            Strategy::Batched,
            &table,
            WORKERS,
            PER_WORKER,
            Twist::Plain
        ),
        hammer(
            &other,
            &two,
            Strategy::Batched,
            &table,
            WORKERS,
            PER_WORKER,
            Twist::Plain
        ),
    );
    assert!(
        a.errors.is_empty() && b.errors.is_empty(),
        "{:?} {:?}",
        a.errors,
        b.errors
    );
    let end = balance(&t.db, &table).await;
    assert_eq!(
        end,
        start - committed(&t.db, &table).await,
        "no lost update"
    );
    assert_eq!(end, 0);
    assert_eq!((a.ok + b.ok) as i64, start, "every unit sold once");
    assert_eq!((a.refused + b.refused) as i64, total - start);
    let (s1, s2) = (one.batch_stats(), two.batch_stats());
    assert!(
        s1.commits + s2.commits < s1.operations + s2.operations,
        "operations were combined: {s1:?} {s2:?}"
    );
    other.pool().close().await;
    drop_log(&t, &table).await;
    t.cleanup().await;
}

on_backends!(
    batched_keeps_the_invariant_where_none_breaks,
    refusal_fails_only_its_own_operation,
    combined_operations_share_one_read_and_write,
    failed_batch_is_retried_then_split,
    dropped_callers_do_not_cancel_their_batch,
    two_processes_batch_on_the_same_row
);
on_backends!(killed_connection_answers_nobody_done only [postgres mysql]);
