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

use super::{Ident, InvalidIdent, Value};
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

/// A table with a generated `BIGINT` id column and a unique text key column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetOrCreate {
    table: Ident,
    id_column: Ident,
    key_column: Ident,
}

fn lost_row(key: &str) -> Error {
    tracing::debug!(key, "unique conflict but the existing row is not visible");
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
        let mut sql = format!("INSERT INTO {table} ({}) VALUES ({marks})", cols.join(", "));
        match (method, backend) {
            (Method::CatchUnique, Backend::MySql) => {}
            (Method::CatchUnique, _) => sql.push_str(&format!(" RETURNING {id}")),
            (Method::OnConflict, Backend::MySql) => {
                sql.push_str(&format!(" ON DUPLICATE KEY UPDATE {id} = {id}"))
            }
            (Method::OnConflict, _) => {
                sql.push_str(&format!(" ON CONFLICT ({key}) DO NOTHING RETURNING {id}"))
            }
        }
        Ok(sql)
    }

    fn select_sql(&self, backend: Backend, in_tx: bool) -> String {
        let lock = if in_tx && backend == Backend::MySql {
            " LOCK IN SHARE MODE"
        } else {
            ""
        };
        format!(
            "SELECT {} FROM {} WHERE {} = ?{lock}",
            self.id_column, self.table, self.key_column
        )
    }

    /// Inserts and returns the new id, or `None` when the key already exists.
    async fn insert(
        &self,
        conn: &mut sqlx::AnyConnection,
        backend: Backend,
        key: &str,
        defaults: &[(&str, Value)],
        method: Method,
    ) -> Result<Option<i64>> {
        let sql = self.insert_sql(backend, defaults, method)?;
        let mut q =
            sqlx::query(sqlx::AssertSqlSafe(backend.sql(&sql).into_owned())).bind(key.to_string());
        for (_, v) in defaults {
            q = v.bind_to(q);
        }
        if backend == Backend::MySql {
            let done = match q.execute(&mut *conn).await {
                Ok(done) => done,
                Err(e) => {
                    let e = Error::from(e);
                    return if e.is_unique_violation() {
                        Ok(None)
                    } else {
                        Err(e)
                    };
                }
            };
            // With `ON DUPLICATE KEY UPDATE id = id` an existing row reports no new insert id.
            let id = done.last_insert_id().filter(|&id| id > 0);
            return Ok(id.filter(|_| done.rows_affected() == 1));
        }
        use sqlx::Row;
        match q.fetch_optional(&mut *conn).await {
            Ok(row) => Ok(row.map(|r| r.try_get::<i64, _>(0)).transpose()?),
            Err(e) => {
                let e = Error::from(e);
                if e.is_unique_violation() {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Finds the row with `key`, or creates it with the `defaults` columns, in autocommit
    /// statements. Never fails because of the race, never creates a second row.
    ///
    /// # Errors
    /// [`Error::Aborted`] when a default names a column that is not a plain identifier; a
    /// retryable conflict when the row vanished between the race and the read; database errors.
    ///
    /// # Cancel safety
    /// Each statement is autocommit: dropped, either the row was created or it was not, and a
    /// later call finds it.
    pub async fn get_or_create(
        &self,
        db: &Db,
        key: &str,
        defaults: &[(&str, Value)],
        method: Method,
    ) -> Result<Found> {
        let mut conn = db.acquire().await?;
        let backend = db.backend();
        if let Some(id) = self
            .insert(&mut conn, backend, key, defaults, method)
            .await?
        {
            return Ok(Found { id, created: true });
        }
        let sql = self.select_sql(backend, false);
        let id: Option<i64> = db
            .query_scalar(&sql)
            .bind(key.to_string())
            .fetch_optional(&mut *conn)
            .await?;
        id.map(|id| Found { id, created: false })
            .ok_or_else(|| lost_row(key))
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
    pub async fn get_or_create_in(
        &self,
        tx: &mut Tx,
        key: &str,
        defaults: &[(&str, Value)],
        method: Method,
    ) -> Result<Found> {
        let backend = tx.backend();
        let inserted = match method {
            Method::OnConflict => {
                self.insert(tx.conn(), backend, key, defaults, method)
                    .await?
            }
            Method::CatchUnique => {
                let sql = self.insert_sql(backend, defaults, method)?;
                let owned_key = key.to_string();
                let values: Vec<Value> = defaults.iter().map(|(_, v)| v.clone()).collect();
                let result: Result<i64> = tx
                    .savepoint(move |tx| {
                        Box::pin(async move {
                            // Inside the savepoint a unique violation must roll the savepoint
                            // back, so it is returned as an error here and caught below.
                            let mut q = tx.query(&sql).bind(owned_key);
                            for v in &values {
                                q = v.bind_to(q);
                            }
                            if backend == Backend::MySql {
                                let done = q.execute(tx.conn()).await?;
                                Ok(done.last_insert_id().unwrap_or(0))
                            } else {
                                use sqlx::Row;
                                let row = q.fetch_one(tx.conn()).await?;
                                Ok(row.try_get::<i64, _>(0)?)
                            }
                        })
                    })
                    .await;
                match result {
                    Ok(id) => Some(id),
                    Err(e) if e.is_unique_violation() => None,
                    Err(e) => return Err(e),
                }
            }
        };
        if let Some(id) = inserted {
            return Ok(Found { id, created: true });
        }
        let sql = self.select_sql(backend, true);
        let id: Option<i64> = tx
            .query_scalar(&sql)
            .bind(key.to_string())
            .fetch_optional(tx.conn())
            .await?;
        id.map(|id| Found { id, created: false })
            .ok_or_else(|| lost_row(key))
    }
}
