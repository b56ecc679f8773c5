//! The fault suite's report: the table people read, the JSON document (`{"runs": [...]}`) and
//! the exit status.
//!
//! A run fails the suite when
//! - a strategy expected to be safe lost an acknowledged operation, applied one twice, or left
//!   an invariant violated;
//! - an unsafe baseline (`none`, `mutex` across two instances) did not break: the load or the
//!   fault did not exercise what it should have;
//! - the fault's effect was not observed (nothing was injected, so nothing was tested).

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, CellAlignment, Color, ContentArrangement, Table};
use serde::Serialize;

use super::RunRow;

/// The JSON document.
#[derive(Debug, Serialize)]
pub struct FaultReport {
    /// One row per fault x strategy x backend.
    pub runs: Vec<RunRow>,
    /// Phases that could not run, with the reason.
    pub errors: Vec<String>,
}

/// A run's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A safe strategy kept every promise.
    Held,
    /// An unsafe baseline broke, as it should.
    BrokeAsExpected,
    /// A safe strategy lost, duplicated or violated.
    Failed,
    /// An unsafe baseline did not break.
    BaselineHeld,
    /// The fault's effect was not observed.
    NotInjected,
}

impl Verdict {
    /// Whether the verdict fails the suite.
    pub fn fails(self) -> bool {
        matches!(
            self,
            Verdict::Failed | Verdict::BaselineHeld | Verdict::NotInjected
        )
    }

    /// The verdict as the table shows it.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Held => "held",
            Verdict::BrokeAsExpected => "broke (expected)",
            Verdict::Failed => "FAILED",
            Verdict::BaselineHeld => "DID NOT BREAK",
            Verdict::NotInjected => "FAULT NOT OBSERVED",
        }
    }
}

/// The verdict of one run.
pub fn verdict(row: &RunRow) -> Verdict {
    let broke = row.lost + row.duplicated + row.violations > 0;
    if !row.fault_observed {
        Verdict::NotInjected
    } else if row.expected_safe {
        if broke {
            Verdict::Failed
        } else {
            Verdict::Held
        }
    } else if broke {
        Verdict::BrokeAsExpected
    } else {
        Verdict::BaselineHeld
    }
}

/// Whether the suite passed: every verdict passes and no phase failed to run.
pub fn passed(report: &FaultReport) -> bool {
    report.errors.is_empty() && report.runs.iter().all(|r| !verdict(r).fails())
}

/// The table's columns, on the terminal and on the page.
pub const COLUMNS: [&str; 13] = [
    "fault",
    "backend",
    "strategy",
    "safe",
    "ack",
    "failed",
    "unknown",
    "no answer",
    "lost",
    "dup",
    "viol",
    "recovery s",
    "verdict",
];

/// One cell of a row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCell {
    /// What it shows.
    pub text: String,
    /// A number (aligned right).
    pub numeric: bool,
    /// A broken promise: a safe strategy's lost, duplicated or violated count above 0, or a
    /// verdict that fails the suite (shown red).
    pub alarm: bool,
}

/// The cells of `r`'s row, in the order of [`COLUMNS`].
pub fn cells(r: &RunRow) -> Vec<TableCell> {
    let text = |t: &str| TableCell {
        text: t.to_string(),
        numeric: false,
        alarm: false,
    };
    let num = |n: u64, flagged: bool| TableCell {
        text: n.to_string(),
        numeric: true,
        alarm: flagged && n > 0 && r.expected_safe,
    };
    let v = verdict(r);
    vec![
        text(&r.fault),
        text(&r.backend),
        text(&r.strategy),
        text(if r.expected_safe { "yes" } else { "no" }),
        num(r.acknowledged, false),
        num(r.failed, false),
        num(r.unknown, false),
        num(r.no_answer, false),
        num(r.lost, true),
        num(r.duplicated, true),
        num(r.violations, true),
        TableCell {
            text: match (r.recovery_s, r.recovered) {
                (Some(s), _) => format!("{s:.2}"),
                (None, false) => "never".into(),
                (None, true) => "-".into(),
            },
            numeric: true,
            alarm: false,
        },
        TableCell {
            text: v.label().into(),
            numeric: false,
            alarm: v.fails(),
        },
    ]
}

/// The phases of the report (fault x backend) in the order they ran, each with its rows.
pub fn phases(report: &FaultReport) -> Vec<(&str, &str, Vec<&RunRow>)> {
    let mut out: Vec<(&str, &str, Vec<&RunRow>)> = Vec::new();
    for r in &report.runs {
        match out
            .iter_mut()
            .find(|(f, b, _)| *f == r.fault && *b == r.backend)
        {
            Some((_, _, rows)) => rows.push(r),
            None => out.push((&r.fault, &r.backend, vec![r])),
        }
    }
    out
}

/// What the table's columns and verdicts mean.
pub const GLOSSARY: &str = "ack: told it succeeded (directly, or its id found in the ledger after a lost answer); \
     failed: told it definitely failed; unknown: no answer and never found out; no answer: \
     attempts whose answer was lost; lost: acknowledged but absent from the ledger; dup: \
     applied more than once; viol: broken invariants of the books; recovery s: from the \
     fault to the first success after it (longest over its injections). safe: expected to \
     stay correct across two instances. DID NOT BREAK: an unsafe baseline held, so the \
     fault or the load did not exercise what it should have (fails the suite); FAULT NOT \
     OBSERVED: the injector did not see its effect (fails the suite).";

