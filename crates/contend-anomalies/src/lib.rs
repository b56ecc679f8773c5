//! The isolation-anomaly suite: Hermitage-style interleavings run against a real database at
//! every isolation level, to show what each level really prevents on the server you run.
//!
//! # Brief overview
//! - [`script`] describes a test: steps of two or three transactions on the table
//!   `(id int primary key, value int)` holding `(1, 10), (2, 20)`, reset before every test, in
//!   a table whose name is unique to the run.
//! - [`driver`] runs the steps on one connection per transaction (pooled connections of a
//!   [`contend::Db`], begun with [`contend::backend::Dialect::begin`] at the level under test,
//!   with lock timeouts). A statement that waits for another transaction's lock is detected by
//!   asking the server (`pg_blocking_pids`, `SHOW ENGINE INNODB STATUS`; `SQLITE_BUSY` on
//!   SQLite); the driver moves on and collects its result when it finishes. The result is a
//!   [`trace::Trace`].
//! - [`catalog`] holds the anomalies' interleavings and, for each, the observation that means the
//!   anomaly occurred; [`verdict`] turns traces into matrix cells; [`report`] prints them.
//! - [`run_suite`] runs everything and returns a [`SuiteReport`]; `contend anomalies` is
//!   [`cli::run`].
//!
//! # Verdicts
//! A cell says *occurred* when a variant's observation was made (the values read, which
//! transactions committed, and the final table, compared with what the committed transactions
//! give when run one after another); *prevented* otherwise, with how: `abort` when one of the
//! variant's key transactions was aborted by the database (serialization failure, deadlock
//! victim), `blocking` when one of their statements had to wait for another transaction, and
//! `values` when nothing waited or failed and the values simply show no anomaly.
//! *Prevented only for read-only* means the variants whose observing transaction only reads were
//! prevented, while a variant with a writing transaction occurred (PMP and G-single have both).
//! Nothing in the output path knows what a database is supposed to do: every cell comes from a
//! run. `--explain ANOMALY LEVEL` prints the interleaving, what each transaction saw, and the
//! precise rule.
//!
//! Transactions that only read are declared read-only (`READ ONLY`, or on SQLite a deferred
//! `query_only` transaction), as an application would.
//!
//! # Levels a backend does not really offer
//! Every requested level is run and reported under the name requested, with a note:
//! PostgreSQL accepts `READ UNCOMMITTED` but runs it as `READ COMMITTED`, so that row shows read
//! committed's behaviour. SQLite has no isolation levels at all: every row runs the same
//! transactions (see below), and the notes say so.
//!
//! # SQLite
//! SQLite (in WAL mode, as [`contend::Db`] opens it) has one writer at a time and snapshot
//! reads. What that means for each anomaly depends on how transactions begin
//! ([`SqliteBegin`]):
//! - `immediate` (the default, as contend's transactions do it): a writing transaction takes the
//!   database write lock at `BEGIN IMMEDIATE` and keeps it to the end, so two writers never
//!   overlap: the second one's `BEGIN` waits. Every interleaving with two writing transactions
//!   (G0, G1c, the write-predicate PMP and G-single variants, P4, G2-item, G2) therefore runs
//!   serially, prevented by blocking. Read-only transactions begin deferred and read one
//!   snapshot, taken at their first read: they never see uncommitted data (G1a, G1b), nor a
//!   commit that happened after their first read (OTV, PMP read predicate, G-single read-only and
//!   predicate variants); they never wait either, so those are prevented by the values read.
//! - `deferred` (`BEGIN DEFERRED` everywhere, SQLite's plain `BEGIN`): a transaction reads from
//!   a snapshot taken at its first read and takes the write lock at its first write, waiting
//!   while another transaction holds it. A write from a snapshot older than the last commit
//!   fails with `SQLITE_BUSY_SNAPSHOT`, whatever the busy timeout: a transaction that read
//!   before another one committed cannot write afterwards. Lost updates and write skew are then
//!   prevented by abort rather than by blocking.
//!
//! The suite runs SQLite with a busy timeout of 0 and retries `SQLITE_BUSY` itself every 2 ms (so
//! it knows at once that a statement waits), up to the same 2 s bound as the servers' lock
//! timeouts. `SQLITE_BUSY_SNAPSHOT` is never retried: it is an abort.
//!
//! # Cancel safety
//! Dropping [`run_suite`]'s future closes the sessions' connections (the servers roll their
//! transactions back) and drops the run's table in a background task.

