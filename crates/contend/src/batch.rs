//! The `batched` strategy: concurrent operations on the same keys combined into one transaction
//! (flat combining, or group commit done by the application).
//!
//! Every safe strategy pays one durable commit per operation while it holds the hot row, so a
//! hot account is capped by the commit rate. Under `batched`, operations submitted to an
//! [`crate::strategy::Executor`] (or its clones) for the same key set and the same database
//! queue up; one task, the *combiner*, takes up to [`BatchOptions::max_size`] of them and runs
//! them in one transaction, while the next batch collects behind it. No fixed sleep is needed:
//! the batch that collects while another commits is as large as the load makes it.
//! [`BatchOptions::max_wait`] optionally holds a batch open a little longer when it is not full.
//!
//! # One batch, one transaction
//! For each operation, in arrival order: [`crate::strategy::Operation::read`] with the row-lock
//! clause of `pessimistic` (so batches of other processes serialise on the same rows), then
//! [`crate::strategy::Operation::write`] on the current values. An operation that fails with
//! its own error (a refusal: "insufficient funds") must fail alone, as if it had run alone:
//! each operation then runs inside its own `SAVEPOINT`, the failed one is rolled back to it,
//! and the others go on and see the state as if it had never run. Savepoints cost a round trip
//! per operation (and a subtransaction on PostgreSQL), so a queue runs its batches without them
//! while no operation fails: when one does, that attempt is rolled back and the batch runs
//! again with savepoints, which stay on until a batch has no failure. Then one `COMMIT`; only
//! after it does any caller get its outcome.
//!
//! Each operation still costs its own read and write round trips, one after the other on the
//! batch's connection: that amortises the commit, not the statements. An operation that can
//! decide in memory ([`crate::strategy::Operation::apply`] and
//! [`crate::strategy::Operation::write_state`]) does better: consecutive operations of its
//! type in a batch share one read, are decided one after the other on the running state (a
//! refusal changes nothing, so it needs no savepoint), and one write stores the result.
//!
//! All the operations of a batch have the same canonical (sorted, deduplicated) key set
//! (unless they name a domain, below), and each reads its rows in that order
//! ([`crate::strategy::Operation::read`]'s contract), so a batch takes its row locks exactly as
//! one `pessimistic` operation would: two batches (of two processes, say) cannot lock the same
//! rows in opposite orders. Deadlocks that arise anyway (from other code) are retried.
//!
//! # Failures
//! - An operation that fails with a conflict (deadlock, lock timeout, serialization or version
//!   conflict), or whose savepoint cannot be rolled back (a lost connection), aborts the whole
//!   attempt: nothing of it committed. So does a failed `BEGIN`.
//! - Such a batch is tried again: conflicts as the executor's retry policy allows, other
//!   failures up to [`BatchOptions::max_attempts`] times. If it still fails, it is *split*:
//!   each operation runs alone (with the same retries), so one bad operation never fails its
//!   neighbours; it gets its own error.
//! - A conflict reported by `COMMIT` itself means the transaction rolled back, and is retried
//!   the same way. Any other `COMMIT` failure (the connection died while committing) leaves the
//!   outcome unknown: the batch may or may not have committed. It is not retried (that could
//!   apply every write twice); every caller of the batch gets
//!   [`Error::TransactionBroken`], never "done".
//!
//! # Callers that go away
//! The combiner is a task of its own ([`tokio::spawn`]); the operations it took are owned by
//! it. A caller that drops its future does not cancel the batch it joined: its operation
//! commits or not with the others, and the outcome is discarded.
//!
//! # What callers get
//! Each caller gets its own [`Executed`]: its operation's result; `attempts` and `conflicts` of
//! the batch that decided it (a batch run again after a refusal without savepoints counts one
//! attempt more); `lock_wait` is the time the operation waited in the queue before that batch
//! started. [`crate::strategy::Executor::batch_stats`] counts commits, batch sizes, retries
//! and splits.
//!
//! # Domains: one batch over several key sets
//! By default operations are combined only with operations on exactly the same key set (one
//! hot account; one pair of accounts in either direction). Transfers among a few accounts
//! have many key sets that share rows, so their batches would queue on each other's row locks
//! one commit at a time. An operation that names a domain
//! ([`crate::strategy::Operation::batch_domain`]) joins the one queue of that domain instead:
//! a batch takes the domain's operations whatever their keys, sorts them by key set (arrival
//! order is kept within a set; operations of one batch are concurrent, so any order is one in
//! which they could have run), and runs them group by group in one transaction with one
//! commit. The groups lock their rows in key order, but a row of a later group may sort before
//! one already locked: another process's batch or transaction on the same rows can then
//! deadlock with it, and the deadlock is retried like any conflict.
//!
//! # Limits
//! - Without a domain, operations are combined only with operations on exactly the same key
//!   set.
//! - On PostgreSQL, each operation's savepoint is a subtransaction; a batch of more than 64
//!   writing operations overflows a backend's subtransaction cache, which makes other
//!   sessions' snapshots slower while it runs. Keep [`BatchOptions::max_size`] moderate where
//!   that matters.
//! - On SQLite the batch is one `BEGIN IMMEDIATE` write transaction (the database write lock is
//!   the row lock); batching there turns many short write transactions into one.
//! - Every operation of a batch waits for the batch's commit: the latency of one operation is
//!   the time of the batch before it plus its own batch.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::{Notify, oneshot};

