//! Fencing tokens on the database side: a write carrying a lock's token applies only if no
//! newer token has written the same resource, checked in the same transaction as the write.
//!
//! # Why
//! A distributed lock (for example the Redis lock of `contend-redis`) can be lost while its
//! holder still runs: a garbage-collection or scheduler pause longer than the lease, a network
//! partition, a Redis failover. The holder then writes, believing it still holds the lock, and
//! overwrites the work of the next holder. Every grant of a fenced lock carries a
//! [`FencingToken`] that increases strictly per lock key; the database remembers the highest
//! token it has accepted for each resource and refuses older ones. That check lives in the
//! database, next to the data, so it holds even when the lock service is wrong.
//!
//! # How
//! [`ensure_schema`] creates the fence table:
//!
//! ```sql
//! CREATE TABLE contend_fence (resource VARCHAR(255) PRIMARY KEY, token BIGINT NOT NULL)
//! ```
//!
//! [`fence`] runs inside the caller's [`Tx`]: it inserts the resource's row if it is missing
//! (token 0), then raises its token with one conditional `UPDATE ... WHERE token <= ?`. The
//! `UPDATE` takes the row's write lock (PostgreSQL and MariaDB row lock, SQLite's database write
//! lock) until the transaction ends, so two fenced transactions on the same resource run one
//! after the other, and the comparison is made against the latest committed token. When the
//! `UPDATE` matches no row the token is stale: [`Error::StaleFencingToken`] is returned, the
//! caller's `?` rolls the transaction back, and none of its writes apply.
//!
//! Call [`fence`] *first* in the transaction, before reading the data you are about to change:
//! then the reads happen under the fence row's lock and see the previous holder's committed
//! writes (on PostgreSQL at READ COMMITTED and on MariaDB, where the snapshot is taken by the
//! first plain read). At REPEATABLE READ / SERIALIZABLE on PostgreSQL a concurrent raise shows up
//! as a serialization conflict instead, which [`crate::RetryPolicy`] retries.
//!
//! A token equal to the stored one is accepted: one holder may make several fenced writes under
//! the same grant.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
//! use contend::fencing::{self, FencingToken};
//! let db = contend::Db::connect("sqlite::memory:").await?;
//! fencing::ensure_schema(&db).await?;
//! // Holder with token 7 writes; then a stale holder with token 6 tries.
//! db.transaction(|tx| Box::pin(async move {
//!     fencing::fence(tx, "account:1", FencingToken::new(7)).await
//! })).await?;
//! let stale = db.transaction(|tx| Box::pin(async move {
//!     fencing::fence(tx, "account:1", FencingToken::new(6)).await
//! })).await;
//! assert!(matches!(stale, Err(contend::Error::StaleFencingToken { highest: 7, .. })));
//! assert_eq!(fencing::highest(&db, "account:1").await?, Some(FencingToken::new(7)));
//! # Ok(()) }
//! ```

use std::fmt;

use crate::backend::Database;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::strategy::Value;
use crate::tx::Tx;

/// The name of the fence table.
pub const FENCE_TABLE: &str = "contend_fence";

/// Longest resource name, in bytes (the primary key is a `VARCHAR(255)`).
pub const MAX_RESOURCE_LEN: usize = 255;

/// A fencing token: a number that increases strictly with every grant of the same lock.
///
/// Tokens are stored as `BIGINT`, so the largest usable token is `i64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[must_use = "a fencing token is only useful when written with the data it guards"]
pub struct FencingToken(u64);

impl FencingToken {
    /// Wraps a token value (as returned by the lock service).
    pub const fn new(value: u64) -> Self {
        FencingToken(value)
    }

    /// The token's value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<FencingToken> for u64 {
    fn from(token: FencingToken) -> u64 {
        token.0
    }
}

