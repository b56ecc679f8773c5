//! `batched` with a domain (`Operation::batch_domain`): transfers between any pairs of a few
//! accounts share one queue, so one commit serves operations on different key sets. On SQLite
//! always, on PostgreSQL and MariaDB when their URLs are set, from `tokio::spawn`ed tasks:
//! transfers between different pairs land in one batch; money is conserved and every ledger
//! matches its balance under concurrent load where the unsafe baseline (`none`) breaks; two
//! processes batching the same domain (whose batches may deadlock each other) lose nothing.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestDb, on_backends};
use contend::batch::BatchOptions;
use contend::strategy::{Executor, Operation, Strategy};
use contend::{Backend, BoxFuture, Db, Tx};
use sqlx::AnyConnection;

#[path = "common/bank.rs"]
mod bank;
use bank::BankError;

/// Accounts, and each one's opening balance.
const ACCOUNTS: i64 = 4;
const OPENING: i64 = 20;

/// Move `amount` from `from` to `to`, refusing to overdraw; record both moves in the ledger.
struct Transfer {
    table: String,
    from: i64,
    to: i64,
    amount: i64,
    /// Whether it names the table as its batch domain.
    domain: bool,
}

/// The two rows (id, balance) in id order, and the ledger rows decided in memory and not yet
/// written (`apply`).
struct Rows {
    rows: Vec<(i64, i64)>,
    ledger: Vec<(i64, i64)>,
}

impl Transfer {
    /// The new balances of `rows` after this transfer, or the refusal.
    fn decide(&self, rows: &[(i64, i64)]) -> Result<Vec<(i64, i64)>, BankError> {
        let balance = |id| rows.iter().find(|(i, _)| *i == id).map_or(0, |(_, b)| *b);
        if balance(self.from) < self.amount {
            return Err(BankError::Insufficient);
        }
        Ok(rows
            .iter()
            .map(|&(id, b)| match id {
                id if id == self.from => (id, b - self.amount),
                id if id == self.to => (id, b + self.amount),
                _ => (id, b),
            })
            .collect())
    }

    async fn write_rows(
        &self,
        tx: &mut Tx,
        rows: &[(i64, i64)],
        ledger: &[(i64, i64)],
    ) -> Result<(), BankError> {
        for (id, balance) in rows {
            tx.query(&format!(
                "UPDATE {} SET balance = ? WHERE id = ?",
                self.table
            ))
            .bind(*balance)
            .bind(*id)
            .execute(tx.conn())
            .await?;
        }
        for (account, delta) in ledger {
            tx.query(&format!("INSERT INTO {}_ledger VALUES (?, ?)", self.table))
                .bind(*account)
                .bind(*delta)
                .execute(tx.conn())
                .await?;
        }
        Ok(())
    }

    fn moves(&self) -> [(i64, i64); 2] {
        [(self.from, -self.amount), (self.to, self.amount)]
    }
}

impl Operation for Transfer {
    type State = Rows;
    type Output = ();
    type Error = BankError;

    fn keys(&self) -> Vec<String> {
        vec![
            format!("{}:{}", self.table, self.from),
            format!("{}:{}", self.table, self.to),
        ]
    }

    fn batch_domain(&self) -> Option<String> {
        self.domain.then(|| self.table.clone())
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, Result<Rows, BankError>> {
        Box::pin(async move {
            let (a, b) = (self.from.min(self.to), self.from.max(self.to));
            let mut rows = Vec::new();
            for id in [a, b] {
                let sql = format!("SELECT balance FROM {} WHERE id = {id}{lock}", self.table);
                let balance: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .fetch_one(&mut *conn)
                    .await?;
                rows.push((id, balance));
            }
            // Widen the race window of the unsafe baseline, as a handler doing work would.
            tokio::task::yield_now().await;
            Ok(Rows {
                rows,
                ledger: Vec::new(),
            })
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        state: &'c Rows,
        _checked: bool,
    ) -> BoxFuture<'c, Result<(), BankError>> {
        Box::pin(async move {
            let rows = self.decide(&state.rows)?;
            self.write_rows(tx, &rows, &self.moves()).await
        })
    }

    fn apply(&self, state: &mut Rows) -> Option<Result<(), BankError>> {
        match self.decide(&state.rows) {
            Ok(rows) => {
                state.rows = rows;
                state.ledger.extend(self.moves());
                Some(Ok(()))
            }
            Err(refused) => Some(Err(refused)),
        }
    }

    fn write_state<'c>(
        &'c self,
        tx: &'c mut Tx,
        state: &'c Rows,
    ) -> Option<BoxFuture<'c, Result<(), BankError>>> {
        Some(Box::pin(self.write_rows(tx, &state.rows, &state.ledger)))
    }
}

async fn create(t: &mut TestDb) -> String {
    let table = t
        .create_table("domain", "id BIGINT PRIMARY KEY, balance BIGINT NOT NULL")
        .await;
    let engine = if t.backend() == Backend::MySql {
        " ENGINE=InnoDB"
    } else {
        ""
    };
    t.db.execute_script(&format!(
        "CREATE TABLE {table}_ledger (account BIGINT NOT NULL, delta BIGINT NOT NULL){engine}"
    ))
    .await
    .expect("ledger");
    for id in 1..=ACCOUNTS {
        t.db.execute_script(&format!(
            "INSERT INTO {table} VALUES ({id}, {OPENING}); \
             INSERT INTO {table}_ledger VALUES ({id}, {OPENING})"
        ))
        .await
        .expect("seed");
    }
    table
}

async fn drop_ledger(t: &TestDb, table: &str) {
    t.db.execute_script(&format!("DROP TABLE IF EXISTS {table}_ledger"))
        .await
        .expect("drop ledger");
}

