//! `get_or_create`: many workers ask for the same few keys at once ("find the tag, create it
//! if missing"). Each key must end up as exactly one row, every caller must get that row's id,
//! and no caller may see an error because of the race.
//!
//! How each strategy does it:
//! - `none`: select, then insert if missing (no unique constraint): duplicates.
//! - `atomic`: [`contend::strategy::get_or_create`] with `ON CONFLICT` / `ON DUPLICATE KEY`
//!   against a unique constraint.
//! - `pessimistic`: create-or-find inside a transaction (insert in a savepoint, catch the unique
//!   violation, read the winner with a locking read).
//! - `serializable`, `advisory`, `mutex`, `redis*`: select-then-insert made safe by the
//!   isolation level or the lock, without any unique constraint (`redis*` fence the key's
//!   resource first, in the same transaction).
//! - `optimistic` does not apply: there is no row to carry a version before it exists.
//!
//! Every caller's id goes to a second table, so the check can see who got what.

use contend::strategy::Strategy;
use contend::strategy::get_or_create::{GetOrCreate as Helper, Method};
use contend::strategy::mutex::KeyedMutex;
use contend::strategy::{Value, advisory, serializable};
use contend::{Backend, BoxFuture, Db, Error, RetryPolicy, Session, Tx, TxOptions};

use super::{
    Ctx, Invariant, OpReport, Outcome, Scenario, Totals, base_support, drop_tables, engine, fenced,
    invariant, outcome_of, scalar, table_name, think,
};

/// Callers per key (see `key_of`).
const CALLERS: u64 = 8;

/// The get-or-create scenario.
#[derive(Debug, Default)]
pub struct GetOrCreate {
    mutex: KeyedMutex,
}

