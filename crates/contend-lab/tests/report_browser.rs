//! The HTML reports in a real browser: a short lab on SQLite writes its page, and a fault suite
//! report built here (no servers) writes the fault suite's page; headless Chromium renders each
//! to a PNG, which must show a page: mostly not blank, many colours, and the colours of the
//! strategies that ran (the chart lines, legends and table dots are inline SVG and CSS, so a page
//! whose SVG or styles broke loses them). The same check must reject a blank page, each page with
//! its charts cut out and Chromium's error page for a missing file, so it can fail.
//!
//! Chromium (`support/browser.rs`): `$CONTEND_CHROMIUM`, else `chromium`, `chromium-browser` or
//! `google-chrome` on the PATH (Debian: `apt-get install chromium`). Without one the tests are skipped, unless servers
//! are required (`contend_test_support::servers_required`) or `CI` is set: then it fails. With
//! `CONTEND_REPORT_DIR` set, the page and the screenshots are kept there (`scripts/check-report`
//! does this).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use contend_lab::cli::{LabArgs, run_config};
use contend_lab::fault::RunRow;
use contend_lab::fault::ledger::{self, Answer, Tracker};
use contend_lab::fault::report::FaultReport;
use contend_lab::fault::timeline::Timeline;

#[path = "support/browser.rs"]
mod browser;

use browser::{broken, chromium_or_skip, look, render, report_dir, screenshot, without_svg};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_report_renders_in_chromium() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let temp = tempfile::tempdir().expect("a temporary directory");
    let dir = report_dir(temp.path());

    // A short lab: two scenarios, the baseline and three safe strategies, three worker counts.
    let args = LabArgs {
        scenario: Some("withdraw,transfer".into()),
        strategy: Some("none,atomic,pessimistic,optimistic".into()),
        workers: Some("1,4,16".into()),
        duration: Some("100ms".into()),
        no_progress: true,
        ..LabArgs::default()
    };
    let registry = contend_lab::scenario::registry();
    let names: Vec<&str> = registry.iter().map(|s| s.name()).collect();
    let config = args.into_config(&names).expect("valid flags");
    let report = run_config(&config, &registry).await.expect("the lab runs");
    assert_eq!(report.runs.len(), 24, "{}", report.render_compact());
    let page = contend_lab::html::render(&report);

    // The colours of the safe strategies that ran: atomic, pessimistic, optimistic (the
    // baseline's dark grey is too close to the text's antialiasing to count).
    let wanted = ["#1f77b4", "#2ca02c", "#ff7f0e"];
    let picture = render(&chromium, &dir, "report", &page, &wanted);
    assert_eq!(broken(&picture), None, "the report did not render");

    // The check fails on a blank page and on the browser's error page.
    let picture = render(
        &chromium,
        &dir,
        "blank",
        "<!DOCTYPE html><html><head><title>x</title></head><body></body></html>",
        &wanted,
    );
    assert!(
        broken(&picture).is_some(),
        "a blank page passed: {picture:?}"
    );
    // The same page without its charts (every inline SVG cut out): the table's dots alone do
    // not carry enough of the strategies' colours.
    let picture = render(&chromium, &dir, "no-charts", &without_svg(&page), &wanted);
    assert!(
        broken(&picture).is_some(),
        "the page without charts passed: {picture:?}"
    );

    // A page that does not exist: Chromium writes no screenshot, or its error page.
    let missing_png = dir.join("missing.png");
    let missing = format!("file://{}", dir.join("no-such-page.html").display());
    if screenshot(&chromium, &missing, &missing_png).is_ok() {
        let picture = look(&missing_png, &wanted);
        assert!(
            broken(&picture).is_some(),
            "the browser's error page passed: {picture:?}"
        );
    }
}

/// A run of a 3 s phase as the suite records it: an operation acknowledged every `every_ms`,
/// none in the 200 ms after each injection (the dip), the first `dup` applied twice.
fn run(
    fault: &str,
    strategy: &str,
    safe: bool,
    every_ms: u64,
    dup: u64,
    injected_ms: &[u64],
) -> RunRow {
    let start = Instant::now();
    let at = |ms: u64| start + Duration::from_millis(ms);
    let mut records = Vec::new();
    let mut applied = HashMap::new();
    let mut id = 0;
    for ms in (0..3000).step_by(every_ms as usize) {
        if injected_ms.iter().any(|&i| (i..i + 200).contains(&ms)) {
            continue;
        }
        let mut op = Tracker::new(id);
        op.answer(Answer::Ok, at(ms), at(ms + every_ms / 2));
        records.push(op.finish());
        applied.insert(id, if id < dup { 2 } else { 1 });
        id += 1;
    }
    let injections: Vec<Instant> = injected_ms.iter().map(|&ms| at(ms)).collect();
    let counts = ledger::account(&records, &applied);
    let violations = if safe { 0 } else { 8 };
    RunRow {
        fault: fault.into(),
        strategy: strategy.into(),
        backend: "postgres".into(),
        expected_safe: safe,
        acknowledged: counts.acknowledged,
        failed: counts.failed,
        unknown: counts.unknown,
        no_answer: counts.no_answer,
        lost: counts.lost,
        duplicated: counts.duplicated,
        violations,
        violation_details: (violations > 0)
            .then(|| "ledger_matches_balances: 8 of 8 accounts differ from their ledger".into())
            .into_iter()
            .collect(),
        recovery_s: Some(0.2),
        recovered: true,
        instances: 2,
        injected: format!("{fault}: {} injections", injected_ms.len()),
        fault_observed: true,
        injections: injected_ms.len() as u64,
        in_flight: injected_ms.iter().map(|_| 40).collect(),
        errors: BTreeMap::from([("connection lost".to_string(), 12)]),
        timeline: Timeline::build(
            start,
            Duration::from_secs(3),
            &records,
            &applied,
            &injections,
        ),
    }
}

#[test]
fn the_fault_suite_report_renders_in_chromium() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let temp = tempfile::tempdir().expect("a temporary directory");
    let dir = report_dir(temp.path());

    let kills = [200, 600, 1000, 1400, 1800, 2200];
    let report = FaultReport {
        runs: vec![
            run("kill-connections", "none", false, 5, 0, &kills),
            run("kill-connections", "mutex", false, 12, 0, &kills),
            run("kill-connections", "atomic", true, 6, 0, &kills),
            run("kill-connections", "pessimistic", true, 9, 0, &kills),
            run("kill-connections", "optimistic", true, 8, 0, &kills),
            run(
                "instance-kill",
                "atomic+keys",
                true,
                20,
                0,
                &[300, 1100, 1900],
            ),
            run(
                "instance-kill",
                "atomic (no keys)",
                false,
                7,
                5,
                &[300, 1100, 1900],
            ),
        ],
        errors: Vec::new(),
    };
    assert!(contend_lab::fault::report::passed(&report));
    let page = contend_lab::html::faults::render(&report);

    // The safe strategies' colours (atomic, pessimistic, optimistic) and the injections' orange:
    // all drawn in the charts only (the table's dots are too small to pass alone).
    let wanted = ["#1f77b4", "#2ca02c", "#ff7f0e", "#ff8800"];
    let picture = render(&chromium, &dir, "faults", &page, &wanted);
    assert_eq!(
        broken(&picture),
        None,
        "the fault suite's report did not render"
    );
    // Without its charts it must fail the same check.
    let picture = render(
        &chromium,
        &dir,
        "faults-no-charts",
        &without_svg(&page),
        &wanted,
    );
    assert!(
        broken(&picture).is_some(),
        "the fault page without charts passed: {picture:?}"
    );
}
