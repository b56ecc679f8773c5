//! SQLite's in-process writer queue (`DbBuilder::writer_queue`): write transactions of one `Db`
//! take turns before `BEGIN IMMEDIATE`, so the process's own writers never meet in SQLite's busy
//! handler, while readers stay concurrent (WAL) and a second `Db` on the same file (another
//! process, as far as the queue can tell) is still guarded by the busy timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use contend::{ConflictKind, Db, Error, RetryPolicy, TxOptions};

#[path = "common/held_write.rs"]
mod held_write;
use held_write::hold_a_write;

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
        tasks.push(tokio::spawn(increment(db, options, 25)));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(count(&a).await, 100);
}

/// Adds 1 to `counter` `times` times, one retried transaction each, on one session of `db`.
async fn increment(db: Db, options: TxOptions, times: usize) {
    let mut session = db.session();
    for _ in 0..times {
        session
            .transaction_with(&options, |tx| {
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
}

/// What the child process (`child_writer`, this test binary run again) is told to do.
const CHILD_MODE: &str = "CONTEND_SQLITE_CHILD_MODE";
const CHILD_PATH: &str = "CONTEND_SQLITE_CHILD_PATH";
/// Increments the child makes in `increment` mode.
const CHILD_INCREMENTS: usize = 100;

/// A child process of this test binary writing to `path`; killed on drop if still running.
struct ChildWriter(std::process::Child);

impl ChildWriter {
    /// Starts `child_writer` in `mode` and waits until it prints `READY`.
    fn start(mode: &str, path: &std::path::Path) -> ChildWriter {
        use std::io::BufRead;
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = std::process::Command::new(exe)
            .args(["--exact", "child_writer", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD_MODE, mode)
            .env(CHILD_PATH, path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the child writer");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                // libtest prints "test child_writer ... " before the child's own output.
                Some(Ok(line)) if line.trim_end().ends_with("READY") => break,
                Some(Ok(_)) => continue,
                _ => {
                    let _ = child.kill();
                    panic!("the child writer exited before it was ready ({mode})");
                }
            }
        }
        // Drain the rest so that the child never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        ChildWriter(child)
    }

    /// Waits for the child to exit and asserts that it succeeded.
    fn wait(mut self) {
        let status = self.0.wait().expect("wait for the child writer");
        assert!(status.success(), "the child writer failed: {status}");
    }
}

impl Drop for ChildWriter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The child process: `hold` takes the database's write lock (a write transaction), prints
/// READY, keeps it for 600 ms and commits one increment; `increment` prints READY and commits
/// `CHILD_INCREMENTS` increments from 4 tasks, retrying busy conflicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of a_second_process_writing_the_same_file_is_guarded_by_the_busy_timeout"]
async fn child_writer() {
    let (Ok(mode), Ok(path)) = (std::env::var(CHILD_MODE), std::env::var(CHILD_PATH)) else {
        return;
    };
    let db = Db::builder(&format!("sqlite:{path}"))
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    match mode.as_str() {
        "hold" => {
            db.transaction(|tx| {
                Box::pin(async move {
                    tx.query("UPDATE counter SET n = n + 1")
                        .execute(tx.conn())
                        .await?;
                    println!("READY");
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    Ok::<_, Error>(())
                })
            })
            .await
            .unwrap();
        }
        "increment" => {
            println!("READY");
            let options = TxOptions::new().retry(
                RetryPolicy::new()
                    .max_attempts(1000)
                    .max_elapsed(Duration::from_secs(60)),
            );
            let mut tasks = Vec::new();
            for _ in 0..4 {
                let (db, options) = (db.clone(), options.clone());
                tasks.push(tokio::spawn(increment(db, options, CHILD_INCREMENTS / 4)));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
        other => panic!("unknown child mode {other}"),
    }
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_writing_the_same_file_is_guarded_by_the_busy_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two-processes.db");
    let patient = Db::builder(&format!("sqlite:{}", path.display()))
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    patient
        .execute_script("CREATE TABLE counter (n INTEGER NOT NULL); INSERT INTO counter VALUES (0)")
        .await
        .unwrap();
    let impatient = open(&path, true).await; // busy timeout 1 ms
    let increment = |db: Db| async move {
        db.transaction(|tx| {
            Box::pin(async move {
                tx.query("UPDATE counter SET n = n + 1")
                    .execute(tx.conn())
                    .await?;
                Ok::<_, Error>(())
            })
        })
        .await
    };

    // The other process holds the write lock: the in-process queue knows nothing of it. A
    // busy timeout of 1 ms gives up (the baseline: nothing else guards), 10 s waits it out.
    let child = ChildWriter::start("hold", &path);
    let refused = increment(impatient.clone()).await;
    assert_eq!(
        refused.as_ref().err().and_then(Error::conflict),
        Some(ConflictKind::Busy),
        "{refused:?}"
    );
    let started = std::time::Instant::now();
    increment(patient.clone())
        .await
        .expect("waited for the other process's commit");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "the write went through while the other process held the lock ({:?})",
        started.elapsed()
    );
    child.wait();
    assert_eq!(count(&patient).await, 2, "the child's and ours");

    // Both processes writing at once, with readers here: every increment lands.
    let child = ChildWriter::start("increment", &path);
    let ours = load(&patient).await;
    child.wait();
    assert!(
        ours.failed.is_empty(),
        "{:?}",
        &ours.failed[..ours.failed.len().min(3)]
    );
    assert!(ours.reads > 0);
    assert_eq!(
        count(&patient).await,
        2 + ours.committed + CHILD_INCREMENTS as i64,
        "no lost update between the processes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autocommit_writes_take_the_writer_turn_too() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("autocommit.db"), true).await;
    let increment_by_one = |db: &Db| db.query("UPDATE counter SET n = n + 1");

    // The baseline: a plain autocommit write runs on the session's own connection, beside the
    // queue, and meets the queue's writer in SQLite's busy handler (1 ms busy timeout here: it
    // fails at once instead of sleeping 1, 2, 5, 10 ms ... as it would with the default).
    let release = Arc::new(tokio::sync::Notify::new());
    let holder = hold_a_write(&db, "UPDATE counter SET n = n + 100", release.clone()).await;
    let update = increment_by_one(&db);
    let beside = db
        .session()
        .autocommit(|conn| {
            Box::pin(async move { Ok::<_, Error>(update.execute(conn).await?.rows_affected()) })
        })
        .await;
    assert_eq!(
        beside.as_ref().err().and_then(|e| e.conflict()),
        Some(ConflictKind::Busy),
        "a write beside the queue meets its writer in the busy handler: {beside:?}"
    );
    release.notify_one();
    holder.await.unwrap().unwrap();
    assert_eq!(count(&db).await, 100);

    // Through `write_autocommit` the same write waits for the turn instead, and runs once the
    // transaction holding it has committed.
    let release = Arc::new(tokio::sync::Notify::new());
    let holder = hold_a_write(&db, "UPDATE counter SET n = n + 100", release.clone()).await;
    let update = increment_by_one(&db);
    let mut session = db.session();
    let queued = tokio::spawn(async move {
        session
            .write_autocommit(|conn| {
                Box::pin(async move { Ok::<_, Error>(update.execute(conn).await?.rows_affected()) })
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!queued.is_finished(), "it waits for the turn");
    release.notify_one();
    holder.await.unwrap().unwrap();
    assert_eq!(queued.await.unwrap().unwrap(), 1);
    assert_eq!(count(&db).await, 201, "both writes, one after the other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cancelled_on_the_writer_connection_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("cancel.db"), true).await;
    // A write transaction dropped halfway (its caller went away) while it holds the turn.
    let (db2, entered) = (db.clone(), Arc::new(tokio::sync::Notify::new()));
    let e = entered.clone();
    let task = tokio::spawn(async move {
        db2.transaction(|tx| {
            Box::pin(async move {
                tx.query("UPDATE counter SET n = n + 100")
                    .execute(tx.conn())
                    .await?;
                e.notify_one();
                std::future::pending::<()>().await;
                Ok::<_, Error>(())
            })
        })
        .await
    });
    entered.notified().await;
    task.abort();
    let _ = task.await;
    // The next writers get the turn and a connection without the cancelled transaction's work
    // (`increment` panics if one of them fails).
    increment(db.clone(), TxOptions::new(), 3).await;
    assert_eq!(
        count(&db).await,
        3,
        "the cancelled transaction's update was rolled back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_connections_wal_is_checkpointed_in_the_background() {
    // The dedicated writer connection runs no automatic checkpoint. Background checkpoints copy
    // alongside it and, once the WAL holds 4,096 frames (`CATCH_UP_FRAMES` in db.rs), catch up
    // with the write turn held so that the WAL starts over; a writer that never pauses (this
    // one) would otherwise grow it with every commit. With 512-byte pages, each commit rewrites
    // a 2,000-byte value (5 pages), so 16,000 commits without a checkpoint that catches up make
    // a WAL of 80,000 frames. With it, the WAL stops at 4,096 frames plus what this writer
    // appends while the checkpoints run (a test build writes fast and the disk syncs slowly:
    // 10,000-30,000 frames measured).
    const COMMITS: usize = 16_000;
    const FRAME: u64 = 512 + 24;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.db");
    let mut setup = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
        "sqlite:{}?mode=rwc",
        path.display()
    ))
    .await
    .unwrap();
    sqlx::raw_sql(
        "PRAGMA page_size = 512; PRAGMA journal_mode = WAL; \
         CREATE TABLE pad (b BLOB); INSERT INTO pad VALUES (NULL)",
    )
    .execute(&mut setup)
    .await
    .unwrap();
    sqlx::Connection::close(setup).await.unwrap();
    let db = Db::connect(&format!("sqlite:{}", path.display()))
        .await
        .unwrap();
    let mut session = db.session();
    for _ in 0..COMMITS {
        session
            .transaction(|tx| {
                Box::pin(async move {
                    tx.query("UPDATE pad SET b = randomblob(2000)")
                        .execute(tx.conn())
                        .await?;
                    Ok::<_, Error>(())
                })
            })
            .await
            .unwrap();
    }
    let page_size: i64 = db
        .query_scalar("PRAGMA page_size")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(page_size, 512);
    let wal = std::fs::metadata(dir.path().join("checkpoint.db-wal"))
        .unwrap()
        .len();
    assert!(
        wal < 45_000 * FRAME,
        "the WAL grew to {} frames: no background checkpoint caught up",
        wal / FRAME
    );
}

/// `mxFrame` (frames in the WAL) and `nBackfill` (frames copied into the database file) from
/// the wal-index (`<db>-shm`, native byte order; <https://www.sqlite.org/walformat.html>).
fn wal_index(shm: &std::path::Path) -> (u32, u32) {
    let bytes = std::fs::read(shm).unwrap();
    let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap());
    (u32_at(16), u32_at(96))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_the_wal_is_checkpointed_while_the_writer_is_idle() {
    // A burst of writes past the 1,000th, where a background checkpoint starts: the writes
    // after it append to the WAL while it copies, so it ends with frames left to copy, and the
    // WAL (far below the 4,096 frames of a catch-up with the turn held) cannot start over.
    // Once the writers pause, the rest is checkpointed without anyone's turn: the whole WAL is
    // copied, and the next write starts it over. Before, nothing ran until the next 1,000
    // writes, so the frames stayed uncopied however long the writer paused.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idle.db");
    let db = Db::connect(&format!("sqlite:{}", path.display()))
        .await
        .unwrap();
    db.execute_script("CREATE TABLE t (n INTEGER)")
        .await
        .unwrap();
    let mut writers = Vec::new();
    for w in 0..4_i64 {
        let db = db.clone();
        writers.push(tokio::spawn(async move {
            let mut session = db.session();
            for i in 0..400_i64 {
                session
                    .transaction(|tx| {
                        Box::pin(async move {
                            tx.query("INSERT INTO t VALUES (?)")
                                .bind(w * 1_000 + i)
                                .execute(tx.conn())
                                .await?;
                            Ok::<_, Error>(())
                        })
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let shm = dir.path().join("idle.db-shm");
    let (frames, _) = wal_index(&shm);
    assert!(frames > 1_000, "the burst wrote {frames} frames");
    // Wait (not timed: a slow disk only makes it take longer) for the WAL to be copied whole.
    let mut copied = 0;
    for _ in 0..1_000 {
        let (frames, backfilled) = wal_index(&shm);
        copied = backfilled;
        if frames > 0 && backfilled == frames {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (frames, _) = wal_index(&shm);
    assert_eq!(
        copied, frames,
        "the idle writer's WAL was not checkpointed whole"
    );
    // The next write starts the WAL over.
    db.transaction(|tx| {
        Box::pin(async move {
            tx.query("INSERT INTO t VALUES (-1)")
                .execute(tx.conn())
                .await?;
            Ok::<_, Error>(())
        })
    })
    .await
    .unwrap();
    let (frames, _) = wal_index(&shm);
    assert!(frames < 10, "the WAL did not start over: {frames} frames");
}
