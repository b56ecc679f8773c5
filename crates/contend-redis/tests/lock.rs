//! The single-node lock against a real Redis (`CONTEND_REDIS_URL`): mutual exclusion under
//! contention (and the unlocked baseline losing updates), crashed holders, non-owner release,
//! wait timeouts, renewal, loss detection, release on drop, unreachable servers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use contend::Error;
use contend_redis::{LockClient, LockOptions};

/// Increments `counter` non-atomically: read, pause, write. Two overlapping calls lose one.
async fn unsafe_increment(counter: &AtomicU64, in_section: &AtomicUsize, overlaps: &AtomicUsize) {
    if in_section.fetch_add(1, Ordering::SeqCst) > 0 {
        overlaps.fetch_add(1, Ordering::SeqCst);
    }
    let v = counter.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1)).await;
    counter.store(v + 1, Ordering::SeqCst);
    in_section.fetch_sub(1, Ordering::SeqCst);
}

const TASKS: usize = 32;
const ROUNDS: u64 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_under_contention_and_the_unlocked_baseline_breaks() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let ns = common::unique_namespace("mutex");
    // Two clients: waiters in two "processes" compete through Redis, not only in-process.
    let clients = [
        common::client(&url, &ns).await,
        common::client(&url, &ns).await,
    ];
    let counter = Arc::new(AtomicU64::new(0));
    let in_section = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let options = LockOptions::new()
        .lease(Duration::from_secs(5))
        .wait(Duration::from_secs(20));
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let locks = clients[i % 2].clone();
        let (counter, in_section, overlaps, tokens) = (
            counter.clone(),
            in_section.clone(),
            overlaps.clone(),
            tokens.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = locks.acquire("counter", &options).await.expect("acquire");
                tokens.lock().unwrap().push(guard.fencing_token().get());
                unsafe_increment(&counter, &in_section, &overlaps).await;
                assert!(guard.release().await.expect("release"), "lock was lost");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let expected = TASKS as u64 * ROUNDS;
    assert_eq!(
        counter.load(Ordering::SeqCst),
        expected,
        "lost updates under the lock"
    );
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders at once");
    // Every grant carried a distinct token, in grant order (the vector was filled under the
    // lock, so its order is the grant order).
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len() as u64, expected);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens not increasing"
    );

    // The same load without the lock loses updates.
    let counter = Arc::new(AtomicU64::new(0));
    let in_section = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (counter, in_section, overlaps) =
            (counter.clone(), in_section.clone(), overlaps.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                unsafe_increment(&counter, &in_section, &overlaps).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert!(
        counter.load(Ordering::SeqCst) < expected,
        "the unlocked baseline should lose updates"
    );
    assert!(overlaps.load(Ordering::SeqCst) > 0);
}

#[tokio::test]
async fn crashed_holder_is_replaced_after_its_lease() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let locks = common::client(&url, &common::unique_namespace("crash")).await;
    let lease = Duration::from_millis(300);
    let crashed = locks
        .acquire("job", &LockOptions::new().lease(lease))
        .await
        .expect("first holder");
    let first_token = crashed.fencing_token();
    let taken_at = Instant::now();
    // A crash: no release, no renewal (the guard's drop never runs).
    std::mem::forget(crashed);
    let options = LockOptions::new().lease(lease).wait(Duration::from_secs(3));
    let next = locks
        .acquire("job", &options)
        .await
        .expect("replaced after the lease");
    let waited = taken_at.elapsed();
    assert!(
        waited >= lease - Duration::from_millis(50),
        "taken over early: {waited:?}"
    );
    // Woken by the holder's lease end (the PTTL the failed attempt returned), not by polling
    // or the wait limit.
    assert!(
        waited < lease + Duration::from_millis(500),
        "woke late: {waited:?}"
    );
    assert!(next.fencing_token() > first_token);
    next.release().await.unwrap();
}

#[tokio::test]
async fn release_by_a_non_owner_is_refused() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let ns = common::unique_namespace("owner");
    let locks = common::client(&url, &ns).await;
    let short = LockOptions::new().lease(Duration::from_millis(100));
    let old = locks.acquire("doc", &short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(old.is_lost(), "validity ran out");
    let current = locks
        .acquire("doc", &LockOptions::new().lease(Duration::from_secs(5)))
        .await
        .unwrap();
    // The expired holder's release must not delete the current holder's lock.
    assert!(
        !old.release().await.unwrap(),
        "a non-owner released the lock"
    );
    let other = locks.try_acquire("doc", &LockOptions::new()).await.unwrap();
    assert!(other.is_none(), "lock was deleted by the non-owner");
    // And the key still carries the current owner's token: extending works.
    assert!(current.extend(Duration::from_secs(5)).await.unwrap());
    assert!(current.release().await.unwrap());
}

