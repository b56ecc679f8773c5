//! Scenario tests of the lock-based strategies (`redis`, `redis-spin`, `redlock`): they keep the
//! invariants under concurrent load with the lab's own lock services (`crate::lockstats`)
//! where the same load without a lock breaks them, and a stale lock holder's write is refused
//! by the fence (`contend::fencing`) and counted as a fenced rejection.
//!
//! Redis tests read `CONTEND_REDIS_URL` (one node: `redis`, `redis-spin`) and
//! `CONTEND_REDLOCK_URLS` (comma-separated nodes: `redlock`); unset, they print
//! "skipped: ..." and return, unless servers are required (`contend_test_support`), which makes
//! them panic. The
//! fence tests without Redis run always on SQLite, and on PostgreSQL / MariaDB when configured.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use contend::fencing::FencingToken;
use contend::lock::{HeldLock, LockService};
use contend::strategy::Strategy;
use contend::{Backend, BoxFuture, Db};
use contend_redis::{LockClient, LockGuard, LockOptions, Redlock};

use super::append::Append;
use super::booking::Booking;
use super::get_or_create::GetOrCreate;
use super::order::Order;
use super::queue::Queue;
use super::tests::{OPERATIONS, WORKERS, drive, drive_with, executor, open};
use super::transfer::Transfer;
use super::withdraw::Withdraw;
use super::{Ctx, Outcome, Scenario, Totals};
use crate::config::LabConfig;

/// The value of `var`, or `None` after printing "skipped: ..." (a panic when servers are
/// required).
fn server_var(var: &str) -> Option<String> {
    contend_test_support::env_url(var)
}

fn redis_url() -> Option<String> {
    server_var("CONTEND_REDIS_URL")
}

fn redlock_urls() -> Option<Vec<String>> {
    contend_test_support::env_urls("CONTEND_REDLOCK_URLS")
}

/// The lab's lock services (as `contend lab` builds them) for every lock-based strategy whose
/// servers are configured.
async fn lab_locks() -> Vec<(Strategy, Arc<dyn LockService>)> {
    let redis = redis_url();
    let redlock = redlock_urls();
    let mut strategies = Vec::new();
    if redis.is_some() {
        strategies.extend([Strategy::Redis, Strategy::RedisSpin]);
    }
    if redlock.is_some() {
        strategies.push(Strategy::Redlock);
    }
    if strategies.is_empty() {
        return Vec::new();
    }
    let config = LabConfig {
        strategies: strategies.clone(),
        redis_url: redis,
        redlock_urls: redlock.unwrap_or_default(),
        ..LabConfig::default()
    };
    let services = crate::lockstats::lock_services(&config)
        .await
        .expect("connect to the Redis servers");
    strategies
        .into_iter()
        .map(|s| {
            let service = services
                .get(&s)
                .and_then(|r| r.as_ref().ok())
                .unwrap_or_else(|| panic!("no lock service for {s}"));
            (s, service.lock.clone())
        })
        .collect()
}

/// Wraps a lock service and counts grants made while another holder of the same key had not
/// released yet: the lock's own mutual exclusion, seen from the scenario. (The fence row lock
/// alone also serializes the writers of one resource, so the invariants could hold with a
/// broken lock; this count could not.)
struct Exclusive {
    inner: Arc<dyn LockService>,
    holders: Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
    overlaps: Arc<AtomicU64>,
}

impl Exclusive {
    fn new(inner: Arc<dyn LockService>) -> Exclusive {
        Exclusive {
            inner,
            holders: Arc::default(),
            overlaps: Arc::default(),
        }
    }
}

struct ExclusiveGrant {
    inner: Box<dyn HeldLock>,
    key: String,
    holders: Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
}

