//! The etcd lock against the shared cluster (`CONTEND_ETCD_URLS`): mutual exclusion under
//! concurrency (and the unlocked baseline breaking under the same load), a paused holder's late
//! write refused by the fence, and the strategy executor's `etcd` strategy.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use contend::fencing::{self, FencingToken};
use contend::strategy::{Executor, Operation, Strategy};
use contend::{BoxFuture, Db, Tx};
use contend_etcd::{EtcdError, EtcdLocks};
use contend_test_support::{env_urls, suffix};

fn urls() -> Option<Vec<String>> {
    env_urls("CONTEND_ETCD_URLS")
}

async fn client(urls: &[String], namespace: &str) -> EtcdLocks {
    EtcdLocks::builder(urls)
        .namespace(namespace)
        .wait(Duration::from_secs(30))
        .connect()
        .await
        .expect("connect to etcd")
}

/// A read-yield-write on a shared register by `tasks` tasks over `clients` clients (each one a
/// "process" with its own lease), `rounds` times each, under the lock when `locks` is given.
/// Returns (final value, most tasks seen inside the critical section at once).
async fn hammer(locks: Option<Vec<EtcdLocks>>, tasks: usize, rounds: usize) -> (i64, u64) {
    let register = Arc::new(AtomicI64::new(0));
    let inside = Arc::new(AtomicU64::new(0));
    let most = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let lock = locks.as_ref().map(|l| l[t % l.len()].clone());
        let (register, inside, most) = (register.clone(), inside.clone(), most.clone());
        handles.push(tokio::spawn(async move {
            for _ in 0..rounds {
                let guard = match &lock {
                    Some(l) => Some(l.acquire("counter").await.expect("acquire")),
                    None => None,
                };
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let read = register.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                register.store(read + 1, Ordering::SeqCst);
                inside.fetch_sub(1, Ordering::SeqCst);
                if let Some(g) = guard {
                    assert!(
                        g.release().await.expect("release"),
                        "released a lock it held"
                    );
                }
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    (register.load(Ordering::SeqCst), most.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_exclusion_and_the_unlocked_baseline_breaking() {
    let Some(urls) = urls() else { return };
    let (tasks, rounds) = (16, 5);
    let expected = (tasks * rounds) as i64;

    // The same load without the lock loses updates and overlaps.
    let (value, most) = hammer(None, tasks, rounds).await;
    assert!(
        value < expected && most > 1,
        "the unlocked baseline should break: {value} of {expected}, {most} inside at once"
    );

    let ns = format!("t-{}", suffix());
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(client(&urls, &ns).await);
    }
    let before: u64 = clients.iter().map(EtcdLocks::requests).sum();
    let (value, most) = hammer(Some(clients.clone()), tasks, rounds).await;
    assert_eq!(value, expected, "an update was lost under the etcd lock");
    assert_eq!(most, 1, "two holders were inside at once");
    // Waiters are woken by a watch, not by polling: at most 4 requests per acquisition (lock,
    // watch, range when woken, unlock) however long they waited, plus a few keepalives.
    let sent: u64 = clients.iter().map(EtcdLocks::requests).sum::<u64>() - before;
    let per = sent as f64 / expected as f64;
    println!("{sent} requests for {expected} acquisitions: {per:.2} per acquisition");
    assert!(per < 4.5, "{per:.2} requests per acquisition: polling?");
}

#[tokio::test]
async fn uncontended_lock_is_one_request_and_release_one_more() {
    let Some(urls) = urls() else { return };
    let locks = client(&urls, &format!("t-{}", suffix())).await;
    // The first acquisition grants the lease.
    locks
        .acquire("warm")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let before = locks.requests();
    let first = locks.acquire("k/1").await.unwrap();
    assert_eq!(locks.requests() - before, 1, "one transaction to lock");
    let token = first.fencing_token();
    assert!(first.release().await.unwrap());
    assert_eq!(locks.requests() - before, 2, "one delete to release");
    // A later grant of the same lock has a larger token; `k/1` and `k%2F1` are different locks.
    let second = locks.acquire("k/1").await.unwrap();
    let other = locks.acquire("k%2F1").await.unwrap();
    assert!(second.fencing_token() > token);
    assert!(!second.is_lost());
    drop(second); // released in a spawned task
    drop(other);
    let third = locks.acquire("k/1").await.unwrap();
    assert!(third.fencing_token() > token);
    third.release().await.unwrap();
}

#[tokio::test]
async fn a_lock_held_elsewhere_times_out_and_leaves_nothing_behind() {
    let Some(urls) = urls() else { return };
    let ns = format!("t-{}", suffix());
    let (a, b) = (client(&urls, &ns).await, client(&urls, &ns).await);
    let held = a.acquire("busy").await.unwrap();
    let waited = b.acquire_within("busy", Duration::from_millis(300)).await;
    assert!(
        matches!(waited, Err(contend::Error::LockNotAcquired { ref key, .. }) if key == "busy"),
        "{waited:?}"
    );
    // A waiter dropped mid-wait leaves no key behind: after the holder releases, a third
    // acquisition is granted at once.
    let dropped = tokio::time::timeout(Duration::from_millis(200), b.acquire("busy")).await;
    assert!(dropped.is_err(), "the lock was granted while held");
    held.release().await.unwrap();
    let next = b.acquire_within("busy", Duration::from_secs(5)).await;
    assert!(
        next.is_ok(),
        "a dropped or timed-out waiter blocked the lock: {next:?}"
    );
}

#[tokio::test]
async fn bad_settings_are_refused_clearly() {
    for (urls, needle) in [
        (vec![], "no etcd URL"),
        (vec!["127.0.0.1:2379".to_string()], "not an etcd client URL"),
        (vec!["https://127.0.0.1:2379".to_string()], "TLS"),
    ] {
        let e = EtcdLocks::builder(&urls).connect().await.unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }
    let e = EtcdLocks::builder(&["http://127.0.0.1:2379"])
        .lease_ttl(Duration::from_millis(500))
        .connect()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("at least 1 s"), "{e}");
    // Nobody listens on a port just released: a clear error within the request timeout.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::time::Instant::now();
    let e = EtcdLocks::builder(&[format!("http://127.0.0.1:{port}")])
        .request_timeout(Duration::from_millis(800))
        .connect()
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(e.to_string().contains("etcd unavailable"), "{e}");
}

async fn account_db(dir: &tempfile::TempDir) -> Db {
    let db = Db::connect(&format!("sqlite:{}", dir.path().join("t.db").display()))
        .await
        .unwrap();
    fencing::ensure_schema(&db).await.unwrap();
    db.execute_script(
        "CREATE TABLE account (id INTEGER PRIMARY KEY, balance BIGINT NOT NULL);
         INSERT INTO account VALUES (1, 100), (2, 100);",
    )
    .await
    .unwrap();
    db
}

async fn balance(db: &Db, id: i64) -> i64 {
    let q = db
        .query("SELECT balance FROM account WHERE id = ?")
        .bind(id);
    let mut conn = db.acquire().await.unwrap();
    sqlx::Row::get(&q.fetch_one(&mut *conn).await.unwrap(), 0)
}

/// Sets account `id` to `value`, fenced with `token` on `resource` when given.
async fn write(db: &Db, id: i64, value: i64, fence: Option<FencingToken>) -> contend::Result<()> {
    db.transaction(move |tx| {
        Box::pin(async move {
            if let Some(token) = fence {
                fencing::fence(tx, "account:1", token).await?;
            }
            let q = tx.query("UPDATE account SET balance = ? WHERE id = ?");
            q.bind(value).bind(id).execute(tx.conn()).await?;
            Ok::<_, contend::Error>(())
        })
    })
    .await
}

/// A holder that pauses (its whole runtime stops: no keepalive) past its lease loses the lock;
/// the next holder gets a larger revision and writes; the first one's late write is refused by
/// the fence, where the same late write without the fence overwrites the second holder's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holders_late_write_is_refused_by_the_fence() {
    let Some(urls) = urls() else { return };
    let ns = format!("t-{}", suffix());
    let dir = tempfile::tempdir().unwrap();
    let db = account_db(&dir).await;

    // Holder A lives in a runtime of its own on its own thread: blocking that thread pauses
    // everything A does, its lease keepalive included, as a GC or scheduler pause would.
    let (granted_tx, granted_rx) = std::sync::mpsc::channel();
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
    let a_urls = urls.clone();
    let a_ns = ns.clone();
    let holder = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let guard = rt.block_on(async {
            let a = EtcdLocks::builder(&a_urls)
                .namespace(&a_ns)
                .lease_ttl(Duration::from_secs(2))
                .connect()
                .await
                .unwrap();
            a.acquire("account:1").await.unwrap()
        });
        granted_tx.send(guard.fencing_token()).unwrap();
        // The pause: the runtime is not driven until B has taken the lock and written.
        resume_rx.recv().unwrap();
        let lost_at_once = guard.is_lost();
        let lost_signal =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(1), guard.lost()).await });
        (guard.fencing_token(), lost_at_once, lost_signal.is_ok())
    });

    let token_a = tokio::task::spawn_blocking(move || granted_rx.recv().unwrap())
        .await
        .unwrap();
    // A read 100 before its pause and means to write 90 (withdraw 10).
    // B waits for the lock: granted only once A's lease has expired.
    let b = client(&urls, &ns).await;
    let started = std::time::Instant::now();
    let guard_b = b
        .acquire("account:1")
        .await
        .expect("B gets the lock after A's lease expires");
    println!("B waited {:?} for A's lease to expire", started.elapsed());
    assert!(guard_b.fencing_token() > token_a);
    write(&db, 1, 70, Some(guard_b.fencing_token()))
        .await
        .unwrap(); // B withdraws 30
    guard_b.release().await.unwrap();

    resume_tx.send(()).unwrap();
    let (token, lost_at_once, lost_signal) =
        tokio::task::spawn_blocking(move || holder.join().unwrap())
            .await
            .unwrap();
    assert!(
        lost_at_once,
        "A's guard must know its lease ran out during the pause"
    );
    assert!(lost_signal, "A's lost() must complete");

    // A's late write, fenced: refused, B's write stands.
    let late = write(&db, 1, 90, Some(token)).await;
    assert!(
        matches!(late, Err(contend::Error::StaleFencingToken { .. })),
        "the paused holder's write must be refused: {late:?}"
    );
    assert_eq!(balance(&db, 1).await, 70);

    // The baseline: the same late write without the fence (account 2 went through the same
    // story) overwrites the other holder's withdrawal.
    write(&db, 2, 70, None).await.unwrap();
    write(&db, 2, 90, None).await.unwrap();
    assert_eq!(
        balance(&db, 2).await,
        90,
        "without the fence the late write wins"
    );
}

