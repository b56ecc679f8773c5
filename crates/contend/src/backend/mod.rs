//! The three supported databases and what differs between them: URLs, placeholders, how a
//! transaction begins, row-lock clauses and how errors are classified.
//!
//! Generic code asks the [`Dialect`] of a [`Backend`]; each database implements it in its own
//! module ([`postgres`], [`mysql`], [`sqlite`]) with the same methods in the same order. The same
//! module implements [`Database`] for sqlx's typed database (`sqlx::Postgres`, ...), which is
//! what lets [`crate::Db`], [`crate::Tx`] and [`crate::Session`] run on a user's own typed pool;
//! [`any`] implements it for `sqlx::Any`, where the backend is chosen by URL at run time.
//!
//! | database | cargo feature | sqlx type | `Tx::conn()` gives |
//! |---|---|---|---|
//! | PostgreSQL | `postgres` | `sqlx::Postgres` | `&mut PgConnection` |
//! | MySQL/MariaDB | `mysql` | `sqlx::MySql` | `&mut MySqlConnection` |
//! | SQLite | `sqlite` | `sqlx::Sqlite` | `&mut SqliteConnection` |
//! | chosen by URL | always | `sqlx::Any` | `&mut AnyConnection` (sqlx's smaller type set) |

pub mod any;
pub mod mysql;
pub mod postgres;
pub mod sqlite;

use std::borrow::Cow;
use std::fmt;

use futures_util::future::BoxFuture;
use sqlx::error::DatabaseError;

use crate::error::{ConflictKind, Error, Result};
use crate::strategy::Value;
use crate::tx::TxOptions;

/// A sqlx database that contend can run transactions on: `sqlx::Postgres`, `sqlx::MySql`,
/// `sqlx::Sqlite` (each behind its cargo feature) and `sqlx::Any`.
///
/// The methods are the few statements contend itself runs on a connection; generic code calls
/// them instead of naming a driver. Users never need to call them: inside a transaction they
/// hold their database's own connection ([`crate::Tx::conn`]) and use sqlx as usual.
pub trait Database: sqlx::Database {
    /// Which backend a pool of this database talks to (fixed by the type, except for `Any`,
    /// where the pool's URL tells).
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] when an `Any` pool's URL names no supported backend.
    fn backend_of(pool: &sqlx::Pool<Self>) -> Result<Backend>;

    /// The pool's URL when it has one to show (an `Any` pool's), for messages; passwords are
    /// redacted by the caller.
    fn url_of(pool: &sqlx::Pool<Self>) -> Option<String>;

    /// Runs `sql` (one or more `;`-separated statements without parameters) on `conn`.
    ///
    /// # Cancel safety
    /// As sqlx's `raw_sql`: if dropped, some of the statements may have run.
    fn execute_raw<'c>(
        conn: &'c mut Self::Connection,
        sql: String,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>>;

    /// Runs `sql` (`?` placeholders, rewritten for `backend`) with the parameters `args` and
    /// returns the number of rows it affected.
    ///
    /// # Cancel safety
    /// As sqlx's `execute`: if dropped, the statement may or may not have run.
    fn execute_values<'c>(
        conn: &'c mut Self::Connection,
        backend: Backend,
        sql: &str,
        args: &[Value],
    ) -> BoxFuture<'c, Result<u64, sqlx::Error>>;

    /// Runs `sql` with the parameters `args` and returns the first column of the first row as
    /// an `i64`, if there is a row.
    ///
    /// # Cancel safety
    /// As sqlx's `fetch_optional`.
    fn fetch_i64<'c>(
        conn: &'c mut Self::Connection,
        backend: Backend,
        sql: &str,
        args: &[Value],
    ) -> BoxFuture<'c, Result<Option<i64>, sqlx::Error>>;

    /// Runs `sql` (`?` placeholders, rewritten for `backend`) with the parameters `args` and
    /// returns the first row, if there is one, decoded column by column as `columns` says:
    /// `columns[i]` decodes column `i` ([`ColumnKind`]); SQL `NULL` becomes [`Value::Null`].
    /// Columns beyond `columns.len()` are ignored.
    ///
    /// For contend's own small reads of several columns (the idempotency key store); users read
    /// rows with sqlx on [`crate::Tx::conn`].
    ///
    /// # Errors
    /// The database's error; a decoding error when a column does not hold its kind (or there
    /// are fewer columns than `columns`).
    ///
    /// # Cancel safety
    /// As sqlx's `fetch_optional`.
    fn fetch_row<'c>(
        conn: &'c mut Self::Connection,
        backend: Backend,
        sql: &str,
        args: &[Value],
        columns: &[ColumnKind],
    ) -> BoxFuture<'c, Result<Option<Vec<Value>>, sqlx::Error>>;
}

