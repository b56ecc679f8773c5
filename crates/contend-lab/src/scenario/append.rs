//! `append`: each operation reads the lists of three keys and appends a unique value (its
//! operation number + 1) to the one or two shortest of them, in one read-decide-write. Every
//! append is unique, so the order of the values in a list is the order its writes took effect,
//! and the lab checks the recorded history of the run for isolation anomalies
//! ([`crate::history`]): `none` shows cycles, safe strategies none.
//!
//! # Storage
//! One row per key: `id BIGINT PRIMARY KEY, list TEXT, version BIGINT`, the list as its values
//! in order, comma separated. The operation writes the whole list back (`list read + value`),
//! which is what an application's read-decide-write does with a row, and what can go wrong
//! with it: an unsafe strategy overwrites another's append (a lost update, or two reads of one
//! key that are not prefixes of one another). A row per element would turn the write into an
//! `INSERT`, which row locks cannot guard (nothing to lock before it exists) and which a
//! unique position would refuse instead of losing; one row per key keeps every strategy's
//! lock on the thing it protects, on SQLite, PostgreSQL and MariaDB alike.
//!
//! # Keys
//! Keys are used a little while, then retired, as Jepsen's list-append workload does, so that
//! lists stay short (about a dozen values) and the check stays cheap for long runs: operation
//! `seq` picks 3 of the 6 keys of a window that moves one key every 8 operations. Concurrent
//! operations share most of their window, so they contend.
//!
//! # Strategies
//! Every strategy but `atomic` applies: `pessimistic` locks the three rows (read ones too)
//! in id order; `optimistic` checks and bumps the version of every row it read (the rows it
//! only read as well, or write skew would pass); `serializable`, `advisory`, `mutex`, the lock
//! services and `batched` serialise the three keys. `atomic` has no form here: the appends
//! depend on lists read from other keys, which no conditional statement can do in one go.
//!
//! # Invariants
//! - `acknowledged_appends_kept`: every append of an operation that succeeded is in its key's
//!   final list;
//! - `history`: the recorded history (with a final read of every key) has no anomaly; each
//!   anomaly found counts as one violation, its kind and witness in the report.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use contend::strategy::{Operation, Strategy, optimistic};
use contend::{Backend, BoxFuture, Error, Session, Tx};
use sqlx::AnyConnection;

use super::{
    Ctx, Invariant, LabError, OpReport, Scenario, Totals, base_support, drop_tables, engine,
    execute, fenced, invariant, sql_for, table_name, think,
};
use crate::history::{FINAL_PROCESS, History, HistoryReport, Mop, Op, Status, Value};
use crate::scenario::transfer::row_key;

/// Keys an operation reads.
const READS: usize = 3;
/// Keys in the window operations pick from.
const WINDOW: u64 = 6;
/// Operations per move of the window by one key.
const STEP: u64 = 8;

/// The append scenario.
#[derive(Debug, Default)]
pub struct Append;

impl Append {
    /// The scenario.
    pub fn new() -> Self {
        Append
    }
}

fn table(ctx: &Ctx) -> String {
    table_name(ctx, "append")
}

/// Rows made for a run sized for `operations` (later operations wrap around to the first keys).
fn key_count(operations: u64) -> u64 {
    operations / STEP + WINDOW
}

/// SplitMix64: a well-mixed 64-bit function of `x`.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Operation `seq`'s keys (row ids, ascending) and how many of them it appends to (1 or 2).
fn plan(seq: u64, keys: u64) -> (Vec<i64>, usize) {
    let base = seq / STEP;
    let mut h = mix(seq);
    let mut offsets: Vec<u64> = Vec::with_capacity(READS);
    while offsets.len() < READS {
        let o = h % WINDOW;
        if !offsets.contains(&o) {
            offsets.push(o);
        }
        h = mix(h);
    }
    let mut ids: Vec<i64> = offsets
        .iter()
        .map(|o| ((base + o) % keys) as i64 + 1)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let appends = 1 + (h % 2) as usize;
    (ids, appends)
}