use crate::BoxFuture;
use crate::backend::Database;
use crate::db::Db;
use crate::error::{ConflictKind, Error};
use crate::retry::RetryPolicy;
use crate::session::Session;
use crate::strategy::{Executed, Operation, pessimistic};
use crate::tx::{Tx, TxError, TxOptions};

/// Settings of the `batched` strategy ([`crate::strategy::Executor::batch`]).
///
/// ```
/// use std::time::Duration;
/// use contend::batch::BatchOptions;
/// let options = BatchOptions::new().max_size(64).max_wait(Duration::from_micros(200));
/// assert_eq!(options.max_batch_size(), 64);
/// assert_eq!(options.max_wait_time(), Duration::from_micros(200));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct BatchOptions {
    max_size: usize,
    max_wait: Duration,
    max_attempts: u32,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions::new()
    }
}

impl BatchOptions {
    /// At most 256 operations per batch, no extra wait, 3 attempts after failures that are
    /// not conflicts.
    pub fn new() -> Self {
        BatchOptions {
            max_size: 256,
            max_wait: Duration::ZERO,
            max_attempts: 3,
        }
    }

    /// The largest number of operations in one transaction (at least 1; 1 turns batching
    /// off while keeping the queue).
    pub fn max_size(mut self, size: usize) -> Self {
        self.max_size = size.max(1);
        self
    }

    /// How long a batch that is not full waits for more operations before it starts. Zero (the
    /// default) starts at once: batches still form from the operations that arrive while the
    /// previous batch runs. tokio's timer has a resolution of about 1 ms, so a non-zero wait
    /// below that lasts up to 1 ms (or until the batch is full, whichever comes first).
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// How many times a batch is run when it fails with something that is not a conflict
    /// (a lost connection, a failed `BEGIN`) before it is split (at least 1). Conflicts are
    /// retried as the executor's retry policy says.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The maximum batch size ([`BatchOptions::max_size`]).
    pub fn max_batch_size(&self) -> usize {
        self.max_size
    }

    /// The maximum wait ([`BatchOptions::max_wait`]).
    pub fn max_wait_time(&self) -> Duration {
        self.max_wait
    }
}

/// Counters of a batcher, shared by an executor and its clones
/// ([`crate::strategy::Executor::batch_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Transactions that committed a batch (a split batch's operations count one each).
    pub commits: u64,
    /// Operations decided and answered: from committed transactions (successes and
    /// refusals), and refusals of operations that ran alone (rolled back).
    pub operations: u64,
    /// The most operations one committed transaction held.
    pub largest: u64,
    /// Batch attempts that failed before their commit and were run again.
    pub retries: u64,
    /// Batches that were split into their operations after their attempts failed.
    pub splits: u64,
    /// Batches whose `COMMIT` failed with an unknown outcome (their callers got an error).
    pub unknown: u64,
}

/// What one operation's step in a batch did.
enum Step {
    /// The operation finished (succeeded, or failed with its own error and was rolled back to
    /// its savepoint): the batch goes on.
    Kept,
    /// Without savepoints: the operation failed with its own error, and what it may have
    /// written cannot be undone alone. The attempt must roll back.
    Refused,
    /// The batch attempt must end: nothing of it may commit.
    Abort(Error),
}

