//! The vocabulary of a test: predicates, operations and steps on the two-row table, the SQL each
//! one becomes, and a model of the table that says what a serial execution would have shown.
//!
//! Every test starts from the same table, `(id int primary key, value int)` holding `(1, 10)` and
//! `(2, 20)` ([`initial_state`]). Operations are data rather than SQL strings so that the verdicts
//! can replay them on the model: "which rows would this `DELETE` have removed from this state?".

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// A transaction of a test: 0 is shown as `T1`, 1 as `T2`, 2 as `T3`.
pub type TxId = usize;

/// The rows a read returned, `(id, value)` ordered by id.
pub type Rows = Vec<(i64, i64)>;

/// The table's content: id to value.
pub type State = BTreeMap<i64, i64>;

/// The table every test starts from: `(1, 10), (2, 20)`.
pub fn initial_state() -> State {
    State::from([(1, 10), (2, 20)])
}

/// The display name of a transaction: `T1`, `T2`, ...
pub fn tx_name(tx: TxId) -> String {
    format!("T{}", tx + 1)
}

/// Which rows a statement reads or writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pred {
    /// Every row.
    All,
    /// `id = n`.
    Id(i64),
    /// `id IN (..)`.
    IdIn(Vec<i64>),
    /// `value = n`.
    Value(i64),
    /// `value % n = 0`.
    ValueMod(i64),
}

impl Pred {
    /// The `WHERE` clause, with a leading space, or nothing for [`Pred::All`].
    pub fn where_sql(&self) -> String {
        match self {
            Pred::All => String::new(),
            Pred::Id(n) => format!(" WHERE id = {n}"),
            Pred::IdIn(ids) => {
                let list: Vec<String> = ids.iter().map(i64::to_string).collect();
                format!(" WHERE id IN ({})", list.join(", "))
            }
            Pred::Value(n) => format!(" WHERE value = {n}"),
            Pred::ValueMod(n) => format!(" WHERE value % {n} = 0"),
        }
    }

    /// Whether a row satisfies the predicate.
    pub fn matches(&self, id: i64, value: i64) -> bool {
        match self {
            Pred::All => true,
            Pred::Id(n) => id == *n,
            Pred::IdIn(ids) => ids.contains(&id),
            Pred::Value(n) => value == *n,
            Pred::ValueMod(n) => *n != 0 && value % n == 0,
        }
    }

    /// The rows of `state` that satisfy the predicate, ordered by id.
    pub fn select(&self, state: &State) -> Rows {
        state
            .iter()
            .filter(|(id, value)| self.matches(**id, **value))
            .map(|(id, value)| (*id, *value))
            .collect()
    }
}

/// The new value an `UPDATE` assigns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Assign {
    /// `SET value = n`.
    Const(i64),
    /// `SET value = value + n`, computed by the database.
    AddInSql(i64),
    /// Read-modify-write in the application: `SET value = <what this transaction last read for
    /// the row> + n`. Only with [`Pred::Id`]. This is how a lost update (P4) happens in real code.
    Increment(i64),
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Op {
    /// Start the transaction at the level under test.
    Begin {
        /// Declared read-only (`READ ONLY`; on SQLite a deferred, `query_only` transaction).
        read_only: bool,
    },
    /// `SELECT id, value ... ORDER BY id`.
    Read {
        /// Which rows.
        pred: Pred,
    },
    /// `UPDATE ... SET value = ...`.
    Update {
        /// Which rows.
        pred: Pred,
        /// The new value.
        set: Assign,
    },
    /// `INSERT INTO ... VALUES (id, value)`.
    Insert {
        /// The new row's id.
        id: i64,
        /// The new row's value.
        value: i64,
    },
    /// `DELETE ...`.
    Delete {
        /// Which rows.
        pred: Pred,
    },
    /// `COMMIT`.
    Commit,
    /// `ROLLBACK`.
    Rollback,
}

