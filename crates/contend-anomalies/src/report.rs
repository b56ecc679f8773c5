//! Printing the suite's results: the levels x anomalies matrix, one cell's interleaving
//! (`--explain`), and the JSON document.

use comfy_table::{Cell, ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};

use crate::catalog;
use crate::model::{Anomaly, CellResult, How, Outcome, SuiteReport};
use crate::script::{show_rows, show_state, tx_name};
use crate::trace::{Detection, StepRecord, StepResult};

/// The word a matrix cell shows.
///
/// ```
/// use contend_anomalies::{How, Outcome, report::cell_text};
/// assert_eq!(cell_text(Outcome::Prevented, Some(How::Blocking)), "prevented-by-blocking");
/// assert_eq!(cell_text(Outcome::Occurred, None), "occurred");
/// ```
pub fn cell_text(outcome: Outcome, how: Option<How>) -> &'static str {
    match (outcome, how) {
        (Outcome::Occurred, _) => "occurred",
        (Outcome::Prevented, Some(How::Abort)) => "prevented-by-abort",
        (Outcome::Prevented, Some(How::Blocking)) => "prevented-by-blocking",
        (Outcome::Prevented, _) => "prevented",
        (Outcome::PreventedReadOnly, _) => "prevented only for read-only",
        (Outcome::Error, _) => "ERROR",
    }
}

