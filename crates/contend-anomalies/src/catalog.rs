//! The anomaly tests: for each anomaly one or more interleavings (after Hermitage), which
//! transactions' waits and aborts count as preventing it, and the precise observation that
//! means it occurred.
//!
//! Every verdict is computed from the trace alone: the values each transaction read, which
//! transactions committed, and the table's final content, compared with what the committed
//! transactions would have produced run one after another. Nothing here knows what a database
//! "should" do.

use std::collections::BTreeSet;

use crate::model::Anomaly;
use crate::script::{
    Assign, Op, Pred, State, Step, TxId, initial_state, permutations, serial_state, show_rows,
    show_state, tx_name,
};
use crate::trace::Trace;

/// What a verdict function concluded from a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// The anomaly's observation was made.
    pub occurred: bool,
    /// The observation, in words.
    pub detail: String,
}

impl Evaluation {
    fn occurred(detail: impl Into<String>) -> Self {
        Evaluation {
            occurred: true,
            detail: detail.into(),
        }
    }

    fn not(detail: impl Into<String>) -> Self {
        Evaluation {
            occurred: false,
            detail: detail.into(),
        }
    }
}

/// One interleaving that tests an anomaly.
#[derive(Debug, Clone)]
pub struct Variant {
    /// The anomaly it tests.
    pub anomaly: Anomaly,
    /// Its name among the anomaly's variants.
    pub name: &'static str,
    /// Whether the transaction that would observe the anomaly only reads.
    pub read_only: bool,
    /// Number of transactions.
    pub txs: usize,
    /// The interleaving.
    pub steps: Vec<Step>,
    /// The transactions whose waits and aborts count as the database preventing the anomaly
    /// (others may wait as part of the set-up).
    pub key_txs: Vec<TxId>,
    /// Whether the verdict depends on which transactions commit. When it does not (the
    /// observation is in the values read), a failed `COMMIT` after the reads did not prevent
    /// anything and is not credited as an abort.
    pub judged_on_commit: bool,
    /// The observation that means the anomaly occurred.
    pub occurred_when: &'static str,
    /// Reads the trace.
    pub evaluate: fn(&Trace) -> Evaluation,
}

fn step(tx: TxId, op: Op) -> Step {
    Step {
        tx,
        op,
        label: None,
    }
}

fn labelled(tx: TxId, op: Op, label: &'static str) -> Step {
    Step {
        tx,
        op,
        label: Some(label),
    }
}

fn begin(tx: TxId) -> Step {
    step(tx, Op::Begin { read_only: false })
}

fn begin_ro(tx: TxId) -> Step {
    step(tx, Op::Begin { read_only: true })
}

fn read(tx: TxId, pred: Pred, label: &'static str) -> Step {
    labelled(tx, Op::Read { pred }, label)
}

fn set(tx: TxId, id: i64, value: i64) -> Step {
    step(
        tx,
        Op::Update {
            pred: Pred::Id(id),
            set: Assign::Const(value),
        },
    )
}

fn commit(tx: TxId) -> Step {
    step(tx, Op::Commit)
}

const T1: TxId = 0;
const T2: TxId = 1;
const T3: TxId = 2;