impl Op {
    /// Whether the operation changes the table.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Op::Update { .. } | Op::Insert { .. } | Op::Delete { .. }
        )
    }

    /// The SQL of this operation on `table`, except `BEGIN` (which depends on the backend and
    /// the level; see the driver) and [`Assign::Increment`], whose value needs `last_read`.
    ///
    /// `last_read` is what this transaction last read for a row id.
    ///
    /// # Errors
    /// A message when an increment has no earlier read of its row to start from, or is not on a
    /// single row.
    pub fn sql(&self, table: &str, last_read: &BTreeMap<i64, i64>) -> Result<String, String> {
        Ok(match self {
            Op::Begin { .. } => "BEGIN".to_string(),
            Op::Read { pred } => {
                format!(
                    "SELECT id, value FROM {table}{} ORDER BY id",
                    pred.where_sql()
                )
            }
            Op::Update { pred, set } => {
                let value = match set {
                    Assign::Const(n) => n.to_string(),
                    Assign::AddInSql(n) => format!("value + {n}"),
                    Assign::Increment(n) => {
                        let Pred::Id(id) = pred else {
                            return Err("an application-side increment needs `id = n`".into());
                        };
                        let Some(read) = last_read.get(id) else {
                            return Err(format!(
                                "an application-side increment of row {id} needs an earlier read of it"
                            ));
                        };
                        (read + n).to_string()
                    }
                };
                format!("UPDATE {table} SET value = {value}{}", pred.where_sql())
            }
            Op::Insert { id, value } => {
                format!("INSERT INTO {table} (id, value) VALUES ({id}, {value})")
            }
            Op::Delete { pred } => format!("DELETE FROM {table}{}", pred.where_sql()),
            Op::Commit => "COMMIT".to_string(),
            Op::Rollback => "ROLLBACK".to_string(),
        })
    }

    /// Applies a write to `state` as if it ran alone (an [`Assign::Increment`] adds to the
    /// current value, which is what the application meant). Returns the ids it touched. Reads,
    /// `BEGIN`, `COMMIT` and `ROLLBACK` change nothing.
    pub fn apply(&self, state: &mut State) -> Vec<i64> {
        match self {
            Op::Update { pred, set } => {
                let ids: Vec<i64> = pred.select(state).into_iter().map(|(id, _)| id).collect();
                for id in &ids {
                    let value = state.get_mut(id).expect("selected from the state");
                    *value = match set {
                        Assign::Const(n) => *n,
                        Assign::AddInSql(n) | Assign::Increment(n) => *value + n,
                    };
                }
                ids
            }
            Op::Insert { id, value } => {
                state.insert(*id, *value);
                vec![*id]
            }
            Op::Delete { pred } => {
                let ids: Vec<i64> = pred.select(state).into_iter().map(|(id, _)| id).collect();
                for id in &ids {
                    state.remove(id);
                }
                ids
            }
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Begin { read_only: true } => f.write_str("BEGIN (read-only)"),
            Op::Begin { read_only: false } => f.write_str("BEGIN"),
            Op::Update {
                pred,
                set: Assign::Increment(n),
            } => write!(f, "UPDATE SET value = <read> + {n}{}", pred.where_sql()),
            other => f.write_str(&other.sql("test", &BTreeMap::new()).unwrap_or_default()),
        }
    }
}

/// One step of an interleaving: which transaction runs which operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// The transaction (0 = T1).
    pub tx: TxId,
    /// What it runs.
    pub op: Op,
    /// A name the verdict uses to find this step's observation (`"r1"`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<&'static str>,
}

/// The final state of running `txs` (each a list of operations) one after another in `order`.
pub fn serial_state(initial: &State, txs: &[Vec<Op>], order: &[TxId]) -> State {
    let mut state = initial.clone();
    for tx in order {
        for op in &txs[*tx] {
            op.apply(&mut state);
        }
    }
    state
}

/// Every ordering of `items` (for at most three transactions: six).
pub fn permutations(items: &[TxId]) -> Vec<Vec<TxId>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for (i, first) in items.iter().enumerate() {
        let mut rest = items.to_vec();
        rest.remove(i);
        for mut tail in permutations(&rest) {
            tail.insert(0, *first);
            out.push(tail);
        }
    }
    out
}

/// Formats rows as `1=>10, 2=>20`, or `(none)`.
pub fn show_rows(rows: &[(i64, i64)]) -> String {
    if rows.is_empty() {
        return "(none)".into();
    }
    rows.iter()
        .map(|(id, value)| format!("{id}=>{value}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Formats a state like [`show_rows`].
pub fn show_state(state: &State) -> String {
    show_rows(&state.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicates_select_rows() {
        let s = initial_state();
        assert_eq!(Pred::ValueMod(5).select(&s), vec![(1, 10), (2, 20)]);
        assert_eq!(Pred::ValueMod(3).select(&s), vec![]);
        assert_eq!(Pred::Value(20).select(&s), vec![(2, 20)]);
        assert_eq!(Pred::IdIn(vec![2]).select(&s), vec![(2, 20)]);
    }

    #[test]
    fn sql_of_operations() {
        let mut last = BTreeMap::new();
        let inc = Op::Update {
            pred: Pred::Id(1),
            set: Assign::Increment(2),
        };
        assert!(inc.sql("t", &last).is_err());
        last.insert(1, 10);
        assert_eq!(
            inc.sql("t", &last).unwrap(),
            "UPDATE t SET value = 12 WHERE id = 1"
        );
        let del = Op::Delete {
            pred: Pred::ValueMod(3),
        };
        assert_eq!(
            del.sql("t", &last).unwrap(),
            "DELETE FROM t WHERE value % 3 = 0"
        );
    }

    #[test]
    fn serial_replay_of_increments_loses_nothing() {
        let t1 = vec![Op::Update {
            pred: Pred::Id(1),
            set: Assign::Increment(1),
        }];
        let t2 = vec![Op::Update {
            pred: Pred::Id(1),
            set: Assign::Increment(2),
        }];
        let txs = vec![t1, t2];
        for order in permutations(&[0, 1]) {
            assert_eq!(serial_state(&initial_state(), &txs, &order)[&1], 13);
        }
        assert_eq!(permutations(&[0, 1, 2]).len(), 6);
    }
}