/// How [`Database::fetch_row`] decodes a column. Every kind accepts SQL `NULL`
/// ([`Value::Null`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ColumnKind {
    /// A `BIGINT` (`INTEGER` on SQLite): [`Value::Int`].
    Int,
    /// A text column (`TEXT`, `VARCHAR`, `CHAR`): [`Value::Text`].
    Text,
}

/// Implements [`Database`] for a sqlx database whose backend is fixed by its type (the `Any`
/// implementation differs only in `backend_of`).
macro_rules! impl_database {
    ($db:ty, backend: |$pool:ident| $backend:expr, url: |$upool:pat_param| $url:expr) => {
        impl $crate::backend::Database for $db {
            fn backend_of($pool: &sqlx::Pool<Self>) -> $crate::error::Result<$crate::Backend> {
                $backend
            }

            fn url_of($upool: &sqlx::Pool<Self>) -> Option<String> {
                $url
            }

            fn execute_raw<'c>(
                conn: &'c mut Self::Connection,
                sql: String,
            ) -> futures_util::future::BoxFuture<'c, Result<(), sqlx::Error>> {
                Box::pin(async move {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(conn)
                        .await
                        .map(|_| ())
                })
            }

            fn execute_values<'c>(
                conn: &'c mut Self::Connection,
                backend: $crate::Backend,
                sql: &str,
                args: &[$crate::strategy::Value],
            ) -> futures_util::future::BoxFuture<'c, Result<u64, sqlx::Error>> {
                let mut query =
                    sqlx::query::<Self>(sqlx::AssertSqlSafe(backend.sql(sql).into_owned()));
                for arg in args {
                    query = match arg {
                        $crate::strategy::Value::Int(v) => query.bind(*v),
                        $crate::strategy::Value::Text(v) => query.bind(v.clone()),
                        $crate::strategy::Value::Null => query.bind(Option::<i64>::None),
                    };
                }
                Box::pin(async move { Ok(query.execute(conn).await?.rows_affected()) })
            }

            fn fetch_i64<'c>(
                conn: &'c mut Self::Connection,
                backend: $crate::Backend,
                sql: &str,
                args: &[$crate::strategy::Value],
            ) -> futures_util::future::BoxFuture<'c, Result<Option<i64>, sqlx::Error>> {
                let mut query = sqlx::query_scalar::<Self, i64>(sqlx::AssertSqlSafe(
                    backend.sql(sql).into_owned(),
                ));
                for arg in args {
                    query = match arg {
                        $crate::strategy::Value::Int(v) => query.bind(*v),
                        $crate::strategy::Value::Text(v) => query.bind(v.clone()),
                        $crate::strategy::Value::Null => query.bind(Option::<i64>::None),
                    };
                }
                Box::pin(async move { query.fetch_optional(conn).await })
            }

            fn fetch_row<'c>(
                conn: &'c mut Self::Connection,
                backend: $crate::Backend,
                sql: &str,
                args: &[$crate::strategy::Value],
                columns: &[$crate::backend::ColumnKind],
            ) -> futures_util::future::BoxFuture<
                'c,
                Result<Option<Vec<$crate::strategy::Value>>, sqlx::Error>,
            > {
                use sqlx::Row as _;
                use $crate::backend::ColumnKind;
                use $crate::strategy::Value;
                let mut query =
                    sqlx::query::<Self>(sqlx::AssertSqlSafe(backend.sql(sql).into_owned()));
                for arg in args {
                    query = match arg {
                        Value::Int(v) => query.bind(*v),
                        Value::Text(v) => query.bind(v.clone()),
                        Value::Null => query.bind(Option::<i64>::None),
                    };
                }
                let columns = columns.to_vec();
                Box::pin(async move {
                    let Some(row) = query.fetch_optional(conn).await? else {
                        return Ok(None);
                    };
                    let mut values = Vec::with_capacity(columns.len());
                    for (i, kind) in columns.into_iter().enumerate() {
                        values.push(match kind {
                            ColumnKind::Int => row
                                .try_get::<Option<i64>, _>(i)?
                                .map_or(Value::Null, Value::Int),
                            ColumnKind::Text => row
                                .try_get::<Option<String>, _>(i)?
                                .map_or(Value::Null, Value::Text),
                        });
                    }
                    Ok(Some(values))
                })
            }
        }
    };
}
pub(crate) use impl_database;