/// One submitted operation, with its caller's reply channel. Type-erased so that one queue
/// holds operations of any type.
trait Job<DB: Database>: Send + 'static {
    /// Runs the operation on `tx` and keeps its outcome: inside a savepoint when `savepoints`
    /// (`first` when no operation of this attempt opened one before). When the operation
    /// decides in memory ([`Operation::apply`]), the operations of the same type at the start
    /// of `rest` are decided on the same state and written with it: the number of them is
    /// returned with the step.
    fn step<'c>(
        &'c mut self,
        tx: &'c mut Tx<DB>,
        rest: &'c mut [Box<dyn Job<DB>>],
        savepoints: bool,
        first: bool,
    ) -> BoxFuture<'c, (Step, usize)>;
    /// For downcasting to the operation's own type.
    fn as_any(&mut self) -> &mut dyn std::any::Any;
    /// The operation's canonical key set, joined (operations of one domain differ in it).
    fn keys(&self) -> &str;
    /// Whether the last [`Job::step`] ended in the operation's own error.
    fn refused(&self) -> bool;
    /// Answers the caller with the outcome kept by the last [`Job::step`] (after a commit).
    fn deliver(self: Box<Self>, report: &Report);
    /// Answers the caller with an error: its own error of the last step if `own` and it had
    /// one, else `error`.
    fn fail(self: Box<Self>, error: Error, own: bool, report: &Report);
}

/// How a batch went, for the [`Executed`] of each of its operations.
struct Report {
    attempts: u32,
    conflicts: Vec<ConflictKind>,
    started: Instant,
}

struct Pending<DB: Database, O: Operation<DB>> {
    op: Arc<O>,
    keys: String,
    lock: &'static str,
    outcome: Option<Result<O::Output, O::Error>>,
    reply: oneshot::Sender<Executed<O::Output, O::Error>>,
    submitted: Instant,
}

const SAVEPOINT: &str = "SAVEPOINT contend_batch";

impl<DB: Database, O: Operation<DB>> Job<DB> for Pending<DB, O> {
    fn step<'c>(
        &'c mut self,
        tx: &'c mut Tx<DB>,
        rest: &'c mut [Box<dyn Job<DB>>],
        savepoints: bool,
        first: bool,
    ) -> BoxFuture<'c, (Step, usize)> {
        Box::pin(async move {
            self.outcome = None;
            if savepoints {
                // One round trip: end the previous operation's savepoint (if any) and open
                // this one. Savepoints of one name stack on PostgreSQL and SQLite, so each is
                // released.
                let open = if first {
                    SAVEPOINT.to_string()
                } else {
                    format!("RELEASE SAVEPOINT contend_batch; {SAVEPOINT}")
                };
                if let Err(e) = DB::execute_raw(tx.conn(), open).await {
                    return (Step::Abort(e.into()), 0);
                }
            }
            let op = self.op.clone();
            let mut state = match op.read(tx.conn(), self.lock).await {
                Ok(state) => state,
                Err(e) => return (self.failed(tx, e, savepoints).await, 0),
            };
            if let Some(outcome) = op.apply(&mut state) {
                // Decided in memory: so are the operations of the same type that follow, on
                // the running state; one write for all of them.
                self.outcome = Some(outcome);
                let mut grouped = 0;
                for job in rest.iter_mut() {
                    if job.keys() != self.keys {
                        break;
                    }
                    let Some(next) = job.as_any().downcast_mut::<Pending<DB, O>>() else {
                        break;
                    };
                    let Some(outcome) = next.op.apply(&mut state) else {
                        break;
                    };
                    next.outcome = Some(outcome);
                    grouped += 1;
                }
                let backend = tx.backend();
                let written = match op.write_state(tx, &state) {
                    Some(write) => write.await,
                    None => Err(Error::Unsupported {
                        backend,
                        what: "`Operation::apply` without `Operation::write_state`".into(),
                    }
                    .into()),
                };
                return match written {
                    Ok(()) => (Step::Kept, grouped),
                    Err(e) => {
                        // The group's shared write failed: the whole attempt ends (a split
                        // then gives each operation its own write, and its own error).
                        let abort = match e.conflict() {
                            Some(kind) => Error::Conflict { kind, source: None },
                            None => {
                                Error::TransactionBroken("the combined write of a batch failed")
                            }
                        };
                        self.outcome = Some(Err(e));
                        (Step::Abort(abort), grouped)
                    }
                };
            }
            match op.write(tx, &state, false).await {
                Ok(value) => {
                    self.outcome = Some(Ok(value));
                    (Step::Kept, 0)
                }
                Err(e) => (self.failed(tx, e, savepoints).await, 0),
            }
        })
    }

    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn keys(&self) -> &str {
        &self.keys
    }

    fn refused(&self) -> bool {
        matches!(self.outcome, Some(Err(_)))
    }

    fn deliver(mut self: Box<Self>, report: &Report) {
        let result = self.outcome.take().unwrap_or_else(|| {
            Err(
                Error::TransactionBroken("a batched operation was not run before the commit")
                    .into(),
            )
        });
        self.answer(result, report);
    }

    fn fail(mut self: Box<Self>, error: Error, own: bool, report: &Report) {
        let result = match self.outcome.take() {
            Some(Err(e)) if own => Err(e),
            _ => Err(error.into()),
        };
        self.answer(result, report);
    }
}

