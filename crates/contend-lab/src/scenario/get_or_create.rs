//! `get_or_create`: many workers ask for the same few keys at once ("find the tag, create it
//! if missing"). Each key must end up as exactly one row, every caller must get that row's id,
//! and no caller may see an error because of the race.
//!
//! How each strategy does it:
//! - `none`: select, then insert if missing (no unique constraint): duplicates.
//! - `atomic`: [`contend::strategy::get_or_create`] with `ON CONFLICT` / `ON DUPLICATE KEY`
//!   against a unique constraint.
//! - `pessimistic`: the locking read finds nothing to lock before the row exists, so the insert
//!   runs in a savepoint against a unique constraint, catches the violation and reads the winner
//!   with a locking read.
//! - `serializable`, `advisory`, `mutex`, `redis*`: select-then-insert made safe by the
//!   isolation level or the lock, without any unique constraint (`redis*` fence the key's
//!   resource first, in the same transaction).
//! - `optimistic` does not apply: there is no row to carry a version before it exists.
//!
//! Every caller's id goes to a second table, so the check can see who got what.

use contend::strategy::get_or_create::{GetOrCreate as Helper, Method};
use contend::strategy::{Operation, Strategy, Value};
use contend::{Backend, BoxFuture, Error, Session, Tx};
use sqlx::AnyConnection;

use super::{
    Ctx, Invariant, LabError, OpReport, Outcome, Scenario, Totals, base_support, drop_tables,
    engine, execute, fenced, invariant, scalar, sql_for, table_name, think,
};

/// Callers per key (see `key_of`).
const CALLERS: u64 = 8;

/// The get-or-create scenario.
#[derive(Debug, Default)]
pub struct GetOrCreate;

impl GetOrCreate {
    /// The scenario.
    pub fn new() -> Self {
        GetOrCreate
    }

    fn keys(operations: u64) -> u64 {
        (operations / CALLERS).max(1)
    }
}

fn tables(ctx: &Ctx) -> (String, String) {
    (table_name(ctx, "goc"), table_name(ctx, "goc_seen"))
}

/// The key operation `seq` asks for: consecutive operations ask for the same key, so the
/// callers of one key run at the same time.
fn key_of(seq: u64, operations: u64) -> String {
    key_name((seq / CALLERS) % GetOrCreate::keys(operations))
}

/// The name of key number `k`.
fn key_name(k: u64) -> String {
    format!("key-{k}")
}

/// The lock key (and fence resource) of `key` in `table`, for the lock-based strategies.
fn lock_key(table: &str, key: &str) -> String {
    format!("{table}:{key}")
}

/// Whether `strategy` runs with a unique constraint on the key (see the module docs).
fn has_unique(strategy: Strategy) -> bool {
    matches!(strategy, Strategy::Atomic | Strategy::Pessimistic)
}

/// Find the row of `key`, create it when missing; its id.
///
/// The read selects the key's row (with the lock clause; a row that does not exist yet locks
/// nothing). The write returns the id found, or inserts in a savepoint that catches a unique
/// violation and then reads the winner: only `pessimistic` runs with the unique constraint
/// (see [`has_unique`]); everywhere else the insert is plain, safe only under a lock or
/// SERIALIZABLE. A lock-service grant fences the key's resource first: the row does not
/// exist yet, but its key's fence row does, so a paused holder whose lock expired cannot create
/// a second row after the next holder created the first. `atomic` is the helper's `ON
/// CONFLICT` / `ON DUPLICATE KEY` against the unique constraint.
struct Get {
    helper: Helper,
    table: String,
    key: String,
    backend: Backend,
}

