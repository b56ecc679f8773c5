//! The lab's harness against a tiny hot-counter scenario (tests/support): lost updates are caught,
//! safe runs pass, a buggy "safe" strategy fails the lab, the JSON document has the schema's
//! fields, bad flags are refused, lock strategies get lock statistics. SQLite always; PostgreSQL
//! and MariaDB when CONTEND_PG_URL / CONTEND_MYSQL_URL are set.

mod support;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;

use contend::strategy::Strategy;
use contend_lab::cli::{LabArgs, run_with};
use contend_lab::config::{LabConfig, Load};
use contend_lab::db_target::{LockService, LockServices, run_lab};
use contend_lab::report::{LabReport, RunReport};
use contend_lab::scenario::Scenario;
use support::{Counter, LocalLock, server_url};

fn registry(buggy_atomic: bool) -> Vec<Arc<dyn Scenario>> {
    vec![Arc::new(Counter { buggy_atomic })]
}

fn config(url: Option<String>, strategies: &[Strategy], workers: usize, ops: u64) -> LabConfig {
    LabConfig {
        database_url: url,
        strategies: strategies.to_vec(),
        workers: vec![workers],
        load: Load {
            operations: Some(ops),
            duration: None,
        },
        progress: false,
        ..LabConfig::default()
    }
}

fn find<'a>(report: &'a LabReport, strategy: &str) -> &'a RunReport {
    report
        .runs
        .iter()
        .find(|r| r.strategy == strategy)
        .unwrap_or_else(|| panic!("no {strategy} run in {report:#?}"))
}