/// Which database a [`crate::Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Backend {
    /// SQLite, embedded (a file or `sqlite::memory:`).
    Sqlite,
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB (the tests run MariaDB).
    MySql,
}

impl Backend {
    /// All backends, in a stable order.
    pub const ALL: [Backend; 3] = [Backend::Sqlite, Backend::Postgres, Backend::MySql];

    /// Detects the backend from a URL's scheme.
    ///
    /// ```
    /// use contend::Backend;
    /// assert_eq!(Backend::from_url("sqlite::memory:").unwrap(), Backend::Sqlite);
    /// assert_eq!(Backend::from_url("postgres://u@127.0.0.1/app").unwrap(), Backend::Postgres);
    /// assert_eq!(Backend::from_url("mariadb://root@127.0.0.1/app").unwrap(), Backend::MySql);
    /// assert!(Backend::from_url("oracle://x").is_err());
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for any other scheme.
    pub fn from_url(url: &str) -> Result<Backend> {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            "mysql" | "mariadb" => Ok(Backend::MySql),
            _ => Err(Error::InvalidUrl {
                url: redact_url(url),
                reason: "expected a URL starting with sqlite:, postgres://, mysql:// or mariadb://"
                    .into(),
            }),
        }
    }

    /// The short name used in reports: `sqlite`, `postgres` or `mysql`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::MySql => "mysql",
        }
    }

    /// The dialect that knows this backend's SQL.
    pub fn dialect(self) -> &'static dyn Dialect {
        match self {
            Backend::Sqlite => &sqlite::Sqlite,
            Backend::Postgres => &postgres::Postgres,
            Backend::MySql => &mysql::MySql,
        }
    }

    /// Rewrites `?` placeholders for this backend (`$1, $2, ...` on PostgreSQL).
    ///
    /// Write SQL once with `?`; `?` inside quoted literals or identifiers is left alone.
    ///
    /// ```
    /// use contend::Backend;
    /// let sql = "UPDATE account SET balance = balance - ? WHERE id = ? AND note <> '?'";
    /// assert_eq!(
    ///     Backend::Postgres.sql(sql),
    ///     "UPDATE account SET balance = balance - $1 WHERE id = $2 AND note <> '?'"
    /// );
    /// assert_eq!(Backend::Sqlite.sql(sql), sql);
    /// ```
    pub fn sql(self, sql: &str) -> Cow<'_, str> {
        match self {
            Backend::Postgres => Cow::Owned(numbered_placeholders(sql)),
            _ => Cow::Borrowed(sql),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
            Backend::MySql => "MySQL/MariaDB",
        })
    }
}