/// The variants that test `anomaly`.
pub fn variants(anomaly: Anomaly) -> Vec<Variant> {
    match anomaly {
        Anomaly::G0 => vec![Variant {
            anomaly,
            name: "write cycle",
            read_only: false,
            txs: 2,
            steps: vec![
                begin(T1),
                begin(T2),
                set(T1, 1, 11),
                set(T2, 1, 12),
                set(T2, 2, 22),
                set(T1, 2, 21),
                commit(T1),
                commit(T2),
            ],
            key_txs: vec![T1, T2],
            judged_on_commit: true,
            occurred_when: "T1 writes rows 1 and 2 (11, 21), T2 writes them in the other order (12, 22), \
                both commit, and the final table matches no serial order of the committed \
                transactions (T1 then T2 leaves 12, 22; T2 then T1 leaves 11, 21): their writes \
                interleaved.",
            evaluate: eval_g0,
        }],
        Anomaly::G1a => vec![Variant {
            anomaly,
            name: "aborted read",
            read_only: true,
            txs: 2,
            steps: vec![
                begin(T1),
                begin_ro(T2),
                set(T1, 1, 101),
                read(T2, Pred::All, "r1"),
                step(T1, Op::Rollback),
                read(T2, Pred::All, "r2"),
                commit(T2),
            ],
            key_txs: vec![T2],
            judged_on_commit: false,
            occurred_when: "T2 reads row 1 as 101, a value T1 wrote and then rolled back.",
            evaluate: eval_g1_dirty,
        }],
        Anomaly::G1b => vec![Variant {
            anomaly,
            name: "intermediate read",
            read_only: true,
            txs: 2,
            steps: vec![
                begin(T1),
                begin_ro(T2),
                set(T1, 1, 101),
                read(T2, Pred::All, "r1"),
                set(T1, 1, 11),
                commit(T1),
                read(T2, Pred::All, "r2"),
                commit(T2),
            ],
            key_txs: vec![T2],
            judged_on_commit: false,
            occurred_when: "T2 reads row 1 as 101, a value T1 overwrote (with 11) before it committed.",
            evaluate: eval_g1_dirty,
        }],
        Anomaly::G1c => vec![Variant {
            anomaly,
            name: "circular information flow",
            read_only: false,
            txs: 2,
            steps: vec![
                begin(T1),
                begin(T2),
                set(T1, 1, 11),
                set(T2, 2, 22),
                read(T1, Pred::Id(2), "r1"),
                read(T2, Pred::Id(1), "r2"),
                commit(T1),
                commit(T2),
            ],
            key_txs: vec![T1, T2],
            judged_on_commit: false,
            occurred_when: "T1 reads T2's uncommitted row 2 = 22 and T2 reads T1's uncommitted row 1 = 11: \
                each transaction saw the other's write, a cycle of read dependencies.",
            evaluate: eval_g1c,
        }],
        Anomaly::Otv => vec![Variant {
            anomaly,
            name: "observed transaction vanishes",
            read_only: true,
            txs: 3,
            steps: vec![
                begin(T1),
                begin(T2),
                begin_ro(T3),
                set(T1, 1, 11),
                set(T1, 2, 19),
                set(T2, 1, 12),
                commit(T1),
                read(T3, Pred::All, "r1"),
                set(T2, 2, 18),
                read(T3, Pred::All, "r2"),
                commit(T2),
                read(T3, Pred::All, "r3"),
                commit(T3),
            ],
            key_txs: vec![T3],
            judged_on_commit: false,
            occurred_when: "Versions: row 1 goes 10 -> 11 (T1) -> 12 (T2), row 2 goes 20 -> 19 (T1) -> 18 \
                (T2). Once T3 has seen a write of T1 or T2 on one row, a read of the other row \
                (in the same statement or later) returns a version older than that \
                transaction's write there: the transaction T3 observed vanished.",
            evaluate: eval_otv,
        }],
        Anomaly::Pmp => vec![
            Variant {
                anomaly,
                name: "read predicate",
                read_only: true,
                txs: 2,
                steps: vec![
                    begin_ro(T1),
                    begin(T2),
                    read(T1, Pred::Value(30), "r1"),
                    step(T2, Op::Insert { id: 3, value: 30 }),
                    commit(T2),
                    read(T1, Pred::ValueMod(3), "r2"),
                    commit(T1),
                ],
                key_txs: vec![T1, T2],
                judged_on_commit: false,
                occurred_when: "T1's two predicate reads (value = 30, then value % 3 = 0) cannot both be \
                    answered from one committed state of the table (before or after T2 inserted \
                    (3, 30)): the first misses the row the second returns.",
                evaluate: eval_pmp_read,
            },
            Variant {
                anomaly,
                name: "write predicate",
                read_only: false,
                txs: 2,
                steps: vec![
                    begin(T1),
                    begin(T2),
                    step(
                        T1,
                        Op::Update {
                            pred: Pred::All,
                            set: Assign::AddInSql(10),
                        },
                    ),
                    read(T2, Pred::Value(20), "r1"),
                    labelled(
                        T2,
                        Op::Delete {
                            pred: Pred::Value(20),
                        },
                        "d",
                    ),
                    commit(T1),
                    read(T2, Pred::Value(20), "r2"),
                    commit(T2),
                ],
                key_txs: vec![T2],
                judged_on_commit: true,
                occurred_when: "T2 commits, and no single committed state (before or after T1 added 10 to \
                    every row) explains together what T2 read for value = 20, which rows its \
                    DELETE ... WHERE value = 20 removed (seen in the final table), and what it read \
                    for value = 20 after that delete.",
                evaluate: eval_pmp_write,
            },
        ],
        Anomaly::P4 => vec![Variant {
            anomaly,
            name: "lost update",
            read_only: false,
            txs: 2,
            steps: vec![
                begin(T1),
                begin(T2),
                read(T1, Pred::Id(1), "r1"),
                read(T2, Pred::Id(1), "r2"),
                step(
                    T1,
                    Op::Update {
                        pred: Pred::Id(1),
                        set: Assign::Increment(1),
                    },
                ),
                step(
                    T2,
                    Op::Update {
                        pred: Pred::Id(1),
                        set: Assign::Increment(2),
                    },
                ),
                commit(T1),
                commit(T2),
            ],
            key_txs: vec![T1, T2],
            judged_on_commit: true,
            occurred_when: "T1 adds 1 and T2 adds 2 to row 1 by read-modify-write in the application \
                (each writes what it read plus its amount); the final row 1 differs from 10 plus \
                the amounts of the transactions that committed: an increment was lost.",
            evaluate: eval_p4,
        }],
        Anomaly::GSingle => vec![
            Variant {
                anomaly,
                name: "read-only",
                read_only: true,
                txs: 2,
                steps: vec![
                    begin_ro(T1),
                    begin(T2),
                    read(T1, Pred::Id(1), "r1"),
                    read(T2, Pred::Id(1), "t2a"),
                    read(T2, Pred::Id(2), "t2b"),
                    set(T2, 1, 12),
                    set(T2, 2, 18),
                    commit(T2),
                    read(T1, Pred::Id(2), "r2"),
                    commit(T1),
                ],
                key_txs: vec![T1, T2],
                judged_on_commit: false,
                occurred_when: "T2 moves 2 from row 2 to row 1 (10, 20 -> 12, 18). T1's reads of row 1 and \
                    row 2 cannot both come from one committed state (10, 20 or 12, 18), e.g. 10 and 18.",
                evaluate: eval_gsingle_read,
            },
            Variant {
                anomaly,
                name: "predicate dependency",
                read_only: true,
                txs: 2,
                steps: vec![
                    begin_ro(T1),
                    begin(T2),
                    read(T1, Pred::ValueMod(5), "r1"),
                    step(
                        T2,
                        Op::Update {
                            pred: Pred::Value(10),
                            set: Assign::Const(12),
                        },
                    ),
                    commit(T2),
                    read(T1, Pred::ValueMod(3), "r2"),
                    commit(T1),
                ],
                key_txs: vec![T1, T2],
                judged_on_commit: false,
                occurred_when: "T2 changes 10 to 12. T1's predicate reads (value % 5 = 0, then value % 3 = 0) \
                    cannot both be answered from one committed state: the first saw 10, the second \
                    sees 12.",
                evaluate: eval_gsingle_predicate,
            },
            Variant {
                anomaly,
                name: "write predicate",
                read_only: false,
                txs: 2,
                steps: vec![
                    begin(T1),
                    begin(T2),
                    read(T1, Pred::Id(1), "r1"),
                    read(T2, Pred::All, "t2"),
                    set(T2, 1, 12),
                    set(T2, 2, 18),
                    commit(T2),
                    labelled(
                        T1,
                        Op::Delete {
                            pred: Pred::Value(20),
                        },
                        "d",
                    ),
                    read(T1, Pred::Id(2), "r2"),
                    commit(T1),
                ],
                key_txs: vec![T1, T2],
                judged_on_commit: true,
                occurred_when: "T1 commits, and no single committed state (10, 20 or T2's 12, 18) explains \
                    together T1's read of row 1, which rows its DELETE ... WHERE value = 20 removed \
                    (seen in the final table), and its read of row 2 after the delete.",
                evaluate: eval_gsingle_write,
            },
        ],
        Anomaly::G2Item => vec![Variant {
            anomaly,
            name: "write skew",
            read_only: false,
            txs: 2,
            steps: vec![
                begin(T1),
                begin(T2),
                read(T1, Pred::IdIn(vec![1, 2]), "r1"),
                read(T2, Pred::IdIn(vec![1, 2]), "r2"),
                set(T1, 1, 11),
                set(T2, 2, 21),
                commit(T1),
                commit(T2),
            ],
            key_txs: vec![T1, T2],
            judged_on_commit: true,
            occurred_when: "Both commit, T1 read row 2 without T2's write (21) and T2 read row 1 without \
                T1's write (11): each read what the other then overwrote, a cycle of two \
                anti-dependencies.",
            evaluate: eval_g2_item,
        }],
        Anomaly::G2 => vec![
            Variant {
                anomaly,
                name: "predicate anti-dependency",
                read_only: false,
                txs: 2,
                steps: vec![
                    begin(T1),
                    begin(T2),
                    read(T1, Pred::ValueMod(3), "r1"),
                    read(T2, Pred::ValueMod(3), "r2"),
                    step(T1, Op::Insert { id: 3, value: 30 }),
                    step(T2, Op::Insert { id: 4, value: 42 }),
                    commit(T1),
                    commit(T2),
                ],
                key_txs: vec![T1, T2],
                judged_on_commit: true,
                occurred_when: "Both commit, T1's read of value % 3 = 0 does not contain T2's insert (4, 42) \
                    and T2's does not contain T1's insert (3, 30): each predicate read missed the \
                    other's insert.",
                evaluate: eval_g2_predicate,
            },
            Variant {
                anomaly,
                name: "two anti-dependency edges (Fekete et al.)",
                read_only: false,
                txs: 3,
                steps: vec![
                    begin(T1),
                    read(T1, Pred::All, "r1"),
                    begin(T2),
                    step(
                        T2,
                        Op::Update {
                            pred: Pred::Id(2),
                            set: Assign::AddInSql(5),
                        },
                    ),
                    commit(T2),
                    begin_ro(T3),
                    read(T3, Pred::All, "r3"),
                    commit(T3),
                    set(T1, 1, 0),
                    commit(T1),
                ],
                key_txs: vec![T1, T2, T3],
                judged_on_commit: true,
                occurred_when: "All three commit; T1 read row 2 as 20 (not T2's 25), T3 read row 2 as 25 \
                    (T2's) and row 1 as 10 (not T1's 0): T1 must precede T2, T2 precede T3 and T3 \
                    precede T1, a cycle.",
                evaluate: eval_g2_fekete,
            },
        ],
    }
}

