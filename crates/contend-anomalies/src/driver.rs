//! The step driver: runs an interleaving on two or three sessions, detects statements that wait
//! for another transaction's lock, moves on without them, and collects their results when they
//! finish.
//!
//! After every step the driver *settles*: it polls every statement still in flight until each
//! one has either answered (a value or an error: a deadlock victim or a serialization failure can
//! land on a statement issued steps earlier) or is confirmed waiting. A wait is confirmed when the
//! server says so twice in a row, [`POLL`] apart: `pg_blocking_pids(pid)` on PostgreSQL, a
//! `LOCK WAIT` transaction of that connection in `SHOW ENGINE INNODB STATUS` on MariaDB/MySQL
//! (not `information_schema.innodb_trx`, which InnoDB caches for 100 ms while it is being read),
//! and the session's own `SQLITE_BUSY` retry loop on SQLite. A statement that neither answers nor
//! is reported waiting within [`FALLBACK_MONITORED`] ([`FALLBACK`] when the server cannot be
//! asked) is taken as blocked too (detected by timeout). Settling
//! makes the interleaving deterministic: a statement released by a commit finishes before the
//! next step runs.
//!
//! Everything is bounded: sessions run with a lock timeout ([`LOCK_TIMEOUT`]) and, on the
//! servers, a statement timeout; after the last step the driver waits at most [`DRAIN`] for
//! statements still in flight, then reports them as timed out and closes their connections.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use contend::{Backend, Db, IsolationLevel, TxOptions};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AssertSqlSafe, Row};
use tokio::sync::oneshot;
use tokio::sync::oneshot::error::TryRecvError;

use crate::Error;
use crate::model::SqliteBegin;
use crate::script::{State, Step, TxId};
use crate::session::{Reply, Session, SessionConfig};
use crate::trace::{Blocked, Detection, StepRecord, StepResult, Trace};

/// How often in-flight statements are checked.
pub const POLL: Duration = Duration::from_millis(3);
/// Consecutive "waiting" answers needed to call a statement blocked.
const CONFIRMATIONS: u32 = 2;
/// A statement with no answer after this long is taken as blocked when the server cannot be
/// asked.
pub const FALLBACK: Duration = Duration::from_millis(300);
/// The same when the server can be asked but has not reported a wait: the statement is probably
/// just slow (a loaded machine), so wait longer before calling it blocked.
pub const FALLBACK_MONITORED: Duration = Duration::from_secs(1);
/// Sessions' lock timeout: no statement waits for a lock longer than this.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(2);
/// Sessions' statement timeout on the servers.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the driver waits after the last step for statements still in flight.
pub const DRAIN: Duration = Duration::from_secs(6);

/// How the driver asks the database who is waiting.
pub(crate) enum Monitor {
    /// `pg_blocking_pids` on a connection of its own.
    Postgres(PoolConnection<Any>),
    /// `SHOW ENGINE INNODB STATUS` on a connection of its own.
    MySql(PoolConnection<Any>),
    /// The sessions' own `SQLITE_BUSY` flags.
    Sqlite,
    /// The server could not be asked (the reason is in the report's notes): timeouts only.
    None,
}

impl Monitor {
    /// Opens the monitor for `db` and checks that its query works; when it does not, returns
    /// [`Monitor::None`] and the reason.
    pub async fn open(db: &Db) -> contend::Result<(Monitor, Option<String>)> {
        let mut monitor = match db.backend() {
            Backend::Postgres => Monitor::Postgres(db.acquire().await?),
            Backend::MySql => Monitor::MySql(db.acquire().await?),
            _ => return Ok((Monitor::Sqlite, None)),
        };
        match monitor.waiting(&[(0, 0)], &[]).await {
            Ok(_) => Ok((monitor, None)),
            Err(e) => Ok((
                Monitor::None,
                Some(format!(
                    "the server cannot be asked which statements wait ({e}); blocking is detected by a {} ms timeout only",
                    FALLBACK.as_millis()
                )),
            )),
        }
    }

