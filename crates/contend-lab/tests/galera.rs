//! The lab on the nodes of a Galera cluster at once (`CONTEND_GALERA_URLS`, comma separated, as
//! `--database-url` takes them): the workers are spread over the nodes, the strategies that
//! cannot be safe there are refused with their reason, the safe ones hold (certification
//! conflicts between nodes are retried), and the unsafe baseline breaks under the same load.

mod support;

use contend_lab::cli::LabArgs;
use support::{run_lab, server_url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_refuses_unsafe_strategies_safe_ones_hold_the_baseline_breaks() {
    let Some(urls) = server_url("CONTEND_GALERA_URLS") else {
        return;
    };
    let args = LabArgs {
        database_url: Some(urls),
        scenario: Some("withdraw".into()),
        strategy: Some("none,atomic,pessimistic,optimistic,advisory,serializable,mutex".into()),
        workers: Some("16".into()),
        operations: Some(300),
        no_progress: true,
        ..LabArgs::default()
    };
    let report = run_lab(args).await;
    let text = report.render();
    println!("{text}");

    // Refused, each with its reason, and the way to run it anyway.
    for (strategy, reason) in [
        ("advisory", "GET_LOCK is local to the node"),
        ("serializable", "write skew between nodes"),
        ("mutex", "the read is stale"),
    ] {
        let skipped = report
            .skipped
            .iter()
            .find(|s| s.strategy == strategy)
            .unwrap_or_else(|| panic!("{strategy} is refused on Galera: {text}"));
        assert!(
            skipped.reason.contains(reason)
                && skipped.reason.contains("Galera cluster of 3 nodes")
                && skipped.reason.contains("--allow-unsafe-on-cluster"),
            "{strategy}: {}",
            skipped.reason
        );
        assert!(report.runs.iter().all(|r| r.strategy != strategy));
    }

    let run = |strategy: &str| {
        report
            .runs
            .iter()
            .find(|r| r.strategy == strategy)
            .unwrap_or_else(|| panic!("{strategy} ran: {text}"))
    };
    let none = run("none");
    assert_eq!(none.backend, "galera");
    assert!(
        none.violations > 0,
        "16 workers over 3 nodes withdrawing with read-decide-write lose updates: {none:#?}"
    );
    let mut cluster_conflicts = 0;
    for strategy in ["atomic", "pessimistic", "optimistic"] {
        let safe = run(strategy);
        assert_eq!(safe.violations, 0, "{safe:#?}");
        assert_eq!((safe.errors, safe.gave_up), (0, 0), "{safe:#?}");
        assert_eq!(safe.operations, 300);
        assert_eq!((safe.succeeded, safe.refused), (150, 150), "{safe:#?}");
        assert_eq!(safe.verdict, "SAFE");
        cluster_conflicts += safe.conflicts.get("certification").copied().unwrap_or(0);
    }
    // The nodes did race: the losers of certification were retried, as their own kind.
    assert!(
        cluster_conflicts > 0,
        "no certification conflict between the nodes: {text}"
    );
    assert!(!report.failed());
    assert_eq!(report.exit_code(), 0);
}

/// `--allow-unsafe-on-cluster` runs the refused strategies, judged as unsafe baselines: whatever
/// they show, they do not fail the lab.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_allow_unsafe_runs_refused_strategies_as_baselines() {
    let Some(urls) = server_url("CONTEND_GALERA_URLS") else {
        return;
    };
    let args = LabArgs {
        database_url: Some(urls),
        allow_unsafe_on_cluster: true,
        scenario: Some("withdraw".into()),
        strategy: Some("advisory".into()),
        workers: Some("8".into()),
        operations: Some(100),
        no_progress: true,
        ..LabArgs::default()
    };
    let report = run_lab(args).await;
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    let advisory = &report.runs[0];
    assert_eq!(advisory.strategy, "advisory");
    assert!(!advisory.expected_safe, "{advisory:#?}");
    assert_eq!(advisory.operations, 100);
    assert!(!advisory.failed, "{advisory:#?}");
}