// ---- verdicts ---------------------------------------------------------------------------------

/// The final states the committed transactions among `txs` give when run one after another,
/// each with the order that gives it.
fn serial_outcomes(trace: &Trace, txs: &[TxId]) -> Vec<(String, State)> {
    let committed: Vec<TxId> = txs
        .iter()
        .copied()
        .filter(|t| trace.committed(*t))
        .collect();
    let ops: Vec<Vec<Op>> = (0..trace.txs).map(|t| trace.applied_ops(t)).collect();
    permutations(&committed)
        .into_iter()
        .map(|order| {
            let name = if order.is_empty() {
                "no transaction".to_string()
            } else {
                order
                    .iter()
                    .map(|t| tx_name(*t))
                    .collect::<Vec<_>>()
                    .join(" then ")
            };
            (name, serial_state(&initial_state(), &ops, &order))
        })
        .collect()
}

/// The committed states a transaction could have read from: the initial table, and the table
/// after `other` if `other` committed.
fn candidate_states(trace: &Trace, other: TxId) -> Vec<(String, State)> {
    let mut out = vec![("the initial state".to_string(), initial_state())];
    if trace.committed(other) {
        let mut state = initial_state();
        for op in trace.applied_ops(other) {
            op.apply(&mut state);
        }
        out.push((format!("the state after {}", tx_name(other)), state));
    }
    out
}