/// One row as read: its list (parsed and as stored) and version.
#[derive(Debug, Clone)]
struct Row {
    list: Vec<Value>,
    text: String,
    version: i64,
}

fn parse(id: i64, text: &str) -> Result<Vec<Value>, LabError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|v| v.parse::<Value>())
        .collect::<Result<_, _>>()
        .map_err(|e| LabError::Db(Error::aborted(format!("key {id}: bad list {text:?}: {e}"))))
}

/// Read the keys' lists (in id order, with the lock clause); append the value to the
/// `appends` shortest (ties: lower id); write them back (under `optimistic`, checking and
/// bumping the version of every row read).
struct AppendOp {
    table: String,
    ids: Vec<i64>,
    appends: usize,
    value: Value,
    backend: Backend,
    /// The ids the last write decided to append to (for the history of failed operations).
    decided: Arc<Mutex<Vec<i64>>>,
}

impl Operation for AppendOp {
    type State = Vec<Row>;
    /// The lists read, in id order.
    type Output = Vec<Vec<Value>>;
    type Error = LabError;

    fn keys(&self) -> Vec<String> {
        self.ids
            .iter()
            .map(|id| row_key(&self.table, *id))
            .collect()
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, Result<Vec<Row>, LabError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT list, version FROM {} WHERE id = ?{lock}",
                self.table
            );
            let mut rows = Vec::with_capacity(self.ids.len());
            for id in &self.ids {
                let (text, version): (String, i64) = sqlx::query_as(sql_for(self.backend, &sql))
                    .bind(*id)
                    .fetch_one(&mut *conn)
                    .await?;
                rows.push(Row {
                    list: parse(*id, &text)?,
                    text,
                    version,
                });
            }
            think().await;
            Ok(rows)
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        rows: &'c Vec<Row>,
        checked: bool,
    ) -> BoxFuture<'c, Result<Vec<Vec<Value>>, LabError>> {
        Box::pin(async move {
            let mut order: Vec<usize> = (0..rows.len()).collect();
            order.sort_by_key(|&i| (rows[i].list.len(), self.ids[i]));
            let targets: Vec<usize> = order.into_iter().take(self.appends).collect();
            *self.decided.lock().unwrap_or_else(|e| e.into_inner()) =
                targets.iter().map(|&i| self.ids[i]).collect();
            let check = if checked { " AND version = ?" } else { "" };
            for (i, (id, row)) in self.ids.iter().zip(rows).enumerate() {
                let done = if targets.contains(&i) {
                    let text = if row.text.is_empty() {
                        self.value.to_string()
                    } else {
                        format!("{},{}", row.text, self.value)
                    };
                    let sql = format!(
                        "UPDATE {} SET list = ?, version = version + 1 WHERE id = ?{check}",
                        self.table
                    );
                    let q = tx.query(&sql).bind(text).bind(*id);
                    let q = if checked { q.bind(row.version) } else { q };
                    q.execute(tx.conn()).await?
                } else if checked {
                    // A row only read: its version must not have moved either (else write skew).
                    let sql = format!(
                        "UPDATE {} SET version = version + 1 WHERE id = ? AND version = ?",
                        self.table
                    );
                    tx.query(&sql)
                        .bind(*id)
                        .bind(row.version)
                        .execute(tx.conn())
                        .await?
                } else {
                    continue;
                };
                optimistic::check(done.rows_affected())?;
            }
            Ok(rows.iter().map(|r| r.list.clone()).collect())
        })
    }
}

/// Whether an operation that ended with `error` certainly did not commit (else its outcome is
/// unknown: a database error or a broken connection around `COMMIT` may or may not have
/// committed it).
fn certainly_failed(error: &LabError) -> bool {
    match error {
        LabError::Refused(_) => true,
        LabError::Db(e) => matches!(
            e,
            Error::Conflict { .. }
                | Error::Unsupported { .. }
                | Error::LockNotAcquired { .. }
                | Error::StaleFencingToken { .. }
                | Error::Unavailable(_)
                | Error::NestedTransaction
                | Error::LockService(_)
                | Error::Aborted(_)
                | Error::InvalidUrl { .. }
        ),
    }
}

