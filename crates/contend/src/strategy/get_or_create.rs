//! `get_or_create`: prevents the duplicate row of "look it up, create it if missing", and the
//! error its usual fix raises. Two callers that both find nothing both insert; with a unique
//! constraint on the key one of them fails (Django's `get_or_create` famously raises
//! `IntegrityError` here), without one there are two rows.
//!
//! [`GetOrCreate`] relies on a unique constraint on the key column and never raises on the race:
//! - [`Method::OnConflict`] inserts first with `ON CONFLICT (key) DO NOTHING` (PostgreSQL,
//!   SQLite) or `ON DUPLICATE KEY UPDATE id = id` (MariaDB), then reads the row if it was not
//!   the one inserting it.
//! - [`Method::CatchUnique`] ("create or find") inserts plainly, and on a unique violation reads
//!   the row that won. Inside a transaction the insert runs in a savepoint so that PostgreSQL's
//!   aborted-statement rule does not poison the caller's transaction.
//!
//! Either way exactly one row exists per key and every caller gets its id. The read after a lost
//! race is a locking read on MariaDB (a plain read could use an older snapshot). If the winner's
//! row is still invisible (PostgreSQL REPEATABLE READ), the call fails with a retryable
//! [`ConflictKind::Serialization`] conflict.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use contend::{Db, strategy::{Value, get_or_create::{GetOrCreate, Method}}};
//! let db = Db::connect("sqlite::memory:").await?;
//! db.execute_script("CREATE TABLE tag (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
//!                    uses BIGINT NOT NULL)").await?;
//! let tags = GetOrCreate::new("tag", "id", "name")?;
//! let first = tags.get_or_create(&db, "rust", &[("uses", Value::Int(0))], Method::OnConflict).await?;
//! let again = tags.get_or_create(&db, "rust", &[("uses", Value::Int(0))], Method::CatchUnique).await?;
//! assert!(first.created && !again.created);
//! assert_eq!(first.id, again.id);
//! # Ok(()) }
//! ```

use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Encode, Type};

use super::{BlockDatabase, Ident, InvalidIdent, Value};
use crate::backend::Backend;
use crate::db::Db;
use crate::error::{ConflictKind, Error, Result};
use crate::tx::Tx;

/// How [`GetOrCreate`] handles the race.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `INSERT ... ON CONFLICT DO NOTHING` / `ON DUPLICATE KEY UPDATE`, then read if needed.
    OnConflict,
    /// Plain `INSERT`; on a unique violation, read the existing row.
    CatchUnique,
}

/// The row [`GetOrCreate`] found or created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Its id.
    pub id: i64,
    /// Whether this call inserted it.
    pub created: bool,
}

/// A table with a generated `BIGINT` id column and a unique key column (of any type sqlx
/// binds for the database: text, a `uuid::Uuid` on PostgreSQL, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetOrCreate {
    table: Ident,
    id_column: Ident,
    key_column: Ident,
}

/// The message of [`lost_insert`].
const LOST_INSERT: &str = "the key exists (unique violation)";

/// Inside the savepoint of [`GetOrCreate::get_or_create_in`]: the insert met the key's row.
fn lost_insert() -> Error {
    Error::aborted(LOST_INSERT)
}

fn lost_row() -> Error {
    tracing::debug!("unique conflict but the existing row is not visible");
    Error::Conflict {
        kind: ConflictKind::Serialization,
        source: None,
    }
}

impl GetOrCreate {
    /// Rows of `table` with the generated id `id_column` and the unique key `key_column`.
    ///
    /// # Errors
    /// [`InvalidIdent`] when a name is not a plain SQL identifier.
    pub fn new(table: &str, id_column: &str, key_column: &str) -> Result<Self, InvalidIdent> {
        Ok(GetOrCreate {
            table: Ident::new(table)?,
            id_column: Ident::new(id_column)?,
            key_column: Ident::new(key_column)?,
        })
    }

