//! Histories of operations, recorded under load and checked for isolation anomalies afterwards,
//! in the way Elle checks list-append histories.
//!
//! # What is recorded
//! Each operation is one [`Op`]: the worker that ran it (its *process*), when it was invoked and
//! when it completed (nanoseconds since the run started), what it did as a sequence of
//! micro-operations ([`Mop`]: the list it read from a key, the unique value it appended to a
//! key) and how it ended ([`Status`]): `ok` (committed), `failed` (certainly did not commit) or
//! `unknown` (it may or may not have committed: Jepsen's `info`).
//!
//! A [`Recorder`] keeps one buffer per worker (each behind a mutex only its own worker takes,
//! on a cache line of its own), so recording costs one uncontended lock and a push per
//! operation; [`Recorder::take`] merges the buffers after the load into a [`History`].
//!
//! # What is checked
//! [`History::check`] (in `check`) infers, per key, the order in which the values were
//! appended (the *version order*) from the reads: every read of a key must be a prefix of the
//! longest read of it, else the key's reads show an *incompatible order*. From that order it
//! derives the dependencies between operations, as in Adya's direct serialization graph:
//! - `ww`: op B appended the value that follows op A's in a key's version order;
//! - `wr`: op B read a list whose last value op A appended;
//! - `rw`: op A read a list of a key, and op B appended the value that comes next in its order
//!   (A did not see B's write).
//!
//! Real-time order (an operation that completed before another was invoked) is not used: the
//! check is for serializability, not strict serializability, so operations that overlapped or
//! not are ordered by their dependencies only.
//!
//! It finds the strongly connected components of that graph (Tarjan), and in each one a
//! shortest cycle of each kind as the witness:
//! - **G0** (write cycle): a cycle of `ww` edges only;
//! - **G1c** (circular information flow): a cycle of `ww` and `wr` edges, at least one `wr`;
//! - **G-single** (read skew, one anti-dependency): a cycle with exactly one `rw` edge;
//! - **G2** (anti-dependency cycle, e.g. write skew): a cycle with more than one `rw` edge.
//!
//! and, without cycles:
//! - **G1a** (aborted read): an operation read a value appended by an operation that failed;
//! - **G1b** (intermediate read): an operation read a list ending in a value that its writer
//!   followed with another append to the same key;
//! - **incompatible order**: two reads of one key of which neither is a prefix of the other;
//! - **lost update**: two committed operations read the same version of a key and both
//!   appended to it (one of them cannot have seen the other's write: P4).
//!
//! Operations with an unknown outcome are handled as Jepsen does: an unknown operation whose
//! appended value somebody read did commit, and takes part in the graph through its writes;
//! one that nobody saw adds nothing; it is never counted as aborted for G1a; and its reads are
//! not trusted (only `ok` operations' reads make edges). Failed operations take no part in the
//! graph; a value of theirs that was read is a G1a.
//!
//! Every anomaly comes with a witness in words: the operations (worker, outcome, times, what
//! they read and appended) and, for a cycle, each edge with the key and value behind it.
//!
//! ```
//! use contend_lab::history::{History, Mop, Op, Status};
//! // Write skew: both read x and y empty; one appends to x, the other to y; a final read
//! // sees both appends.
//! let t1 = Op::new(0, Status::Ok, vec![Mop::read(1, []), Mop::read(2, []), Mop::append(1, 10)]);
//! let t2 = Op::new(1, Status::Ok, vec![Mop::read(1, []), Mop::read(2, []), Mop::append(2, 20)]);
//! let last = Op::new(2, Status::Ok, vec![Mop::read(1, [10]), Mop::read(2, [20])]);
//! let analysis = History::new(vec![t1, t2, last]).check();
//! assert_eq!(analysis.count("G2"), 1);
//! assert_eq!(analysis.anomalies.len(), 1);
//! ```

mod check;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use check::{Analysis, Anomaly, AnomalyKind};

/// A key of a list-append history.
pub type Key = u64;
/// A value appended to a key's list (unique per key over a history).
pub type Value = u64;

/// The process of the final read that a scenario may add after the load ([`Op::is_final`]).
pub const FINAL_PROCESS: usize = usize::MAX;

/// One micro-operation of an [`Op`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mop {
    /// The list of `key` as read, oldest value first; `None` when it is not known (the
    /// operation failed, or its outcome is unknown).
    Read {
        /// The key read.
        key: Key,
        /// What was read.
        list: Option<Vec<Value>>,
    },
    /// `value` appended to the list of `key`.
    Append {
        /// The key appended to.
        key: Key,
        /// The value appended.
        value: Value,
    },
}

