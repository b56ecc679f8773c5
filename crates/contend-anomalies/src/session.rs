//! One connection running one transaction of a test, statement by statement, in a task of its
//! own, so that a statement waiting for a lock does not stop the driver.
//!
//! Statements are queued in order; each answers on its own channel. Once a statement fails, the
//! session rolls its transaction back at once (as an application would, and so that MariaDB,
//! which has already rolled back a deadlock victim, never runs later statements in autocommit
//! mode) and answers every later statement with "skipped". On SQLite the session waits for locks
//! itself: the busy timeout is 0, and a statement answered `SQLITE_BUSY` is retried every 2 ms
//! with a flag raised, so the driver knows at once that it waits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use contend::{Backend, ConflictKind, Db};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AssertSqlSafe, Executor, Row};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::script::{Op, Rows};
use crate::trace::{Failure, FailureKind, StepResult};

/// How often a SQLite statement answered `SQLITE_BUSY` is tried again.
const BUSY_RETRY: Duration = Duration::from_millis(2);

/// What every session of one run shares.
#[derive(Debug)]
pub(crate) struct SessionConfig {
    pub backend: Backend,
    pub table: String,
    /// `BEGIN` for a transaction that writes.
    pub begin_rw: String,
    /// `BEGIN` for a read-only transaction.
    pub begin_ro: String,
    /// How long a SQLite statement may wait for the database lock before it fails with `Busy`.
    pub busy_bound: Duration,
}

/// A statement for a session.
struct Command {
    index: usize,
    op: Op,
    reply: oneshot::Sender<Reply>,
}

/// A session's answer to one statement.
#[derive(Debug)]
pub(crate) struct Reply {
    pub sql: Option<String>,
    pub result: StepResult,
}

/// A running session.
pub(crate) struct Session {
    sender: Option<mpsc::UnboundedSender<Command>>,
    /// Raised while a SQLite statement waits for the database lock.
    pub waiting: Arc<AtomicBool>,
    /// The server's id for this connection (PostgreSQL backend pid, MariaDB connection id).
    pub server_id: Option<i64>,
    task: Option<JoinHandle<()>>,
}

impl Session {
    /// Takes a connection from the pool (closed, never reused, when the session ends) and starts
    /// the session's task.
    pub async fn open(db: &Db, config: Arc<SessionConfig>) -> contend::Result<Session> {
        let mut conn = db.acquire().await?;
        // The session changes connection settings (timeouts, query_only) and may be abandoned
        // with a statement in flight: never hand such a connection to anyone else.
        conn.close_on_drop();
        let server_id = match config.backend {
            Backend::Postgres => Some(
                sqlx::query_scalar::<_, i64>("SELECT CAST(pg_backend_pid() AS BIGINT)")
                    .fetch_one(&mut *conn)
                    .await?,
            ),
            Backend::MySql => Some(
                sqlx::query_scalar::<_, i64>("SELECT CAST(CONNECTION_ID() AS SIGNED)")
                    .fetch_one(&mut *conn)
                    .await?,
            ),
            _ => None,
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(conn, config, receiver, waiting.clone()));
        Ok(Session {
            sender: Some(sender),
            waiting,
            server_id,
            task: Some(task),
        })
    }

    /// Queues `op` (step `index`); the answer arrives on the returned channel.
    pub fn send(&self, index: usize, op: Op) -> oneshot::Receiver<Reply> {
        let (reply, answer) = oneshot::channel();
        if let Some(sender) = &self.sender {
            // If the task is gone the reply sender is dropped and the driver sees a closed channel.
            let _ = sender.send(Command { index, op, reply });
        }
        answer
    }