/// Row-lock modes for `SELECT ... FOR ...` (see [`Dialect::row_lock_clause`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RowLock {
    /// `FOR UPDATE`: exclusive, waits.
    Update,
    /// `FOR NO KEY UPDATE` (PostgreSQL): does not block inserts of referencing rows.
    NoKeyUpdate,
    /// `FOR SHARE` (PostgreSQL; MariaDB `LOCK IN SHARE MODE`).
    Share,
    /// `FOR UPDATE NOWAIT`: fail at once with [`ConflictKind::LockTimeout`] if taken.
    UpdateNowait,
    /// `FOR UPDATE SKIP LOCKED`: leave rows that are locked out of the result.
    UpdateSkipLocked,
}

/// What differs between databases. One zero-sized implementation per backend.
///
/// Generic code calls these instead of matching on a backend name.
pub trait Dialect: Send + Sync + 'static {
    /// The backend this dialect is for.
    fn backend(&self) -> Backend;

    /// The statements that start a transaction with `options` (one round trip; may contain
    /// several `;`-separated statements), and the statements that undo session settings after it
    /// ends (empty when nothing needs undoing).
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the backend cannot honour an option.
    fn begin(&self, options: &TxOptions) -> Result<(String, Option<String>)>;

    /// The statements that end a transaction begun with [`Dialect::begin`], in one round trip:
    /// `COMMIT` when `commit`, else `ROLLBACK`, with the backend's commit guard (see
    /// [`Dialect::rolled_back_before_commit`]) and the reset of any session setting that
    /// `begin` changed for it. `commit_guard`: the transaction began with the guard that
    /// [`TxOptions`] asks for on a Galera node (MySQL/MariaDB's; PostgreSQL's guard is always on).
    fn end(&self, commit: bool, commit_guard: bool) -> &'static str {
        let _ = commit_guard;
        if commit { "COMMIT" } else { "ROLLBACK" }
    }

    /// Whether `err`, the error of [`Dialect::end`]'s `COMMIT` round trip, is its guard's: the
    /// server had rolled the whole transaction back before the `COMMIT` (so nothing of the
    /// transaction committed, and what ran after the rollback is rolled back too), with the
    /// error to return instead. `None` for any other error.
    fn rolled_back_before_commit(&self, err: &dyn DatabaseError) -> Option<Error> {
        let _ = err;
        None
    }

    /// Classifies a database error as a conflict kind, if it is one.
    fn classify(&self, err: &dyn DatabaseError) -> Option<ConflictKind>;

    /// Whether `INSERT`/`UPDATE ... RETURNING` is available (MySQL/MariaDB: no).
    fn returning(&self) -> bool {
        true
    }

    /// The clause that makes an `INSERT` do nothing when a row with the same `key` exists
    /// (`noop` is a column the MySQL form assigns to itself).
    fn on_conflict_do_nothing(&self, key: &str, _noop: &str) -> String {
        format!(" ON CONFLICT ({key}) DO NOTHING")
    }

    /// The clause appended to a `SELECT` inside a transaction that must read the latest
    /// committed row rather than the transaction's snapshot (MySQL's REPEATABLE READ reads a
    /// snapshot unless the read locks: `LOCK IN SHARE MODE`). Empty where reads already see it.
    fn current_read(&self) -> &'static str {
        ""
    }

    /// How to take a transaction-scoped advisory lock on `key`, waiting at most `wait` (else
    /// the transaction's lock timeout, `tx_lock_timeout`, or the server's).
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the backend has no advisory locks.
    fn advisory_xact(
        &self,
        key: &str,
        _wait: Option<std::time::Duration>,
        _tx_lock_timeout: Option<std::time::Duration>,
    ) -> Result<AdvisoryXact> {
        let _ = key;
        Err(Error::Unsupported {
            backend: self.backend(),
            what: "advisory locks".into(),
        })
    }

    /// The clause appended to a `SELECT` to take row locks.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the backend has no such lock (SQLite has no row locks).
    fn row_lock_clause(&self, mode: RowLock) -> Result<&'static str> {
        Ok(match mode {
            RowLock::Update => " FOR UPDATE",
            RowLock::UpdateNowait => " FOR UPDATE NOWAIT",
            RowLock::UpdateSkipLocked => " FOR UPDATE SKIP LOCKED",
            RowLock::Share => " FOR SHARE",
            RowLock::NoKeyUpdate => {
                return Err(Error::Unsupported {
                    backend: self.backend(),
                    what: "FOR NO KEY UPDATE".into(),
                });
            }
        })
    }

    /// The column type of a string of at most `max_len` bytes of printable ASCII that must
    /// compare byte for byte, with no case folding and no trailing-space padding (keys, hashes,
    /// nonces); usable in a primary key. `TEXT` by default: SQLite's `BINARY` collation and
    /// PostgreSQL's deterministic collations compare it exactly.
    fn exact_ascii_type(&self, max_len: usize) -> String {
        let _ = max_len;
        "TEXT".into()
    }

    /// The column type of UTF-8 text up to at least 16 MiB (response bodies and the like).
    fn long_text_type(&self) -> &'static str {
        "TEXT"
    }

    /// What follows the column list of a `CREATE TABLE` for a table that transactions write
    /// (the storage engine on MySQL/MariaDB); empty by default.
    fn table_options(&self) -> &'static str {
        ""
    }
}