impl Scenario for Append {
    fn name(&self) -> &'static str {
        "append"
    }

    fn supports(&self, strategy: Strategy, backend: Backend) -> Result<(), String> {
        if strategy == Strategy::Atomic {
            return Err(
                "an append depends on lists read from other keys: no conditional statement \
                 reads and appends in one go"
                    .into(),
            );
        }
        base_support(strategy, backend)
    }

    fn records_history(&self) -> bool {
        true
    }

    fn setup<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let t = table(ctx);
            let db = &ctx.db;
            drop_tables(db, std::slice::from_ref(&t)).await?;
            db.execute_script(&format!(
                "CREATE TABLE {t} (id BIGINT PRIMARY KEY, list TEXT NOT NULL, \
                 version BIGINT NOT NULL){}",
                engine(db.backend())
            ))
            .await?;
            let keys = key_count(ctx.operations);
            let ids: Vec<u64> = (1..=keys).collect();
            for chunk in ids.chunks(200) {
                let rows = vec!["(?, '', 0)"; chunk.len()].join(", ");
                let mut q = db.query(&format!(
                    "INSERT INTO {t} (id, list, version) VALUES {rows}"
                ));
                for id in chunk {
                    q = q.bind(*id as i64);
                }
                super::exec(db, q).await?;
            }
            fenced::setup(ctx).await
        })
    }

    fn op_in_session<'a>(
        &'a self,
        ctx: &'a Ctx,
        session: &'a mut Session,
        worker: usize,
        seq: u64,
    ) -> BoxFuture<'a, OpReport> {
        Box::pin(async move {
            let (ids, appends) = plan(seq, key_count(ctx.operations));
            let value = seq + 1;
            let decided = Arc::new(Mutex::new(Vec::new()));
            let op = AppendOp {
                table: table(ctx),
                ids: ids.clone(),
                appends,
                value,
                backend: ctx.db.backend(),
                decided: decided.clone(),
            };
            let Some(recorder) = &ctx.history else {
                return execute(ctx, session, op).await.1;
            };
            let invoked = recorder.now_ns();
            let (result, report) = execute(ctx, session, op).await;
            let completed = recorder.now_ns();
            let (status, mut mops) = match &result {
                Ok(lists) => (
                    Status::Ok,
                    ids.iter()
                        .zip(lists)
                        .map(|(id, list)| Mop::read(*id as u64, list.iter().copied()))
                        .collect(),
                ),
                Err(e) => (
                    if certainly_failed(e) {
                        Status::Failed
                    } else {
                        Status::Unknown
                    },
                    ids.iter()
                        .map(|id| Mop::Read {
                            key: *id as u64,
                            list: None,
                        })
                        .collect::<Vec<_>>(),
                ),
            };
            let decided = decided.lock().unwrap_or_else(|e| e.into_inner()).clone();
            mops.extend(decided.iter().map(|id| Mop::append(*id as u64, value)));
            recorder.record(Op {
                process: worker,
                invoked_ns: invoked,
                completed_ns: completed,
                status,
                mops,
            });
            report
        })
    }

    fn check<'a>(
        &'a self,
        ctx: &'a Ctx,
        _totals: &'a Totals,
    ) -> BoxFuture<'a, anyhow::Result<Vec<Invariant>>> {
        Box::pin(async move {
            let recorder = ctx
                .history
                .as_ref()
                .context("the append scenario needs a history recorder (Ctx::history)")?;
            let t = table(ctx);
            let invoked = recorder.now_ns();
            // Through the session's autocommit (a transaction behind pgbouncer), as every
            // statement outside the operations.
            let q = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT id, list FROM {t} ORDER BY id"
            )));
            let rows: Vec<(i64, String)> = ctx
                .db
                .session()
                .autocommit(|c| {
                    Box::pin(async move { Ok::<_, contend::Error>(q.fetch_all(c).await?) })
                })
                .await?;
            let completed = recorder.now_ns();
            let mut finals = Vec::with_capacity(rows.len());
            for (id, text) in &rows {
                let list = parse(*id, text).map_err(|e| anyhow::anyhow!("{e}"))?;
                finals.push(Mop::read(*id as u64, list));
            }

            let mut history = recorder.take();
            // Acknowledged appends missing from their key's final list.
            let kept: HashSet<(u64, Value)> = finals
                .iter()
                .flat_map(|m| match m {
                    Mop::Read { key, list: Some(l) } => l.iter().map(|v| (*key, *v)).collect(),
                    _ => Vec::new(),
                })
                .collect();
            let mut lost = Vec::new();
            for op in history.ops.iter().filter(|o| o.status == Status::Ok) {
                for m in &op.mops {
                    if let Mop::Append { key, value } = m
                        && !kept.contains(&(*key, *value))
                    {
                        lost.push(format!("{value} of key {key}"));
                    }
                }
            }
            let acknowledged = history.count(Status::Ok);
            history.ops.push(Op {
                process: FINAL_PROCESS,
                invoked_ns: invoked,
                completed_ns: completed,
                status: Status::Ok,
                mops: finals,
            });
            let history = History::new(history.ops);
            let started = std::time::Instant::now();
            let analysis = history.check();
            let report = HistoryReport::new(&history, &analysis, started.elapsed());
            let detail = format!(
                "{} operations ({} ok, {} failed, {} unknown, a final read) checked in {:.1} ms: {}",
                report.operations,
                report.ok,
                report.failed,
                report.unknown,
                report.check_ms,
                if analysis.anomalies.is_empty() {
                    "no anomaly".to_string()
                } else {
                    let first = analysis.examples()[0].witness.lines().next().unwrap_or("");
                    format!("{}; first: {first}", report.kinds_text())
                }
            );
            let anomalies = report.anomalies;
            recorder.set_report(report);
            Ok(vec![
                invariant(
                    "acknowledged_appends_kept",
                    lost.len() as u64,
                    if lost.is_empty() {
                        format!(
                            "every append of the {acknowledged} acknowledged operations is in its key's final list"
                        )
                    } else {
                        format!(
                            "{} acknowledged appends missing from the final lists, e.g. {}",
                            lost.len(),
                            lost.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                        )
                    },
                ),
                invariant("history", anomalies, detail),
            ])
        })
    }

    fn teardown<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let t = table(ctx);
            let keys: Vec<String> = (1..=key_count(ctx.operations) as i64)
                .map(|id| row_key(&t, id))
                .collect();
            fenced::teardown(ctx, &keys).await?;
            drop_tables(&ctx.db, &[t]).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_pick_three_keys_of_a_moving_window() {
        let keys = key_count(1000);
        for seq in 0..1000 {
            let (ids, appends) = plan(seq, keys);
            assert_eq!(ids.len(), READS, "{seq}: {ids:?}");
            assert!((1..=2).contains(&appends));
            let base = (seq / STEP) as i64 + 1;
            assert!(
                ids.iter()
                    .all(|id| (base..base + WINDOW as i64).contains(id))
            );
        }
        // Both append counts occur, and the choice of keys varies.
        let plans: Vec<_> = (0..64).map(|s| plan(s, keys)).collect();
        assert!(plans.iter().any(|p| p.1 == 1) && plans.iter().any(|p| p.1 == 2));
        assert!(plans.windows(2).any(|w| w[0].0 != w[1].0));
        // Beyond the planned operations, keys wrap around instead of running out.
        let (ids, _) = plan(10 * 1000, keys);
        assert!(ids.iter().all(|id| (1..=keys as i64).contains(id)));
    }

    #[test]
    fn lists_parse_or_refuse() {
        assert_eq!(parse(1, "").unwrap(), Vec::<Value>::new());
        assert_eq!(parse(1, "3,10,7").unwrap(), vec![3, 10, 7]);
        assert!(parse(1, "3,x").is_err());
    }
}
