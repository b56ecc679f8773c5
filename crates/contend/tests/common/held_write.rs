//! A write transaction that holds SQLite's writer turn while a test runs something beside it
//! (`sqlite_writers.rs`, `sqlite_library_writes.rs`).

use std::sync::Arc;

use contend::{Database, Db, Error};
use tokio::sync::Notify;

/// Starts a write transaction on `db` that runs `sql` and then holds the turn (and SQLite's
/// write lock) until `release` is notified; returns once it has written, with its task.
pub async fn hold_a_write<DB: Database>(
    db: &Db<DB>,
    sql: &'static str,
    release: Arc<Notify>,
) -> tokio::task::JoinHandle<Result<(), Error>> {
    let (db, entered) = (db.clone(), Arc::new(Notify::new()));
    let e = entered.clone();
    let task = tokio::spawn(async move {
        db.transaction(|tx| {
            Box::pin(async move {
                DB::execute_raw(tx.conn(), sql.into()).await?;
                e.notify_one();
                release.notified().await;
                Ok::<_, Error>(())
            })
        })
        .await
    });
    entered.notified().await;
    task
}