/// The statements of a transaction-scoped advisory lock ([`Dialect::advisory_xact`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvisoryXact {
    /// The statement that takes the lock.
    pub acquire: String,
    /// When true, `acquire` is one query that returns 1 when the lock was granted and anything
    /// else when the wait ran out; when false, it fails with a lock-timeout error instead.
    pub returns_granted: bool,
    /// A statement to run right after the transaction ends (MySQL releases `GET_LOCK` there).
    pub after_end: Option<String>,
}

/// Classifies an error from any backend (used by `From<sqlx::Error> for Error`).
pub(crate) fn classify(err: &dyn DatabaseError) -> Option<ConflictKind> {
    [
        postgres::recognise(err),
        mysql::recognise(err),
        sqlite::recognise(err),
    ]
    .into_iter()
    .flatten()
    .next()
    .and_then(|dialect| dialect.classify(err))
}

fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    let mut quote: Option<char> = None;
    for c in sql.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                out.push(c);
            }
            (Some(_), c) => out.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                out.push(c);
            }
            (None, '?') => {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            }
            (None, c) => out.push(c),
        }
    }
    out
}

/// Replaces the password in a URL with `***`, for error messages and logs.
///
/// ```
/// assert_eq!(
///     contend::backend::redact_url("postgres://app:secret@db:5432/x"),
///     "postgres://app:***@db:5432/x"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
        && let Some((user, _password)) = userinfo.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    url.to_string()
}

/// The `host:port` (or file) part of a URL, for error messages.
pub(crate) fn address_of(url: &str) -> String {
    match url.split_once("://") {
        Some((_, rest)) => {
            let rest = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
            rest.split(['/', '?']).next().unwrap_or(rest).to_string()
        }
        None => url
            .strip_prefix("sqlite:")
            .unwrap_or(url)
            .split('?')
            .next()
            .unwrap_or(url)
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            address_of("postgres://u:p@127.0.0.1:5432/app"),
            "127.0.0.1:5432"
        );
        assert_eq!(address_of("mysql://root@localhost/app?x=1"), "localhost");
        assert_eq!(address_of("sqlite:/tmp/a.db?mode=rwc"), "/tmp/a.db");
    }

    #[test]
    fn placeholders_skip_quotes() {
        assert_eq!(
            numbered_placeholders("a ? \"?\" ? '??' ?"),
            "a $1 \"?\" $2 '??' $3"
        );
    }
}
