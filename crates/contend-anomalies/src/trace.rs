//! What a run observed: for every step, its SQL, whether it blocked and on whom, and its result
//! (rows, affected count, error), plus the table's final content. Verdicts read only this.

use serde::Serialize;

use crate::script::{Op, Rows, State, Step, TxId};

/// How the driver learned that a statement was waiting for another transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Detection {
    /// The server said so (`pg_blocking_pids` on PostgreSQL, `LOCK WAIT` in
    /// `SHOW ENGINE INNODB STATUS` on MariaDB/MySQL).
    Server,
    /// SQLite answered `SQLITE_BUSY`: another connection holds the lock it needs.
    SqliteBusy,
    /// No answer within the fallback time, and the server could not say why.
    Timeout,
}

/// A statement that had to wait.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Blocked {
    /// How the wait was detected.
    pub detected_by: Detection,
    /// The transactions it waited for, when the server names them (PostgreSQL).
    pub waiting_for: Vec<TxId>,
}

/// Why a statement failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Serialization failure (PostgreSQL `40001`, MariaDB `1020`) or SQLite `SQLITE_BUSY_SNAPSHOT`
    /// (its snapshot is older than the last commit): the database aborted the transaction.
    Serialization,
    /// Chosen as a deadlock victim.
    Deadlock,
    /// Waited for a lock longer than the session's lock timeout (the suite's bound on blocking).
    LockTimeout,
    /// SQLite's database lock stayed busy longer than the suite's bound.
    Busy,
    /// Any other error: the test itself is broken (or the connection was lost).
    Other,
}

impl FailureKind {
    /// True for the kinds by which a database prevents an anomaly by aborting a transaction.
    pub fn is_abort(self) -> bool {
        matches!(self, FailureKind::Serialization | FailureKind::Deadlock)
    }

    /// True for the kinds that mean "waited until the suite's timeout".
    pub fn is_wait_timeout(self) -> bool {
        matches!(self, FailureKind::LockTimeout | FailureKind::Busy)
    }
}

/// A failed statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// The database's message.
    pub message: String,
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum StepResult {
    /// Not finished (only while running, or when the run gave up on it).
    Pending,
    /// A read's rows.
    Rows {
        /// `(id, value)` ordered by id.
        rows: Rows,
    },
    /// A write's affected-row count.
    Affected {
        /// As the driver reports it.
        count: u64,
    },
    /// `BEGIN`, `COMMIT` or `ROLLBACK` succeeded.
    Done,
    /// The statement failed; the session then rolled its transaction back.
    Failed(Failure),
    /// Not run: the transaction had already failed.
    Skipped {
        /// Why.
        reason: String,
    },
    /// Still unfinished when the run's time bound expired.
    TimedOut,
}

/// One step as it ran.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// The step's position in the interleaving (0-based).
    pub index: usize,
    /// The step as scripted.
    #[serde(flatten)]
    pub step: Step,
    /// The SQL actually sent, once known.
    pub sql: Option<String>,
    /// Issued while an earlier statement of the same transaction was still blocked, so it could
    /// only run after that one.
    pub queued: bool,
    /// Set when the statement had to wait for another transaction.
    pub blocked: Option<Blocked>,
    /// The result.
    #[serde(flatten)]
    pub result: StepResult,
    /// The step during which the result arrived, when that was a later step (a blocked
    /// statement that finished once another transaction committed, say).
    pub finished_during: Option<usize>,
}

/// Everything one run of an interleaving observed.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    /// Number of transactions.
    pub txs: usize,
    /// Every step, in script order.
    pub steps: Vec<StepRecord>,
    /// The table read after every transaction ended (autocommit, fresh connection).
    pub final_state: State,
}

impl Trace {
    /// The record of the step labelled `label`.
    pub fn labelled(&self, label: &str) -> Option<&StepRecord> {
        self.steps.iter().find(|s| s.step.label == Some(label))
    }

    /// The rows returned by the read labelled `label`, if it ran and succeeded.
    pub fn rows(&self, label: &str) -> Option<&Rows> {
        match &self.labelled(label)?.result {
            StepResult::Rows { rows } => Some(rows),
            _ => None,
        }
    }

    /// The value of row `id` in the read labelled `label` (`None` when the read did not succeed
    /// or did not return that row).
    pub fn value(&self, label: &str, id: i64) -> Option<i64> {
        self.rows(label)?
            .iter()
            .find(|(rid, _)| *rid == id)
            .map(|(_, v)| *v)
    }

    /// Whether transaction `tx` committed.
    pub fn committed(&self, tx: TxId) -> bool {
        self.steps.iter().any(|s| {
            s.step.tx == tx && s.step.op == Op::Commit && matches!(s.result, StepResult::Done)
        })
    }

    /// The first failure of transaction `tx`.
    pub fn failure(&self, tx: TxId) -> Option<&Failure> {
        self.steps
            .iter()
            .filter(|s| s.step.tx == tx)
            .find_map(|s| match &s.result {
                StepResult::Failed(f) => Some(f),
                _ => None,
            })
    }

    /// Whether any statement of `tx` had to wait for another transaction.
    pub fn blocked(&self, tx: TxId) -> bool {
        self.steps
            .iter()
            .any(|s| s.step.tx == tx && s.blocked.is_some())
    }

    /// The operations of `tx` that took effect (succeeded), in order.
    pub fn applied_ops(&self, tx: TxId) -> Vec<Op> {
        self.steps
            .iter()
            .filter(|s| s.step.tx == tx && s.step.op.is_write())
            .filter(|s| matches!(s.result, StepResult::Affected { .. }))
            .map(|s| s.step.op.clone())
            .collect()
    }

    /// Steps that ran into trouble the suite cannot interpret: an unexpected error, or a
    /// statement that never finished.
    pub fn broken_steps(&self) -> Vec<&StepRecord> {
        self.steps
            .iter()
            .filter(|s| {
                matches!(
                    s.result,
                    StepResult::TimedOut
                        | StepResult::Pending
                        | StepResult::Failed(Failure {
                            kind: FailureKind::Other,
                            ..
                        })
                )
            })
            .collect()
    }
}