/// The matrix with its legend, notes and any errors.
pub fn matrix(report: &SuiteReport) -> String {
    let mut levels = Vec::new();
    let mut anomalies: Vec<Anomaly> = Vec::new();
    for cell in &report.results {
        if !levels.contains(&cell.level) {
            levels.push(cell.level);
        }
        if !anomalies.contains(&cell.anomaly) {
            anomalies.push(cell.anomaly);
        }
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    if table.is_tty() {
        table.set_content_arrangement(ContentArrangement::Dynamic);
    }
    let mut header = vec![Cell::new("level")];
    header.extend(anomalies.iter().map(|a| Cell::new(a.name())));
    table.set_header(header);
    for level in &levels {
        let mut row = vec![Cell::new(level.as_str())];
        for anomaly in &anomalies {
            row.push(Cell::new(
                report
                    .cell(*level, *anomaly)
                    .map_or("-", |c| cell_text(c.outcome, c.how)),
            ));
        }
        table.add_row(row);
    }
    let mut out = format!(
        "Isolation anomalies on {} {}\n{table}\n",
        report.backend, report.server_version
    );
    out.push_str(
        "prevented: no anomaly, nothing waited or failed | prevented-by-blocking: a statement waited \
         for another transaction | prevented-by-abort: the database aborted a transaction | \
         prevented only for read-only: the read-only variants were prevented, a writing variant \
         was not\n",
    );
    // One line per note text, naming every level it applies to.
    let mut grouped: Vec<(Vec<String>, &str)> = Vec::new();
    for note in &report.notes {
        let level = note.level.map(|l| l.as_str().to_string());
        match grouped.iter_mut().find(|(_, text)| *text == note.note) {
            Some((levels, _)) => levels.extend(level),
            None => grouped.push((level.into_iter().collect(), &note.note)),
        }
    }
    for (levels, text) in grouped {
        if levels.is_empty() {
            out.push_str(&format!("note: {text}\n"));
        } else {
            out.push_str(&format!("note ({}): {text}\n", levels.join(", ")));
        }
    }
    for cell in report
        .results
        .iter()
        .filter(|c| c.outcome == Outcome::Error)
    {
        out.push_str(&format!(
            "error: {} at {}: {}\n",
            cell.anomaly, cell.level, cell.detail
        ));
    }
    out.push_str("Details of one cell: contend anomalies --explain ANOMALY LEVEL\n");
    out
}

fn result_text(record: &StepRecord) -> String {
    match &record.result {
        StepResult::Pending => "pending".into(),
        StepResult::Rows { rows } => format!("-> {}", show_rows(rows)),
        StepResult::Affected { count } => format!("-> {count} row(s)"),
        StepResult::Done => "-> ok".into(),
        StepResult::Failed(f) => format!("-> ERROR ({:?}): {}", f.kind, f.message),
        StepResult::Skipped { reason } => format!("skipped: {reason}"),
        StepResult::TimedOut => "-> TIMED OUT (never finished)".into(),
    }
}

fn step_text(record: &StepRecord) -> String {
    let mut lines = vec![
        record
            .sql
            .clone()
            .unwrap_or_else(|| record.step.op.to_string()),
    ];
    if record.queued {
        lines.push("(queued behind its transaction's blocked statement)".into());
    }
    if let Some(blocked) = &record.blocked {
        let whom = if blocked.waiting_for.is_empty() {
            "another transaction's lock".to_string()
        } else {
            blocked
                .waiting_for
                .iter()
                .map(|t| tx_name(*t))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let how = match blocked.detected_by {
            Detection::Server => "reported by the server",
            Detection::SqliteBusy => "SQLITE_BUSY",
            Detection::Timeout => "no answer within the fallback time",
        };
        lines.push(format!("BLOCKED waiting for {whom} ({how})"));
    }
    let mut result = result_text(record);
    if let Some(step) = record.finished_during {
        result.push_str(&format!(" (finished during step {})", step + 1));
    }
    lines.push(result);
    lines.join("\n")
}

/// The interleaving of every variant of `cell`, what each transaction saw, and the verdict.
pub fn explain(report: &SuiteReport, cell: &CellResult) -> String {
    let mut out = format!(
        "{} ({}) at {} on {} {}: {}\n",
        cell.anomaly,
        cell.anomaly.title(),
        cell.level,
        report.backend,
        report.server_version,
        cell_text(cell.outcome, cell.how)
    );
    for note in report
        .notes
        .iter()
        .filter(|n| n.level.is_none() || n.level == Some(cell.level))
    {
        out.push_str(&format!("note: {}\n", note.note));
    }
    let definitions = catalog::variants(cell.anomaly);
    for variant in &cell.variants {
        let definition = definitions.iter().find(|d| d.name == variant.variant);
        out.push_str(&format!(
            "\nVariant: {}{}\n",
            variant.variant,
            if variant.read_only {
                " (the observing transaction only reads)"
            } else {
                ""
            }
        ));
        if let Some(d) = definition {
            out.push_str(&format!("Occurred when: {}\n", d.occurred_when));
            out.push_str(&format!(
                "Prevention is credited to waits and aborts of: {}\n",
                d.key_txs
                    .iter()
                    .map(|t| tx_name(*t))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let trace = &variant.trace;
        let mut table = new_table();
        let mut header = vec![Cell::new("#")];
        header.extend((0..trace.txs).map(|t| Cell::new(tx_name(t))));
        table.set_header(header);
        for record in &trace.steps {
            let mut row = vec![Cell::new(record.index + 1)];
            for tx in 0..trace.txs {
                row.push(Cell::new(if tx == record.step.tx {
                    step_text(record)
                } else {
                    String::new()
                }));
            }
            table.add_row(row);
        }
        out.push_str(&format!("{table}\n"));
        out.push_str(&format!(
            "Final table: {}\n",
            show_state(&trace.final_state)
        ));
        let verdict = match (variant.occurred, variant.how) {
            (None, _) => "could not be judged".to_string(),
            (Some(true), _) => "OCCURRED".to_string(),
            (Some(false), Some(how)) => format!("prevented ({})", how_text(how)),
            (Some(false), None) => "prevented".to_string(),
        };
        out.push_str(&format!("Verdict: {verdict}: {}\n", variant.detail));
    }
    out
}

fn how_text(how: How) -> &'static str {
    match how {
        How::Values => "by the values read",
        How::Blocking => "by blocking",
        How::Abort => "by abort",
    }
}

/// The JSON document: `{"backend", "server_version", "notes", "results": [...]}`, plus
/// `"explain"` with the variants and traces of `explain` when given.
pub fn json(report: &SuiteReport, explain: Option<&CellResult>) -> serde_json::Result<String> {
    #[derive(serde::Serialize)]
    struct Explained<'a> {
        level: &'static str,
        anomaly: &'static str,
        variants: &'a [crate::model::VariantResult],
    }
    #[derive(serde::Serialize)]
    struct Document<'a> {
        #[serde(flatten)]
        report: &'a SuiteReport,
        #[serde(skip_serializing_if = "Option::is_none")]
        explain: Option<Explained<'a>>,
    }
    serde_json::to_string_pretty(&Document {
        report,
        explain: explain.map(|cell| Explained {
            level: cell.level.as_str(),
            anomaly: cell.anomaly.name(),
            variants: &cell.variants,
        }),
    })
}

/// A table that wraps to the terminal, or to 160 columns when the output is not a terminal.
fn new_table() -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    if !table.is_tty() {
        table.set_width(160);
    }
    table
}