impl<DB: Database, O: Operation<DB>> Pending<DB, O> {
    /// The step after the operation failed with `e`: a conflict ends the attempt; its own
    /// error is kept, and undone with its savepoint (or, without one, the attempt ends).
    async fn failed(&mut self, tx: &mut Tx<DB>, e: O::Error, savepoints: bool) -> Step {
        let conflict = e.conflict();
        self.outcome = Some(Err(e));
        if let Some(kind) = conflict {
            return Step::Abort(Error::Conflict { kind, source: None });
        }
        if !savepoints {
            return Step::Refused;
        }
        match DB::execute_raw(tx.conn(), "ROLLBACK TO SAVEPOINT contend_batch".into()).await {
            Ok(()) => Step::Kept,
            Err(e) => Step::Abort(e.into()),
        }
    }

    fn answer(self, result: Result<O::Output, O::Error>, report: &Report) {
        // A caller that went away has dropped its receiver: its outcome is discarded.
        let _ = self.reply.send(Executed {
            result,
            attempts: report.attempts,
            conflicts: report.conflicts.clone(),
            lock_wait: report.started.saturating_duration_since(self.submitted),
            fenced: false,
        });
    }
}

type Jobs<DB> = Vec<Box<dyn Job<DB>>>;

/// The operations waiting for one key set of one database.
struct Queue<DB: Database> {
    pending: VecDeque<Box<dyn Job<DB>>>,
    arrived: Arc<Notify>,
}

struct Inner<DB: Database> {
    queues: Mutex<HashMap<String, Queue<DB>>>,
    commits: AtomicU64,
    operations: AtomicU64,
    largest: AtomicU64,
    retries: AtomicU64,
    splits: AtomicU64,
    unknown: AtomicU64,
}

/// The queues and combiners of the `batched` strategy. Owned by an
/// [`crate::strategy::Executor`]; clones share it.
pub(crate) struct Batcher<DB: Database> {
    inner: Arc<Inner<DB>>,
}

impl<DB: Database> Clone for Batcher<DB> {
    fn clone(&self) -> Self {
        Batcher {
            inner: self.inner.clone(),
        }
    }
}

impl<DB: Database> Batcher<DB> {
    pub(crate) fn new() -> Self {
        Batcher {
            inner: Arc::new(Inner {
                queues: Mutex::new(HashMap::new()),
                commits: AtomicU64::new(0),
                operations: AtomicU64::new(0),
                largest: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                splits: AtomicU64::new(0),
                unknown: AtomicU64::new(0),
            }),
        }
    }

    pub(crate) fn stats(&self) -> BatchStats {
        let i = &self.inner;
        BatchStats {
            commits: i.commits.load(Ordering::Relaxed),
            operations: i.operations.load(Ordering::Relaxed),
            largest: i.largest.load(Ordering::Relaxed),
            retries: i.retries.load(Ordering::Relaxed),
            splits: i.splits.load(Ordering::Relaxed),
            unknown: i.unknown.load(Ordering::Relaxed),
        }
    }