fn committed_list(trace: &Trace) -> String {
    let names: Vec<String> = (0..trace.txs)
        .filter(|t| trace.committed(*t))
        .map(tx_name)
        .collect();
    if names.is_empty() {
        "no transaction committed".into()
    } else {
        format!("committed: {}", names.join(", "))
    }
}

fn eval_g0(trace: &Trace) -> Evaluation {
    let outcomes = serial_outcomes(trace, &[T1, T2]);
    let fin = &trace.final_state;
    match outcomes.iter().find(|(_, s)| s == fin) {
        Some((order, _)) => Evaluation::not(format!(
            "{}; final table {} is what {order} gives",
            committed_list(trace),
            show_state(fin)
        )),
        None => Evaluation::occurred(format!(
            "{}; final table {} matches no serial order ({})",
            committed_list(trace),
            show_state(fin),
            outcomes
                .iter()
                .map(|(o, s)| format!("{o}: {}", show_state(s)))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}

fn eval_g1_dirty(trace: &Trace) -> Evaluation {
    let seen: Vec<String> = ["r1", "r2"]
        .iter()
        .filter_map(|l| trace.rows(l).map(|r| show_rows(r)))
        .collect();
    let dirty = ["r1", "r2"].iter().any(|l| trace.value(l, 1) == Some(101));
    let detail = format!("T2's reads returned [{}]", seen.join("], ["));
    if dirty {
        Evaluation::occurred(format!("{detail}: it saw T1's 101"))
    } else {
        Evaluation::not(format!("{detail}: never T1's 101"))
    }
}

fn eval_g1c(trace: &Trace) -> Evaluation {
    let r1 = trace.value("r1", 2);
    let r2 = trace.value("r2", 1);
    let show = |v: Option<i64>| v.map_or("nothing".to_string(), |v| v.to_string());
    let detail = format!("T1 read row 2 = {}, T2 read row 1 = {}", show(r1), show(r2));
    if r1 == Some(22) && r2 == Some(11) {
        Evaluation::occurred(format!("{detail}: each saw the other's uncommitted write"))
    } else {
        Evaluation::not(format!("{detail}: no cycle of reads"))
    }
}

fn eval_otv(trace: &Trace) -> Evaluation {
    // Version order of each row; index 1 is T1's write, index 2 is T2's.
    let versions = |id: i64| -> [i64; 3] { if id == 1 { [10, 11, 12] } else { [20, 19, 18] } };
    let version_of = |id: i64, value: i64| versions(id).iter().position(|v| *v == value);
    let mut observed: BTreeSet<(usize, i64)> = BTreeSet::new(); // (writer version, row)
    let mut seen = Vec::new();
    for label in ["r1", "r2", "r3"] {
        let Some(rows) = trace.rows(label) else {
            continue;
        };
        seen.push(show_rows(rows));
        for (id, value) in rows {
            if let Some(v) = version_of(*id, *value)
                && v > 0
            {
                observed.insert((v, *id));
            }
        }
        for (writer, row) in &observed {
            for (id, value) in rows {
                if id == row {
                    continue;
                }
                if let Some(v) = version_of(*id, *value)
                    && v < *writer
                {
                    return Evaluation::occurred(format!(
                        "T3 read [{}]: after seeing {}'s write to row {row} it read row {id} = \
                         {value}, older than {}'s write there",
                        seen.join("], ["),
                        tx_name(writer - 1),
                        tx_name(writer - 1)
                    ));
                }
            }
        }
    }
    Evaluation::not(format!(
        "T3 read [{}]: no transaction it saw vanished",
        seen.join("], [")
    ))
}

/// Whether one candidate state answers every `(label, predicate)` read of the trace. `None`
/// when a read did not succeed (its transaction failed).
fn one_state_for_reads(
    trace: &Trace,
    reads: &[(&str, Pred)],
    candidates: &[(String, State)],
) -> Option<(Option<String>, String)> {
    let mut shown = Vec::new();
    for (label, _) in reads {
        shown.push(show_rows(trace.rows(label)?));
    }
    let found = candidates.iter().find(|(_, state)| {
        reads
            .iter()
            .all(|(label, pred)| trace.rows(label) == Some(&pred.select(state)))
    });
    Some((found.map(|(name, _)| name.clone()), shown.join("], [")))
}

fn eval_pmp_read(trace: &Trace) -> Evaluation {
    let reads = [("r1", Pred::Value(30)), ("r2", Pred::ValueMod(3))];
    consistent_reads_verdict(trace, T1, &reads, T2)
}

fn eval_gsingle_read(trace: &Trace) -> Evaluation {
    let reads = [("r1", Pred::Id(1)), ("r2", Pred::Id(2))];
    consistent_reads_verdict(trace, T1, &reads, T2)
}

fn eval_gsingle_predicate(trace: &Trace) -> Evaluation {
    let reads = [("r1", Pred::ValueMod(5)), ("r2", Pred::ValueMod(3))];
    consistent_reads_verdict(trace, T1, &reads, T2)
}

fn consistent_reads_verdict(
    trace: &Trace,
    reader: TxId,
    reads: &[(&str, Pred)],
    writer: TxId,
) -> Evaluation {
    let candidates = candidate_states(trace, writer);
    match one_state_for_reads(trace, reads, &candidates) {
        None => Evaluation::not(format!(
            "{} did not complete its reads ({})",
            tx_name(reader),
            trace
                .failure(reader)
                .map_or("skipped".to_string(), |f| f.message.clone())
        )),
        Some((Some(state), shown)) => Evaluation::not(format!(
            "{} read [{shown}]: all from {state}",
            tx_name(reader)
        )),
        Some((None, shown)) => Evaluation::occurred(format!(
            "{} read [{shown}]: no single committed state gives these reads",
            tx_name(reader)
        )),
    }
}

/// The verdict of a transaction that reads, deletes by predicate, and reads again: is there one
/// committed state from which all three observations follow?
fn delete_view_verdict(
    trace: &Trace,
    tx: TxId,
    before: (&str, Pred),
    delete: Pred,
    after: (&str, Pred),
    other: TxId,
) -> Evaluation {
    let name = tx_name(tx);
    if !trace.committed(tx) {
        return Evaluation::not(format!(
            "{name} did not commit ({})",
            trace
                .failure(tx)
                .map_or("skipped".to_string(), |f| f.message.clone())
        ));
    }
    let (Some(r1), Some(r2)) = (trace.rows(before.0), trace.rows(after.0)) else {
        return Evaluation::not(format!("{name} committed without completing its reads"));
    };
    // Nobody else deletes: the rows missing from the final table are the ones this DELETE removed.
    let deleted: BTreeSet<i64> = initial_state()
        .keys()
        .copied()
        .filter(|id| !trace.final_state.contains_key(id))
        .collect();
    let explains = |state: &State| {
        let matched: BTreeSet<i64> = delete.select(state).into_iter().map(|(id, _)| id).collect();
        let mut rest = state.clone();
        rest.retain(|id, _| !matched.contains(id));
        before.1.select(state) == *r1 && matched == deleted && after.1.select(&rest) == *r2
    };
    let deleted_text = if deleted.is_empty() {
        "nothing".to_string()
    } else {
        deleted
            .iter()
            .map(|id| format!("row {id}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let observed = format!(
        "{name} read [{}], its DELETE removed {deleted_text}, then it read [{}]",
        show_rows(r1),
        show_rows(r2)
    );
    match candidate_states(trace, other)
        .into_iter()
        .find(|(_, s)| explains(s))
    {
        Some((state, _)) => Evaluation::not(format!("{observed}: all consistent with {state}")),
        None => Evaluation::occurred(format!(
            "{observed}: no single committed state explains this"
        )),
    }
}

fn eval_pmp_write(trace: &Trace) -> Evaluation {
    delete_view_verdict(
        trace,
        T2,
        ("r1", Pred::Value(20)),
        Pred::Value(20),
        ("r2", Pred::Value(20)),
        T1,
    )
}

fn eval_gsingle_write(trace: &Trace) -> Evaluation {
    delete_view_verdict(
        trace,
        T1,
        ("r1", Pred::Id(1)),
        Pred::Value(20),
        ("r2", Pred::Id(2)),
        T2,
    )
}

fn eval_p4(trace: &Trace) -> Evaluation {
    let outcomes = serial_outcomes(trace, &[T1, T2]);
    let fin = trace.final_state.get(&1).copied();
    let show = |v: Option<i64>| v.map_or("nothing".to_string(), |v| v.to_string());
    let detail = format!(
        "T1 read {}, T2 read {}; {}; final row 1 = {}",
        show(trace.value("r1", 1)),
        show(trace.value("r2", 1)),
        committed_list(trace),
        show(fin)
    );
    let expected: BTreeSet<i64> = outcomes
        .iter()
        .filter_map(|(_, s)| s.get(&1).copied())
        .collect();
    let expected_text = expected
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(" or ");
    if fin.is_some_and(|v| expected.contains(&v)) {
        Evaluation::not(format!("{detail}, as a serial order gives"))
    } else {
        Evaluation::occurred(format!(
            "{detail}, but a serial order gives {expected_text}: an update was lost"
        ))
    }
}

fn eval_g2_item(trace: &Trace) -> Evaluation {
    let r1 = trace.value("r1", 2);
    let r2 = trace.value("r2", 1);
    let show = |v: Option<i64>| v.map_or("nothing".to_string(), |v| v.to_string());
    let detail = format!(
        "T1 read row 2 = {}, T2 read row 1 = {}; {}",
        show(r1),
        show(r2),
        committed_list(trace)
    );
    let both = trace.committed(T1) && trace.committed(T2);
    if both && r1.is_some_and(|v| v != 21) && r2.is_some_and(|v| v != 11) {
        Evaluation::occurred(format!(
            "{detail}: each missed the other's write, yet both committed"
        ))
    } else {
        Evaluation::not(detail)
    }
}

fn eval_g2_predicate(trace: &Trace) -> Evaluation {
    let (r1, r2) = (trace.rows("r1"), trace.rows("r2"));
    let show = |r: Option<&crate::script::Rows>| r.map_or("nothing".to_string(), |r| show_rows(r));
    let detail = format!(
        "T1's predicate read returned [{}], T2's [{}]; {}",
        show(r1),
        show(r2),
        committed_list(trace)
    );
    let both = trace.committed(T1) && trace.committed(T2);
    let t1_missed = r1.is_some_and(|r| !r.iter().any(|(id, _)| *id == 4));
    let t2_missed = r2.is_some_and(|r| !r.iter().any(|(id, _)| *id == 3));
    if both && t1_missed && t2_missed {
        Evaluation::occurred(format!(
            "{detail}: each missed the other's insert, yet both committed"
        ))
    } else {
        Evaluation::not(detail)
    }
}

fn eval_g2_fekete(trace: &Trace) -> Evaluation {
    let show = |v: Option<i64>| v.map_or("nothing".to_string(), |v| v.to_string());
    let t1_row2 = trace.value("r1", 2);
    let t3_row1 = trace.value("r3", 1);
    let t3_row2 = trace.value("r3", 2);
    let detail = format!(
        "T1 read row 2 = {}; T3 read row 1 = {}, row 2 = {}; {}",
        show(t1_row2),
        show(t3_row1),
        show(t3_row2),
        committed_list(trace)
    );
    let all = (0..3).all(|t| trace.committed(t));
    if all && t1_row2 == Some(20) && t3_row2 == Some(25) && t3_row1 == Some(10) {
        Evaluation::occurred(format!(
            "{detail}: T1 before T2 before T3 before T1, a cycle"
        ))
    } else {
        Evaluation::not(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{StepRecord, StepResult};

    /// A trace where every step of `variant` succeeded, reads returning `reads` (by label) and
    /// the table ending as `final_state`.
    fn fake(variant: &Variant, reads: &[(&str, Vec<(i64, i64)>)], final_state: State) -> Trace {
        let steps = variant
            .steps
            .iter()
            .enumerate()
            .map(|(index, s)| StepRecord {
                index,
                step: s.clone(),
                sql: None,
                queued: false,
                blocked: None,
                result: match &s.op {
                    Op::Read { .. } => StepResult::Rows {
                        rows: reads
                            .iter()
                            .find(|(l, _)| Some(*l) == s.label)
                            .map(|(_, r)| r.clone())
                            .unwrap_or_default(),
                    },
                    op if op.is_write() => StepResult::Affected { count: 1 },
                    _ => StepResult::Done,
                },
                finished_during: None,
            })
            .collect();
        Trace {
            txs: variant.txs,
            steps,
            final_state,
        }
    }

    fn state(rows: &[(i64, i64)]) -> State {
        rows.iter().copied().collect()
    }

    #[test]
    fn lost_update_is_seen_in_the_final_value() {
        let v = &variants(Anomaly::P4)[0];
        let lost = fake(
            v,
            &[("r1", vec![(1, 10)]), ("r2", vec![(1, 10)])],
            state(&[(1, 12), (2, 20)]),
        );
        assert!((v.evaluate)(&lost).occurred);
        let kept = fake(
            v,
            &[("r1", vec![(1, 10)]), ("r2", vec![(1, 11)])],
            state(&[(1, 13), (2, 20)]),
        );
        assert!(!(v.evaluate)(&kept).occurred);
    }

    #[test]
    fn read_skew_needs_two_states() {
        let v = &variants(Anomaly::GSingle)[0];
        let skew = fake(
            v,
            &[("r1", vec![(1, 10)]), ("r2", vec![(2, 18)])],
            state(&[(1, 12), (2, 18)]),
        );
        assert!((v.evaluate)(&skew).occurred);
        let snapshot = fake(
            v,
            &[("r1", vec![(1, 10)]), ("r2", vec![(2, 20)])],
            state(&[(1, 12), (2, 18)]),
        );
        assert!(!(v.evaluate)(&snapshot).occurred);
    }

    #[test]
    fn otv_as_in_hermitage_mysql_read_uncommitted() {
        let v = &variants(Anomaly::Otv)[0];
        let fin = state(&[(1, 12), (2, 18)]);
        let vanish = fake(
            v,
            &[
                ("r1", vec![(1, 12), (2, 19)]),
                ("r2", vec![(1, 12), (2, 18)]),
                ("r3", vec![(1, 12), (2, 18)]),
            ],
            fin.clone(),
        );
        assert!((v.evaluate)(&vanish).occurred);
        let read_committed = fake(
            v,
            &[
                ("r1", vec![(1, 11), (2, 19)]),
                ("r2", vec![(1, 11), (2, 19)]),
                ("r3", vec![(1, 12), (2, 18)]),
            ],
            fin,
        );
        assert!(!(v.evaluate)(&read_committed).occurred);
    }

    #[test]
    fn write_predicate_pmp_as_in_postgres_read_committed() {
        let v = &variants(Anomaly::Pmp)[1];
        // T2 saw 2=>20, deleted nothing, then saw 1=>20.
        let pg = fake(
            v,
            &[("r1", vec![(2, 20)]), ("r2", vec![(1, 20)])],
            state(&[(1, 20), (2, 30)]),
        );
        assert!((v.evaluate)(&pg).occurred);
        // T2 ran after T1: saw 1=>20, deleted row 1, then saw nothing.
        let serial = fake(
            v,
            &[("r1", vec![(1, 20)]), ("r2", vec![])],
            state(&[(2, 30)]),
        );
        assert!(!(v.evaluate)(&serial).occurred);
    }

    #[test]
    fn dirty_write_shows_in_a_mixed_final_state() {
        let v = &variants(Anomaly::G0)[0];
        assert!((v.evaluate)(&fake(v, &[], state(&[(1, 12), (2, 21)]))).occurred);
        assert!(!(v.evaluate)(&fake(v, &[], state(&[(1, 12), (2, 22)]))).occurred);
    }

    #[test]
    fn every_variant_labels_its_reads_uniquely() {
        for anomaly in Anomaly::ALL {
            for v in variants(anomaly) {
                let labels: Vec<_> = v.steps.iter().filter_map(|s| s.label).collect();
                let unique: BTreeSet<_> = labels.iter().collect();
                assert_eq!(labels.len(), unique.len(), "{anomaly} {}", v.name);
                assert!(v.steps.iter().all(|s| s.tx < v.txs));
            }
        }
    }
}