    /// Which of `heads` (session index, server id) wait for a lock, with the server ids they
    /// wait for (PostgreSQL only). `sessions` gives the SQLite flags.
    async fn waiting(
        &mut self,
        heads: &[(usize, i64)],
        sessions: &[Session],
    ) -> Result<HashMap<usize, Vec<i64>>, sqlx::Error> {
        let mut out = HashMap::new();
        match self {
            Monitor::Postgres(conn) => {
                let values: Vec<String> = heads.iter().map(|(_, id)| format!("({id})")).collect();
                let sql = format!(
                    "SELECT CAST(p AS BIGINT), COALESCE(array_to_string(pg_blocking_pids(p), ','), '') \
                     FROM (VALUES {}) AS v(p)",
                    values.join(", ")
                );
                let rows = sqlx::query(AssertSqlSafe(sql))
                    .persistent(false)
                    .fetch_all(&mut **conn)
                    .await?;
                for row in rows {
                    let pid: i64 = row.try_get(0)?;
                    let blockers: String = row.try_get(1)?;
                    if blockers.is_empty() {
                        continue;
                    }
                    let blockers = blockers.split(',').filter_map(|b| b.parse().ok()).collect();
                    if let Some((session, _)) = heads.iter().find(|(_, id)| *id == pid) {
                        out.insert(*session, blockers);
                    }
                }
            }
            Monitor::MySql(conn) => {
                let row = sqlx::raw_sql(AssertSqlSafe("SHOW ENGINE INNODB STATUS".to_string()))
                    .fetch_one(&mut **conn)
                    .await?;
                let status: String = row.try_get(2)?;
                let waiting = innodb_waiting_threads(&status);
                for (session, id) in heads {
                    if waiting.contains(id) {
                        out.insert(*session, Vec::new());
                    }
                }
            }
            Monitor::Sqlite => {
                for (session, _) in heads {
                    if sessions[*session].waiting.load(Ordering::SeqCst) {
                        out.insert(*session, Vec::new());
                    }
                }
            }
            Monitor::None => {}
        }
        Ok(out)
    }

    fn fallback(&self) -> Duration {
        match self {
            Monitor::None => FALLBACK,
            _ => FALLBACK_MONITORED,
        }
    }

    fn detection(&self) -> Detection {
        match self {
            Monitor::Sqlite => Detection::SqliteBusy,
            _ => Detection::Server,
        }
    }
}

/// The connection ids of InnoDB transactions in `LOCK WAIT`, from `SHOW ENGINE INNODB STATUS`.
///
/// Each transaction is a block starting `---TRANSACTION`; a waiting one has a line starting
/// `LOCK WAIT` and names its connection as `MariaDB thread id N,` (MySQL: `MySQL thread id N,`).
pub(crate) fn innodb_waiting_threads(status: &str) -> HashSet<i64> {
    let mut out = HashSet::new();
    for block in status.split("---TRANSACTION").skip(1) {
        let block = block.split("\n--------\n").next().unwrap_or(block);
        if !block
            .lines()
            .any(|l| l.trim_start().starts_with("LOCK WAIT"))
        {
            continue;
        }
        if let Some(pos) = block.find("thread id ") {
            let digits: String = block[pos + "thread id ".len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(id) = digits.parse() {
                out.insert(id);
            }
        }
    }
    out
}

/// What one run of an interleaving needs to know.
pub(crate) struct RunContext<'a> {
    pub db: &'a Db,
    pub table: &'a str,
    pub level: IsolationLevel,
    pub sqlite_begin: SqliteBegin,
}

impl RunContext<'_> {
    /// The sessions' configuration: `BEGIN` statements from contend's dialect (lock and
    /// statement timeouts included), busy bound for SQLite.
    fn session_config(&self) -> Result<SessionConfig, Error> {
        let backend = self.db.backend();
        let dialect = backend.dialect();
        let (begin_rw, begin_ro) = match (backend, self.sqlite_begin) {
            (Backend::Sqlite, SqliteBegin::Deferred) => {
                let sql = "PRAGMA busy_timeout = 0; BEGIN DEFERRED".to_string();
                (sql.clone(), sql)
            }
            (Backend::Sqlite, SqliteBegin::Immediate) => {
                // Busy timeout 0: the session waits for the lock itself (see `session`).
                let options = TxOptions::new()
                    .isolation(self.level)
                    .lock_timeout(Duration::ZERO);
                (
                    dialect.begin(&options)?.0,
                    dialect.begin(&options.clone().read_only(true))?.0,
                )
            }
            _ => {
                let options = TxOptions::new()
                    .isolation(self.level)
                    .lock_timeout(LOCK_TIMEOUT)
                    .statement_timeout(STATEMENT_TIMEOUT);
                (
                    dialect.begin(&options)?.0,
                    dialect.begin(&options.clone().read_only(true))?.0,
                )
            }
        };
        Ok(SessionConfig {
            backend,
            table: self.table.to_string(),
            begin_rw,
            begin_ro,
            busy_bound: LOCK_TIMEOUT,
        })
    }
}