    /// Queues `op` with the operations on the same keys of the same database and waits for
    /// the outcome of the batch it ends up in. `options` are the transaction options of the
    /// batch (lock timeout; its retry policy decides which conflicts are retried).
    ///
    /// Cancel safety: dropping the future discards the outcome; the operation still runs with
    /// its batch.
    pub(crate) async fn run<O: Operation<DB>>(
        &self,
        session: &mut Session<DB>,
        options: &TxOptions,
        batch: BatchOptions,
        keys: Vec<String>,
        op: Arc<O>,
    ) -> Executed<O::Output, O::Error> {
        let db = session.db().clone();
        let lock = match pessimistic::lock_clause(db.backend(), op.row_lock()) {
            Ok(lock) => lock,
            Err(e) => return failed(e),
        };
        // The caller's connection is not needed while it waits: the combiner has its own.
        session.release();
        let keys = keys.join("\u{1f}");
        let key = match op.batch_domain() {
            Some(domain) => format!("{}\u{1e}{domain}", db.url()),
            None => format!("{}\u{1f}{keys}", db.url()),
        };
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Pending {
            op,
            keys,
            lock,
            outcome: None,
            reply,
            submitted: Instant::now(),
        });
        self.submit(key, db, job, options, batch);
        match answer.await {
            Ok(done) => done,
            Err(_) => failed(Error::TransactionBroken(
                "the batch's combiner task ended without an answer (it panicked); the \
                 operation's outcome is unknown",
            )),
        }
    }

    fn submit(
        &self,
        key: String,
        db: Db<DB>,
        job: Box<dyn Job<DB>>,
        options: &TxOptions,
        batch: BatchOptions,
    ) {
        let mut queues = self.inner.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(queue) = queues.get_mut(&key) {
            queue.pending.push_back(job);
            queue.arrived.notify_one();
            return;
        }
        // No combiner for this key: this submitter starts one. It stays while the queue has
        // work and removes the queue (under this lock) when it finds it empty.
        let arrived = Arc::new(Notify::new());
        queues.insert(
            key.clone(),
            Queue {
                pending: VecDeque::from([job]),
                arrived: arrived.clone(),
            },
        );
        drop(queues);
        let combiner = Combiner {
            inner: self.inner.clone(),
            key,
            arrived,
            options: options.clone().retry(RetryPolicy::none()),
            retry: options.retry.clone(),
            batch,
            savepoints: AtomicBool::new(false),
        };
        tokio::spawn(combiner.run(db));
    }
}

fn failed<T, E: TxError>(error: Error) -> Executed<T, E> {
    Executed {
        result: Err(error.into()),
        attempts: 0,
        conflicts: Vec::new(),
        lock_wait: Duration::ZERO,
        fenced: false,
    }
}

/// The task that runs the batches of one queue, one after the other.
struct Combiner<DB: Database> {
    inner: Arc<Inner<DB>>,
    key: String,
    arrived: Arc<Notify>,
    /// The batch transaction's options, without retry (the combiner retries itself).
    options: TxOptions,
    /// Which conflicts are retried, how often and how long.
    retry: RetryPolicy,
    batch: BatchOptions,
    /// Whether batches run each operation in a savepoint. Off while no operation fails with
    /// its own error (one round trip less per operation, and no subtransactions); turned on by
    /// the first such failure, and off again after a batch without one.
    savepoints: AtomicBool,
}

/// How one attempt at a batch ended.
enum Attempt {
    Committed,
    /// Without savepoints, an operation failed with its own error: rolled back, nothing
    /// committed. Alone, that is its outcome; in a batch, the batch runs again with savepoints.
    Refused,
    /// Nothing committed; the batch may run again.
    NotCommitted(Error),
    /// `COMMIT` failed with something other than a conflict: it may have committed or not.
    Unknown(Error),
}