pub mod catalog;
pub mod cli;
pub mod driver;
pub mod model;
pub mod report;
pub mod script;
mod session;
pub mod trace;
pub mod verdict;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use contend::{Backend, Db, IsolationLevel};

pub use model::{
    Anomaly, CellResult, How, LevelNote, Outcome, SqliteBegin, SuiteReport, VariantResult,
};

/// Errors that stop the suite (a cell that cannot be judged is an [`Outcome::Error`] instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database failed outside a test's statements: connecting, creating or resetting the
    /// table, opening a session.
    #[error(transparent)]
    Database(#[from] contend::Error),
    /// A custom interleaving that cannot run.
    #[error("invalid interleaving: {0}")]
    InvalidScript(String),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// The levels, in the matrix's row order. Default: all four.
    pub levels: Vec<IsolationLevel>,
    /// The anomalies, in the matrix's column order. Default: all.
    pub anomalies: Vec<Anomaly>,
    /// How SQLite transactions begin (ignored by the servers).
    pub sqlite_begin: SqliteBegin,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        SuiteOptions {
            levels: IsolationLevel::ALL.to_vec(),
            anomalies: Anomaly::ALL.to_vec(),
            sqlite_begin: SqliteBegin::default(),
        }
    }
}

/// Runs every selected anomaly's variants at every selected level on `db`, in a table created
/// for this run and dropped at the end.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use contend::IsolationLevel;
/// use contend_anomalies::{Anomaly, Outcome, SuiteOptions, run_suite};
/// let db = contend::Db::connect("postgres://postgres@127.0.0.1:55432/app").await?;
/// let options = SuiteOptions {
///     levels: vec![IsolationLevel::ReadCommitted],
///     anomalies: vec![Anomaly::P4],
///     ..SuiteOptions::default()
/// };
/// let report = run_suite(&db, &options).await?;
/// let cell = report.cell(IsolationLevel::ReadCommitted, Anomaly::P4).unwrap();
/// println!("{:?}: {}", cell.outcome, cell.detail);
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`Error::Database`] when the table cannot be created or reset, or a connection cannot be
/// had. Failures of a test's own statements are results, not errors.
///
/// # Cancel safety
/// Safe to drop at any await point: the sessions' connections are closed (never returned to the
/// pool), so the servers roll their transactions back, and the table is dropped by a background
/// task.
pub async fn run_suite(db: &Db, options: &SuiteOptions) -> Result<SuiteReport, Error> {
    let backend = db.backend();
    let server_version = server_version(db).await?;
    let mut guard = TableGuard::create(db).await?;
    let result = run_cells(db, &guard.table, options).await;
    guard.drop_now().await;
    let (results, mut notes) = result?;
    notes.extend(level_notes(backend, options));
    Ok(SuiteReport {
        backend: backend.name(),
        server_version,
        notes,
        results,
    })
}

/// Runs one interleaving of your own at `level`, on the suite's table (`(1, 10), (2, 20)`,
/// created for this call and dropped after it), and returns what it observed.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use contend::IsolationLevel;
/// use contend_anomalies::script::{Assign, Op, Pred, Step};
/// use contend_anomalies::{SqliteBegin, run_interleaving};
/// let db = contend::Db::connect("postgres://postgres@127.0.0.1:55432/app").await?;
/// let step = |tx, op| Step { tx, op, label: None };
/// let steps = [
///     step(0, Op::Begin { read_only: false }),
///     step(1, Op::Begin { read_only: false }),
///     step(0, Op::Update { pred: Pred::Id(1), set: Assign::Const(11) }),
///     step(1, Op::Update { pred: Pred::Id(1), set: Assign::Const(12) }), // waits for T1
///     step(0, Op::Commit),
///     step(1, Op::Commit),
/// ];
/// let trace = run_interleaving(&db, IsolationLevel::ReadCommitted, SqliteBegin::Immediate, 2, &steps).await?;
/// assert!(trace.steps[3].blocked.is_some());
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`Error::InvalidScript`] when a step names a transaction beyond `txs`; [`Error::Database`]
/// as [`run_suite`].
///
/// # Cancel safety
/// As [`run_suite`].
pub async fn run_interleaving(
    db: &Db,
    level: IsolationLevel,
    sqlite_begin: SqliteBegin,
    txs: usize,
    steps: &[script::Step],
) -> Result<trace::Trace, Error> {
    if let Some(bad) = steps.iter().find(|s| s.tx >= txs) {
        return Err(Error::InvalidScript(format!(
            "a step of {} in a script of {txs} transaction(s)",
            script::tx_name(bad.tx)
        )));
    }
    let mut guard = TableGuard::create(db).await?;
    let result = async {
        let (mut monitor, _) = driver::Monitor::open(db).await?;
        let ctx = driver::RunContext {
            db,
            table: &guard.table,
            level,
            sqlite_begin,
        };
        driver::run_interleaving(&ctx, &mut monitor, txs, steps).await
    }
    .await;
    guard.drop_now().await;
    result
}