/// Creates the fence table if it does not exist. Safe to call from several processes at once.
///
/// # Errors
/// The database's error (unreachable, no permission to create tables).
///
/// # Cancel safety
/// Safe: `CREATE TABLE IF NOT EXISTS` either ran or did not.
pub async fn ensure_schema<DB: Database>(db: &Db<DB>) -> Result<()> {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {FENCE_TABLE} \
         (resource VARCHAR({MAX_RESOURCE_LEN}) PRIMARY KEY, token BIGINT NOT NULL)"
    );
    match db.execute_script(&sql).await {
        Ok(()) => Ok(()),
        // PostgreSQL: two concurrent CREATE TABLE IF NOT EXISTS can race on the catalog; the
        // loser's error means the table now exists.
        Err(e) if e.lost_create_race() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Checks `token` against the highest token `resource` has accepted and raises it, inside the
/// caller's transaction. Call it before the reads and writes it guards.
///
/// On success the fence row stays locked until the transaction ends, so a concurrent fenced
/// transaction on the same resource waits; commit or roll back as usual.
///
/// # Errors
/// [`Error::StaleFencingToken`] when a newer token has already been accepted (roll back: `?`
/// does that); [`Error::Aborted`] for an empty or too long resource name or a token above
/// `i64::MAX`; database errors, conflicts classified as usual.
///
/// # Cancel safety
/// Dropping the future leaves the transaction mid-statement; [`crate::Db::transaction`] then
/// closes the connection and the server rolls back, so no partial raise is committed.
pub async fn fence<DB: Database>(
    tx: &mut Tx<DB>,
    resource: &str,
    token: FencingToken,
) -> Result<()> {
    check_resource(resource)?;
    let value = token_value(token)?;
    let backend = tx.backend();
    let insert = format!(
        "INSERT INTO {FENCE_TABLE} (resource, token) VALUES (?, 0){}",
        backend
            .dialect()
            .on_conflict_do_nothing("resource", "resource")
    );
    let name = Value::from(resource);
    DB::execute_values(tx.conn(), backend, &insert, std::slice::from_ref(&name)).await?;
    // sqlx connects to MySQL/MariaDB with CLIENT_FOUND_ROWS, so a matched row whose token is
    // already equal counts as affected there too.
    let update = format!("UPDATE {FENCE_TABLE} SET token = ? WHERE resource = ? AND token <= ?");
    let args = [Value::Int(value), name.clone(), Value::Int(value)];
    if DB::execute_values(tx.conn(), backend, &update, &args).await? == 1 {
        return Ok(());
    }
    let select = format!("SELECT token FROM {FENCE_TABLE} WHERE resource = ?");
    let highest = DB::fetch_i64(tx.conn(), backend, &select, &[name])
        .await?
        .unwrap_or(0);
    Err(Error::StaleFencingToken {
        resource: resource.to_string(),
        token: token.get(),
        highest: u64::try_from(highest).unwrap_or(0),
    })
}

/// Runs `fence(tx, resource, token)` and then `write` in the same transaction: `write` runs only
/// when the token is current, and its changes commit together with the raised token.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
/// use contend::fencing::{self, FencingToken};
/// let db = contend::Db::connect("sqlite::memory:").await?;
/// fencing::ensure_schema(&db).await?;
/// db.execute_script("CREATE TABLE doc (id INTEGER PRIMARY KEY, body TEXT)").await?;
/// db.transaction(|tx| Box::pin(async move {
///     fencing::fenced_write(tx, "doc:1", FencingToken::new(3), |tx| Box::pin(async move {
///         let q = tx.query("INSERT INTO doc (id, body) VALUES (1, 'hello')");
///         q.execute(tx.conn()).await?;
///         Ok(())
///     })).await
/// })).await?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// As [`fence`], then `write`'s error.
///
/// # Cancel safety
/// As [`fence`].
pub async fn fenced_write<DB: Database, T, F>(
    tx: &mut Tx<DB>,
    resource: &str,
    token: FencingToken,
    write: F,
) -> Result<T>
where
    F: for<'c> FnOnce(&'c mut Tx<DB>) -> futures_util::future::BoxFuture<'c, Result<T>>,
{
    fence(tx, resource, token).await?;
    write(tx).await
}

/// The highest token `resource` has accepted, or `None` if it has never been fenced.
///
/// # Errors
/// Database errors; [`Error::Aborted`] for an invalid resource name.
///
/// # Cancel safety
/// Safe: a single read outside any transaction.
pub async fn highest<DB: Database>(db: &Db<DB>, resource: &str) -> Result<Option<FencingToken>> {
    check_resource(resource)?;
    let select = format!("SELECT token FROM {FENCE_TABLE} WHERE resource = ?");
    let mut conn = db.acquire().await?;
    let (backend, args) = (db.backend(), [Value::from(resource)]);
    let token: Option<i64> = crate::session::pinned_pooled(db, &mut conn, |c| {
        crate::session::classified(DB::fetch_i64(c, backend, &select, &args))
    })
    .await?;
    Ok(token.map(|t| FencingToken::new(u64::try_from(t).unwrap_or(0))))
}

fn check_resource(resource: &str) -> Result<()> {
    if resource.is_empty() || resource.len() > MAX_RESOURCE_LEN {
        return Err(Error::aborted(format!(
            "fencing resource name must be 1 to {MAX_RESOURCE_LEN} bytes long, got {}",
            resource.len()
        )));
    }
    Ok(())
}

fn token_value(token: FencingToken) -> Result<i64> {
    i64::try_from(token.get()).map_err(|_| {
        Error::aborted(format!(
            "fencing token {token} is larger than the largest storable token ({})",
            i64::MAX
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_input() {
        assert!(check_resource("").is_err());
        assert!(check_resource(&"x".repeat(MAX_RESOURCE_LEN + 1)).is_err());
        assert!(check_resource("account:1").is_ok());
        assert!(token_value(FencingToken::new(u64::MAX)).is_err());
        assert_eq!(token_value(FencingToken::new(42)).unwrap(), 42);
    }
}