/// `none` loses updates under 8 workers (the check can fail), `atomic` loses none.
async fn none_loses_atomic_keeps(url: Option<String>) {
    let config = config(url, &[Strategy::None, Strategy::Atomic], 8, 400);
    let report = run_lab(&config, &registry(false), &HashMap::new())
        .await
        .expect("lab runs");
    let none = find(&report, "none");
    assert_eq!(none.operations, 400);
    assert!(
        none.violations > 0,
        "8 workers doing read-modify-write should lose updates: {none:#?}"
    );
    assert!(!none.invariants[0].ok);
    assert!(
        none.verdict.contains("unsafe baseline, expected"),
        "{}",
        none.verdict
    );
    assert!(
        !none.failed,
        "an unsafe baseline's violation does not fail the lab"
    );

    let atomic = find(&report, "atomic");
    assert_eq!(atomic.operations, 400);
    assert_eq!(atomic.succeeded, 400, "{atomic:#?}");
    assert_eq!(atomic.violations, 0, "{atomic:#?}");
    assert_eq!(atomic.verdict, "SAFE");
    assert!(atomic.throughput_ops_s > 0.0);
    assert!(atomic.latency_ms.p50 > 0.0 && atomic.latency_ms.p50 <= atomic.latency_ms.max);
    assert!(!report.failed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_none_loses_updates_atomic_does_not() {
    none_loses_atomic_keeps(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_none_loses_updates_atomic_does_not() {
    if let Some(url) = server_url("CONTEND_PG_URL") {
        none_loses_atomic_keeps(Some(url)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_none_loses_updates_atomic_does_not() {
    if let Some(url) = server_url("CONTEND_MYSQL_URL") {
        none_loses_atomic_keeps(Some(url)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_strategy_with_a_violation_fails_the_lab() {
    let args = LabArgs {
        strategy: Some("atomic".into()),
        workers: Some("8".into()),
        operations: Some(300),
        no_progress: true,
        json: true,
        ..LabArgs::default()
    };
    let code = run_with(args, registry(true)).await.expect("lab runs");
    assert_eq!(code, ExitCode::from(1));

    // The same flags against the correct implementation pass.
    let args = LabArgs {
        strategy: Some("atomic".into()),
        workers: Some("8".into()),
        operations: Some(300),
        no_progress: true,
        json: true,
        ..LabArgs::default()
    };
    let code = run_with(args, registry(false)).await.expect("lab runs");
    assert_eq!(code, ExitCode::SUCCESS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_document_has_the_schema_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lab.json");
    let args = LabArgs {
        strategy: Some("none,atomic,optimistic,redis,redlock".into()),
        workers: Some("1,4".into()),
        operations: Some(50),
        output: Some(path.clone()),
        no_progress: true,
        ..LabArgs::default()
    };
    let code = run_with(args, registry(false)).await.expect("lab runs");
    assert_eq!(code, ExitCode::SUCCESS);
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");

    let runs = doc["runs"].as_array().expect("runs array");
    assert_eq!(runs.len(), 4, "none and atomic at 1 and 4 workers: {text}");
    for run in runs {
        for key in ["scenario", "strategy", "backend", "verdict"] {
            assert!(run[key].is_string(), "{key} in {run}");
        }
        for key in [
            "workers",
            "operations",
            "succeeded",
            "refused",
            "retries",
            "errors",
            "violations",
        ] {
            assert!(run[key].is_u64(), "{key} in {run}");
        }
        assert!(run["duration_s"].is_f64() && run["throughput_ops_s"].is_f64());
        assert!(run["conflicts"].is_object());
        for p in ["p50", "p90", "p99", "max"] {
            assert!(run["latency_ms"][p].is_f64(), "latency_ms.{p} in {run}");
        }
        assert!(run["expected_safe"].is_boolean());
        let inv = &run["invariants"][0];
        assert!(inv["name"].is_string() && inv["ok"].is_boolean() && inv["detail"].is_string());
        assert_eq!(run["backend"], "sqlite");
        assert!(
            run.get("lock").is_none(),
            "no lock stats without a lock strategy"
        );
    }
    assert_eq!(runs[0]["strategy"], "none");
    assert_eq!(runs[0]["expected_safe"], false);
    assert_eq!(runs[2]["strategy"], "atomic");
    assert_eq!(runs[2]["expected_safe"], true);

    let skipped = doc["skipped"].as_array().expect("skipped array");
    let reason = |strategy: &str| {
        skipped
            .iter()
            .find(|s| s["strategy"] == strategy)
            .and_then(|s| s["reason"].as_str())
            .unwrap_or_else(|| panic!("{strategy} not skipped: {text}"))
            .to_string()
    };
    assert!(reason("optimistic").contains("no `optimistic` variant"));
    assert!(reason("redis").contains("--redis-url"));
    assert!(reason("redlock").contains("--redlock-urls"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_are_refused_with_a_clear_message() {
    let cases: Vec<(LabArgs, &str)> = vec![
        (
            LabArgs {
                workers: Some("0".into()),
                ..LabArgs::default()
            },
            "--workers",
        ),
        (
            LabArgs {
                workers: Some("8,lots".into()),
                ..LabArgs::default()
            },
            "`lots`",
        ),
        (
            LabArgs {
                strategy: Some("atomic,optimstic".into()),
                ..LabArgs::default()
            },
            "optimstic",
        ),
        (
            LabArgs {
                scenario: Some("withdrawl".into()),
                ..LabArgs::default()
            },
            "unknown scenario `withdrawl`",
        ),
        (
            LabArgs {
                duration: Some("forever".into()),
                ..LabArgs::default()
            },
            "--duration",
        ),
        (
            LabArgs {
                operations: Some(0),
                ..LabArgs::default()
            },
            "--operations",
        ),
        (
            LabArgs {
                database_url: Some("oracle://db".into()),
                ..LabArgs::default()
            },
            "--database-url",
        ),
        (
            LabArgs {
                redlock_urls: Some("redis://127.0.0.1:1,redis://127.0.0.1:2".into()),
                ..LabArgs::default()
            },
            "odd number",
        ),
        (
            LabArgs {
                redis_url: Some("http://127.0.0.1:6379".into()),
                ..LabArgs::default()
            },
            "not a Redis URL",
        ),
    ];
    for (args, expected) in cases {
        let shown = format!("{args:?}");
        let err = run_with(args, registry(false))
            .await
            .expect_err(&format!("{shown} must be refused"));
        let message = format!("{err:#}");
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_strategies_report_acquisitions_and_handoffs() {
    let config = config(None, &[Strategy::Redis], 8, 200);
    let mut locks: LockServices = HashMap::new();
    locks.insert(
        Strategy::Redis,
        Ok(LockService {
            lock: Arc::new(LocalLock::default()),
            commands: None,
        }),
    );
    let report = run_lab(&config, &registry(false), &locks)
        .await
        .expect("lab runs");
    let run = find(&report, "redis");
    assert_eq!(run.violations, 0, "{run:#?}");
    let lock = run.lock.as_ref().expect("lock stats for a lock strategy");
    assert_eq!(lock.acquisitions, run.succeeded);
    assert_eq!(lock.acquisitions, 200);
    assert!(
        lock.handoff_p50_ms > 0.0,
        "8 workers on one key must queue: {lock:?}"
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
    let l = &json["runs"][0]["lock"];
    for key in [
        "acquisitions",
        "redis_commands",
        "commands_per_acquisition",
        "handoff_p50_ms",
        "fenced_rejections",
    ] {
        assert!(!l[key].is_null(), "lock.{key} in {l}");
    }
}
