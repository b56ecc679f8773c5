//! README's strategy table and the one in the rustdoc of `contend::strategy` say, per strategy
//! and database, what `Executor::check` allows: a cell starts with "no" exactly when the check
//! refuses. Every strategy appears in exactly one row of each table. The lock-service strategies
//! are checked with a lock service configured (without one the executor refuses them anywhere).
//!
//! The column "PostgreSQL via pgbouncer" is a PostgreSQL `Db` behind a transaction pooler: the
//! executor's statements there are all transaction-scoped (`tests/clusters.rs` runs every
//! strategy through pgbouncer), so it allows what it allows on PostgreSQL.

use std::str::FromStr;
use std::sync::Arc;

use contend::lock::{HeldLock, LockService};
use contend::nodes::Cluster;
use contend::strategy::{Executor, Strategy};
use contend::{Backend, BoxFuture};

/// A lock service that is configured but never asked (the check does not acquire).
struct Unused;

impl LockService for Unused {
    fn acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        Box::pin(async move { Err(contend::Error::aborted(format!("not a real lock: {key}"))) })
    }
}

/// The columns of the tables, in order, with the backend each one is checked on and whether it
/// is a Galera cluster (whose refusals `Executor::check_db` adds: `Cluster::unsafe_strategy`).
const COLUMNS: [(&str, Backend, bool); 5] = [
    ("SQLite", Backend::Sqlite, false),
    ("PostgreSQL", Backend::Postgres, false),
    ("MySQL/MariaDB", Backend::MySql, false),
    ("PostgreSQL via pgbouncer", Backend::Postgres, false),
    ("Galera (several nodes)", Backend::MySql, true),
];

fn executor() -> Executor {
    let mut executor = Executor::new();
    for strategy in Strategy::ALL {
        if strategy.needs_lock_service() {
            executor = executor.lock_service(strategy, Arc::new(Unused));
        }
    }
    executor
}

fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

/// Checks the table in `text` whose header ends with the four columns; returns the mismatches.
fn check_table(source: &str, text: &str) -> Vec<String> {
    let executor = executor();
    let header_end = COLUMNS.map(|(name, _, _)| name).join(" | ");
    let lines: Vec<&str> = text.lines().collect();
    let Some(header) = lines
        .iter()
        .position(|l| l.starts_with('|') && l.trim_end().ends_with(&format!("{header_end} |")))
    else {
        return vec![format!("{source}: no table with the columns {header_end}")];
    };
    let mut problems = Vec::new();
    let mut seen = Vec::new();
    for line in lines[header + 2..]
        .iter()
        .take_while(|l| l.starts_with('|'))
    {
        let cells = cells(line);
        let names: Vec<&str> = cells[0].split('`').skip(1).step_by(2).collect();
        let supports = &cells[cells.len() - COLUMNS.len()..];
        for name in names {
            let strategy = match Strategy::from_str(name) {
                Ok(s) => s,
                Err(e) => {
                    problems.push(format!("{source}: {e}"));
                    continue;
                }
            };
            seen.push(strategy);
            for ((column, backend, on_galera), cell) in COLUMNS.iter().zip(supports) {
                let galera = Cluster::Galera { nodes: 3, size: 3 };
                let allowed = executor.check(strategy, *backend).is_ok()
                    && !(*on_galera && galera.unsafe_strategy(strategy).is_some());
                let says = !cell.starts_with("no");
                if allowed != says {
                    problems.push(format!(
                        "{source}: `{strategy}` on {column} says \"{cell}\", but Executor::check {}",
                        if allowed { "allows it" } else { "refuses it" }
                    ));
                }
            }
        }
    }
    for strategy in Strategy::ALL {
        match seen.iter().filter(|s| **s == strategy).count() {
            1 => {}
            n => problems.push(format!("{source}: `{strategy}` is in {n} rows, not 1")),
        }
    }
    problems
}

#[test]
fn readme_and_rustdoc_tables_say_what_the_executor_allows() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README.md");
    let module =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/strategy/mod.rs"))
            .expect("src/strategy/mod.rs");
    let rustdoc: String = module
        .lines()
        .filter_map(|l| l.strip_prefix("//! ").or_else(|| l.strip_prefix("//!")))
        .collect::<Vec<_>>()
        .join("\n");
    let mut problems = check_table("README.md", &readme);
    problems.extend(check_table(
        "contend::strategy (src/strategy/mod.rs)",
        &rustdoc,
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The check itself can fail: a table that claims `advisory` on SQLite is caught, and so is a
/// table that leaves a strategy out.
#[test]
fn a_wrong_table_is_caught() {
    let header = "| strategy | notes | SQLite | PostgreSQL | MySQL/MariaDB | PostgreSQL via pgbouncer | Galera (several nodes) |\n|---|---|---|---|---|---|---|\n";
    let rows: Vec<String> = Strategy::ALL
        .iter()
        .map(|s| format!("| `{s}` | x | yes | yes | yes | yes | yes |"))
        .collect();
    let wrong = format!("{header}{}\n", rows.join("\n"));
    let problems = check_table("wrong", &wrong);
    assert!(
        problems.iter().any(|p| p.contains("`advisory` on SQLite")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("`mutex` on Galera (several nodes)")),
        "{problems:?}"
    );
    let missing = format!("{header}{}\n", rows[1..].join("\n"));
    let problems = check_table("missing", &missing);
    assert!(
        problems.iter().any(|p| p.contains("`none` is in 0 rows")),
        "{problems:?}"
    );
}
