//! The locks beyond mutual exclusion against a real Redis (`CONTEND_REDIS_URL`): reentrant
//! lock, semaphore, fair lock, read-write lock. Holders that die are real processes: this test
//! binary runs itself as a child (`child_holder`), which takes a lock with the watchdog on,
//! says so on stdout and is then killed (SIGKILL: no release, no more renewals).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contend::Error;
use contend::fencing::FencingToken;
use contend_redis::{FairLock, LockOptions, Owner, ReentrantLock, RwLock, Semaphore};

/// The lease of the children's locks (renewed by their watchdog while they live).
const CHILD_LEASE: Duration = Duration::from_millis(600);

/// A child process of this test binary holding (or waiting for) a lock; killed on drop.
struct ChildHolder(Child);

impl ChildHolder {
    /// Starts `child_holder` doing `kind` on `key` and waits until it prints `READY`.
    fn start(kind: &str, url: &str, ns: &str, key: &str) -> ChildHolder {
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new(exe)
            .args(["--exact", "child_holder", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env("CONTEND_CHILD_KIND", kind)
            .env("CONTEND_CHILD_URL", url)
            .env("CONTEND_CHILD_NS", ns)
            .env("CONTEND_CHILD_KEY", key)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the child holder");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                // libtest prints "test child_holder ... " before the child's own output.
                Some(Ok(line)) if line.trim_end().ends_with("READY") => break,
                Some(Ok(_)) => continue,
                _ => {
                    let _ = child.kill();
                    panic!("the child holder exited before it was ready ({kind})");
                }
            }
        }
        ChildHolder(child)
    }