/// The table and, per fault and backend, what was injected and how many operations were in
/// flight when it hit; then the details of every violation.
pub fn render(report: &FaultReport) -> String {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(COLUMNS.to_vec());
    for r in &report.runs {
        table.add_row(cells(r).into_iter().map(|c| {
            let mut cell = Cell::new(c.text);
            if c.numeric {
                cell = cell.set_alignment(CellAlignment::Right);
            }
            if c.alarm {
                cell = cell.fg(Color::Red);
            }
            cell
        }));
    }
    let mut out = table.to_string();
    out.push_str("\n\nWhat was injected (in flight: operations started and not yet answered when it hit, all strategies of the phase):\n");
    for (_, _, rows) in phases(report) {
        let r = rows[0];
        out.push_str(&format!(
            "- {} on {}: {}; in flight: {}{}\n",
            r.fault,
            r.backend,
            r.injected,
            in_flight_text(&r.in_flight),
            if r.fault_observed {
                ""
            } else {
                " — NOT OBSERVED"
            }
        ));
    }
    let details: Vec<String> = report
        .runs
        .iter()
        .filter(|r| !r.violation_details.is_empty())
        .map(|r| {
            format!(
                "- {} / {} / {}: {}",
                r.fault,
                r.backend,
                r.strategy,
                r.violation_details.join("; ")
            )
        })
        .collect();
    if !details.is_empty() {
        out.push_str("\nViolations:\n");
        out.push_str(&details.join("\n"));
        out.push('\n');
    }
    let errors: Vec<String> = report
        .runs
        .iter()
        .filter(|r| !r.errors.is_empty())
        .map(|r| {
            let kinds: Vec<String> = r.errors.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            format!(
                "- {} / {} / {}: {}",
                r.fault,
                r.backend,
                r.strategy,
                kinds.join(", ")
            )
        })
        .collect();
    if !errors.is_empty() {
        out.push_str("\nAttempts that did not succeed, by what they met:\n");
        out.push_str(&errors.join("\n"));
        out.push('\n');
    }
    for e in &report.errors {
        out.push_str(&format!("\nERROR: {e}\n"));
    }
    out.push('\n');
    out.push_str(GLOSSARY);
    out.push('\n');
    out
}

/// `n` (one injection) or `min-max (mean m, k injections)`.
pub fn in_flight_text(v: &[u64]) -> String {
    match v {
        [] => "-".into(),
        [one] => one.to_string(),
        many => {
            let min = many.iter().min().copied().unwrap_or(0);
            let max = many.iter().max().copied().unwrap_or(0);
            let mean = many.iter().sum::<u64>() as f64 / many.len() as f64;
            format!("{min}-{max} (mean {mean:.1}, {} injections)", many.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(strategy: &str, safe: bool, lost: u64, dup: u64, viol: u64, observed: bool) -> RunRow {
        RunRow {
            fault: "kill-connections".into(),
            strategy: strategy.into(),
            backend: "postgres".into(),
            expected_safe: safe,
            acknowledged: 100,
            failed: 1,
            unknown: 0,
            no_answer: 3,
            lost,
            duplicated: dup,
            violations: viol,
            violation_details: vec![],
            recovery_s: Some(0.01),
            recovered: true,
            instances: 2,
            injected: "x".into(),
            fault_observed: observed,
            injections: 3,
            in_flight: vec![1, 5, 3],
            errors: Default::default(),
            timeline: Default::default(),
        }
    }

    #[test]
    fn verdicts_fail_on_broken_promises_on_baselines_that_held_and_on_faults_not_seen() {
        assert_eq!(verdict(&row("atomic", true, 0, 0, 0, true)), Verdict::Held);
        assert_eq!(
            verdict(&row("atomic", true, 1, 0, 0, true)),
            Verdict::Failed
        );
        assert_eq!(
            verdict(&row("atomic", true, 0, 1, 0, true)),
            Verdict::Failed
        );
        assert_eq!(
            verdict(&row("atomic", true, 0, 0, 1, true)),
            Verdict::Failed
        );
        assert_eq!(
            verdict(&row("none", false, 0, 0, 2, true)),
            Verdict::BrokeAsExpected
        );
        assert_eq!(
            verdict(&row("none", false, 0, 0, 0, true)),
            Verdict::BaselineHeld
        );
        assert_eq!(
            verdict(&row("atomic", true, 0, 0, 0, false)),
            Verdict::NotInjected
        );

        let good = FaultReport {
            runs: vec![
                row("atomic", true, 0, 0, 0, true),
                row("none", false, 0, 0, 4, true),
            ],
            errors: vec![],
        };
        assert!(passed(&good));
        let text = render(&good);
        assert!(text.contains("broke (expected)") && text.contains("1-5 (mean 3.0, 3 injections)"));
        let bad = FaultReport {
            runs: vec![row("none", false, 0, 0, 0, true)],
            errors: vec![],
        };
        assert!(!passed(&bad));
        let json = serde_json::to_value(&good).unwrap();
        for field in [
            "fault",
            "strategy",
            "backend",
            "expected_safe",
            "acknowledged",
            "failed",
            "unknown",
            "lost",
            "duplicated",
            "violations",
            "recovery_s",
        ] {
            assert!(json["runs"][0].get(field).is_some(), "missing {field}");
        }
    }
}