    /// Ends the session: an open transaction is rolled back and the connection closed. A task
    /// still stuck in a statement after `grace` is aborted (its connection is closed on drop, so
    /// the server rolls back).
    pub async fn close(mut self, grace: Duration) {
        self.sender.take();
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(grace, &mut task).await.is_err()
        {
            task.abort();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Outcome of one statement that ran.
enum Ran {
    Rows(Rows),
    Affected(u64),
    Done,
}

async fn run(
    mut conn: PoolConnection<Any>,
    config: Arc<SessionConfig>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    waiting: Arc<AtomicBool>,
) {
    let mut in_tx = false;
    let mut failed_at: Option<usize> = None;
    let mut last_read = BTreeMap::new();
    while let Some(cmd) = commands.recv().await {
        if let Some(step) = failed_at {
            let _ = cmd.reply.send(Reply {
                sql: None,
                result: StepResult::Skipped {
                    reason: format!("the transaction had failed at step {}", step + 1),
                },
            });
            continue;
        }
        let sql = match &cmd.op {
            Op::Begin { read_only: true } => Ok(config.begin_ro.clone()),
            Op::Begin { read_only: false } => Ok(config.begin_rw.clone()),
            op => op.sql(&config.table, &last_read),
        };
        let sql = match sql {
            Ok(sql) => sql,
            Err(message) => {
                failed_at = Some(cmd.index);
                if in_tx {
                    rollback(&mut conn).await;
                    in_tx = false;
                }
                let _ = cmd.reply.send(Reply {
                    sql: None,
                    result: StepResult::Failed(Failure {
                        kind: FailureKind::Other,
                        message,
                    }),
                });
                continue;
            }
        };
        let result = match execute(&mut conn, &config, &cmd.op, &sql, &waiting).await {
            Ok(Ran::Rows(rows)) => {
                for (id, value) in &rows {
                    last_read.insert(*id, *value);
                }
                StepResult::Rows { rows }
            }
            Ok(Ran::Affected(count)) => StepResult::Affected { count },
            Ok(Ran::Done) => {
                match cmd.op {
                    Op::Begin { .. } => in_tx = true,
                    Op::Commit | Op::Rollback => in_tx = false,
                    _ => {}
                }
                StepResult::Done
            }
            Err(failure) => {
                // Roll back before answering, so that the locks are gone by the time the driver
                // issues the next step.
                // (A failed PostgreSQL COMMIT has already ended the transaction.)
                let ended = cmd.op == Op::Commit && config.backend == Backend::Postgres;
                if (in_tx || matches!(cmd.op, Op::Begin { .. })) && !ended {
                    rollback(&mut conn).await;
                }
                in_tx = false;
                failed_at = Some(cmd.index);
                StepResult::Failed(failure)
            }
        };
        let _ = cmd.reply.send(Reply {
            sql: Some(sql),
            result,
        });
    }
    if in_tx {
        rollback(&mut conn).await;
    }
}

async fn rollback(conn: &mut PoolConnection<Any>) {
    if let Err(e) = conn
        .execute(sqlx::raw_sql(AssertSqlSafe("ROLLBACK".to_string())))
        .await
    {
        tracing::debug!(error = %e, "rollback after a failed statement");
    }
}

async fn execute(
    conn: &mut PoolConnection<Any>,
    config: &SessionConfig,
    op: &Op,
    sql: &str,
    waiting: &AtomicBool,
) -> Result<Ran, Failure> {
    let deadline = Instant::now() + config.busy_bound;
    loop {
        let attempt = match op {
            Op::Read { .. } => {
                let rows = sqlx::query(AssertSqlSafe(sql.to_string()))
                    .persistent(false)
                    .fetch_all(&mut **conn)
                    .await;
                rows.and_then(|rows| {
                    rows.iter()
                        .map(|row| Ok((row.try_get::<i64, _>(0)?, row.try_get::<i64, _>(1)?)))
                        .collect::<Result<Rows, sqlx::Error>>()
                })
                .map(Ran::Rows)
            }
            Op::Update { .. } | Op::Insert { .. } | Op::Delete { .. } => {
                sqlx::query(AssertSqlSafe(sql.to_string()))
                    .persistent(false)
                    .execute(&mut **conn)
                    .await
                    .map(|r| Ran::Affected(r.rows_affected()))
            }
            Op::Begin { .. } | Op::Commit | Op::Rollback => conn
                .execute(sqlx::raw_sql(AssertSqlSafe(sql.to_string())))
                .await
                .map(|_| Ran::Done),
        };
        match attempt {
            Ok(ran) => {
                waiting.store(false, Ordering::SeqCst);
                return Ok(ran);
            }
            Err(e) if config.backend == Backend::Sqlite && sqlite_busy(&e) => {
                if Instant::now() >= deadline {
                    waiting.store(false, Ordering::SeqCst);
                    return Err(Failure {
                        kind: FailureKind::Busy,
                        message: format!(
                            "still SQLITE_BUSY after {} ms (the suite's bound): {e}",
                            config.busy_bound.as_millis()
                        ),
                    });
                }
                waiting.store(true, Ordering::SeqCst);
                tokio::time::sleep(BUSY_RETRY).await;
            }
            Err(e) => {
                waiting.store(false, Ordering::SeqCst);
                return Err(classify(e));
            }
        }
    }
}

/// The SQLite extended result code of an error, if it is one.
fn sqlite_code(err: &sqlx::Error) -> Option<i64> {
    match err {
        sqlx::Error::Database(db)
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() =>
        {
            db.code()?.parse().ok()
        }
        _ => None,
    }
}

/// `SQLITE_BUSY` (5) or `SQLITE_BUSY_RECOVERY` (261): another connection holds the lock; trying
/// again later is what SQLite's own busy handler would do. `SQLITE_BUSY_SNAPSHOT` (517) is not
/// one of them: that snapshot can never become current again.
fn sqlite_busy(err: &sqlx::Error) -> bool {
    matches!(sqlite_code(err), Some(5 | 261))
}

/// Classifies an error with contend's classification, and SQLite's stale-snapshot error as the
/// serialization failure it is.
fn classify(err: sqlx::Error) -> Failure {
    let message = match &err {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (code {code})", db.message()),
            None => db.message().to_string(),
        },
        other => other.to_string(),
    };
    if sqlite_code(&err) == Some(517) {
        return Failure {
            kind: FailureKind::Serialization,
            message,
        };
    }
    let kind = match contend::Error::from(err).conflict() {
        Some(ConflictKind::Serialization) => FailureKind::Serialization,
        Some(ConflictKind::Deadlock) => FailureKind::Deadlock,
        Some(ConflictKind::LockTimeout) => FailureKind::LockTimeout,
        Some(ConflictKind::Busy) => FailureKind::Busy,
        _ => FailureKind::Other,
    };
    Failure { kind, message }
}