/// `counter += 1` as an operation, to run under the executor's `etcd` strategy.
struct Increment;

impl Operation for Increment {
    type State = i64;
    type Output = i64;
    type Error = contend::Error;

    fn keys(&self) -> Vec<String> {
        vec!["account:1".into()]
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut sqlx::AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, contend::Result<i64>> {
        Box::pin(async move {
            let sql = format!("SELECT balance FROM account WHERE id = 1{lock}");
            Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(conn)
                .await?)
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        n: &'c i64,
        _checked: bool,
    ) -> BoxFuture<'c, contend::Result<i64>> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let q = tx.query("UPDATE account SET balance = ? WHERE id = 1");
            q.bind(n + 1).execute(tx.conn()).await?;
            Ok(n + 1)
        })
    }
}

async fn run_many(executor: &Executor, db: &Db, strategy: Strategy, n: usize) -> usize {
    let mut handles = Vec::new();
    for _ in 0..n {
        let (executor, db) = (executor.clone(), db.clone());
        handles.push(tokio::spawn(async move {
            let mut session = db.session();
            executor
                .run(strategy, &mut session, Arc::new(Increment))
                .await
                .result
                .is_ok()
        }));
    }
    let mut ok = 0;
    for h in handles {
        ok += usize::from(h.await.unwrap());
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_executor_runs_operations_under_the_etcd_strategy() {
    let Some(urls) = urls() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = account_db(&dir).await;
    let locks = client(&urls, &format!("t-{}", suffix())).await;
    let executor: Executor = Executor::new().lock_service(Strategy::Etcd, Arc::new(locks));
    assert!(executor.check(Strategy::Etcd, db.backend()).is_ok());
    let unconfigured: Executor = Executor::new();
    assert!(unconfigured.check(Strategy::Etcd, db.backend()).is_err());

    // The unsafe baseline under the same load loses increments.
    db.execute_script("UPDATE account SET balance = 0 WHERE id = 1")
        .await
        .unwrap();
    let ok = run_many(&executor, &db, Strategy::None, 20).await;
    assert!(
        (balance(&db, 1).await as usize) < ok,
        "the baseline should lose updates"
    );

    db.execute_script("UPDATE account SET balance = 0 WHERE id = 1")
        .await
        .unwrap();
    let ok = run_many(&executor, &db, Strategy::Etcd, 20).await;
    assert_eq!(ok, 20);
    assert_eq!(
        balance(&db, 1).await,
        20,
        "an increment was lost under `etcd`"
    );
    let fenced = fencing::highest(&db, "account:1").await.unwrap();
    assert!(fenced.is_some_and(|t| t.get() > 0), "writes were fenced");
}

#[test]
fn errors_read_clearly() {
    let e = EtcdError::NoQuorum {
        what: "lock",
        waited_ms: 2000,
    };
    assert!(e.to_string().contains("no quorum"));
    let e: contend::Error = e.into();
    assert!(matches!(e, contend::Error::LockService(_)));
}