impl HeldLock for ExclusiveGrant {
    fn fencing_token(&self) -> Option<FencingToken> {
        self.inner.fencing_token()
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, contend::Result<()>> {
        // Counted out before the real release, so the next holder never sees this one.
        if let Some(n) = self.holders.lock().expect("holders").get_mut(&self.key) {
            *n -= 1;
        }
        self.inner.release()
    }
}

impl LockService for Exclusive {
    fn acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        Box::pin(async move {
            let inner = self.inner.acquire(key).await?;
            {
                let mut holders = self.holders.lock().expect("holders");
                let n = holders.entry(key.to_string()).or_insert(0);
                if *n > 0 {
                    self.overlaps.fetch_add(1, Ordering::SeqCst);
                }
                *n += 1;
            }
            Ok(Box::new(ExclusiveGrant {
                inner,
                key: key.to_string(),
                holders: self.holders.clone(),
            }) as Box<dyn HeldLock>)
        })
    }
}

/// Under the load of the scenario tests (`WORKERS` x `OPERATIONS`), `none` breaks an invariant (once in 3 runs at least) and
/// every configured lock-based strategy keeps all of them, with no error and no fenced
/// rejection (no lock is lost in a healthy run), and its lock never had two holders of a key.
async fn prove_locked(scenario: Arc<dyn Scenario>, backend: Backend) {
    let locks = lab_locks().await;
    if locks.is_empty() {
        return;
    }
    let Some((db, _dir)) = open(backend).await else {
        return;
    };
    let mut broke = false;
    let mut last = String::new();
    for _ in 0..3 {
        let run = drive(scenario.clone(), &db, Strategy::None, WORKERS, OPERATIONS).await;
        last = run.describe();
        if run.violations() > 0 {
            broke = true;
            break;
        }
    }
    assert!(
        broke,
        "{} on {backend}: the unsafe baseline kept every invariant in 3 runs: {last}",
        scenario.name()
    );
    for (strategy, lock) in locks {
        let lock = Arc::new(Exclusive::new(lock));
        let run = drive_with(
            scenario.clone(),
            &db,
            strategy,
            Some(lock.clone() as Arc<dyn LockService>),
            WORKERS,
            OPERATIONS,
        )
        .await;
        let what = format!("{} / {strategy} on {backend}", scenario.name());
        let overlaps = lock.overlaps.load(Ordering::SeqCst);
        assert_eq!(
            overlaps, 0,
            "{what}: {overlaps} grants to a key already held"
        );
        assert_eq!(
            run.violations(),
            0,
            "{what} broke an invariant: {}",
            run.describe()
        );
        assert_eq!(
            run.totals.errors,
            0,
            "{what} had errors: {}",
            run.describe()
        );
        assert_eq!(run.fenced_rejections, 0, "{what}: {}", run.describe());
        assert!(run.totals.succeeded > 0, "{what}: {}", run.describe());
    }
    db.pool().close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdraw_under_redis_locks_sqlite() {
    prove_locked(Arc::new(Withdraw::new()), Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdraw_under_redis_locks_postgres() {
    prove_locked(Arc::new(Withdraw::new()), Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_under_redis_locks_sqlite() {
    prove_locked(Arc::new(Transfer::new()), Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_under_redis_locks_postgres() {
    prove_locked(Arc::new(Transfer::new()), Backend::Postgres).await;
}

// ---- stale holders ----

/// A lock service whose grants carry the token the test sets: it plays a lock that was lost
/// (another holder got a newer token meanwhile), so that the fence alone must refuse the write.
struct SetToken {
    token: AtomicU64,
}

struct Grant(u64);

impl HeldLock for Grant {
    fn fencing_token(&self) -> Option<FencingToken> {
        Some(FencingToken::new(self.0))
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, contend::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

impl LockService for SetToken {
    fn acquire<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        let token = self.token.load(Ordering::SeqCst);
        Box::pin(async move { Ok(Box::new(Grant(token)) as Box<dyn HeldLock>) })
    }
}

fn ctx(db: &Db, strategy: Strategy, locks: Arc<dyn LockService>) -> Ctx {
    Ctx {
        db: db.clone(),
        strategy,
        workers: 1,
        // Sizes the data (balances, stock, seats, jobs, keys) well above the few operations run.
        operations: 40,
        executor: executor(strategy, Some(locks)),
        run_id: format!("t{:08x}", rand::random::<u32>()),
        // Scenarios that record no history ignore it.
        history: Some(Arc::new(crate::history::Recorder::new(2))),
    }
}

/// Checks every invariant of `scenario` but `no_errors` (a refused stale write is an error).
async fn assert_invariants(scenario: &dyn Scenario, ctx: &Ctx, totals: &Totals, what: &str) {
    let invariants = scenario.check(ctx, totals).await.expect("check");
    for i in invariants.iter().filter(|i| i.name != "no_errors") {
        assert!(i.ok, "{what}: invariant {} broken: {}", i.name, i.detail);
    }
}

/// The rows of the fence table whose resource starts with this run's tables.
async fn fence_rows(ctx: &Ctx) -> i64 {
    let sql = format!(
        "SELECT COUNT(*) FROM {} WHERE resource LIKE ?",
        contend::fencing::FENCE_TABLE
    );
    ctx.db
        .query_scalar(&sql)
        .bind(format!("%{}%", ctx.run_id))
        .fetch_one(ctx.db.pool())
        .await
        .expect("count fence rows")
}

/// In every scenario, operation 0 writes with token 10; operation 1, which shares a resource
/// with it, comes with token 5 (a holder whose lock expired while a newer one wrote): refused,
/// counted as one fenced rejection, and none of its writes apply (the invariants hold);
/// operation 2 with token 11 writes again. Teardown removes the run's fence rows.
async fn stale_token_refused(backend: Backend) {
    let Some((db, _dir)) = open(backend).await else {
        return;
    };
    let scenarios: Vec<Arc<dyn Scenario>> = vec![
        Arc::new(Withdraw::new()),
        Arc::new(Transfer::new()),
        Arc::new(Order::new()),
        Arc::new(Booking::new()),
        Arc::new(GetOrCreate::new()),
        Arc::new(Queue::new()),
        Arc::new(Append::new()),
    ];
    for scenario in scenarios {
        let lock = Arc::new(SetToken {
            token: AtomicU64::new(0),
        });
        let ctx = ctx(&db, Strategy::Redis, lock.clone());
        scenario.setup(&ctx).await.expect("setup");
        let mut totals = Totals::default();
        for (seq, token, stale) in [(0, 10, false), (1, 5, true), (2, 11, false)] {
            lock.token.store(token, Ordering::SeqCst);
            let rep = scenario.op(&ctx, 0, seq).await;
            let what = format!(
                "{} on {backend}, operation {seq} with token {token}: {rep:?}",
                scenario.name()
            );
            if stale {
                assert_eq!(rep.fenced_rejections, 1, "{what}");
                assert!(matches!(rep.outcome, Outcome::Error(_)), "{what}");
                totals.errors += 1;
            } else {
                assert_eq!(rep.fenced_rejections, 0, "{what}");
                assert_eq!(rep.outcome, Outcome::Succeeded, "{what}");
                totals.succeeded += 1;
            }
        }
        let what = format!("{} on {backend}", scenario.name());
        assert_invariants(scenario.as_ref(), &ctx, &totals, &what).await;
        assert!(fence_rows(&ctx).await > 0, "{what}: no fence row written");
        scenario.teardown(&ctx).await.expect("teardown");
        assert_eq!(fence_rows(&ctx).await, 0, "{what}: fence rows left behind");
    }
    db.pool().close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_token_refused_sqlite() {
    stale_token_refused(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_token_refused_postgres() {
    stale_token_refused(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_token_refused_mysql() {
    stale_token_refused(Backend::MySql).await;
}

/// The lease of the pausing lock: short, so that a pause outlives it.
const SHORT_LEASE: Duration = Duration::from_millis(100);
/// The pause of the first holder (a GC or scheduler pause), well past the lease.
const PAUSE: Duration = Duration::from_millis(700);
/// When the second operation starts: after the first one's lease ran out, well before it wakes.
const SECOND_AFTER: Duration = Duration::from_millis(250);

enum RealLock {
    Single(LockClient),
    Quorum(Redlock),
}

/// A real `contend-redis` lock (short lease, no watchdog) whose next grant pauses past its
/// lease before its holder goes on, while Redis lets the lease run out.
struct PausingLock {
    lock: RealLock,
    options: LockOptions,
    pause_next: AtomicBool,
}

struct Real(LockGuard);

impl HeldLock for Real {
    fn fencing_token(&self) -> Option<FencingToken> {
        Some(self.0.fencing_token())
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, contend::Result<()>> {
        // A lost lock's release is refused by the token check: `Ok(false)`.
        Box::pin(async move { self.0.release().await.map(|_| ()) })
    }
}

impl LockService for PausingLock {
    fn acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        Box::pin(async move {
            let guard = match &self.lock {
                RealLock::Single(client) => client.acquire(key, &self.options).await?,
                RealLock::Quorum(redlock) => redlock.acquire(key, &self.options).await?,
            };
            if self.pause_next.swap(false, Ordering::SeqCst) {
                tokio::time::sleep(PAUSE).await;
            }
            Ok(Box::new(Real(guard)) as Box<dyn HeldLock>)
        })
    }
}

/// Operation `first` takes its first lock and pauses past the lease; meanwhile operation
/// `second` (which needs that lock too) takes it with a newer token and commits. When the first
/// holder goes on, its fence refuses it: one fenced rejection, an error, nothing written.
async fn paused_holder_refused(
    scenario: Arc<dyn Scenario>,
    lock: RealLock,
    first: u64,
    second: u64,
) {
    let Some((db, _dir)) = open(Backend::Sqlite).await else {
        return;
    };
    let lock = Arc::new(PausingLock {
        lock,
        options: LockOptions::new()
            .lease(SHORT_LEASE)
            .wait(Duration::from_secs(5)),
        pause_next: AtomicBool::new(true),
    });
    let ctx = Arc::new(ctx(&db, Strategy::Redis, lock));
    scenario.setup(&ctx).await.expect("setup");
    let paused = {
        let (scenario, ctx) = (scenario.clone(), ctx.clone());
        tokio::spawn(async move { scenario.op(&ctx, 0, first).await })
    };
    tokio::time::sleep(SECOND_AFTER).await;
    let newer = scenario.op(&ctx, 1, second).await;
    let paused = paused.await.expect("first operation");
    let what = format!("{}: paused {paused:?}, newer {newer:?}", scenario.name());
    assert_eq!(newer.outcome, Outcome::Succeeded, "{what}");
    assert_eq!(newer.fenced_rejections, 0, "{what}");
    assert_eq!(paused.fenced_rejections, 1, "{what}");
    assert!(matches!(paused.outcome, Outcome::Error(_)), "{what}");
    let totals = Totals {
        succeeded: 1,
        refused: 0,
        errors: 1,
        gave_up: 0,
    };
    assert_invariants(scenario.as_ref(), &ctx, &totals, &what).await;
    scenario.teardown(&ctx).await.expect("teardown");
    db.pool().close().await;
}

const TEST_NAMESPACE: &str = "contend-lab-test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_redis_holder_refused() {
    let Some(url) = redis_url() else {
        return;
    };
    let client = || async {
        LockClient::builder(&url)
            .namespace(TEST_NAMESPACE)
            .connect()
            .await
            .expect("connect to Redis")
    };
    // Both at once (each on its own database and client): the pauses overlap.
    // Transfer 0 moves 1 -> 2, transfer 4 moves 1 -> 3: they share account 1, the first lock.
    tokio::join!(
        paused_holder_refused(
            Arc::new(Withdraw::new()),
            RealLock::Single(client().await),
            0,
            1,
        ),
        paused_holder_refused(
            Arc::new(Transfer::new()),
            RealLock::Single(client().await),
            0,
            4,
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_redlock_holder_refused() {
    let Some(urls) = redlock_urls() else {
        return;
    };
    let redlock = Redlock::builder(&urls)
        .namespace(TEST_NAMESPACE)
        .connect()
        .await
        .expect("connect to the Redlock nodes");
    paused_holder_refused(Arc::new(Withdraw::new()), RealLock::Quorum(redlock), 0, 1).await;
}
