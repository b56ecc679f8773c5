//! Hot-row withdraw through the strategy executor: N workers withdraw 1 from one account for D
//! seconds under one strategy, then the throughput and the invariant are printed. The driver of
//! `bench/batched-vs-pgbench.sh`.
//!
//! ```text
//! cargo run --release -p contend --example hot_row -- URL [--strategy batched] [--workers 32]
//!     [--seconds 10] [--max-size 256] [--max-wait-us 0] [--combine]
//! ```
//!
//! `--combine` gives the operation its in-memory form (`Operation::apply` and `write_state`),
//! which `batched` uses to decide a whole batch on one read and store it with one write.
//!
//! Prints one line of `key=value` pairs: `ops_per_s` counts successful withdrawals per second;
//! `lost` is the final balance minus (the starting balance minus the successes): lost updates;
//! 0 for every safe strategy; `errors` counts operations that failed with anything but a
//! refusal. Exit status 1 when `lost` or `errors` is not 0, 2 on bad arguments or a failed setup.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use contend::batch::BatchOptions;
use contend::strategy::{Executor, Operation, Strategy};
use contend::{BoxFuture, Db, Error, Tx};
use sqlx::{AnyConnection, Row};

const START: i64 = 1_000_000_000_000;

#[path = "../tests/common/bank.rs"]
mod bank;
use bank::BankError;

/// Withdraw 1 from account 1 of `table`, refusing to overdraw; with `combine`, decided in
/// memory under `batched` (`Operation::apply`).
struct Withdraw {
    table: String,
    combine: bool,
}

impl Operation for Withdraw {
    type State = (i64, i64);
    type Output = ();
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
            Ok((row.try_get(0)?, row.try_get(1)?))
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        state: &'c (i64, i64),
        checked: bool,
    ) -> BoxFuture<'c, Result<(), BankError>> {
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
            contend::strategy::optimistic::check(q.execute(tx.conn()).await?.rows_affected())?;
            Ok(())
        })
    }

    fn apply(&self, state: &mut (i64, i64)) -> Option<Result<(), BankError>> {
        if !self.combine {
            return None;
        }
        if state.0 < 1 {
            return Some(Err(BankError::Insufficient));
        }
        *state = (state.0 - 1, state.1 + 1);
        Some(Ok(()))
    }

    fn write_state<'c>(
        &'c self,
        tx: &'c mut Tx,
        state: &'c (i64, i64),
    ) -> Option<BoxFuture<'c, Result<(), BankError>>> {
        Some(Box::pin(async move {
            let sql = format!(
                "UPDATE {} SET balance = ?, version = ? WHERE id = 1",
                self.table
            );
            tx.query(&sql)
                .bind(state.0)
                .bind(state.1)
                .execute(tx.conn())
                .await?;
            Ok(())
        }))
    }

    fn atomic<'c>(&'c self, tx: &'c mut Tx) -> Option<BoxFuture<'c, Result<(), BankError>>> {
        Some(Box::pin(async move {
            let sql = format!(
                "UPDATE {} SET balance = balance - 1, version = version + 1 \
                 WHERE id = 1 AND balance >= 1",
                self.table
            );
            if tx.query(&sql).execute(tx.conn()).await?.rows_affected() == 0 {
                return Err(BankError::Insufficient);
            }
            Ok(())
        }))
    }
}

struct Args {
    url: String,
    strategy: Strategy,
    workers: usize,
    seconds: f64,
    max_size: usize,
    max_wait_us: u64,
    combine: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        url: String::new(),
        strategy: Strategy::Batched,
        workers: 32,
        seconds: 10.0,
        max_size: 256,
        max_wait_us: 0,
        combine: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--strategy" => {
                args.strategy = value("--strategy")?.parse().map_err(|e| format!("{e}"))?
            }
            "--workers" => {
                args.workers = value("--workers")?
                    .parse()
                    .map_err(|_| "--workers: a positive integer")?
            }
            "--seconds" => {
                args.seconds = value("--seconds")?
                    .parse()
                    .map_err(|_| "--seconds: a number")?
            }
            "--max-size" => {
                args.max_size = value("--max-size")?
                    .parse()
                    .map_err(|_| "--max-size: a positive integer")?
            }
            "--max-wait-us" => {
                args.max_wait_us = value("--max-wait-us")?
                    .parse()
                    .map_err(|_| "--max-wait-us: an integer")?
            }
            "--combine" => args.combine = true,
            other if other.starts_with("--") => return Err(format!("unknown option {other}")),
            url => args.url = url.to_string(),
        }
    }
    if args.url.is_empty() {
        return Err("a database URL is required".into());
    }
    if args.workers == 0 || !args.seconds.is_finite() || args.seconds <= 0.0 {
        return Err("--workers and --seconds must be positive".into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("hot_row: {e}");
            eprintln!(
                "usage: hot_row URL [--strategy S] [--workers N] [--seconds D] [--max-size N] [--max-wait-us N] [--combine]"
            );
            std::process::exit(2);
        }
    };
    match run(&args).await {
        Ok(clean) => std::process::exit(if clean { 0 } else { 1 }),
        Err(e) => {
            eprintln!("hot_row: {e}");
            std::process::exit(2);
        }
    }
}

async fn run(args: &Args) -> contend::Result<bool> {
    let db = Db::builder(&args.url)
        .max_connections(args.workers as u32 + 4)
        .connect()
        .await?;
    let table = format!("hot_row_{}", std::process::id());
    db.execute_script(&format!(
        "DROP TABLE IF EXISTS {table}; \
         CREATE TABLE {table} (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL, version BIGINT NOT NULL); \
         INSERT INTO {table} VALUES (1, {START}, 0)"
    ))
    .await?;
    let executor: Executor = Executor::new().batch(
        BatchOptions::new()
            .max_size(args.max_size)
            .max_wait(Duration::from_micros(args.max_wait_us)),
    );
    if let Err(e) = executor.check(args.strategy, db.backend()) {
        db.execute_script(&format!("DROP TABLE {table}")).await?;
        return Err(e);
    }
    let (ok, refused, errors) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.workers {
        let (db, executor, strategy) = (db.clone(), executor.clone(), args.strategy);
        let (ok, refused, errors) = (ok.clone(), refused.clone(), errors.clone());
        let op = Arc::new(Withdraw {
            table: table.clone(),
            combine: args.combine,
        });
        tasks.push(tokio::spawn(async move {
            let mut session = db.session();
            while Instant::now() < deadline {
                match executor
                    .run(strategy, &mut session, op.clone())
                    .await
                    .result
                {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(BankError::Insufficient) => refused.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("hot_row: first error: {e}");
                        }
                        0
                    }
                };
            }
        }));
    }
    for task in tasks {
        task.await.map_err(|e| Error::aborted(e.to_string()))?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let end: i64 = db
        .query_scalar(&format!("SELECT balance FROM {table} WHERE id = 1"))
        .fetch_one(db.pool())
        .await?;
    db.execute_script(&format!("DROP TABLE {table}")).await?;
    let (ok, refused, errors) = (
        ok.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    );
    let lost = end - (START - ok as i64);
    let stats = executor.batch_stats();
    println!(
        "strategy={}{} workers={} seconds={elapsed:.2} ok={ok} ops_per_s={:.0} refused={refused} \
         errors={errors} lost={lost} batches={} largest_batch={} batch_retries={} batch_splits={}",
        args.strategy,
        if args.combine { "+combine" } else { "" },
        args.workers,
        ok as f64 / elapsed,
        stats.commits,
        stats.largest,
        stats.retries,
        stats.splits,
    );
    Ok(lost == 0 && errors == 0)
}