/// What broke: total money not conserved, negative balances, ledgers not matching balances.
async fn violations(db: &Db, table: &str) -> Vec<String> {
    let balances: Vec<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, balance FROM {table} ORDER BY id"
    )))
    .fetch_all(db.pool())
    .await
    .expect("balances");
    let moves: Vec<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT account, delta FROM {table}_ledger"
    )))
    .fetch_all(db.pool())
    .await
    .expect("ledger");
    let mut broken = Vec::new();
    let total: i64 = balances.iter().map(|(_, b)| b).sum();
    if total != ACCOUNTS * OPENING {
        broken.push(format!("total {total}"));
    }
    for (id, balance) in &balances {
        let sum: i64 = moves.iter().filter(|(a, _)| a == id).map(|(_, d)| d).sum();
        if *balance < 0 || sum != *balance {
            broken.push(format!("account {id}: balance {balance}, ledger {sum}"));
        }
    }
    broken
}

/// `workers x per_worker` transfers under `strategy`, between pairs that vary with the worker
/// and the round, in both directions.
async fn transfers(
    db: &Db,
    executor: &Executor,
    strategy: Strategy,
    table: &str,
    workers: i64,
    per_worker: i64,
) -> Vec<String> {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (db, executor, errors) = (db.clone(), executor.clone(), errors.clone());
        let table = table.to_string();
        tasks.push(tokio::spawn(async move {
            let mut session = db.session();
            for n in 0..per_worker {
                let from = (w + n) % ACCOUNTS + 1;
                let to = (from + n % (ACCOUNTS - 1)) % ACCOUNTS + 1;
                let op = Arc::new(Transfer {
                    table: table.clone(),
                    from,
                    to,
                    amount: n % 5 + 1,
                    domain: true,
                });
                match executor.run(strategy, &mut session, op).await.result {
                    Ok(()) | Err(BankError::Insufficient) => {}
                    Err(e) => errors.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    errors.lock().unwrap().clone()
}

fn executor() -> Executor {
    Executor::new().lock_wait(Duration::from_secs(20))
}

/// Transfers between four different pairs, submitted at once to an executor whose batches wait
/// for 4 operations: with a domain, one commit serves all four (without one, each pair would
/// be a queue of its own and commit alone).
async fn one_commit_serves_different_pairs(mut t: TestDb) {
    let table = create(&mut t).await;
    let executor = executor().batch(
        BatchOptions::new()
            .max_size(4)
            .max_wait(Duration::from_secs(10)),
    );
    let mut tasks = Vec::new();
    for (from, to) in [(1, 2), (3, 4), (4, 1), (2, 3)] {
        let (db, executor) = (t.db.clone(), executor.clone());
        let op = Arc::new(Transfer {
            table: table.clone(),
            from,
            to,
            amount: 5,
            domain: true,
        });
        tasks.push(tokio::spawn(async move {
            let mut session = db.session();
            executor
                .run(Strategy::Batched, &mut session, op)
                .await
                .result
        }));
    }
    for task in tasks {
        task.await.expect("caller").expect("transfer done");
    }
    let stats = executor.batch_stats();
    assert_eq!(
        (stats.commits, stats.operations, stats.largest),
        (1, 4, 4),
        "four key sets, one commit: {stats:?}"
    );
    assert_eq!(violations(&t.db, &table).await, Vec::<String>::new());
    drop_ledger(&t, &table).await;
    t.cleanup().await;
}

/// 8 workers x 30 transfers: `none` loses updates (the ledger and the balances disagree);
/// `batched` with a domain keeps every invariant and combines.
async fn domain_batches_keep_the_books_where_none_breaks(mut t: TestDb) {
    let table = create(&mut t).await;
    let errors = transfers(&t.db, &executor(), Strategy::None, &table, 8, 30).await;
    assert!(errors.is_empty(), "{errors:?}");
    let broken = violations(&t.db, &table).await;
    assert!(
        !broken.is_empty(),
        "8 workers transferring with read-decide-write must break the books"
    );
    drop_ledger(&t, &table).await;

    let table = create(&mut t).await;
    let executor = executor();
    let errors = transfers(&t.db, &executor, Strategy::Batched, &table, 8, 30).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(violations(&t.db, &table).await, Vec::<String>::new());
    let stats = executor.batch_stats();
    assert_eq!(stats.operations, 240, "{stats:?}");
    assert!(stats.commits < 240, "operations were combined: {stats:?}");
    drop_ledger(&t, &table).await;
    t.cleanup().await;
}

/// Two processes (two pools, two executors) batching the same domain: their batches lock rows
/// of several pairs and may deadlock each other; the deadlocks are retried and nothing is lost.
async fn two_processes_batch_one_domain(mut t: TestDb) {
    let table = create(&mut t).await;
    let other = t.reopen(|b| b).await;
    let (one, two) = (executor(), executor());
    let (a, b) = tokio::join!(
        transfers(&t.db, &one, Strategy::Batched, &table, 6, 25),
        transfers(&other, &two, Strategy::Batched, &table, 6, 25),
    );
    assert!(a.is_empty() && b.is_empty(), "{a:?} {b:?}");
    assert_eq!(violations(&t.db, &table).await, Vec::<String>::new());
    let (s1, s2) = (one.batch_stats(), two.batch_stats());
    assert_eq!(s1.operations + s2.operations, 300, "{s1:?} {s2:?}");
    other.pool().close().await;
    drop_ledger(&t, &table).await;
    t.cleanup().await;
}

on_backends!(
    one_commit_serves_different_pairs,
    domain_batches_keep_the_books_where_none_breaks,
    two_processes_batch_one_domain
);