/// A statement issued and not yet answered.
struct InFlight {
    index: usize,
    answer: oneshot::Receiver<Reply>,
}

/// Per session: its statements in flight (the first one is executing) and the wait evidence.
struct Lane {
    queue: VecDeque<InFlight>,
    head_since: Instant,
    confirmations: u32,
    waiting_for: Vec<i64>,
}

/// Runs `steps` on `txs` fresh sessions, from a freshly reset table, and returns what it saw.
///
/// # Errors
/// When the table cannot be reset or read back, or a session cannot be opened: the database is
/// not usable, and the suite stops.
pub(crate) async fn run_interleaving(
    ctx: &RunContext<'_>,
    monitor: &mut Monitor,
    txs: usize,
    steps: &[Step],
) -> Result<Trace, Error> {
    let table = ctx.table;
    ctx.db
        .execute_script(&format!(
            "DELETE FROM {table}; INSERT INTO {table} (id, value) VALUES (1, 10), (2, 20)"
        ))
        .await?;
    let config = Arc::new(ctx.session_config()?);
    let mut sessions = Vec::with_capacity(txs);
    for _ in 0..txs {
        sessions.push(Session::open(ctx.db, config.clone()).await?);
    }
    let mut run = Run {
        records: steps
            .iter()
            .enumerate()
            .map(|(index, step)| StepRecord {
                index,
                step: step.clone(),
                sql: None,
                queued: false,
                blocked: None,
                result: StepResult::Pending,
                finished_during: None,
            })
            .collect(),
        lanes: (0..txs)
            .map(|_| Lane {
                queue: VecDeque::new(),
                head_since: Instant::now(),
                confirmations: 0,
                waiting_for: Vec::new(),
            })
            .collect(),
        server_ids: sessions
            .iter()
            .enumerate()
            .filter_map(|(tx, s)| s.server_id.map(|id| (id, tx)))
            .collect(),
        sessions,
        monitor,
    };
    for (index, step) in steps.iter().enumerate() {
        run.issue(index, step);
        run.settle(index, false, Instant::now() + DRAIN).await;
    }
    let last = steps.len().saturating_sub(1);
    run.settle(last, true, Instant::now() + DRAIN).await;
    let Run {
        mut records,
        lanes,
        sessions,
        ..
    } = run;
    for lane in lanes {
        for stuck in lane.queue {
            records[stuck.index].result = StepResult::TimedOut;
        }
    }
    for session in sessions {
        session.close(Duration::from_secs(1)).await;
    }
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT id, value FROM {table} ORDER BY id"
    )))
    .persistent(false)
    .fetch_all(ctx.db.pool())
    .await
    .map_err(contend::Error::from)?;
    let mut final_state = State::new();
    for row in rows {
        let id: i64 = row.try_get(0).map_err(contend::Error::from)?;
        let value: i64 = row.try_get(1).map_err(contend::Error::from)?;
        final_state.insert(id, value);
    }
    Ok(Trace {
        txs,
        steps: records,
        final_state,
    })
}

struct Run<'m> {
    records: Vec<StepRecord>,
    lanes: Vec<Lane>,
    sessions: Vec<Session>,
    server_ids: BTreeMap<i64, TxId>,
    monitor: &'m mut Monitor,
}