    fn insert_sql(
        &self,
        backend: Backend,
        defaults: &[(&str, Value)],
        method: Method,
    ) -> Result<String> {
        let mut cols = vec![self.key_column.as_str().to_string()];
        for (c, _) in defaults {
            cols.push(Ident::new(c).map_err(Error::aborted)?.to_string());
        }
        let marks = vec!["?"; cols.len()].join(", ");
        let (table, id, key) = (&self.table, &self.id_column, &self.key_column);
        let dialect = backend.dialect();
        let mut sql = format!("INSERT INTO {table} ({}) VALUES ({marks})", cols.join(", "));
        if method == Method::OnConflict {
            sql.push_str(&dialect.on_conflict_do_nothing(key.as_str(), id.as_str()));
        }
        if dialect.returning() {
            sql.push_str(&format!(" RETURNING {id}"));
        }
        Ok(backend.sql(&sql).into_owned())
    }

    /// The read of the row after a lost race; inside a transaction it reads the latest
    /// committed row ([`crate::backend::Dialect::current_read`]: a locking read on MariaDB,
    /// whose plain read could use an older snapshot).
    fn select_sql(&self, backend: Backend, in_tx: bool) -> String {
        let lock = if in_tx {
            backend.dialect().current_read()
        } else {
            ""
        };
        let sql = format!(
            "SELECT {} FROM {} WHERE {} = ?{lock}",
            self.id_column, self.table, self.key_column
        );
        backend.sql(&sql).into_owned()
    }

    /// The read of the id of the row with `key`, bound.
    fn find_query<'k, DB, K>(
        &self,
        backend: Backend,
        key: K,
        in_tx: bool,
    ) -> Query<'static, DB, <DB as sqlx::Database>::Arguments>
    where
        DB: BlockDatabase,
        K: Encode<'k, DB> + Type<DB>,
    {
        sqlx::query(AssertSqlSafe(self.select_sql(backend, in_tx))).bind(key)
    }

    /// The insert of a row with `key` and `defaults`, bound.
    fn insert_query<'k, DB, K>(
        &self,
        backend: Backend,
        key: K,
        defaults: &[(&str, Value)],
        method: Method,
    ) -> Result<Query<'static, DB, <DB as sqlx::Database>::Arguments>>
    where
        DB: BlockDatabase,
        K: Encode<'k, DB> + Type<DB>,
    {
        let sql = self.insert_sql(backend, defaults, method)?;
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(key);
        for (_, v) in defaults {
            q = DB::bind_value(q, v);
        }
        Ok(q)
    }

    /// Finds the row with `key`, or creates it with the `defaults` columns, in autocommit
    /// statements (behind a transaction pooler, each in a transaction of its own). Never fails
    /// because of the race, never creates a second row. `key` is any type sqlx binds for the
    /// database.
    ///
    /// The insert is a write: it runs through [`crate::Session::write_autocommit`], so on a
    /// SQLite `Db` with a writer queue ([`crate::DbBuilder::writer_queue`]) it waits for this
    /// process's turn to write (on the dedicated writer connection when the `Db` has one)
    /// instead of meeting the queue's writer in SQLite's busy handler. The read after a lost
    /// race runs on a pooled connection, concurrent with the writer under WAL. The future is
    /// `Send` (it runs inside `tokio::spawn`).
    ///
    /// # Errors
    /// [`Error::Aborted`] when a default names a column that is not a plain identifier; a
    /// retryable conflict when the row vanished between the race and the read; a
    /// [`ConflictKind::Busy`] conflict when the SQLite writer's turn does not come within the
    /// `Db`'s acquire timeout; database errors.
    ///
    /// # Cancel safety
    /// Each statement is autocommit: dropped, either the row was created or it was not, and a
    /// later call finds it. Dropped while waiting for the writer's turn, it leaves the queue
    /// without writing; a connection interrupted mid-statement is closed, not pooled.
    pub async fn get_or_create<'k, DB, K>(
        &self,
        db: &Db<DB>,
        key: K,
        defaults: &[(&str, Value)],
        method: Method,
    ) -> Result<Found>
    where
        DB: BlockDatabase,
        K: Encode<'k, DB> + Type<DB> + Send + Sync + Clone,
    {
        let backend = db.backend();
        let returning = backend.dialect().returning();
        let q = self.insert_query(backend, key.clone(), defaults, method)?;
        let mut session = db.session();
        let inserted = session
            .write_autocommit(move |c| Box::pin(insert::<DB>(c, q, returning)))
            .await?;
        if let Some(id) = inserted {
            return Ok(Found { id, created: true });
        }
        let q = self.find_query(backend, key, false);
        let id = session
            .autocommit(move |c| Box::pin(find::<DB>(c, q)))
            .await?;
        id.map(|id| Found { id, created: false })
            .ok_or_else(lost_row)
    }

    /// Like [`GetOrCreate::get_or_create`], inside the caller's transaction (the insert runs in a
    /// savepoint with [`Method::CatchUnique`]).
    ///
    /// # Errors
    /// As [`GetOrCreate::get_or_create`]; a [`ConflictKind::Serialization`] conflict when the
    /// transaction's snapshot cannot see the row that won the race (retry the transaction).
    ///
    /// # Cancel safety
    /// As the caller's transaction: dropped, it rolls back.
    pub async fn get_or_create_in<'k, DB, K>(
        &self,
        tx: &mut Tx<DB>,
        key: K,
        defaults: &[(&str, Value)],
        method: Method,
    ) -> Result<Found>
    where
        DB: BlockDatabase,
        K: Encode<'k, DB> + Type<DB> + Send + Sync + Clone,
    {
        let backend = tx.backend();
        let returning = backend.dialect().returning();
        let q = self.insert_query(backend, key.clone(), defaults, method)?;
        let inserted = match method {
            Method::OnConflict => insert::<DB>(tx.conn(), q, returning).await?,
            Method::CatchUnique => {
                // Inside the savepoint a unique violation must roll the savepoint back, so it
                // is returned as an error there and caught here.
                let result: Result<i64> = tx
                    .savepoint(|tx| {
                        Box::pin(async move {
                            match insert::<DB>(tx.conn(), q, returning).await? {
                                Some(id) => Ok(id),
                                None => Err(lost_insert()),
                            }
                        })
                    })
                    .await;
                match result {
                    Ok(id) => Some(id),
                    Err(Error::Aborted(e)) if e.to_string() == LOST_INSERT => None,
                    Err(e) if e.is_unique_violation() => None,
                    Err(e) => return Err(e),
                }
            }
        };
        if let Some(id) = inserted {
            return Ok(Found { id, created: true });
        }
        let q = self.find_query(backend, key, true);
        find::<DB>(tx.conn(), q)
            .await?
            .map(|id| Found { id, created: false })
            .ok_or_else(lost_row)
    }
}