    /// SIGKILL: the process dies holding what it holds.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildHolder {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Run by the other tests as a child process (does nothing when run directly).
#[tokio::test]
#[ignore = "a child process of the other tests"]
async fn child_holder() {
    let Ok(kind) = std::env::var("CONTEND_CHILD_KIND") else {
        return;
    };
    let var = |name: &str| std::env::var(name).expect("child variable");
    let (url, ns, key) = (
        var("CONTEND_CHILD_URL"),
        var("CONTEND_CHILD_NS"),
        var("CONTEND_CHILD_KEY"),
    );
    let locks = common::client(&url, &ns).await;
    let options = LockOptions::new().lease(CHILD_LEASE).watchdog(true);
    let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    let ready = || {
        use std::io::Write;
        println!("READY");
        std::io::stdout().flush().unwrap();
    };
    match kind.as_str() {
        "reentrant" => {
            let lock = ReentrantLock::new(&locks);
            let owner = Owner::new();
            held.push(Box::new(
                lock.acquire(&key, &owner, &options).await.unwrap(),
            ));
            held.push(Box::new(
                lock.acquire(&key, &owner, &options).await.unwrap(),
            ));
        }
        "semaphore" => {
            let semaphore = Semaphore::new(&locks, &key, 3).unwrap();
            held.push(Box::new(semaphore.acquire(&options).await.unwrap()));
            held.push(Box::new(semaphore.acquire(&options).await.unwrap()));
        }
        "naive-semaphore" => {
            // INCR/DECR counting, as many semaphores on Redis do: two permits taken.
            let raw = redis::Client::open(url.as_str()).unwrap();
            let mut conn = raw.get_multiplexed_async_connection().await.unwrap();
            for _ in 0..2 {
                let taken: i64 = redis::cmd("INCR")
                    .arg(format!("{ns}:naive:{key}"))
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert!(taken <= 3);
            }
        }
        "fair" => {
            let fair = FairLock::new(&locks);
            held.push(Box::new(fair.acquire(&key, &options).await.unwrap()));
        }
        "fair-waiter" | "fair-waiter-forever" => {
            // Queue behind the parent's holder; READY once queued (the attempt returned).
            let timeout = if kind == "fair-waiter" {
                Duration::from_millis(600)
            } else {
                Duration::from_secs(86_400)
            };
            let fair = FairLock::new(&locks).queue_timeout(timeout);
            let long = options.wait(Duration::from_secs(60));
            wait_pending(fair.acquire(&key, &long), ready).await;
            return;
        }
        "reader" => {
            let rw = RwLock::new(&locks);
            held.push(Box::new(rw.read(&key, &options).await.unwrap()));
        }
        "waiting-writer" => {
            let rw = RwLock::new(&locks).intent_timeout(Duration::from_millis(600));
            let long = options.wait(Duration::from_secs(60));
            wait_pending(rw.write(&key, &long), ready).await;
            return;
        }
        other => panic!("unknown child kind {other}"),
    }
    ready();
    tokio::time::sleep(Duration::from_secs(60)).await;
    drop(held);
}

/// Child side of a waiting attempt: checks that `attempt` is still pending after 300 ms (it
/// waits behind the parent's holder), signals READY, then waits for the attempt to end.
async fn wait_pending<T>(attempt: impl std::future::Future<Output = T>, ready: impl FnOnce()) {
    tokio::pin!(attempt);
    tokio::select! {
        _ = &mut attempt => panic!("the child should wait"),
        _ = tokio::time::sleep(Duration::from_millis(300)) => {}
    }
    ready();
    let _ = attempt.await;
}

/// Refused at once (wait 0)?
fn refused<T>(r: contend::Result<T>) -> bool {
    matches!(r, Err(Error::LockNotAcquired { .. }))
}

fn now_only() -> LockOptions {
    LockOptions::new().wait(Duration::ZERO)
}

/// Asserts that the dead child's lock stays held while it lives (renewed past several
/// leases) and is freed within about one lease of its death; returns how long that took.
async fn freed_after_death<T, F, Fut>(child: &mut ChildHolder, mut take: F) -> Duration
where
    F: FnMut(LockOptions) -> Fut,
    Fut: std::future::Future<Output = contend::Result<T>>,
{
    // Alive: the watchdog renews past three leases.
    tokio::time::sleep(CHILD_LEASE * 3).await;
    assert!(
        refused(take(now_only()).await),
        "the living child's lock was not held"
    );
    child.kill();
    let died = Instant::now();
    let got = take(LockOptions::new().wait(CHILD_LEASE * 5)).await;
    let took = died.elapsed();
    assert!(
        got.is_ok(),
        "not freed after the holder died: {:?}",
        got.err()
    );
    assert!(took < CHILD_LEASE * 3, "freed only after {took:?}");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reentrant_lock_nests_counts_and_survives_a_dead_owner() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let ns = common::unique_namespace("reentrant");
    let locks = common::client(&url, &ns).await;
    let lock = ReentrantLock::new(&locks);
    let (me, other) = (Owner::new(), Owner::new());
    let options = LockOptions::new().wait(Duration::from_secs(5));
    let a = lock.acquire("k", &me, &options).await.unwrap();
    let b = lock.acquire("k", &me, &options).await.unwrap();
    let c = lock.acquire("k", &me.clone(), &options).await.unwrap();
    assert_eq!((a.holds(), b.holds(), c.holds()), (1, 2, 3));
    assert_eq!(a.fencing_token(), c.fencing_token());
    assert!(refused(lock.acquire("k", &other, &now_only()).await));
    assert!(c.release().await.unwrap());
    drop(b); // released in a spawned task
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        refused(lock.acquire("k", &other, &now_only()).await),
        "freed before the last hold was released"
    );
    // The other owner waits and is woken by the last release.
    let waiter = {
        let (lock, other) = (lock.clone(), other.clone());
        tokio::spawn(async move {
            lock.acquire(
                "k",
                &other,
                &LockOptions::new().wait(Duration::from_secs(5)),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let first = a.fencing_token();
    assert!(a.release().await.unwrap());
    let theirs = waiter.await.unwrap().expect("woken by the release");
    assert_eq!(theirs.holds(), 1);
    assert!(theirs.fencing_token() > first);
    theirs.release().await.unwrap();

    // A dead owner's nested holds all end with its lease.
    let mut child = ChildHolder::start("reentrant", &url, &ns, "dead");
    freed_after_death(&mut child, |o| {
        let (lock, other) = (lock.clone(), other.clone());
        async move { lock.acquire("dead", &other, &o).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_bounds_holders_and_a_dead_client_leaks_no_permit() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let ns = common::unique_namespace("semaphore");
    let clients = [
        common::client(&url, &ns).await,
        common::client(&url, &ns).await,
    ];
    // Twelve tasks in two "processes" share three permits.
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..12 {
        let semaphore = Semaphore::new(&clients[i % 2], "pool", 3).unwrap();
        let (inside, most) = (inside.clone(), most.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..4 {
                let permit = semaphore
                    .acquire(&LockOptions::new().wait(Duration::from_secs(20)))
                    .await
                    .expect("permit");
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                assert!(permit.release().await.unwrap());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        3,
        "more (or fewer) than 3 holders"
    );

    // A client that dies holding 2 of 3 permits: they come back with their lease.
    let semaphore = Semaphore::new(&clients[0], "dead", 3).unwrap();
    let mut child = ChildHolder::start("semaphore", &url, &ns, "dead");
    let mine = semaphore
        .acquire(&now_only())
        .await
        .expect("the third permit");
    freed_after_death(&mut child, |o| {
        let semaphore = semaphore.clone();
        async move { semaphore.acquire(&o).await }
    })
    .await;
    // Both came back: with ours, three permits can be held again, and no fourth.
    let soon = LockOptions::new().wait(Duration::from_secs(1));
    let again = semaphore.acquire(&soon).await.expect("the first came back");
    let again2 = semaphore
        .acquire(&soon)
        .await
        .expect("the second came back");
    assert!(refused(semaphore.acquire(&now_only()).await), "4 permits");
    drop((mine, again, again2));

    // The naive INCR/DECR semaphore under the same death leaks both permits for good.
    let mut child = ChildHolder::start("naive-semaphore", &url, &ns, "dead");
    child.kill();
    tokio::time::sleep(CHILD_LEASE * 3).await;
    let raw = redis::Client::open(url.as_str()).unwrap();
    let mut conn = raw.get_multiplexed_async_connection().await.unwrap();
    let taken: i64 = redis::cmd("GET")
        .arg(format!("{ns}:naive:dead"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(taken, 2, "the naive semaphore should have leaked 2 permits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_lock_grants_in_arrival_order_across_processes() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let ns = common::unique_namespace("fair");
    let clients = [
        common::client(&url, &ns).await,
        common::client(&url, &ns).await,
    ];
    let fair = [FairLock::new(&clients[0]), FairLock::new(&clients[1])];
    let holder = fair[0].acquire("k", &LockOptions::new()).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (fair, order) = (fair[i % 2].clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let guard = fair
                .acquire("k", &LockOptions::new().wait(Duration::from_secs(10)))
                .await
                .expect("fair acquire");
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(5)).await;
            guard.release().await.unwrap();
        }));
        // Let each waiter join the queue before the next arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    holder.release().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);

    // The holder dies: the head of the queue gets the lock after its lease.
    let mut child = ChildHolder::start("fair", &url, &ns, "dead");
    freed_after_death(&mut child, |o| {
        let fair = fair[0].clone();
        async move { fair.acquire("dead", &o).await }
    })
    .await;
}

/// A waiter that vanishes (killed while queued, at the head) delays the next one by its queue
/// timeout; with heartbeats that do not expire (a one-day queue timeout, as if waiters had no
/// timeout of their own) the queue hangs on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_lock_does_not_hang_on_a_vanished_waiter() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let ns = common::unique_namespace("fair-vanished");
    let locks = common::client(&url, &ns).await;
    let fair = FairLock::new(&locks).queue_timeout(Duration::from_millis(600));
    for (kind, should_get_it) in [("fair-waiter", true), ("fair-waiter-forever", false)] {
        let key = format!("k-{kind}");
        let holder = fair.acquire(&key, &LockOptions::new()).await.unwrap();
        let mut child = ChildHolder::start(kind, &url, &ns, &key);
        // Queued behind the child.
        let next = {
            let (fair, key) = (fair.clone(), key.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let got = fair
                    .acquire(&key, &LockOptions::new().wait(Duration::from_secs(3)))
                    .await;
                (got, started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        child.kill();
        holder.release().await.unwrap();
        let (got, waited) = next.await.unwrap();
        if should_get_it {
            let guard = got.expect("the next waiter gets the lock");
            assert!(waited < Duration::from_millis(2500), "waited {waited:?}");
            guard.release().await.unwrap();
        } else {
            assert!(
                refused(got),
                "without expiring heartbeats the dead waiter should block the queue"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rw_lock_shares_reads_excludes_writes_and_prefers_writers() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let ns = common::unique_namespace("rw");
    let clients = [
        common::client(&url, &ns).await,
        common::client(&url, &ns).await,
    ];
    let rw = [RwLock::new(&clients[0]), RwLock::new(&clients[1])];
    let a = rw[0].read("k", &now_only()).await.expect("reader a");
    let b = rw[1].read("k", &now_only()).await.expect("reader b shares");
    assert!(refused(rw[0].write("k", &now_only()).await));
    drop((a, b));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let w = rw[1].write("k", &now_only()).await.expect("writer");
    assert!(refused(rw[0].read("k", &now_only()).await));
    assert!(refused(rw[0].write("k", &now_only()).await));
    w.release().await.unwrap();

    // Writer preference: readers overlap continuously from two processes; a writer still gets
    // in while they keep coming, and no reader is inside with it.
    let stop = Arc::new(AtomicBool::new(false));
    let writer_in = Arc::new(AtomicBool::new(false));
    let readers_inside = Arc::new(AtomicUsize::new(0));
    let violations = Arc::new(AtomicUsize::new(0));
    let reads = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let lock = rw[i % 2].clone();
        let (stop, writer_in, inside, violations, reads) = (
            stop.clone(),
            writer_in.clone(),
            readers_inside.clone(),
            violations.clone(),
            reads.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let guard = lock
                    .read("hot", &LockOptions::new().wait(Duration::from_secs(10)))
                    .await
                    .expect("read");
                inside.fetch_add(1, Ordering::SeqCst);
                if writer_in.load(Ordering::SeqCst) {
                    violations.fetch_add(1, Ordering::SeqCst);
                }
                reads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                guard.release().await.unwrap();
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let w = rw[0]
        .write("hot", &LockOptions::new().wait(Duration::from_secs(5)))
        .await
        .expect("the writer starved");
    writer_in.store(true, Ordering::SeqCst);
    assert_eq!(
        readers_inside.load(Ordering::SeqCst),
        0,
        "readers with the writer"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    writer_in.store(false, Ordering::SeqCst);
    w.release().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(violations.load(Ordering::SeqCst), 0);
    assert!(
        reads.load(Ordering::SeqCst) > 8,
        "the readers did not overlap"
    );

    // A dead reader keeps the writer out only until its lease ends.
    let mut child = ChildHolder::start("reader", &url, &ns, "dead-reader");
    freed_after_death(&mut child, |o| {
        let rw = rw[0].clone();
        async move { rw.write("dead-reader", &o).await }
    })
    .await;

    // A writer that dies while waiting keeps readers out only until its intent expires.
    let reader = rw[0].read("dead-writer", &now_only()).await.unwrap();
    let mut child = ChildHolder::start("waiting-writer", &url, &ns, "dead-writer");
    assert!(
        refused(rw[1].read("dead-writer", &now_only()).await),
        "a waiting writer should keep new readers out"
    );
    child.kill();
    let second = rw[1]
        .read(
            "dead-writer",
            &LockOptions::new().wait(Duration::from_secs(3)),
        )
        .await
        .expect("readers get in once the dead writer's intent expired");
    drop((reader, second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_reports_the_loss_of_an_expired_lease() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let ns = common::unique_namespace("kinds-loss");
    let locks = common::client(&url, &ns).await;
    let short = LockOptions::new().lease(Duration::from_millis(150));
    let reentrant = ReentrantLock::new(&locks)
        .acquire("r", &Owner::new(), &short)
        .await
        .unwrap();
    let permit = Semaphore::new(&locks, "s", 1)
        .unwrap()
        .acquire(&short)
        .await
        .unwrap();
    let fair = FairLock::new(&locks).acquire("f", &short).await.unwrap();
    let read = RwLock::new(&locks).read("rw", &short).await.unwrap();
    let lost = [
        tokio::spawn(reentrant.lost()),
        tokio::spawn(permit.lost()),
        tokio::spawn(fair.lost()),
        tokio::spawn(read.lost()),
    ];
    assert!(!reentrant.is_lost() && !permit.is_lost() && !fair.is_lost() && !read.is_lost());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(reentrant.is_lost() && permit.is_lost() && fair.is_lost() && read.is_lost());
    for l in lost {
        tokio::time::timeout(Duration::from_secs(1), l)
            .await
            .expect("lost() completed")
            .unwrap();
    }
    // Expired in Redis too: renewal fails, others get in, the late release says so.
    assert!(!permit.extend(Duration::from_secs(1)).await.unwrap());
    let other = RwLock::new(&locks).write("rw", &now_only()).await;
    assert!(
        other.is_ok(),
        "the expired reader still keeps the writer out"
    );
    assert!(!read.release().await.unwrap());
    assert!(!fair.release().await.unwrap());
    assert!(!reentrant.release().await.unwrap());
}

#[tokio::test]
async fn bad_input_is_refused_clearly() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let locks = common::client(&url, &common::unique_namespace("kinds-input")).await;
    let err = Semaphore::new(&locks, "s", 0).unwrap_err();
    assert!(err.to_string().contains("at least one permit"), "{err}");
    assert!(Semaphore::new(&locks, "", 1).is_err());
    let err = FairLock::new(&locks)
        .queue_timeout(Duration::from_millis(1))
        .acquire("f", &LockOptions::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("queue timeout"), "{err}");
    let err = RwLock::new(&locks)
        .intent_timeout(Duration::ZERO)
        .write("w", &LockOptions::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("intent timeout"), "{err}");
}

/// A reentrant lock's fencing counter that went back (the key deleted, as a Redis restarted
/// without persistence loses it) hands out a token the database has already seen; the owner
/// raises it past the database's highest while it holds the lock, and the next outermost hold
/// gets a newer token than any before.
#[tokio::test]
async fn reentrant_fence_counter_that_went_back_is_raised() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let ns = common::unique_namespace("reentrant-raise");
    let locks = common::client(&url, &ns).await;
    let lock = ReentrantLock::new(&locks);
    let me = Owner::new();
    let options = LockOptions::new().wait(Duration::from_secs(5));
    let mut highest = FencingToken::new(0);
    for _ in 0..3 {
        let hold = lock.acquire("k", &me, &options).await.unwrap();
        assert!(hold.fencing_token() > highest);
        highest = hold.fencing_token();
        hold.release().await.unwrap();
    }
    let deleted = common::forget(&url, &format!("{ns}:reentrant:fence:k")).await;
    assert_eq!(deleted, 1, "the counter key is where the test expects it");
    let stale = lock.acquire("k", &me, &options).await.unwrap();
    assert!(stale.fencing_token() < highest, "the counter went back");
    assert!(stale.raise_fence(highest).await.unwrap());
    stale.release().await.unwrap();
    let next = lock.acquire("k", &me, &options).await.unwrap();
    assert!(
        next.fencing_token() > highest,
        "{:?} after raising past {highest:?}",
        next.fencing_token()
    );
    next.release().await.unwrap();
}