#[tokio::test]
async fn wait_timeout_gives_lock_not_acquired() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let locks = common::client(&url, &common::unique_namespace("timeout")).await;
    let held = locks
        .acquire("busy", &LockOptions::new().lease(Duration::from_secs(10)))
        .await
        .unwrap();
    let started = Instant::now();
    let wait = Duration::from_millis(250);
    let err = locks
        .acquire("busy", &LockOptions::new().wait(wait))
        .await
        .expect_err("must time out");
    let took = started.elapsed();
    assert!(
        matches!(&err, Error::LockNotAcquired { key, .. } if key == "busy"),
        "{err}"
    );
    assert!(!err.is_unavailable());
    assert!(
        took >= wait && took < wait + Duration::from_millis(500),
        "{took:?}"
    );
    // Zero wait: one attempt.
    let once = locks
        .acquire("busy", &LockOptions::new().wait(Duration::ZERO))
        .await;
    assert!(matches!(once, Err(Error::LockNotAcquired { .. })));
    held.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_a_long_critical_section_safe_and_without_it_the_lock_is_taken() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let ns = common::unique_namespace("renew");
    let (a, b) = (
        common::client(&url, &ns).await,
        common::client(&url, &ns).await,
    );
    let lease = Duration::from_millis(200);
    for watchdog in [true, false] {
        let key = format!("long-{watchdog}");
        let holder = a
            .acquire(&key, &LockOptions::new().lease(lease).watchdog(watchdog))
            .await
            .unwrap();
        // Another client keeps trying while the holder works for five leases.
        let stop = Arc::new(AtomicBool::new(false));
        let rival = {
            let (b, key, stop) = (b.clone(), key.clone(), stop.clone());
            tokio::spawn(async move {
                let options = LockOptions::new()
                    .lease(Duration::from_secs(5))
                    .wait(Duration::from_millis(100));
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(g) = b.acquire(&key, &options).await {
                        return Some(g);
                    }
                }
                None
            })
        };
        tokio::time::sleep(lease * 5).await;
        stop.store(true, Ordering::SeqCst);
        let stolen = rival.await.unwrap();
        if watchdog {
            assert!(stolen.is_none(), "the lock was taken while renewed");
            assert!(!holder.is_lost());
            assert!(holder.release().await.unwrap());
        } else {
            // The baseline: without renewal the lease runs out and the rival gets in.
            let stolen = stolen.expect("without renewal the lock should be taken");
            assert!(holder.is_lost());
            assert!(!holder.release().await.unwrap());
            stolen.release().await.unwrap();
        }
    }
}

#[tokio::test]
async fn renewal_failure_is_observable_by_the_holder() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let ns = common::unique_namespace("lost");
    let locks = common::client(&url, &ns).await;
    let lease = Duration::from_millis(300);
    let guard = locks
        .acquire("victim", &LockOptions::new().lease(lease).watchdog(true))
        .await
        .unwrap();
    let lost = guard.lost();
    // Someone deletes the lock behind the holder's back (an operator, a failover without
    // replication), and another client takes it.
    let raw = redis::Client::open(url.as_str()).unwrap();
    let mut conn = raw.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{ns}:lock:victim"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let usurper = locks
        .try_acquire("victim", &LockOptions::new())
        .await
        .unwrap();
    assert!(usurper.is_some());
    // The watchdog's next renewal finds the lock taken: the holder learns within a period.
    let noticed = tokio::time::timeout(lease, lost).await;
    assert!(noticed.is_ok(), "lost() did not fire");
    assert!(guard.is_lost());
    assert!(!guard.release().await.unwrap());
    usurper.unwrap().release().await.unwrap();
}

#[tokio::test]
async fn dropping_the_guard_releases_the_lock() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let locks = common::client(&url, &common::unique_namespace("drop")).await;
    let options = LockOptions::new().lease(Duration::from_secs(30));
    {
        let _guard = locks.acquire("k", &options).await.unwrap();
    }
    let started = Instant::now();
    let again = locks
        .acquire("k", &options.wait(Duration::from_secs(2)))
        .await
        .expect("released on drop");
    assert!(started.elapsed() < Duration::from_secs(1));
    again.release().await.unwrap();
}

#[tokio::test]
async fn acquire_works_inside_tokio_spawn() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let locks = common::client(&url, &common::unique_namespace("send")).await;
    let handle = tokio::spawn(async move {
        let g = locks.acquire("spawned", &LockOptions::new()).await?;
        g.release().await
    });
    assert!(handle.await.unwrap().unwrap());
}

#[tokio::test]
async fn unreachable_redis_and_bad_input_give_clear_errors() {
    let started = Instant::now();
    let url = format!("redis://127.0.0.1:{}/0", common::closed_port());
    let err = LockClient::connect(&url)
        .await
        .expect_err("nothing listens there");
    assert!(err.is_unavailable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(err.to_string().contains("127.0.0.1"), "{err}");

    let err = LockClient::connect("http://127.0.0.1:1").await.unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");

    let Some(url) = common::redis_url() else {
        return;
    };
    let locks = common::client(&url, &common::unique_namespace("input")).await;
    assert!(locks.acquire("", &LockOptions::new()).await.is_err());
    let bad_lease = LockOptions::new().lease(Duration::ZERO);
    assert!(locks.acquire("k", &bad_lease).await.is_err());
}