/// Runs a read of [`GetOrCreate::find_query`]: the id, if the row exists.
async fn find<DB: BlockDatabase>(
    conn: &mut DB::Connection,
    query: Query<'static, DB, <DB as sqlx::Database>::Arguments>,
) -> Result<Option<i64>> {
    match DB::fetch_optional_query(conn, query).await? {
        Some(row) => Ok(Some(DB::get_i64(&row, 0)?)),
        None => Ok(None),
    }
}

/// Runs an insert of [`GetOrCreate::insert_query`]: the new id, or `None` when the key
/// already exists. `returning`: whether the insert ends with `RETURNING id`.
async fn insert<DB: BlockDatabase>(
    conn: &mut DB::Connection,
    query: Query<'static, DB, <DB as sqlx::Database>::Arguments>,
    returning: bool,
) -> Result<Option<i64>> {
    let unique_is_none = |e: sqlx::Error| {
        let e = Error::from(e);
        if e.is_unique_violation() {
            Ok(None)
        } else {
            Err(e)
        }
    };
    if !returning {
        return match DB::execute_insert(conn, query).await {
            // With `ON DUPLICATE KEY UPDATE id = id` an existing row reports no new id.
            Ok((rows, id)) => Ok(id.filter(|&id| id > 0 && rows == 1)),
            Err(e) => unique_is_none(e),
        };
    }
    match DB::fetch_optional_query(conn, query).await {
        Ok(row) => Ok(row.map(|r| DB::get_i64(&r, 0)).transpose()?),
        Err(e) => unique_is_none(e),
    }
}