impl Mop {
    /// A read of `key` that returned `list`.
    pub fn read(key: Key, list: impl IntoIterator<Item = Value>) -> Mop {
        Mop::Read {
            key,
            list: Some(list.into_iter().collect()),
        }
    }

    /// An append of `value` to `key`.
    pub fn append(key: Key, value: Value) -> Mop {
        Mop::Append { key, value }
    }
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// It committed.
    Ok,
    /// It certainly did not commit (a conflict, a refusal, a lock not acquired).
    Failed,
    /// It may or may not have committed (an error at or around commit, a lost connection):
    /// Jepsen's `info`.
    Unknown,
}

impl Status {
    /// `ok`, `failed` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Unknown => "unknown",
        }
    }
}

/// One operation of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// The worker that ran it ([`FINAL_PROCESS`] for a final read).
    pub process: usize,
    /// When it was invoked, in nanoseconds since the run started.
    pub invoked_ns: u64,
    /// When it completed, in nanoseconds since the run started.
    pub completed_ns: u64,
    /// How it ended.
    pub status: Status,
    /// What it read and appended, in order.
    pub mops: Vec<Mop>,
}

impl Op {
    /// An operation of `process` with times 0 (hand-made histories; [`History::new`] keeps the
    /// given order for equal times).
    pub fn new(process: usize, status: Status, mops: Vec<Mop>) -> Op {
        Op {
            process,
            invoked_ns: 0,
            completed_ns: 0,
            status,
            mops,
        }
    }

    /// The same operation with its invocation and completion times (nanoseconds).
    pub fn at(mut self, invoked_ns: u64, completed_ns: u64) -> Op {
        self.invoked_ns = invoked_ns;
        self.completed_ns = completed_ns;
        self
    }

    /// Whether this is a final read added after the load.
    pub fn is_final(&self) -> bool {
        self.process == FINAL_PROCESS
    }

    /// Who ran the operation, how it ended and when: `op 12 (worker 3, ok, 1.204-1.377 ms)`.
    pub fn who(&self, id: usize) -> String {
        let who = if self.is_final() {
            "final read".to_string()
        } else {
            format!("worker {}", self.process)
        };
        let ms = |ns: u64| ns as f64 / 1e6;
        format!(
            "op {id} ({who}, {}, {:.3}-{:.3} ms)",
            self.status.as_str(),
            ms(self.invoked_ns),
            ms(self.completed_ns)
        )
    }

    /// The operation in words: `op 12 (worker 3, ok, 1.204-1.377 ms: r 7 [.. 5 9], a 7 12)`.
    /// Long lists show their length and last values only; after 6 micro-operations, the
    /// number of the others.
    pub fn describe(&self, id: usize) -> String {
        const SHOWN: usize = 6;
        let mut s = self.who(id);
        s.pop();
        s.push(':');
        for (i, m) in self.mops.iter().take(SHOWN).enumerate() {
            s.push_str(if i == 0 { " " } else { ", " });
            match m {
                Mop::Read { key, list: Some(l) } => {
                    let _ = write!(s, "r {key} {}", show_list(l));
                }
                Mop::Read { key, list: None } => {
                    let _ = write!(s, "r {key} ?");
                }
                Mop::Append { key, value } => {
                    let _ = write!(s, "a {key} {value}");
                }
            }
        }
        if self.mops.len() > SHOWN {
            let _ = write!(s, ", .. {} more", self.mops.len() - SHOWN);
        }
        s.push(')');
        s
    }
}

/// `[1 2 3]`, or `[.. 7 8 9] (12 values)` for a long list.
pub(crate) fn show_list(list: &[Value]) -> String {
    const SHOWN: usize = 4;
    let tail = &list[list.len().saturating_sub(SHOWN)..];
    let values: Vec<String> = tail.iter().map(Value::to_string).collect();
    if list.len() > SHOWN {
        format!("[.. {}] ({} values)", values.join(" "), list.len())
    } else {
        format!("[{}]", values.join(" "))
    }
}

/// A recorded history: its operations, sorted by invocation time (then process).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// The operations; an operation's index here is its id in witnesses (`op 12`).
    pub ops: Vec<Op>,
}

impl History {
    /// A history of `ops`, sorted by invocation time (stable: hand-made histories with equal
    /// times keep their order).
    pub fn new(mut ops: Vec<Op>) -> History {
        ops.sort_by_key(|o| o.invoked_ns);
        History { ops }
    }

    /// Operations that ended `status`.
    pub fn count(&self, status: Status) -> u64 {
        self.ops.iter().filter(|o| o.status == status).count() as u64
    }

