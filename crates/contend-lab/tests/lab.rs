//! The lab end to end with its real scenarios (as `contend lab` runs them): on the `withdraw` hot
//! row, `none` loses updates under 16 workers (the check can fail) and `atomic` and `pessimistic`
//! lose none. SQLite always; PostgreSQL and MariaDB when CONTEND_PG_URL / CONTEND_MYSQL_URL are set.

mod support;

use contend_lab::cli::LabArgs;
use support::{run_lab, server_url};

async fn withdraw(url: Option<String>) {
    let args = LabArgs {
        database_url: url,
        scenario: Some("withdraw".into()),
        strategy: Some("none,atomic,pessimistic".into()),
        workers: Some("16".into()),
        operations: Some(600),
        no_progress: true,
        ..LabArgs::default()
    };
    let report = run_lab(args).await;
    assert_eq!(report.runs.len(), 3, "{report:#?}");

    let none = &report.runs[0];
    assert_eq!(none.strategy, "none");
    assert_eq!(none.operations, 600);
    assert!(
        none.violations > 0,
        "16 workers withdrawing with read-decide-write must lose updates: {none:#?}"
    );
    assert!(!none.failed);

    for safe in &report.runs[1..] {
        assert_eq!(safe.violations, 0, "{safe:#?}");
        assert_eq!(safe.errors, 0, "{safe:#?}");
        assert_eq!(safe.operations, 600);
        // The balance is half the operations: exactly that many succeed, the rest are refused.
        assert_eq!(safe.succeeded, 300, "{safe:#?}");
        assert_eq!(safe.refused, 300, "{safe:#?}");
        assert_eq!(safe.verdict, "SAFE");
        assert!(safe.invariants.iter().all(|i| i.ok));
    }
    assert!(!report.failed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_withdraw_none_loses_money_safe_strategies_do_not() {
    withdraw(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_withdraw_none_loses_money_safe_strategies_do_not() {
    if let Some(url) = server_url("CONTEND_PG_URL") {
        withdraw(Some(url)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_withdraw_none_loses_money_safe_strategies_do_not() {
    if let Some(url) = server_url("CONTEND_MYSQL_URL") {
        withdraw(Some(url)).await;
    }
}

/// `redis`, `redis-spin` and `redlock` guard the withdraw hot row under 32 workers: no violation,
/// one grant per operation that took the lock, and the Redis commands counted per grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lock_strategies_are_safe_and_counted() {
    let (Some(redis), Some(redlock)) = (
        server_url("CONTEND_REDIS_URL"),
        server_url("CONTEND_REDLOCK_URLS"),
    ) else {
        return;
    };
    let args = LabArgs {
        scenario: Some("withdraw".into()),
        strategy: Some("redis,redis-spin,redlock".into()),
        workers: Some("32".into()),
        operations: Some(300),
        redis_url: Some(redis),
        redlock_urls: Some(redlock),
        no_progress: true,
        ..LabArgs::default()
    };
    let report = run_lab(args).await;
    assert_eq!(report.runs.len(), 3, "{report:#?}");
    for run in &report.runs {
        assert_eq!(run.violations, 0, "{run:#?}");
        assert_eq!(run.errors, 0, "{run:#?}");
        assert_eq!(run.verdict, "SAFE");
        let lock = run.lock.as_ref().expect("lock statistics");
        assert_eq!(lock.acquisitions, run.operations, "{run:#?}");
        assert!(lock.redis_commands >= lock.acquisitions, "{lock:?}");
        assert!(lock.commands_per_acquisition >= 1.0, "{lock:?}");
        assert_eq!(lock.fenced_rejections, 0, "{lock:?}");
    }
}

/// `batched` on the hot rows of `withdraw`, `transfer` and `order`: the operations decided in
/// memory (`Operation::apply`) keep every invariant, and under 16 workers one commit serves
/// several operations, while 1 worker commits each alone.
async fn batched_combines(url: Option<String>) {
    let args = LabArgs {
        database_url: url,
        scenario: Some("withdraw,transfer,order".into()),
        strategy: Some("batched".into()),
        workers: Some("1,16".into()),
        operations: Some(400),
        no_progress: true,
        ..LabArgs::default()
    };
    let report = run_lab(args).await;
    assert_eq!(report.runs.len(), 6, "{report:#?}");
    for run in &report.runs {
        assert_eq!(run.violations, 0, "{run:#?}");
        assert_eq!(run.errors, 0, "{run:#?}");
        assert_eq!(run.operations, 400, "{run:#?}");
        let batch = run
            .batch
            .as_ref()
            .expect("batched runs report their batches");
        assert_eq!(batch.operations, 400, "{run:#?}");
        if run.workers == 1 {
            assert_eq!(batch.commits, 400, "one worker: one operation per commit");
        } else if run.scenario == "withdraw" {
            // One hot row: 16 workers queue on one key set.
            assert!(batch.ops_per_commit > 2.0, "{run:#?}");
        } else {
            assert!(batch.commits < 400, "{run:#?}");
        }
    }
    assert!(!report.failed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_batched_combines_operations_and_keeps_invariants() {
    batched_combines(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batched_combines_operations_and_keeps_invariants() {
    if let Some(url) = server_url("CONTEND_PG_URL") {
        batched_combines(Some(url)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_batched_combines_operations_and_keeps_invariants() {
    if let Some(url) = server_url("CONTEND_MYSQL_URL") {
        batched_combines(Some(url)).await;
    }
}

/// `etcd` guards the withdraw hot row under 32 workers on the shared etcd cluster: no
/// violation, one grant per operation, and the client's requests counted per grant (a watch
/// wakes each waiter: at most 4 requests per grant plus keepalives, however many wait).
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_strategy_is_safe_and_counted() {
    let Some(etcd) = server_url("CONTEND_ETCD_URLS") else {
        return;
    };
    let args = LabArgs {
        scenario: Some("withdraw".into()),
        strategy: Some("etcd".into()),
        workers: Some("32".into()),
        operations: Some(200),
        etcd_urls: Some(etcd),
        no_progress: true,
        ..LabArgs::default()
    };
    let report = run_lab(args).await;
    assert_eq!(report.runs.len(), 1, "{report:#?}");
    let run = &report.runs[0];
    assert_eq!((run.violations, run.errors), (0, 0), "{run:#?}");
    assert_eq!(run.verdict, "SAFE");
    let lock = run.lock.as_ref().expect("lock statistics");
    assert_eq!(lock.acquisitions, run.operations, "{run:#?}");
    assert!(
        (1.0..4.5).contains(&lock.commands_per_acquisition),
        "{lock:?}"
    );
    assert_eq!(lock.fenced_rejections, 0, "{lock:?}");
}

#[test]
fn etcd_urls_are_checked() {
    let args = LabArgs {
        etcd_urls: Some("127.0.0.1:2379".into()),
        ..LabArgs::default()
    };
    let e = args.into_config(&["withdraw"]).unwrap_err();
    assert!(e.to_string().contains("--etcd-urls"), "{e}");
}