/// The columns a created row gets besides its key.
fn defaults() -> [(&'static str, Value); 1] {
    [("hits", Value::Int(0))]
}

impl Operation for Get {
    /// The id found, if any.
    type State = Option<i64>;
    type Output = i64;
    type Error = LabError;

    fn keys(&self) -> Vec<String> {
        vec![lock_key(&self.table, &self.key)]
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, Result<Option<i64>, LabError>> {
        Box::pin(async move {
            let sql = format!("SELECT id FROM {} WHERE name = ?{lock}", self.table);
            let found = sqlx::query_scalar(sql_for(self.backend, &sql))
                .bind(self.key.clone())
                .fetch_optional(conn)
                .await?;
            think().await;
            Ok(found)
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        found: &'c Option<i64>,
        _checked: bool,
    ) -> BoxFuture<'c, Result<i64, LabError>> {
        Box::pin(async move {
            if let Some(id) = *found {
                return Ok(id);
            }
            // Without the unique constraint no violation can happen, and this is a plain
            // insert (in a savepoint).
            let found = self
                .helper
                .get_or_create_in(tx, &self.key, &defaults(), Method::CatchUnique)
                .await?;
            Ok(found.id)
        })
    }

    fn atomic<'c>(&'c self, tx: &'c mut Tx) -> Option<BoxFuture<'c, Result<i64, LabError>>> {
        Some(Box::pin(async move {
            let found = self
                .helper
                .get_or_create_in(tx, &self.key, &defaults(), Method::OnConflict)
                .await?;
            Ok(found.id)
        }))
    }
}

impl Scenario for GetOrCreate {
    fn name(&self) -> &'static str {
        "get_or_create"
    }

    fn supports(&self, strategy: Strategy, backend: Backend) -> Result<(), String> {
        if strategy == Strategy::Optimistic {
            return Err("a row that does not exist yet has no version to check".into());
        }
        base_support(strategy, backend)
    }

    fn setup<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let (table, seen) = tables(ctx);
            let db = &ctx.db;
            let backend = db.backend();
            drop_tables(db, &[table.clone(), seen.clone()]).await?;
            let id = match backend {
                Backend::Postgres => "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                Backend::MySql => "id BIGINT AUTO_INCREMENT PRIMARY KEY",
                _ => "id INTEGER PRIMARY KEY",
            };
            // The helper needs the unique constraint; every other strategy runs without it, so
            // that a duplicate stays visible to the check.
            let unique = has_unique(ctx.strategy);
            let engine = engine(backend);
            // The constraint is part of CREATE TABLE: a pooled SQLite connection that learnt the
            // table's schema then knows the constraint too (a separate CREATE UNIQUE INDEX can
            // reach it later than the table, and its upsert then fails to find the constraint).
            let unique_clause = if unique { " UNIQUE" } else { "" };
            db.execute_script(&format!(
                "CREATE TABLE {table} ({id}, name VARCHAR(64) NOT NULL{unique_clause}, \
                 hits BIGINT NOT NULL){engine}"
            ))
            .await?;
            if !unique {
                db.execute_script(&format!("CREATE INDEX {table}_name ON {table} (name)"))
                    .await?;
            }
            // A primary key of its own: on a Galera cluster a table without one is certified
            // as a whole, and concurrent callers' records on different nodes would conflict.
            db.execute_script(&format!(
                "CREATE TABLE {seen} ({id}, name VARCHAR(64) NOT NULL, got BIGINT NOT NULL){engine}"
            ))
            .await?;
            fenced::setup(ctx).await
        })
    }

    fn op_in_session<'a>(
        &'a self,
        ctx: &'a Ctx,
        session: &'a mut Session,
        _worker: usize,
        seq: u64,
    ) -> BoxFuture<'a, OpReport> {
        Box::pin(async move {
            let (table, seen) = tables(ctx);
            let key = key_of(seq, ctx.operations);
            let helper = match Helper::new(&table, "id", "name") {
                Ok(helper) => helper,
                Err(e) => return OpReport::new(Outcome::Error(Error::aborted(e).to_string())),
            };
            let op = Get {
                helper,
                table: table.clone(),
                key: key.clone(),
                backend: ctx.db.backend(),
            };
            let (result, mut rep) = execute(ctx, session, op).await;
            if let Ok(id) = result {
                // On the session's connection (a second one from the pool could wait for a
                // connection other sessions hold), as a write: on SQLite in the writer queue,
                // like the operations' own writes. A plain autocommit would write beside the
                // queue and meet its writer in SQLite's busy handler, which sleeps 1, 2, 5,
                // 10 ms ... and holds up every queued writer meanwhile.
                let insert = ctx
                    .db
                    .query(&format!("INSERT INTO {seen} (name, got) VALUES (?, ?)"))
                    .bind(key)
                    .bind(id);
                let recorded = session
                    .write_autocommit(|conn| {
                        Box::pin(
                            async move { Ok::<_, Error>(insert.execute(conn).await.map(drop)?) },
                        )
                    })
                    .await;
                if let Err(e) = recorded {
                    rep.outcome = Outcome::Error(format!("could not record the id: {e}"));
                }
            }
            rep
        })
    }

    fn check<'a>(
        &'a self,
        ctx: &'a Ctx,
        totals: &'a Totals,
    ) -> BoxFuture<'a, anyhow::Result<Vec<Invariant>>> {
        Box::pin(async move {
            let (table, seen) = tables(ctx);
            let db = &ctx.db;
            let asked = scalar(db, &format!("SELECT COUNT(DISTINCT name) FROM {seen}")).await?;
            let rows = scalar(db, &format!("SELECT COUNT(*) FROM {table}")).await?;
            let distinct = scalar(db, &format!("SELECT COUNT(DISTINCT name) FROM {table}")).await?;
            let duplicates = rows - distinct;
            let missing = asked - scalar(
                db,
                &format!(
                    "SELECT COUNT(DISTINCT s.name) FROM {seen} s JOIN {table} t ON t.name = s.name"
                ),
            )
            .await?;
            // A caller got the wrong row when its id is not the lowest id of its key (with
            // exactly one row per key, the only one).
            let wrong = scalar(
                db,
                &format!(
                    "SELECT COUNT(*) FROM {seen} s WHERE s.got <> \
                     (SELECT MIN(t.id) FROM {table} t WHERE t.name = s.name)"
                ),
            )
            .await?;
            Ok(vec![
                invariant(
                    "one_row_per_key",
                    (duplicates + missing) as u64,
                    format!(
                        "{rows} rows for {distinct} keys ({duplicates} duplicates, {missing} missing)"
                    ),
                ),
                invariant(
                    "every_caller_gets_the_row",
                    wrong as u64,
                    format!("{wrong} callers got another row than the key's first"),
                ),
                invariant(
                    "no_errors",
                    totals.errors,
                    format!("{} callers failed", totals.errors),
                ),
            ])
        })
    }

    fn teardown<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let (table, seen) = tables(ctx);
            let keys: Vec<String> = (0..GetOrCreate::keys(ctx.operations))
                .map(|k| lock_key(&table, &key_name(k)))
                .collect();
            fenced::teardown(ctx, &keys).await?;
            drop_tables(&ctx.db, &[table, seen]).await
        })
    }
}