impl Run<'_> {
    fn issue(&mut self, index: usize, step: &Step) {
        let lane = &mut self.lanes[step.tx];
        if lane.queue.is_empty() {
            lane.head_since = Instant::now();
            lane.confirmations = 0;
        } else {
            self.records[index].queued = true;
        }
        let answer = self.sessions[step.tx].send(index, step.op.clone());
        lane.queue.push_back(InFlight { index, answer });
    }

    /// Takes every answer that has arrived. Returns whether any did.
    fn collect(&mut self, current: usize) -> bool {
        let mut any = false;
        for lane in &mut self.lanes {
            while let Some(head) = lane.queue.front_mut() {
                let reply = match head.answer.try_recv() {
                    Ok(reply) => reply,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => Reply {
                        sql: None,
                        result: StepResult::Failed(crate::trace::Failure {
                            kind: crate::trace::FailureKind::Other,
                            message: "the session ended without answering".into(),
                        }),
                    },
                };
                let index = head.index;
                let record = &mut self.records[index];
                if reply.sql.is_some() {
                    record.sql = reply.sql;
                }
                record.result = reply.result;
                if current > index {
                    record.finished_during = Some(current);
                }
                lane.queue.pop_front();
                lane.head_since = Instant::now();
                lane.confirmations = 0;
                lane.waiting_for.clear();
                any = true;
            }
        }
        any
    }

    /// Waits until every statement in flight has answered or is confirmed waiting (`all`:
    /// until every one has answered), or until `deadline`.
    async fn settle(&mut self, current: usize, all: bool, deadline: Instant) {
        loop {
            self.collect(current);
            let heads: Vec<(usize, i64)> = self
                .lanes
                .iter()
                .enumerate()
                .filter(|(_, lane)| !lane.queue.is_empty())
                .map(|(tx, _)| (tx, self.sessions[tx].server_id.unwrap_or(0)))
                .collect();
            if heads.is_empty() || Instant::now() >= deadline {
                return;
            }
            let waiting = match self.monitor.waiting(&heads, &self.sessions).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!(error = %e, "asking the server who waits failed");
                    HashMap::new()
                }
            };
            if self.collect(current) {
                // Something answered meanwhile: what the server said may be stale.
                continue;
            }
            let mut decided = true;
            for (tx, _) in &heads {
                let lane = &mut self.lanes[*tx];
                match waiting.get(tx) {
                    Some(blockers) => {
                        lane.confirmations += 1;
                        lane.waiting_for = blockers.clone();
                    }
                    None => lane.confirmations = 0,
                }
                let detection = if lane.confirmations >= CONFIRMATIONS {
                    Some(self.monitor.detection())
                } else if lane.head_since.elapsed() >= self.monitor.fallback() {
                    Some(Detection::Timeout)
                } else {
                    None
                };
                match detection {
                    Some(detected_by) => {
                        let head = lane.queue.front().expect("a head").index;
                        let record = &mut self.records[head];
                        if record.blocked.is_none() {
                            let mut waiting_for: Vec<TxId> = lane
                                .waiting_for
                                .iter()
                                .filter_map(|id| self.server_ids.get(id).copied())
                                .collect();
                            waiting_for.sort_unstable();
                            waiting_for.dedup();
                            record.blocked = Some(Blocked {
                                detected_by,
                                waiting_for,
                            });
                        }
                    }
                    None => decided = false,
                }
            }
            if decided && !all {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_innodb_lock_waits() {
        let status = "\
------------
TRANSACTIONS
------------
Trx id counter 33
LIST OF TRANSACTIONS FOR EACH SESSION:
---TRANSACTION 32, ACTIVE 0 sec starting index read
mysql tables in use 1, locked 1
LOCK WAIT 2 lock struct(s), heap size 1128, 1 row lock(s)
MariaDB thread id 9, OS thread handle 140530331330240, query id 28 127.0.0.1 root Updating
update anom_probe set value=12 where id=1
------- TRX HAS BEEN WAITING 512403 us FOR THIS LOCK TO BE GRANTED:
RECORD LOCKS space id 6 page no 3 n bits 320 index PRIMARY of table `app`.`anom_probe`
------------------
---TRANSACTION 31, ACTIVE 1 sec
2 lock struct(s), heap size 1128, 1 row lock(s), undo log entries 1
MariaDB thread id 8, OS thread handle 140530331637440, query id 25 127.0.0.1 root User sleep
select sleep(3)
--------
FILE I/O
--------
";
        let waiting = innodb_waiting_threads(status);
        assert_eq!(waiting, HashSet::from([9]));
        assert!(innodb_waiting_threads("no transactions").is_empty());
    }
}