impl GetOrCreate {
    /// The scenario.
    pub fn new() -> Self {
        GetOrCreate::default()
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

fn options() -> TxOptions {
    TxOptions::new().retry(RetryPolicy::new().max_attempts(30))
}

/// Select, then insert when missing: safe only under a lock or SERIALIZABLE.
async fn select_then_insert(tx: &mut Tx, table: &str, key: &str) -> contend::Result<i64> {
    let sql = format!("SELECT id FROM {table} WHERE name = ?");
    let found: Option<i64> = tx
        .query_scalar(&sql)
        .bind(key.to_string())
        .fetch_optional(tx.conn())
        .await?;
    think().await;
    if let Some(id) = found {
        return Ok(id);
    }
    insert(tx, table, key).await
}

async fn insert(tx: &mut Tx, table: &str, key: &str) -> contend::Result<i64> {
    if tx.backend() == Backend::MySql {
        let done = tx
            .query(&format!("INSERT INTO {table} (name, hits) VALUES (?, 0)"))
            .bind(key.to_string())
            .execute(tx.conn())
            .await?;
        Ok(done.last_insert_id().unwrap_or(0))
    } else {
        Ok(tx
            .query_scalar(&format!(
                "INSERT INTO {table} (name, hits) VALUES (?, 0) RETURNING id"
            ))
            .bind(key.to_string())
            .fetch_one(tx.conn())
            .await?)
    }
}

/// The unsafe baseline in autocommit statements.
async fn unlocked(db: &Db, table: &str, key: &str) -> contend::Result<i64> {
    let sql = format!("SELECT id FROM {table} WHERE name = ?");
    let found: Option<i64> = db
        .query_scalar(&sql)
        .bind(key.to_string())
        .fetch_optional(db.pool())
        .await?;
    think().await;
    if let Some(id) = found {
        return Ok(id);
    }
    db.transaction(|tx| {
        let (table, key) = (table.to_string(), key.to_string());
        Box::pin(async move { insert(tx, &table, &key).await })
    })
    .await
}

impl GetOrCreate {
    async fn get(&self, ctx: &Ctx, table: &str, key: &str) -> (contend::Result<i64>, OpReport) {
        let db = &ctx.db;
        let helper = match Helper::new(table, "id", "name") {
            Ok(h) => h,
            Err(e) => return plain(Err(Error::aborted(e))),
        };
        let defaults = [("hits", Value::Int(0))];
        match ctx.strategy {
            Strategy::None => plain(unlocked(db, table, key).await),
            Strategy::Mutex => {
                let _guard = self.mutex.lock(&format!("{table}:{key}")).await;
                plain(unlocked(db, table, key).await)
            }
            Strategy::Atomic => plain(
                helper
                    .get_or_create(db, key, &defaults, Method::OnConflict)
                    .await
                    .map(|f| f.id),
            ),
            Strategy::Pessimistic => {
                let run = db
                    .run(&options(), |tx| {
                        let (helper, key) = (helper.clone(), key.to_string());
                        Box::pin(async move {
                            let defaults = [("hits", Value::Int(0))];
                            let found = helper
                                .get_or_create_in(tx, &key, &defaults, Method::CatchUnique)
                                .await?;
                            Ok(found.id)
                        })
                    })
                    .await;
                split(run)
            }
            Strategy::Serializable | Strategy::Advisory => {
                let opts = if ctx.strategy == Strategy::Serializable {
                    serializable::options()
                } else {
                    options()
                };
                let advisory = ctx.strategy == Strategy::Advisory;
                let run = db
                    .run(&opts, |tx| {
                        let (table, key) = (table.to_string(), key.to_string());
                        Box::pin(async move {
                            if advisory {
                                advisory::lock_xact(tx, &format!("{table}:{key}"), None).await?;
                            }
                            select_then_insert(tx, &table, &key).await
                        })
                    })
                    .await;
                split(run)
            }
            Strategy::Redis | Strategy::RedisSpin | Strategy::Redlock => {
                // The row does not exist yet, but its key's fence row does (the fence table
                // holds one row per resource): a paused holder whose lock expired cannot
                // create a second row after the next holder created the first.
                let (owned_table, owned_key) = (table.to_string(), key.to_string());
                let run = fenced::run(ctx, &[lock_key(table, key)], &options(), move |tx| {
                    let (table, key) = (owned_table.clone(), owned_key.clone());
                    Box::pin(async move { select_then_insert(tx, &table, &key).await })
                })
                .await;
                let stale = u32::from(matches!(run.result, Err(Error::StaleFencingToken { .. })));
                let (result, mut rep) = split(run);
                rep.fenced_rejections = stale;
                (result, rep)
            }
            other => plain(Err(Error::aborted(format!(
                "no implementation of strategy {other}"
            )))),
        }
    }
}

/// The id and the report of an operation that ran in autocommit statements.
fn plain(result: contend::Result<i64>) -> (contend::Result<i64>, OpReport) {
    let mut rep = OpReport::new(outcome_of(&result));
    rep.conflicts = result
        .as_ref()
        .err()
        .and_then(Error::conflict)
        .into_iter()
        .collect();
    (result, rep)
}

/// The id and the report of an operation that ran through `Db::run`.
fn split(run: contend::Attempted<i64>) -> (contend::Result<i64>, OpReport) {
    let rep = OpReport {
        outcome: outcome_of(&run.result),
        attempts: run.attempts,
        conflicts: run.conflicts,
        fenced_rejections: 0,
    };
    (run.result, rep)
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
            let unique = matches!(ctx.strategy, Strategy::Atomic | Strategy::Pessimistic);
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
            db.execute_script(&format!(
                "CREATE TABLE {seen} (name VARCHAR(64) NOT NULL, got BIGINT NOT NULL){engine}"
            ))
            .await?;
            fenced::setup(ctx).await
        })
    }

    fn op_in_session<'a>(
        &'a self,
        ctx: &'a Ctx,
        _session: &'a mut Session,
        _worker: usize,
        seq: u64,
    ) -> BoxFuture<'a, OpReport> {
        Box::pin(async move {
            let (table, seen) = tables(ctx);
            let key = key_of(seq, ctx.operations);
            let (result, mut rep) = self.get(ctx, &table, &key).await;
            if let Ok(id) = result {
                let db = &ctx.db;
                let recorded = db
                    .query(&format!("INSERT INTO {seen} (name, got) VALUES (?, ?)"))
                    .bind(key)
                    .bind(id)
                    .execute(db.pool())
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
