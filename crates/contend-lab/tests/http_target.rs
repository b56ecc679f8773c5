//! The lab's HTTP target against TWO in-process instances of the reference service sharing one
//! database: `mutex` (an in-process lock) visibly breaks the invariants across instances, while
//! `atomic` and `pessimistic` keep them under the same load. SQLite always (a shared temp file);
//! PostgreSQL when `CONTEND_PG_URL` is set (a database of its own, dropped afterwards).

use std::process::ExitCode;
use std::time::Duration;

use contend::strategy::Strategy;
use contend_lab::cli::LabArgs;
use contend_lab::config::{LabConfig, Load};
use contend_lab::http_target::{SCENARIOS, run_targets};
use contend_lab::report::{LabReport, RunReport};
use contend_service::{AppState, Config};

const ADMIN: &str = "lab-http-target-admin";
const WORKERS: usize = 16;
const OPERATIONS: u64 = 300;

/// One running instance; stopped (gracefully) on drop of its sender.
struct Instance {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Instance {
    async fn start(url: &str) -> Instance {
        let db = contend::Db::builder(url)
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect the service's database");
        contend_service::migrate::run(&db).await.expect("migrate");
        let mut config = Config::new(db, ADMIN);
        config.allow_strategy_header = true;
        config.shutdown_grace = Duration::from_secs(5);
        let state = AppState::new(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let base = format!("http://{}", listener.local_addr().expect("local addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(contend_service::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Instance {
            base,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

fn config(scenarios: &[&str], strategies: &[Strategy]) -> LabConfig {
    LabConfig {
        scenarios: scenarios.iter().map(|s| s.to_string()).collect(),
        strategies: strategies.to_vec(),
        workers: vec![WORKERS],
        load: Load {
            operations: Some(OPERATIONS),
            duration: None,
        },
        progress: false,
        ..LabConfig::default()
    }
}

fn find<'a>(report: &'a LabReport, scenario: &str, strategy: &str) -> &'a RunReport {
    report
        .runs
        .iter()
        .find(|r| r.scenario == scenario && r.strategy == strategy)
        .unwrap_or_else(|| panic!("no {scenario}/{strategy} run in:\n{}", report.render()))
}

/// The whole check against two instances on the database at `url`.
async fn two_instances(url: &str, backend: &str) {
    let a = Instance::start(url).await;
    let b = Instance::start(url).await;
    let targets = vec![a.base.clone(), b.base.clone()];

    // The safe strategies: no violation, no error, nothing skipped, across both instances.
    let safe = run_targets(
        &config(&SCENARIOS, &[Strategy::Atomic, Strategy::Pessimistic]),
        &targets,
        ADMIN,
    )
    .await
    .expect("the HTTP lab runs");
    let text = safe.render();
    println!("{text}");
    assert!(safe.skipped.is_empty(), "{text}");
    for scenario in SCENARIOS {
        for strategy in ["atomic", "pessimistic"] {
            let run = find(&safe, scenario, strategy);
            assert_eq!(run.backend, format!("http({backend})"));
            assert!(run.expected_safe);
            assert_eq!(run.operations, OPERATIONS, "{text}");
            assert_eq!(run.violations, 0, "{scenario}/{strategy}: {text}");
            assert_eq!(run.errors, 0, "{scenario}/{strategy}: {text}");
            assert!(!run.failed, "{text}");
            assert!(run.succeeded > 0 && run.throughput_ops_s > 0.0, "{text}");
        }
    }
    // The scenarios are sized so that the business refuses part of the load.
    assert!(find(&safe, "withdraw", "atomic").refused > 0, "{text}");
    assert!(find(&safe, "order", "atomic").refused > 0, "{text}");
    assert!(!safe.failed());

    // `mutex` under the same load: the lock of one process does not stop the other, so the
    // invariants break (a few attempts, since a race is a race). It is an unsafe baseline
    // here, so its violations do not fail the lab.
    for scenario in ["withdraw", "transfer", "order"] {
        let mut broke = false;
        let mut seen = String::new();
        for _ in 0..3 {
            let report = run_targets(&config(&[scenario], &[Strategy::Mutex]), &targets, ADMIN)
                .await
                .expect("the HTTP lab runs");
            let run = find(&report, scenario, "mutex");
            assert!(!run.expected_safe, "mutex across 2 instances is not safe");
            assert!(!report.failed(), "{}", report.render());
            seen = report.render();
            if run.violations > 0 {
                broke = true;
                break;
            }
        }
        println!("{seen}");
        assert!(
            broke,
            "{scenario}/mutex across two instances never broke an invariant:\n{seen}"
        );
    }

    // Retries through HTTP are read from the servers' counters: optimistic withdrawals from one
    // hot account across both instances conflict on the version and are retried (not on
    // SQLite, where a writer holds the database for the whole transaction).
    if backend != "sqlite" {
        let report = run_targets(
            &config(&["withdraw"], &[Strategy::Optimistic]),
            &targets,
            ADMIN,
        )
        .await
        .expect("the HTTP lab runs");
        let run = find(&report, "withdraw", "optimistic");
        let text = report.render();
        assert_eq!(run.violations, 0, "{text}");
        assert!(run.retries > 0, "16 workers on one row: {text}");
        assert_eq!(
            run.conflicts.get("version").copied().unwrap_or(0),
            run.retries,
            "each retry was caused by a version conflict: {text}"
        );
    }

    // With ONE instance the in-process lock is enough: `mutex` is expected safe and holds.
    let one = run_targets(
        &config(&["withdraw"], &[Strategy::Mutex]),
        &targets[..1],
        ADMIN,
    )
    .await
    .expect("the HTTP lab runs");
    let run = find(&one, "withdraw", "mutex");
    assert!(run.expected_safe);
    assert_eq!(run.violations, 0, "{}", one.render());
    assert!(!one.failed(), "{}", one.render());

    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sqlite_instances_mutex_breaks_database_strategies_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite:{}", dir.path().join("shared.db").display());
    two_instances(&url, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_instances_mutex_breaks_database_strategies_hold() {
    let Some(admin_url) = contend_test_support::env_url("CONTEND_PG_URL") else {
        return;
    };
    let name = format!("lab_http_{:016x}", rand::random::<u64>());
    let admin = contend::Db::connect(&admin_url).await.expect("connect");
    admin
        .execute_script(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let url = replace_db(&admin_url, &name);
    two_instances(&url, "postgres").await;
    let _ = admin
        .execute_script(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
    admin.pool().close().await;
}

/// `url` with its database name replaced by `name`.
fn replace_db(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{base}/{name}{query}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_drives_targets_and_reports_bad_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite:{}", dir.path().join("cli.db").display());
    let a = Instance::start(&url).await;
    let out = dir.path().join("report.json");
    let args = |admin: Option<&str>| LabArgs {
        target: Some(format!("{}, {}/", a.base, a.base)),
        admin_token: admin.map(str::to_string),
        scenario: Some("transfer".into()),
        strategy: Some("atomic,redis-spin".into()),
        workers: Some("4".into()),
        operations: Some(60),
        output: Some(out.clone()),
        json: true,
        no_progress: true,
        ..LabArgs::default()
    };
    let code = contend_lab::cli::run(args(Some(ADMIN)))
        .await
        .expect("the lab runs");
    assert_eq!(code, ExitCode::SUCCESS);
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("report written"))
            .expect("JSON report");
    assert_eq!(doc["runs"][0]["strategy"], "atomic");
    assert_eq!(doc["runs"][0]["backend"], "http(sqlite)");
    assert_eq!(doc["runs"][0]["operations"], 60);
    // `redis-spin` is not offered by the service: skipped with the server's reason.
    assert_eq!(doc["skipped"][0]["strategy"], "redis-spin");
    assert!(
        doc["skipped"][0]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    );

    // A wrong admin token, a missing one, a bad URL, a scenario not offered over HTTP: errors.
    let e = contend_lab::cli::run(args(Some("wrong")))
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("admin token"), "{e:#}");
    let e = contend_lab::cli::run(args(None)).await.unwrap_err();
    assert!(format!("{e:#}").contains("--admin-token"), "{e:#}");
    let bad = LabArgs {
        target: Some("127.0.0.1:1".into()),
        admin_token: Some(ADMIN.into()),
        ..LabArgs::default()
    };
    let e = contend_lab::cli::run(bad).await.unwrap_err();
    assert!(format!("{e:#}").contains("--target"), "{e:#}");
    let bad = LabArgs {
        target: Some(a.base.clone()),
        admin_token: Some(ADMIN.into()),
        scenario: Some("queue".into()),
        ..LabArgs::default()
    };
    let e = contend_lab::cli::run(bad).await.unwrap_err();
    assert!(format!("{e:#}").contains("--scenario"), "{e:#}");
    a.stop().await;
}
