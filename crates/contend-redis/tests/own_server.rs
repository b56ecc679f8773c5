//! Tests on redis-server processes of our own (the shared dev servers are never stopped, and
//! their command statistics are polluted by other test runs): commands per acquisition under
//! contention against the spin-lock baseline, and a server killed mid-run.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use contend_redis::{LockClient, LockOptions, SpinLock, command_count};

enum Held {
    Lock(contend_redis::LockGuard),
    Spin(contend_redis::SpinGuard),
}

impl Held {
    async fn release(self) -> contend::Result<bool> {
        match self {
            Held::Lock(g) => g.release().await,
            Held::Spin(g) => g.release().await,
        }
    }
}

const CONTENDERS: usize = 24;
const ROUNDS: usize = 6;

/// Runs CONTENDERS tasks that each take a lock `rounds` times around a short critical section,
/// asserting one holder at a time; task `i` acquires with `acquirer(i)`. Returns the number of
/// acquisitions.
async fn run_contenders<A, Fut>(rounds: usize, acquirer: impl Fn(usize) -> A) -> u64
where
    A: Fn(LockOptions) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Held> + Send,
{
    let in_section = Arc::new(AtomicUsize::new(0));
    let acquisitions = Arc::new(AtomicU64::new(0));
    let options = LockOptions::new()
        .lease(Duration::from_secs(5))
        .wait(Duration::from_secs(30));
    let mut tasks = Vec::new();
    for i in 0..CONTENDERS {
        let acquire = acquirer(i);
        let (in_section, acquisitions) = (in_section.clone(), acquisitions.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..rounds {
                let guard = acquire(options).await;
                assert_eq!(in_section.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                tokio::time::sleep(Duration::from_millis(1)).await;
                in_section.fetch_sub(1, Ordering::SeqCst);
                acquisitions.fetch_add(1, Ordering::SeqCst);
                assert!(guard.release().await.expect("release"));
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    acquisitions.load(Ordering::SeqCst)
}

/// Runs CONTENDERS tasks (spread over `clients`, as over several processes) that each take the
/// lock ROUNDS times around a short critical section; returns the number of acquisitions.
async fn contend(clients: &[LockClient], spin: bool) -> u64 {
    run_contenders(ROUNDS, |i| {
        let client = clients[i % clients.len()].clone();
        let spinner = SpinLock::new(&client).retry_interval(Duration::from_millis(2));
        move |options: LockOptions| {
            let (client, spinner) = (client.clone(), spinner.clone());
            async move {
                if spin {
                    Held::Spin(
                        spinner
                            .acquire("hot", &options)
                            .await
                            .expect("spin acquire"),
                    )
                } else {
                    Held::Lock(client.acquire("hot", &options).await.expect("acquire"))
                }
            }
        }
    })
    .await
}

/// Commands sent per acquisition for one contended run.
async fn commands_per_acquisition(urls: &[String], clients: &[LockClient], spin: bool) -> f64 {
    let before = command_count(urls).await.unwrap();
    let n = contend(clients, spin).await;
    let after = command_count(urls).await.unwrap();
    assert_eq!(n, (CONTENDERS * ROUNDS) as u64);
    let per = (after - before) as f64 / n as f64;
    eprintln!(
        "{} over {} client(s): {} commands for {n} acquisitions = {per:.2}",
        if spin { "spin lock" } else { "pub/sub lock" },
        clients.len(),
        after - before
    );
    per
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_costs_few_commands_and_spinning_many() {
    let Some(server) = common::OwnRedis::start() else {
        return;
    };
    let urls = [server.url()];
    let one = [LockClient::connect(&urls[0]).await.unwrap()];
    let two = [one[0].clone(), LockClient::connect(&urls[0]).await.unwrap()];

    // One process: one failed attempt at most, the winning attempt, the release.
    let pubsub = commands_per_acquisition(&urls, &one, false).await;
    assert!(pubsub <= 3.0, "{pubsub:.2} commands per acquisition");
    // Two processes: each release wakes one waiter in each, so one more failed attempt.
    let pubsub_two = commands_per_acquisition(&urls, &two, false).await;
    assert!(
        pubsub_two <= 4.0,
        "{pubsub_two:.2} commands per acquisition"
    );
    // The spin baseline under the same load.
    let spin = commands_per_acquisition(&urls, &one, true).await;
    assert!(
        spin > 2.0 * pubsub,
        "spinning should cost far more: {spin:.2} vs {pubsub:.2}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_gives_errors_not_hangs_or_double_grants() {
    let Some(mut server) = common::OwnRedis::start() else {
        return;
    };
    let url = server.url();
    let client = LockClient::builder(&url)
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let in_section = Arc::new(AtomicUsize::new(0));
    let double_grants = Arc::new(AtomicUsize::new(0));
    let granted = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let slowest_error_ms = Arc::new(AtomicU64::new(0));
    let options = LockOptions::new()
        .lease(Duration::from_secs(2))
        .wait(Duration::from_secs(2));
    let stop_at = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let (in_section, double_grants, granted, errors, slowest) = (
            in_section.clone(),
            double_grants.clone(),
            granted.clone(),
            errors.clone(),
            slowest_error_ms.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop_at {
                let started = Instant::now();
                match client.acquire("shared", &options).await {
                    Ok(guard) => {
                        granted.fetch_add(1, Ordering::SeqCst);
                        if in_section.fetch_add(1, Ordering::SeqCst) > 0 {
                            double_grants.fetch_add(1, Ordering::SeqCst);
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        in_section.fetch_sub(1, Ordering::SeqCst);
                        let _ = guard.release().await;
                    }
                    Err(e) => {
                        assert!(e.is_unavailable(), "unexpected error kind: {e}");
                        errors.fetch_add(1, Ordering::SeqCst);
                        slowest.fetch_max(started.elapsed().as_millis() as u64, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let granted_before_kill = granted.load(Ordering::SeqCst);
    server.kill();
    // Every task must finish: no acquire may hang past its timeouts.
    let all = futures_util::future::join_all(tasks);
    tokio::time::timeout(Duration::from_secs(6), all)
        .await
        .expect("a task hung after the server died");
    assert!(granted_before_kill > 0, "no grants before the kill");
    assert!(
        errors.load(Ordering::SeqCst) > 0,
        "no errors after the kill"
    );
    assert_eq!(double_grants.load(Ordering::SeqCst), 0);
    let slowest = slowest_error_ms.load(Ordering::SeqCst);
    assert!(slowest < 1500, "an error took {slowest} ms");

    // After a restart the same client recovers (it reconnects).
    server.restart();
    let mut recovered = false;
    for _ in 0..50 {
        if let Ok(g) = client.acquire("shared", &LockOptions::new()).await {
            g.release().await.unwrap();
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the client did not reconnect");
}

/// Acquisitions per task in the Redlock runs (each task's first round fails: amortised here).
const REDLOCK_ROUNDS: usize = 12;

/// Redlock over five servers of our own: commands per acquisition under contention, one
/// process (all waiters share one subscription per node) and two.
async fn redlock_commands_per_acquisition(
    urls: &[String],
    locks: &[contend_redis::Redlock],
) -> f64 {
    let before = command_count(urls).await.unwrap();
    let n = run_contenders(REDLOCK_ROUNDS, |i| {
        let lock = locks[i % locks.len()].clone();
        move |options: LockOptions| {
            let lock = lock.clone();
            async move { Held::Lock(lock.acquire("hot", &options).await.expect("acquire")) }
        }
    })
    .await;
    let after = command_count(urls).await.unwrap();
    assert_eq!(n, (CONTENDERS * REDLOCK_ROUNDS) as u64);
    let per = (after - before) as f64 / n as f64;
    eprintln!(
        "redlock over {} nodes, {} client(s): {} commands for {n} acquisitions = {per:.2}",
        urls.len(),
        locks.len(),
        after - before
    );
    per
}

/// Five redis-server processes of our own and their URLs (kept running while the servers are
/// held); `None` when redis-server cannot be started (the test is then skipped).
fn five_own_servers() -> Option<(Vec<common::OwnRedis>, Vec<String>)> {
    let mut servers = Vec::new();
    for _ in 0..5 {
        servers.push(common::OwnRedis::start()?);
    }
    let urls = servers.iter().map(|s| s.url()).collect();
    Some((servers, urls))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_waits_on_notifications_not_by_polling() {
    let Some((_servers, urls)) = five_own_servers() else {
        return;
    };
    let connect = || async {
        contend_redis::Redlock::builder(&urls)
            .node_timeout(Duration::from_millis(500))
            .connect()
            .await
            .unwrap()
    };
    let one = [connect().await];
    // One process: N commands to acquire and N to release, plus a failed first round per task
    // and the subscriptions: at most 2N + 2 (polling every 20 ms cost over 60).
    let per = redlock_commands_per_acquisition(&urls, &one).await;
    assert!(
        per <= 12.0,
        "{per:.2} commands per acquisition over 5 nodes"
    );
    // Two processes race for each release: the loser's round is extra, but nobody polls.
    let two = [one[0].clone(), connect().await];
    let per_two = redlock_commands_per_acquisition(&urls, &two).await;
    assert!(
        per_two <= 20.0,
        "{per_two:.2} commands per acquisition over 5 nodes, 2 clients"
    );
}

/// A node dies while a Redlock waiter waits: the waiter is still woken by the release on the
/// remaining nodes (not by the holder's 10 s lease or its wait limit), and gets the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redlock_waiter_survives_a_node_dying_mid_wait() {
    let Some((mut servers, urls)) = five_own_servers() else {
        return;
    };
    let lock = contend_redis::Redlock::builder(&urls)
        .node_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let lease = Duration::from_secs(10);
    let holder = lock
        .acquire("k", &LockOptions::new().lease(lease))
        .await
        .unwrap();
    let waiter = {
        let lock = lock.clone();
        tokio::spawn(async move {
            let got = lock
                .acquire(
                    "k",
                    &LockOptions::new().lease(lease).wait(Duration::from_secs(8)),
                )
                .await;
            (got, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    servers[0].kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    assert!(holder.release().await.unwrap());
    let (got, at) = waiter.await.unwrap();
    let guard = got.expect("the waiter gets the lock on the 4 remaining nodes");
    let after = at.duration_since(released);
    assert!(
        after < Duration::from_secs(2),
        "woken {after:?} after the release"
    );
    guard.release().await.unwrap();
}