async fn run_cells(
    db: &Db,
    table: &str,
    options: &SuiteOptions,
) -> Result<(Vec<CellResult>, Vec<LevelNote>), Error> {
    let (mut monitor, monitor_note) = driver::Monitor::open(db).await?;
    let notes: Vec<LevelNote> = monitor_note
        .map(|note| LevelNote { level: None, note })
        .into_iter()
        .collect();
    let mut results = Vec::new();
    for level in &options.levels {
        let ctx = driver::RunContext {
            db,
            table,
            level: *level,
            sqlite_begin: options.sqlite_begin,
        };
        for anomaly in &options.anomalies {
            let mut judged = Vec::new();
            for variant in catalog::variants(*anomaly) {
                let trace =
                    driver::run_interleaving(&ctx, &mut monitor, variant.txs, &variant.steps)
                        .await?;
                judged.push(verdict::judge(&variant, trace));
            }
            let cell = verdict::combine(*level, *anomaly, judged);
            tracing::debug!(level = %level, anomaly = %anomaly, outcome = ?cell.outcome, "cell done");
            results.push(cell);
        }
    }
    Ok((results, notes))
}

fn level_notes(backend: Backend, options: &SuiteOptions) -> Vec<LevelNote> {
    let mut notes = Vec::new();
    for level in &options.levels {
        let note = match (backend, level) {
            (Backend::Postgres, IsolationLevel::ReadUncommitted) => Some(
                "PostgreSQL accepts READ UNCOMMITTED but runs it as READ COMMITTED: this row shows what that gives"
                    .to_string(),
            ),
            (Backend::Sqlite, _) => Some(match options.sqlite_begin {
                SqliteBegin::Immediate => "SQLite has no isolation levels: every row runs writers with BEGIN IMMEDIATE and read-only transactions with BEGIN DEFERRED (query_only), as contend does".to_string(),
                SqliteBegin::Deferred => "SQLite has no isolation levels: every row runs every transaction with BEGIN DEFERRED".to_string(),
            }),
            _ => None,
        };
        if let Some(note) = note {
            notes.push(LevelNote {
                level: Some(*level),
                note,
            });
        }
    }
    notes
}

/// The server's version string.
async fn server_version(db: &Db) -> Result<String, Error> {
    let sql = match db.backend() {
        Backend::Postgres => "SHOW server_version",
        Backend::MySql => "SELECT VERSION()",
        _ => "SELECT sqlite_version()",
    };
    Ok(db
        .query_scalar::<String>(sql)
        .fetch_one(db.pool())
        .await
        .map_err(contend::Error::from)?)
}

/// `anomalies_<pid>_<time>_<counter>`: unique among parallel runs on one machine.
fn unique_table_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "anomalies_{}_{}_{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The run's table: created with a unique name, dropped at the end of the run, or from a
/// background task if the run's future is dropped first.
struct TableGuard {
    db: Option<Db>,
    table: String,
}

impl TableGuard {
    async fn create(db: &Db) -> Result<TableGuard, Error> {
        let table = unique_table_name();
        let engine = if db.backend() == Backend::MySql {
            " ENGINE=InnoDB"
        } else {
            ""
        };
        db.execute_script(&format!(
            "CREATE TABLE {table} (id INT PRIMARY KEY, value INT){engine}"
        ))
        .await?;
        Ok(TableGuard {
            db: Some(db.clone()),
            table,
        })
    }

    async fn drop_now(&mut self) {
        if let Some(db) = self.db.take()
            && let Err(e) = db
                .execute_script(&format!("DROP TABLE IF EXISTS {}", self.table))
                .await
        {
            tracing::warn!(table = %self.table, error = %e, "could not drop the suite's table");
        }
    }
}

impl Drop for TableGuard {
    fn drop(&mut self) {
        if let Some(db) = self.db.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let sql = format!("DROP TABLE IF EXISTS {}", self.table);
            handle.spawn(async move {
                let _ = db.execute_script(&sql).await;
            });
        }
    }
}