    /// Checks the history for anomalies (see the module documentation).
    pub fn check(&self) -> Analysis {
        check::check(self)
    }
}

/// One worker's buffer, alone on its cache line(s) so that workers never share one.
#[repr(align(128))]
struct Slot(Mutex<Vec<Op>>);

/// Records the operations of one run: one buffer per worker, merged by [`Recorder::take`].
/// After the check, it keeps the run's [`HistoryReport`] for the lab's report.
pub struct Recorder {
    started: Instant,
    slots: Box<[Slot]>,
    report: Mutex<Option<HistoryReport>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("workers", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder for `workers` workers (at least one buffer), its clock started now.
    ///
    /// ```
    /// use contend_lab::history::{Mop, Op, Recorder, Status};
    /// let recorder = Recorder::new(2);
    /// let t = recorder.now_ns();
    /// recorder.record(Op::new(1, Status::Ok, vec![Mop::append(1, 5)]).at(t, recorder.now_ns()));
    /// recorder.record(Op::new(0, Status::Ok, vec![Mop::read(1, [5])]).at(t + 1, recorder.now_ns()));
    /// let history = recorder.take();
    /// assert_eq!(history.ops.len(), 2);
    /// assert_eq!(history.ops[0].process, 1); // merged in invocation order
    /// assert!(history.check().anomalies.is_empty());
    /// ```
    pub fn new(workers: usize) -> Recorder {
        Recorder {
            started: Instant::now(),
            slots: (0..workers.max(1))
                .map(|_| Slot(Mutex::new(Vec::new())))
                .collect(),
            report: Mutex::new(None),
        }
    }

    /// Nanoseconds since the recorder was made.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Adds `op` to its worker's buffer (worker `op.process`, modulo the buffers made).
    pub fn record(&self, op: Op) {
        let slot = &self.slots[op.process % self.slots.len()];
        slot.0.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// Empties every buffer into one [`History`].
    pub fn take(&self) -> History {
        let mut ops = Vec::new();
        for slot in self.slots.iter() {
            ops.append(&mut slot.0.lock().unwrap_or_else(|e| e.into_inner()));
        }
        History::new(ops)
    }

    /// Keeps `report` as the run's history report ([`Recorder::report`]).
    pub fn set_report(&self, report: HistoryReport) {
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
    }

    /// The report set by [`Recorder::set_report`], if the history has been checked.
    pub fn report(&self) -> Option<HistoryReport> {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What the lab reports of a run's checked history (the `history` object of a run in the JSON
/// document).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HistoryReport {
    /// Operations in the history (a final read included).
    pub operations: u64,
    /// Operations that committed.
    pub ok: u64,
    /// Operations that certainly did not commit.
    pub failed: u64,
    /// Operations whose outcome is unknown.
    pub unknown: u64,
    /// Anomalies found (each counts as one violation of the run).
    pub anomalies: u64,
    /// Anomalies by kind (`G0`, `G1a`, `G1b`, `G1c`, `G-single`, `G2`, `incompatible-order`,
    /// `lost-update`).
    pub kinds: BTreeMap<String, u64>,
    /// How long the check took, in milliseconds.
    pub check_ms: f64,
    /// Whether the cycle search ran out of its budget (some cycles may be unclassified or
    /// counted once for their component).
    pub truncated: bool,
    /// Witnesses in words: the first anomaly of each kind found, cycles first (at most 4).
    pub witnesses: Vec<String>,
}

/// Witnesses kept in a [`HistoryReport`].
const MAX_WITNESSES: usize = 4;

impl HistoryReport {
    /// The report of `history`, checked as `analysis` in `took`.
    pub fn new(history: &History, analysis: &Analysis, took: Duration) -> HistoryReport {
        HistoryReport {
            operations: history.ops.len() as u64,
            ok: history.count(Status::Ok),
            failed: history.count(Status::Failed),
            unknown: history.count(Status::Unknown),
            anomalies: analysis.anomalies.len() as u64,
            kinds: analysis
                .counts()
                .into_iter()
                .map(|(k, n)| (k.to_string(), n))
                .collect(),
            check_ms: took.as_secs_f64() * 1e3,
            truncated: analysis.truncated,
            witnesses: analysis
                .examples()
                .into_iter()
                .take(MAX_WITNESSES)
                .map(|a| a.witness.clone())
                .collect(),
        }
    }

    /// The kinds as `2 G-single, 1 G2`, or `none`.
    pub fn kinds_text(&self) -> String {
        if self.kinds.is_empty() {
            return "none".to_string();
        }
        self.kinds
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
