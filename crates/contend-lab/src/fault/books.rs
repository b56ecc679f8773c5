//! The fault suite's workload on a database: the lab's `transfer` operation (its `Plan` run
//! by the lab's executor under the run's strategy), with the operation's unique id written into
//! the ledger in the same transaction as the balance changes. After the run the ledger tells,
//! per operation id, how many times it was applied, and the books must still balance.

use std::collections::HashMap;

use contend::backend::RowLock;
use contend::{Backend, Db};

use crate::scenario::transfer::{BooksReading, Move, Plan, read_books};
use crate::scenario::{Invariant, engine, invariant, pairs, sum_bigint};

/// Accounts the transfers move money between (few: the operations race on them).
pub const ACCOUNTS: i64 = 8;
/// Each account's opening balance (large enough that transfers are never refused).
pub const OPENING: i64 = 1_000_000;

/// One run's tables: accounts and the ledger with operation ids.
#[derive(Debug, Clone)]
pub struct Books {
    /// The accounts table.
    pub accounts: String,
    /// The ledger table: (op, account, delta); op 0 holds the opening balances.
    pub ledger: String,
}

impl Books {
    /// The tables of the run tagged `tag` (letters, digits and `_`).
    pub fn new(tag: &str) -> Self {
        let tag: String = tag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        Books {
            accounts: format!("fault_acc_{tag}"),
            ledger: format!("fault_ledger_{tag}"),
        }
    }

    /// (Re)creates the tables with the opening balances.
    ///
    /// # Cancel safety
    /// Not cancel-safe: a dropped call may leave the tables half made (call it again).
    pub async fn setup(&self, db: &Db) -> anyhow::Result<()> {
        let engine = engine(db.backend());
        self.drop(db).await?;
        let (acc, ledger) = (&self.accounts, &self.ledger);
        db.execute_script(&format!(
            "CREATE TABLE {acc} (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL, \
             version BIGINT NOT NULL){engine}"
        ))
        .await?;
        db.execute_script(&format!(
            "CREATE TABLE {ledger} (op BIGINT NOT NULL, account BIGINT NOT NULL, \
             delta BIGINT NOT NULL){engine}"
        ))
        .await?;
        db.execute_script(&format!("CREATE INDEX {ledger}_op ON {ledger} (op)"))
            .await?;
        for id in 1..=ACCOUNTS {
            db.query(&format!("INSERT INTO {acc} VALUES (?, ?, 0)"))
                .bind(id)
                .bind(OPENING)
                .execute(db.pool())
                .await?;
            db.query(&format!("INSERT INTO {ledger} VALUES (0, ?, ?)"))
                .bind(id)
                .bind(OPENING)
                .execute(db.pool())
                .await?;
        }
        Ok(())
    }

    /// Drops the tables.
    ///
    /// # Cancel safety
    /// Not cancel-safe: a dropped call may drop one table only.
    pub async fn drop(&self, db: &Db) -> anyhow::Result<()> {
        for t in [&self.accounts, &self.ledger] {
            db.execute_script(&format!("DROP TABLE IF EXISTS {t}"))
                .await?;
        }
        Ok(())
    }

    /// Operation `op`'s transfer: from, to (different) and amount 1..=5, both directions over
    /// time, the ledger rows carrying `op`.
    pub(crate) fn plan(&self, op: u64) -> Plan {
        let (from, to) = accounts_of(op);
        let amount = (op % 5) as i64 + 1;
        let moves = vec![
            Move {
                table: self.accounts.clone(),
                column: "balance",
                id: from,
                delta: -amount,
                why: "insufficient funds",
            },
            Move {
                table: self.accounts.clone(),
                column: "balance",
                id: to,
                delta: amount,
                why: "",
            },
        ];
        let record = format!(
            "INSERT INTO {} (op, account, delta) VALUES (?, ?, ?), (?, ?, ?)",
            self.ledger
        );
        let op = op as i64;
        Plan::new(moves, record, vec![op, from, -amount, op, to, amount])
    }

