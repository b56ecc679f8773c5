//! SQLite's in-process writer queue (`DbBuilder::writer_queue`): write transactions of one `Db`
//! take turns before `BEGIN IMMEDIATE`, so the process's own writers never meet in SQLite's busy
//! handler, while readers stay concurrent (WAL) and a second `Db` on the same file (another
//! process, as far as the queue can tell) is still guarded by the busy timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use contend::{ConflictKind, Db, Error, RetryPolicy, TxOptions};

const WRITERS: usize = 16;
const PER_WRITER: i64 = 20;

struct Outcome {
    committed: i64,
    busy: u64,
    failed: Vec<String>,
    reads: u64,
}

/// `WRITERS` tasks each run `PER_WRITER` read-then-increment transactions on one row while 4
/// readers read it in read-only transactions, on a database whose busy timeout is 1 ms (so
/// that writers meeting in the busy handler fail at once instead of sleeping).
async fn load(db: &Db) -> Outcome {
    let busy = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (db, reads, stop) = (db.clone(), reads.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let options = TxOptions::new().read_only(true);
            loop {
                let read = db.transaction_with(&options, |tx| {
                    Box::pin(async move {
                        let n: i64 = tx
                            .query_scalar("SELECT n FROM counter")
                            .fetch_one(tx.conn())
                            .await?;
                        Ok::<_, Error>(n)
                    })
                });
                tokio::select! {
                    r = read => { r.expect("a read-only transaction never waits for writers"); }
                    _ = stop.notified() => return,
                }
                reads.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let (db, busy) = (db.clone(), busy.clone());
        writers.push(tokio::spawn(async move {
            let mut session = db.session();
            let mut failed = Vec::new();
            let mut committed = 0;
            for _ in 0..PER_WRITER {
                let run = session
                    .run(&TxOptions::new(), |tx| {
                        Box::pin(async move {
                            let n: i64 = tx
                                .query_scalar("SELECT n FROM counter")
                                .fetch_one(tx.conn())
                                .await?;
                            tokio::task::yield_now().await;
                            tx.query("UPDATE counter SET n = ?")
                                .bind(n + 1)
                                .execute(tx.conn())
                                .await?;
                            Ok::<_, Error>(())
                        })
                    })
                    .await;
                match run.result {
                    Ok(()) => committed += 1,
                    Err(e) => {
                        if e.conflict() == Some(ConflictKind::Busy) {
                            busy.fetch_add(1, Ordering::Relaxed);
                        }
                        failed.push(e.to_string());
                    }
                }
            }
            (committed, failed)
        }));
    }
    let mut committed = 0;
    let mut failed = Vec::new();
    for w in writers {
        let (c, f) = w.await.unwrap();
        committed += c;
        failed.extend(f);
    }
    stop.notify_waiters();
    for r in readers {
        r.abort();
    }
    Outcome {
        committed,
        busy: busy.load(Ordering::Relaxed),
        failed,
        reads: reads.load(Ordering::Relaxed),
    }
}

async fn open(path: &std::path::Path, queue: bool) -> Db {
    let db = Db::builder(&format!("sqlite:{}", path.display()))
        .busy_timeout(Duration::from_millis(1))
        .writer_queue(queue)
        .connect()
        .await
        .unwrap();
    db.execute_script(
        "CREATE TABLE IF NOT EXISTS counter (n INTEGER NOT NULL); \
         INSERT INTO counter SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM counter)",
    )
    .await
    .unwrap();
    db
}

async fn count(db: &Db) -> i64 {
    db.query_scalar("SELECT n FROM counter")
        .fetch_one(db.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_queue_instead_of_meeting_in_the_busy_handler() {
    let dir = tempfile::tempdir().unwrap();
    // Without the queue, the same load makes writers meet in the busy handler.
    let unqueued = open(&dir.path().join("unqueued.db"), false).await;
    let without = load(&unqueued).await;
    assert!(
        without.busy > 0,
        "without the queue some writers should fail busy (1 ms busy timeout)"
    );
    assert_eq!(count(&unqueued).await, without.committed);

    let queued = open(&dir.path().join("queued.db"), true).await;
    let with = load(&queued).await;
    assert!(
        with.failed.is_empty(),
        "{:?}",
        &with.failed[..with.failed.len().min(3)]
    );
    assert_eq!(with.committed, WRITERS as i64 * PER_WRITER);
    assert_eq!(count(&queued).await, with.committed, "no lost update");
    assert!(with.reads > 0, "readers ran alongside the writers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_on_the_same_file_is_guarded_by_the_busy_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    // Two Dbs on one file: each queues its own writers; between them, SQLite's lock and the
    // busy timeout decide, and busy conflicts are retried.
    let a = open(&path, true).await;
    let b = open(&path, true).await;
    let options = TxOptions::new().retry(
        RetryPolicy::new()
            .max_attempts(1000)
            .max_elapsed(Duration::from_secs(60)),
    );
    let mut tasks = Vec::new();
    for db in [a.clone(), b.clone(), a.clone(), b.clone()] {
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                db.transaction_with(&options, |tx| {
                    Box::pin(async move {
                        tx.query("UPDATE counter SET n = n + 1")
                            .execute(tx.conn())
                            .await?;
                        Ok::<_, Error>(())
                    })
                })
                .await
                .expect("retried until it committed");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(count(&a).await, 100);
}
