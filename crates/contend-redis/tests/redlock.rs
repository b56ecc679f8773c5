//! Redlock over the five dev servers (`CONTEND_REDLOCK_URLS`), with "stopped" nodes simulated
//! by closed ports: works with 2 of 5 down, refuses with 3 of 5 down, keeps mutual exclusion,
//! and its fencing tokens increase even when successive grants use different majorities.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use contend::Error;
use contend_redis::{LockOptions, Redlock};

fn closed_url() -> String {
    format!("redis://127.0.0.1:{}/0", common::closed_port())
}

/// The five nodes with those at `down` replaced by closed ports.
fn with_down(urls: &[String], down: &[usize]) -> Vec<String> {
    urls.iter()
        .enumerate()
        .map(|(i, u)| {
            if down.contains(&i) {
                closed_url()
            } else {
                u.clone()
            }
        })
        .collect()
}

async fn redlock(urls: &[String], ns: &str) -> Redlock {
    Redlock::builder(urls)
        .namespace(ns)
        .node_timeout(Duration::from_millis(200))
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_with_two_of_five_down_and_keeps_mutual_exclusion() {
    let Some(urls) = common::redlock_urls() else {
        return;
    };
    assert_eq!(urls.len(), 5, "CONTEND_REDLOCK_URLS should name 5 nodes");
    let ns = common::unique_namespace("redlock-2down");
    let nodes = with_down(&urls, &[1, 3]);
    // Two clients, as two processes.
    let clients = [redlock(&nodes, &ns).await, redlock(&nodes, &ns).await];
    assert_eq!(clients[0].quorum(), 3);
    let counter = Arc::new(AtomicU64::new(0));
    let in_section = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let options = LockOptions::new()
        .lease(Duration::from_secs(5))
        .wait(Duration::from_secs(30));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let lock = clients[i % 2].clone();
        let (counter, in_section, overlaps, tokens) = (
            counter.clone(),
            in_section.clone(),
            overlaps.clone(),
            tokens.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                let g = lock
                    .acquire("hot", &options)
                    .await
                    .expect("acquire with 3 of 5 up");
                tokens.lock().unwrap().push(g.fencing_token().get());
                if in_section.fetch_add(1, Ordering::SeqCst) > 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                let v = counter.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                counter.store(v + 1, Ordering::SeqCst);
                in_section.fetch_sub(1, Ordering::SeqCst);
                assert!(g.release().await.unwrap());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        counter.load(Ordering::SeqCst),
        40,
        "lost updates under Redlock"
    );
    assert_eq!(overlaps.load(Ordering::SeqCst), 0);
    let tokens = tokens.lock().unwrap().clone();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens not increasing: {tokens:?}"
    );
}

#[tokio::test]
async fn refuses_with_three_of_five_down_quickly_and_clearly() {
    let Some(urls) = common::redlock_urls() else {
        return;
    };
    let ns = common::unique_namespace("redlock-3down");
    let lock = redlock(&with_down(&urls, &[0, 2, 4]), &ns).await;
    let started = Instant::now();
    let err = lock
        .acquire("k", &LockOptions::new().wait(Duration::from_secs(5)))
        .await
        .expect_err("no majority possible");
    assert!(err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("2 of 5"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Nothing is left behind on the nodes that answered: a full cluster gets the lock at once.
    let full = redlock(&urls, &ns).await;
    let g = full
        .acquire("k", &LockOptions::new().wait(Duration::ZERO))
        .await
        .expect("partial grants were released");
    g.release().await.unwrap();
}

#[tokio::test]
async fn a_held_lock_is_not_granted_and_the_wait_times_out() {
    let Some(urls) = common::redlock_urls() else {
        return;
    };
    let ns = common::unique_namespace("redlock-held");
    let lock = redlock(&urls, &ns).await;
    let g = lock.acquire("k", &LockOptions::new()).await.unwrap();
    let started = Instant::now();
    let err = lock
        .acquire("k", &LockOptions::new().wait(Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LockNotAcquired { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(g.release().await.unwrap());
}

#[tokio::test]
async fn tokens_increase_across_grants_by_different_majorities() {
    let Some(urls) = common::redlock_urls() else {
        return;
    };
    let ns = common::unique_namespace("redlock-fence");
    // Node 0's counter runs far ahead of the others (it served other majorities before).
    let raw = redis::Client::open(urls[0].as_str()).unwrap();
    let mut conn = raw.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{ns}:fence:k"))
        .arg(1000)
        .query_async(&mut conn)
        .await
        .unwrap();
    // First grant by nodes {0, 1, 2}: token from node 0's counter.
    let west = redlock(&with_down(&urls, &[3, 4]), &ns).await;
    let g = west.acquire("k", &LockOptions::new()).await.unwrap();
    let first = g.fencing_token();
    assert_eq!(first.get(), 1001);
    g.release().await.unwrap();
    // Next grant by nodes {2, 3, 4}: they never saw node 0's counter, but node 2 was raised to
    // the first token while the first grant held it, so the new token is larger.
    let east = redlock(&with_down(&urls, &[0, 1]), &ns).await;
    let g = east.acquire("k", &LockOptions::new()).await.unwrap();
    assert!(
        g.fencing_token() > first,
        "{} after {first}",
        g.fencing_token()
    );
    g.release().await.unwrap();
}

#[tokio::test]
async fn watchdog_renews_on_a_majority() {
    let Some(urls) = common::redlock_urls() else {
        return;
    };
    let ns = common::unique_namespace("redlock-renew");
    let lock = redlock(&with_down(&urls, &[4]), &ns).await;
    let lease = Duration::from_millis(300);
    let g = lock
        .acquire("k", &LockOptions::new().lease(lease).watchdog(true))
        .await
        .unwrap();
    tokio::time::sleep(lease * 3).await;
    assert!(!g.is_lost());
    let rival = lock
        .acquire("k", &LockOptions::new().wait(Duration::ZERO))
        .await;
    assert!(matches!(rival, Err(Error::LockNotAcquired { .. })));
    assert!(g.release().await.unwrap());
}