    /// Whether operation `op` is in the ledger: what a client asks after an answer was lost,
    /// before it tries again.
    ///
    /// The answer must be final, or the retry that follows a "no" applies the operation twice:
    /// a connection the server killed (MariaDB's `KILL CONNECTION` closes the socket at once) or
    /// one whose bytes a proxy still holds may belong to a transaction that is still
    /// committing. Every strategy's transaction writes the operation's two account rows, so it
    /// holds their row locks until it has committed or rolled back; this lookup first takes
    /// those locks (`FOR UPDATE`, waiting for such a transaction to end) and only then reads the
    /// ledger with a fresh read.
    ///
    /// On a Galera cluster row locks are node-local: the lost transaction may be committing on
    /// another node, its write set not yet ordered. There the lookup also writes the two rows
    /// (`version + 1`), so that its own commit is certified against that transaction: either
    /// the lookup's snapshot holds it (found), or whichever of the two is ordered second is
    /// aborted (the lookup, by certification or a brute-force abort, and it is tried again;
    /// or the lost transaction, which then never applies). A lookup that commits and says
    /// "absent" is final.
    ///
    /// # Cancel safety
    /// Cancel-safe: a dropped call rolls its transaction back (on Galera nothing of its
    /// certifying write commits).
    pub async fn applied(&self, db: &Db, op: u64) -> contend::Result<bool> {
        let (from, to) = accounts_of(op);
        let lock = format!(
            "SELECT id FROM {} WHERE id IN (?, ?) ORDER BY id {}",
            self.accounts,
            db.backend().dialect().row_lock_clause(RowLock::Update)?
        );
        let count = format!("SELECT COUNT(*) FROM {} WHERE op = ?", self.ledger);
        let certify = db.cluster().is_galera().then(|| {
            format!(
                "UPDATE {} SET version = version + 1 WHERE id IN (?, ?)",
                self.accounts
            )
        });
        let (lookup_db, op) = (db.clone(), op as i64);
        let n = db
            .transaction(|tx| {
                Box::pin(async move {
                    lookup_db
                        .query(&lock)
                        .bind(from)
                        .bind(to)
                        .fetch_all(tx.conn())
                        .await?;
                    if let Some(certify) = &certify {
                        lookup_db
                            .query(certify)
                            .bind(from)
                            .bind(to)
                            .execute(tx.conn())
                            .await?;
                    }
                    let n = lookup_db
                        .query_scalar::<i64>(&count)
                        .bind(op)
                        .fetch_one(tx.conn())
                        .await?;
                    Ok::<_, contend::Error>(n)
                })
            })
            .await?;
        Ok(n > 0)
    }

    /// Operation id -> times applied (each application writes two ledger rows).
    ///
    /// # Cancel safety
    /// Cancel-safe (one read).
    pub async fn applications(&self, db: &Db) -> contend::Result<HashMap<u64, u64>> {
        let b = db.backend();
        let rows = pairs(
            db,
            &format!(
                "SELECT op, {} FROM {} WHERE op <> 0 GROUP BY op",
                count_bigint(b),
                self.ledger
            ),
        )
        .await?;
        Ok(rows
            .into_iter()
            .map(|(op, rows)| (op as u64, (rows as u64).div_ceil(2)))
            .collect())
    }

    /// Account id -> balance.
    ///
    /// # Cancel safety
    /// Cancel-safe (one read).
    pub async fn balances(&self, db: &Db) -> contend::Result<Vec<(i64, i64)>> {
        pairs(
            db,
            &format!("SELECT id, balance FROM {} ORDER BY id", self.accounts),
        )
        .await
    }

    /// The books' invariants: money conserved, no negative balance, every account's balance
    /// equal to the sum of its ledger rows (a lost update breaks this one).
    ///
    /// # Cancel safety
    /// Cancel-safe (reads only).
    pub async fn invariants(&self, db: &Db) -> anyhow::Result<Vec<Invariant>> {
        let expected = ACCOUNTS * OPENING;
        let BooksReading {
            total,
            negative,
            mismatched,
        } = read_books(db, &self.accounts, &self.ledger).await?;
        Ok(vec![
            invariant(
                "total_conserved",
                u64::from(total != expected),
                format!("total {total}, expected {expected}"),
            ),
            invariant(
                "no_negative_balance",
                negative as u64,
                format!("{negative} accounts below zero"),
            ),
            invariant(
                "ledger_matches_balances",
                mismatched.len() as u64,
                match mismatched.first() {
                    None => format!("{ACCOUNTS} accounts match their ledger"),
                    Some(first) => format!(
                        "{} of {ACCOUNTS} accounts differ from their ledger (lost updates), e.g. {first}",
                        mismatched.len()
                    ),
                },
            ),
        ])
    }
}

/// The two accounts operation `op` moves money between (from, to; 1-based, different).
pub fn accounts_of(op: u64) -> (i64, i64) {
    let k = ACCOUNTS as u64;
    let from = op % k;
    let to = (from + 1 + (op / k) % (k - 1)) % k;
    (from as i64 + 1, to as i64 + 1)
}

/// `COUNT(*)` as a `BIGINT` on every backend.
fn count_bigint(backend: Backend) -> String {
    sum_bigint(backend, "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_moves_money_between_two_different_accounts() {
        let mut pairs = std::collections::HashSet::new();
        for op in 0..1000 {
            let (from, to) = accounts_of(op);
            assert_ne!(from, to);
            assert!((1..=ACCOUNTS).contains(&from) && (1..=ACCOUNTS).contains(&to));
            pairs.insert((from, to));
        }
        // Both directions of every pair occur: the locks are taken in canonical order.
        assert_eq!(pairs.len() as i64, ACCOUNTS * (ACCOUNTS - 1));
    }

    #[test]
    fn table_names_are_plain_identifiers() {
        let b = Books::new("db-restart/Postgres redis-spin");
        assert_eq!(b.accounts, "fault_acc_db_restart_postgres_redis_spin");
        assert_eq!(b.ledger, "fault_ledger_db_restart_postgres_redis_spin");
    }
}