impl<DB: Database> Combiner<DB> {
    async fn run(self, db: Db<DB>) {
        let mut session = db.session();
        // How many operations the last batch took: callers that were just answered, whose next
        // operations `collect` waits for.
        let mut last = 0;
        loop {
            self.collect(last).await;
            let jobs: Jobs<DB> = {
                let mut queues = self.inner.queues.lock().unwrap_or_else(|e| e.into_inner());
                let Some(queue) = queues.get_mut(&self.key) else {
                    return;
                };
                if queue.pending.is_empty() {
                    queues.remove(&self.key);
                    return;
                }
                let n = queue.pending.len().min(self.batch.max_size);
                last = n;
                let mut jobs: Jobs<DB> = queue.pending.drain(..n).collect();
                // A domain's operations grouped by key set (stable: arrival order within a
                // set), so that a group shares one read and one write, and rows are locked in
                // key order. On a key set's own queue this changes nothing.
                jobs.sort_by(|a, b| a.keys().cmp(b.keys()));
                jobs
            };
            // A panicking operation must not leave the queue without a combiner: the jobs of
            // that batch are dropped (their callers are told the outcome is unknown) and the
            // next batch runs.
            if AssertUnwindSafe(self.batch(&mut session, jobs, true))
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!("an operation panicked in a batch; its batch was abandoned");
                session.release();
            }
        }
    }

    /// Waits up to `max_wait` for the queue to fill up to `max_size` (without a wait,
    /// [`Combiner::gather`] for the `answered` callers of the last batch).
    async fn collect(&self, answered: usize) {
        if self.batch.max_wait.is_zero() {
            self.gather(answered).await;
            return;
        }
        let deadline = tokio::time::Instant::now() + self.batch.max_wait;
        loop {
            let notified = self.arrived.notified();
            {
                let queues = self.inner.queues.lock().unwrap_or_else(|e| e.into_inner());
                match queues.get(&self.key) {
                    // Nothing to wait for when empty: the combiner ends.
                    Some(queue)
                        if !queue.pending.is_empty()
                            && queue.pending.len() < self.batch.max_size => {}
                    _ => return,
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// Without a wait: lets the submitters that are already running reach the queue. The
    /// callers of the batch that just committed were woken by their answers and most send
    /// their next operation within microseconds; taking the queue at once would leave them to
    /// the batch after (measured on PostgreSQL, withdraw at 32 workers: 27 operations per
    /// commit). So the combiner yields to them while the queue keeps growing, up to
    /// `GATHER_YIELDS` times, and stops as soon as the queue holds what was already waiting
    /// plus one operation per caller of the last batch (or `max_size`), or when it stops
    /// growing. No timer is involved: when nobody else is runnable a yield returns at once.
    async fn gather(&self, answered: usize) {
        const GATHER_YIELDS: usize = 16;
        let pending = || {
            let queues = self.inner.queues.lock().unwrap_or_else(|e| e.into_inner());
            queues.get(&self.key).map_or(0, |q| q.pending.len())
        };
        let mut seen = pending();
        let target = (seen + answered).min(self.batch.max_size);
        let mut still = 0;
        for _ in 0..GATHER_YIELDS {
            tokio::task::yield_now().await;
            let len = pending();
            if len == 0 || len >= target {
                return;
            }
            if len > seen {
                seen = len;
                still = 0;
            } else {
                still += 1;
                if still >= 2 {
                    return;
                }
            }
        }
    }

    /// Runs `jobs` as one transaction, retried; when `split` and it keeps failing, each job
    /// alone.
    fn batch<'a>(
        &'a self,
        session: &'a mut Session<DB>,
        mut jobs: Jobs<DB>,
        split: bool,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let started = Instant::now();
            let mut report = Report {
                attempts: 0,
                conflicts: Vec::new(),
                started,
            };
            let mut savepoints = self.savepoints.load(Ordering::Relaxed);
            loop {
                report.attempts += 1;
                report.started = Instant::now();
                let (attempt, back) = self.attempt(session, jobs, savepoints).await;
                jobs = back;
                let error = match attempt {
                    Attempt::Refused if jobs.len() == 1 => {
                        // Alone, a rolled-back transaction is exactly the refusal's outcome.
                        self.inner.operations.fetch_add(1, Ordering::Relaxed);
                        if let Some(job) = jobs.pop() {
                            job.fail(
                                Error::TransactionBroken("a refused operation lost its error"),
                                true,
                                &report,
                            );
                        }
                        return;
                    }
                    Attempt::Refused => {
                        // Run the batch again with a savepoint per operation, so that the
                        // refusal undoes only its own writes.
                        self.inner.retries.fetch_add(1, Ordering::Relaxed);
                        savepoints = true;
                        self.savepoints.store(true, Ordering::Relaxed);
                        continue;
                    }
                    Attempt::Committed => {
                        if savepoints && !jobs.iter().any(|job| job.refused()) {
                            self.savepoints.store(false, Ordering::Relaxed);
                        }
                        let n = jobs.len() as u64;
                        self.inner.commits.fetch_add(1, Ordering::Relaxed);
                        self.inner.operations.fetch_add(n, Ordering::Relaxed);
                        self.inner.largest.fetch_max(n, Ordering::Relaxed);
                        for job in jobs {
                            job.deliver(&report);
                        }
                        return;
                    }
                    Attempt::Unknown(e) => {
                        tracing::warn!(error = %e, operations = jobs.len(),
                            "COMMIT of a batch failed; its outcome is unknown");
                        self.inner.unknown.fetch_add(1, Ordering::Relaxed);
                        session.release();
                        for job in jobs {
                            job.fail(
                                Error::TransactionBroken(
                                    "the batch's COMMIT failed: the operation may or may not \
                                     have committed",
                                ),
                                false,
                                &report,
                            );
                        }
                        return;
                    }
                    Attempt::NotCommitted(e) => e,
                };
                let again = match error.conflict() {
                    Some(kind) => {
                        report.conflicts.push(kind);
                        self.retry
                            .should_retry(kind, report.attempts, started.elapsed())
                    }
                    None => report.attempts < self.batch.max_attempts,
                };
                if again {
                    self.inner.retries.fetch_add(1, Ordering::Relaxed);
                    if error.conflict().is_some() {
                        tokio::time::sleep(self.retry.backoff(report.attempts)).await;
                    }
                    continue;
                }
                if split && jobs.len() > 1 {
                    self.inner.splits.fetch_add(1, Ordering::Relaxed);
                    for job in jobs {
                        self.batch(session, vec![job], false).await;
                    }
                    return;
                }
                // Alone: the operation's own error if it had one, else the batch's.
                debug_assert_eq!(
                    jobs.len(),
                    1,
                    "a batch that is not split holds one operation"
                );
                if let Some(job) = jobs.pop() {
                    job.fail(error, true, &report);
                }
                return;
            }
        })
    }

    /// One transaction over `jobs`; the jobs are handed back whatever happens.
    async fn attempt(
        &self,
        session: &mut Session<DB>,
        jobs: Jobs<DB>,
        savepoints: bool,
    ) -> (Attempt, Jobs<DB>) {
        let slot = Arc::new(Mutex::new(jobs));
        let reached_commit = Arc::new(AtomicBool::new(false));
        let refused_flag = Arc::new(AtomicBool::new(false));
        let (s, r, f) = (slot.clone(), reached_commit.clone(), refused_flag.clone());
        let run = session
            .run(&self.options, move |tx| {
                let (slot, reached, refused) = (s.clone(), r.clone(), f.clone());
                Box::pin(async move {
                    let mut jobs =
                        std::mem::take(&mut *slot.lock().unwrap_or_else(|e| e.into_inner()));
                    let mut result = Ok(());
                    let mut i = 0;
                    while i < jobs.len() {
                        let (head, rest) = jobs[i..].split_at_mut(1);
                        let (step, grouped) = head[0].step(tx, rest, savepoints, i == 0).await;
                        i += 1 + grouped;
                        match step {
                            Step::Kept => {}
                            Step::Refused => {
                                refused.store(true, Ordering::Relaxed);
                                result = Err(Error::TransactionBroken(
                                    "an operation of the batch failed without a savepoint",
                                ));
                                break;
                            }
                            Step::Abort(e) => {
                                result = Err(e);
                                break;
                            }
                        }
                    }
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = std::mem::take(&mut jobs);
                    if result.is_ok() {
                        reached.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .await;
        let jobs = std::mem::take(&mut *slot.lock().unwrap_or_else(|e| e.into_inner()));
        let attempt = match run.result {
            Ok(()) => Attempt::Committed,
            Err(_) if refused_flag.load(Ordering::Relaxed) => Attempt::Refused,
            Err(e) if !reached_commit.load(Ordering::Relaxed) => Attempt::NotCommitted(e),
            // A conflict at COMMIT (serialization failure, busy) and a transaction found
            // broken at COMMIT both mean it rolled back.
            Err(e) if e.conflict().is_some() || matches!(e, Error::TransactionBroken(_)) => {
                Attempt::NotCommitted(e)
            }
            Err(e) => Attempt::Unknown(e),
        };
        (attempt, jobs)
    }
}
