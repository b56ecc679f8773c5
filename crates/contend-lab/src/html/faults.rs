//! The fault suite's report as one self-contained HTML page (`contend faults --html FILE`): no
//! script, nothing fetched, the charts inline SVG drawn with the building blocks of [`super`].
//!
//! The page has, in order:
//! - a header: passed or failed, how many runs, failed runs, phases, acknowledged operations,
//!   phases that could not run;
//! - the verdict table: the terminal table's columns ([`COLUMNS`]), verdicts coloured (green:
//!   held; yellow: an unsafe baseline broke, as it should; red: a failure of the suite), a
//!   safe strategy's lost, duplicated or violated count in red;
//! - per phase (fault x backend), a timeline of its load: per strategy, acknowledged operations
//!   per second in each time bucket ([`Timeline`]), one line per strategy in its lab colour
//!   (dashed for unsafe baselines), so that the dip at an injection and the recovery after it
//!   show; orange vertical lines at the injections, numbered (and named when there is room);
//!   a grey dashed line where the load ended (retries of operations in hand go on after it);
//!   red marks where lost (a cross), duplicated (a diamond) and failed-but-applied (a triangle)
//!   operations were answered; on the right, per strategy, what the final state showed; under
//!   it, what was injected, the operations in flight, the violations' details and the attempts
//!   that did not succeed, by kind;
//! - phases that could not run, and what the columns mean.

use std::fmt::Write as _;

use super::{
    Frame, PAGE_END, Scale, color, dash, esc, facts, legend_item, num, page_start, ticks_to,
};
use crate::fault::RunRow;
use crate::fault::report::{
    COLUMNS, FaultReport, GLOSSARY, Verdict, cells, in_flight_text, passed, phases, verdict,
};
use crate::fault::timeline::Timeline;

/// The frame of a phase's timeline: wide, with room on the right for the final state.
const FRAME: Frame = Frame {
    width: 1280.0,
    height: 300.0,
    left: 62.0,
    right: 250.0,
    top: 36.0,
    bottom: 46.0,
};

/// The colour of a run's strategy: the lab's colour of the strategy it runs (`atomic+keys` and
/// `atomic (no keys)` are both `atomic`, told apart by the dashes of the unsafe one).
fn run_color(strategy: &str) -> &'static str {
    color(strategy.split(['+', ' ']).next().unwrap_or(strategy))
}

/// A short name for an injection of `fault`, for the labels of its lines.
fn injection_name(fault: &str) -> &str {
    match fault {
        "kill-connections" => "kill",
        "latency" => "delay on",
        "db-restart" => "restart",
        "redis-restart" => "redis restart",
        "lock-freeze" => "freeze",
        "instance-kill" => "SIGKILL",
        other => other,
    }
}

/// The verdict's class in the table (the lab's classes): `safe` held, `broke` an unsafe
/// baseline broke as expected, `bug` a failure of the suite.
fn verdict_class(v: Verdict) -> &'static str {
    match v {
        Verdict::Held => "safe",
        Verdict::BrokeAsExpected => "broke",
        Verdict::Failed | Verdict::BaselineHeld | Verdict::NotInjected => "bug",
    }
}

/// The verdict table: the terminal's columns, the strategy with its colour.
fn table(report: &FaultReport) -> String {
    let mut s = String::from("<table><thead><tr>");
    for c in COLUMNS {
        let _ = write!(s, "<th>{}</th>", esc(c));
    }
    s.push_str("</tr></thead><tbody>");
    for r in &report.runs {
        s.push_str("<tr>");
        let v = verdict(r);
        for (i, c) in cells(r).into_iter().enumerate() {
            let text = esc(&c.text);
            if i == COLUMNS.len() - 1 {
                let _ = write!(s, r#"<td class="v {}">{text}</td>"#, verdict_class(v));
            } else if COLUMNS[i] == "strategy" {
                let _ = write!(
                    s,
                    r#"<td><span class="dot" style="background:{}"></span>{text}</td>"#,
                    run_color(&r.strategy)
                );
            } else {
                let class = match (c.numeric, c.alarm) {
                    (true, true) => r#" class="n alarm""#,
                    (true, false) => r#" class="n""#,
                    (false, true) => r#" class="alarm""#,
                    (false, false) => "",
                };
                let _ = write!(s, "<td{class}>{text}</td>");
            }
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

/// What the final state showed for a run, for the panel right of its timeline.
fn final_state(r: &RunRow) -> (String, bool) {
    let mut parts = Vec::new();
    for (n, what) in [
        (r.lost, "lost"),
        (r.duplicated, "dup"),
        (r.violations, "viol"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    if parts.is_empty() {
        ("clean".into(), false)
    } else {
        (parts.join(", "), true)
    }
}

/// The timeline chart of one phase: a line per run, the injections, the load's end, the
/// convicted operations, and the final state per run on the right.
fn chart(fault: &str, backend: &str, rows: &[&RunRow]) -> String {
    let lines: Vec<(&RunRow, &Timeline)> = rows
        .iter()
        .map(|r| (*r, &r.timeline))
        .filter(|(_, t)| t.bucket_s > 0.0)
        .collect();
    let span = lines
        .iter()
        .map(|(_, t)| t.span_s().max(t.load_s))
        .fold(0.0_f64, f64::max)
        .max(0.1);
    let peak = lines
        .iter()
        .flat_map(|(_, t)| t.rates())
        .fold(0.0_f64, f64::max);
    let scale = Scale::linear(peak);
    let x = |t: f64| FRAME.left + t.clamp(0.0, span) / span * FRAME.pw();
    let y = |v: f64| FRAME.y(scale, v);
    let bucket_ms = lines.first().map_or(100.0, |(_, t)| t.bucket_s * 1000.0);
    let mut s = String::new();
    FRAME.open(
        &mut s,
        "faultline",
        &format!("{fault} on {backend}: acknowledged operations over time"),
        &format!(
            "acknowledged operations per second ({} ms buckets)",
            num(bucket_ms)
        ),
    );
    FRAME.y_grid(&mut s, scale);
    for t in ticks_to(span, 12.0) {
        FRAME.x_tick(&mut s, x(t), &format!("{}s", num(t)));
    }
    FRAME.axes(&mut s, "seconds since the load started");
    let (top, base) = (FRAME.top, FRAME.base());

    // The load's end.
    if let Some(load) = lines.iter().map(|(_, t)| t.load_s).reduce(f64::max) {
        let lx = x(load);
        // Left of the line when the load ends at the plot's right edge.
        let (tx, anchor) = if lx + 70.0 > FRAME.left + FRAME.pw() {
            (lx - 4.0, "end")
        } else {
            (lx + 4.0, "start")
        };
        let _ = write!(
            s,
            r##"<line x1="{lx:.1}" x2="{lx:.1}" y1="{top}" y2="{base:.1}" stroke="#8c959f" stroke-width="1.5" stroke-dasharray="4 3"/><text x="{tx:.1}" y="{:.1}" class="injl" text-anchor="{anchor}" style="fill:#57606a">load ends</text>"##,
            top + 36.0
        );
    }

    // The injections: the same instants for every run of the phase.
    let injections: &[f64] = rows
        .iter()
        .map(|r| r.timeline.injections_s.as_slice())
        .find(|v| !v.is_empty())
        .unwrap_or(&[]);
    let in_flight = rows.first().map_or(&[][..], |r| r.in_flight.as_slice());
    let gap = injections
        .windows(2)
        .map(|w| x(w[1]) - x(w[0]))
        .fold(f64::INFINITY, f64::min);
    let name = injection_name(fault);
    for (i, &at) in injections.iter().enumerate() {
        let ix = x(at);
        let label = if gap >= 12.0 * (name.len() as f64 + 4.0) * 0.6 {
            format!("{name} {}", i + 1)
        } else if gap >= 16.0 {
            (i + 1).to_string()
        } else {
            String::new()
        };
        let tip = format!(
            "{fault} injection {} at {:.2} s{}",
            i + 1,
            at,
            in_flight
                .get(i)
                .map(|n| format!(": {n} operations in flight"))
                .unwrap_or_default()
        );
        let _ = write!(
            s,
            r##"<g class="inj"><line x1="{ix:.1}" x2="{ix:.1}" y1="{top}" y2="{base:.1}" stroke="#f80" stroke-width="2"/><path d="M{:.1} {top} L{:.1} {top} L{ix:.1} {:.1} Z" fill="#f80"/><text x="{:.1}" y="{:.1}" class="injl">{}</text><title>{}</title></g>"##,
            ix - 6.0,
            ix + 6.0,
            top + 8.0,
            ix + 4.0,
            top + 20.0,
            esc(&label),
            esc(&tip)
        );
    }

    // One line per run, through the buckets' middles.
    for (r, t) in &lines {
        let c = run_color(&r.strategy);
        let pts: Vec<String> = t
            .rates()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x((i as f64 + 0.5) * t.bucket_s), y(v)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2.2" stroke-linejoin="round"{}><title>{}</title></polyline>"#,
            pts.join(" "),
            dash(r.expected_safe),
            esc(&format!("{}: {} acknowledged", r.strategy, r.acknowledged))
        );
    }

    // The convicted operations, on their run's line at the bucket of their answer.
    for (r, t) in &lines {
        let at_line = |when: f64| {
            let i = ((when / t.bucket_s) as usize).min(t.acked.len().saturating_sub(1));
            let v = t.acked.get(i).map_or(0.0, |&n| n as f64 / t.bucket_s);
            (x((i as f64 + 0.5) * t.bucket_s), y(v))
        };
        for (times, what) in [
            (&t.lost_s, "lost"),
            (&t.duplicated_s, "duplicated"),
            (&t.failed_applied_s, "failed but applied"),
        ] {
            // One mark per bucket, with the count.
            let mut i = 0;
            while i < times.len() {
                let b = (times[i] / t.bucket_s) as usize;
                let n = times[i..]
                    .iter()
                    .take_while(|&&w| (w / t.bucket_s) as usize == b)
                    .count();
                let (mx, my) = at_line(times[i]);
                let tip = esc(&format!(
                    "{}: {n} {what} operation(s) answered at {:.2} s",
                    r.strategy, times[i]
                ));
                let shape = match what {
                    "lost" => format!(
                        r##"<path d="M{:.1} {:.1} L{:.1} {:.1} M{:.1} {:.1} L{:.1} {:.1}" stroke="#e00" stroke-width="3"/>"##,
                        mx - 6.0,
                        my - 6.0,
                        mx + 6.0,
                        my + 6.0,
                        mx - 6.0,
                        my + 6.0,
                        mx + 6.0,
                        my - 6.0
                    ),
                    "duplicated" => format!(
                        r##"<path d="M{mx:.1} {:.1} L{:.1} {my:.1} L{mx:.1} {:.1} L{:.1} {my:.1} Z" fill="#e00" stroke="#fff" stroke-width="1"/>"##,
                        my - 7.0,
                        mx + 7.0,
                        my + 7.0,
                        mx - 7.0
                    ),
                    _ => format!(
                        r##"<path d="M{mx:.1} {:.1} L{:.1} {:.1} L{:.1} {:.1} Z" fill="#e00" stroke="#fff" stroke-width="1"/>"##,
                        my - 7.0,
                        mx + 7.0,
                        my + 6.0,
                        mx - 7.0,
                        my + 6.0
                    ),
                };
                let count = if n > 1 {
                    format!(
                        r#"<text x="{:.1}" y="{:.1}" class="markn">{n}</text>"#,
                        mx + 8.0,
                        my - 6.0
                    )
                } else {
                    String::new()
                };
                let _ = write!(
                    s,
                    r#"<g class="mark">{shape}{count}<title>{tip}</title></g>"#
                );
                i += n;
            }
        }
    }

    // The final state per run, on the right.
    let px = FRAME.left + FRAME.pw() + 16.0;
    let _ = write!(
        s,
        r#"<text x="{px:.1}" y="{:.1}" class="label">final state</text>"#,
        top + 10.0
    );
    for (k, r) in rows.iter().enumerate() {
        let ry = top + 30.0 + 17.0 * k as f64;
        let (text, bad) = final_state(r);
        let c = run_color(&r.strategy);
        let _ = write!(
            s,
            r#"<line x1="{px:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="{c}" stroke-width="3"{}/><text x="{:.1}" y="{ry:.1}" class="{}">{}: {}</text>"#,
            px + 16.0,
            ry - 4.0,
            ry - 4.0,
            dash(r.expected_safe),
            px + 21.0,
            if bad { "fbad" } else { "fok" },
            esc(&r.strategy),
            esc(&text)
        );
    }
    s.push_str("</svg>");
    s
}

/// One phase: title, legend, the timeline, what was injected, the violations and errors.
fn phase(fault: &str, backend: &str, rows: &[&RunRow]) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<section class="group"><h3>{} on {}</h3><div class="legend">"#,
        esc(fault),
        esc(backend)
    );
    for r in rows {
        let v = verdict(r);
        let _ = write!(
            s,
            r#"{}<span class="vtag {}">{}</span>"#,
            legend_item(&r.strategy, run_color(&r.strategy), r.expected_safe),
            verdict_class(v),
            esc(v.label())
        );
    }
    s.push_str("</div>");
    s.push_str(&chart(fault, backend, rows));
    let first = rows[0];
    // What the rows share (the injector's log, clause by clause), then what each adds
    // (lock-freeze: what its holder's late write met).
    let clauses: Vec<Vec<&str>> = rows
        .iter()
        .map(|r| r.injected.split("; ").collect())
        .collect();
    let shared = (0..clauses[0].len())
        .take_while(|&k| clauses.iter().all(|c| c.get(k) == clauses[0].get(k)))
        .count();
    let common = clauses[0][..shared].join("; ");
    let _ = write!(
        s,
        r#"<p class="injected"><b>Injected</b>: {}{}. <b>In flight</b> at each injection (all strategies of the phase{}): {}.</p>"#,
        esc(if common.is_empty() {
            "per strategy, below"
        } else {
            &common
        }),
        if first.fault_observed {
            ""
        } else {
            " — NOT OBSERVED"
        },
        if fault == "instance-kill" {
            "; the requests open on the instance killed"
        } else {
            ""
        },
        esc(&in_flight_text(&first.in_flight))
    );
    for (r, c) in rows.iter().zip(&clauses) {
        if c.len() > shared {
            let _ = write!(
                s,
                r#"<p class="injected"><b>{}</b>: {}</p>"#,
                esc(&r.strategy),
                esc(&c[shared..].join("; "))
            );
        }
    }
    let mut details = String::new();
    for r in rows {
        for d in &r.violation_details {
            let _ = write!(details, "<li><b>{}</b>: {}</li>", esc(&r.strategy), esc(d));
        }
    }
    if !details.is_empty() {
        let _ = write!(
            s,
            r#"<p class="marks">Violations:</p><ul class="details">{details}</ul>"#
        );
    }
    let mut errors = String::new();
    for r in rows.iter().filter(|r| !r.errors.is_empty()) {
        let kinds: Vec<String> = r.errors.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        let _ = write!(
            errors,
            "<li><b>{}</b>: {}</li>",
            esc(&r.strategy),
            esc(&kinds.join(", "))
        );
    }
    if !errors.is_empty() {
        let _ = write!(
            s,
            r#"<p class="marks">Attempts that did not succeed, by what they met:</p><ul class="details">{errors}</ul>"#
        );
    }
    s.push_str("</section>");
    s
}

/// The page: header, verdict table, a timeline per phase, phases that could not run.
pub fn render(report: &FaultReport) -> String {
    let ok = passed(report);
    let failing = report.runs.iter().filter(|r| verdict(r).fails()).count();
    let status = if ok {
        "PASSED: every safe strategy held, every baseline broke, every fault was observed"
            .to_string()
    } else {
        format!(
            "FAILED: {failing} run(s) failed the suite, {} phase(s) could not run",
            report.errors.len()
        )
    };
    let phases = phases(report);
    let acked: u64 = report.runs.iter().map(|r| r.acknowledged).sum();
    let mut s = String::with_capacity(64 * 1024);
    s.push_str(&page_start("contend fault suite report", ok, &status));
    s.push_str(&facts(&[
        (report.runs.len().to_string(), "runs"),
        (failing.to_string(), "failed"),
        (phases.len().to_string(), "phases"),
        (acked.to_string(), "acknowledged ops"),
        (report.errors.len().to_string(), "phases not run"),
    ]));

    s.push_str("<h2>Verdicts</h2>");
    if report.runs.is_empty() {
        s.push_str("<p>No phase produced a run.</p>");
    } else {
        s.push_str(&table(report));
    }

    s.push_str("<h2>Each phase over time</h2>");
    s.push_str(r#"<p class="marks">Per fault and backend, every strategy ran at once as two instances under the same fault. Lines: acknowledged operations per second in each time bucket, one per strategy (solid: expected to be safe; dashed: unsafe baselines), so the dip at an injection and the recovery after it show. Orange lines: the injections, numbered (hover for the operations in flight). Grey dashed line: the load's end; operations in hand may still be retried after it. Red marks on a line, at the time of their answer: a cross for an acknowledged operation the final state lost, a diamond for one applied twice, a triangle for one reported failed but applied (a number when several share a bucket). Right: what the final state showed per strategy (the books are checked after the load).</p>"#);
    for (fault, backend, rows) in &phases {
        s.push_str(&phase(fault, backend, rows));
    }

    if !report.errors.is_empty() {
        s.push_str(r#"<h2>Phases that could not run</h2><ul class="details">"#);
        for e in &report.errors {
            let _ = write!(s, "<li>{}</li>", esc(e));
        }
        s.push_str("</ul>");
    }
    let _ = write!(
        s,
        r#"<h2>What the columns mean</h2><p class="marks">{}</p>"#,
        esc(GLOSSARY)
    );
    s.push_str(PAGE_END);
    s
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::fault::ledger::{Answer, Tracker};

    /// A run of `strategy` in a 1 s phase with an injection at 0.4 s: acknowledgements every
    /// 10 ms except between 0.4 and 0.6 s (the dip); `dup` of them applied twice.
    fn run(fault: &str, strategy: &str, safe: bool, dup: u64, viol: u64) -> RunRow {
        let b = Instant::now();
        let at = |ms: u64| b + Duration::from_millis(ms);
        let mut records = Vec::new();
        let mut applied = HashMap::new();
        for (id, ms) in (0..100u64).filter(|i| !(40..60).contains(i)).enumerate() {
            let mut t = Tracker::new(id as u64);
            t.answer(Answer::Ok, at(ms * 10), at(ms * 10 + 5));
            records.push(t.finish());
            applied.insert(id as u64, if (id as u64) < dup { 2 } else { 1 });
        }
        let counts = crate::fault::ledger::account(&records, &applied);
        let log = crate::fault::inject::FaultLog {
            injected: vec![at(400)],
            in_flight: vec![7],
            effect: "pg_terminate_backend <of> every & other".into(),
            observed: true,
            recovers: true,
            holders: Vec::new(),
        };
        RunRow {
            fault: fault.into(),
            strategy: strategy.into(),
            backend: "postgres".into(),
            expected_safe: safe,
            violations: viol,
            violation_details: (viol > 0)
                .then(|| "money: <script>alert(1)</script>".to_string())
                .into_iter()
                .collect(),
            recovered: true,
            timeline: Timeline::build(b, Duration::from_secs(1), &records, &applied, &log.injected),
            ..RunRow::measured(&counts, &log, Some(Duration::from_millis(200)))
        }
    }

    #[test]
    fn the_page_is_self_contained_escaped_and_has_every_part() {
        let report = FaultReport {
            runs: vec![
                run("kill-connections", "none", false, 0, 4),
                run("kill-connections", "atomic", true, 0, 0),
                run("instance-kill", "atomic+keys", true, 0, 0),
                run("instance-kill", "atomic (no keys)", false, 3, 0),
            ],
            errors: vec!["db-restart on postgres: <gone>".into()],
        };
        let page = render(&report);
        assert!(page.starts_with("<!DOCTYPE html>"));
        for needle in ["<script", "src=", "href=", "@import", "url("] {
            assert!(!page.contains(needle), "page contains {needle}");
        }
        assert!(page.contains("money: &lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("pg_terminate_backend &lt;of&gt; every &amp; other"));
        assert!(page.contains("db-restart on postgres: &lt;gone&gt;"));
        // A phase error fails the suite.
        assert!(page.contains("FAILED: 0 run(s) failed the suite, 1 phase(s) could not run"));
        // One timeline per phase, one line per run, one injection line per phase.
        assert_eq!(page.matches(r#"<svg class="faultline""#).count(), 2);
        assert_eq!(page.matches("<polyline").count(), 4);
        assert_eq!(page.matches(r#"<g class="inj">"#).count(), 2);
        assert!(page.contains("kill-connections injection 1 at 0.40 s: 7 operations in flight"));
        assert_eq!(page.matches("<svg").count(), page.matches("</svg>").count());
        // The dip: the buckets from 0.4 to 0.6 s are at 0 (y = the plot's bottom), the others
        // at 100 ops/s.
        let base = format!(",{:.1}", FRAME.base());
        let line = page.split("<polyline points=\"").nth(1).unwrap();
        let line = &line[..line.find('"').unwrap()];
        assert_eq!(line.split(' ').count(), 10, "{line}");
        assert_eq!(line.matches(&base).count(), 2, "{line}");
        // The three duplicates of the run without keys share a bucket: one diamond, "3".
        assert_eq!(page.matches(r#"<g class="mark">"#).count(), 1);
        assert!(page.contains("atomic (no keys): 3 duplicated operation(s) answered at"));
        // Same colour for both instance-kill runs, dashed for the one without keys.
        assert!(page.contains("atomic (no keys): 3 dup"));
        assert!(page.contains("none: 4 viol"));
        // The table: the terminal's columns, coloured verdicts, the broken promise in red.
        for c in COLUMNS {
            assert!(page.contains(&format!("<th>{c}</th>")), "{c}");
        }
        assert!(page.contains(r#"<td class="v broke">broke (expected)</td>"#));
        assert!(page.contains(r#"<td class="v safe">held</td>"#));
        assert!(!page.contains(r#"class="n alarm""#));
    }

    #[test]
    fn what_the_runs_of_a_phase_share_is_shown_once_and_what_each_adds_after_it() {
        let mut a = run("lock-freeze", "redis", true, 0, 0);
        let mut b = run("lock-freeze", "redis-spin", false, 0, 1);
        a.injected = "frozen; redis: x; redis-spin: y; its late write was rejected".into();
        b.injected = "frozen; redis: x; redis-spin: y; its late write was APPLIED".into();
        let page = render(&FaultReport {
            runs: vec![a, b],
            errors: vec![],
        });
        assert_eq!(page.matches("frozen; redis: x; redis-spin: y").count(), 1);
        assert!(page.contains("<b>redis</b>: its late write was rejected</p>"));
        assert!(page.contains("<b>redis-spin</b>: its late write was APPLIED</p>"));
        // Runs with the same text: once, nothing per run.
        let page = render(&FaultReport {
            runs: vec![
                run("latency", "none", false, 0, 1),
                run("latency", "atomic", true, 0, 0),
            ],
            errors: vec![],
        });
        assert_eq!(page.matches(r#"<p class="injected">"#).count(), 1);
    }

    #[test]
    fn failures_are_red_and_an_empty_report_still_renders() {
        let mut bad = run("latency", "atomic", true, 2, 0);
        bad.fault_observed = true;
        let report = FaultReport {
            runs: vec![bad, run("latency", "none", false, 0, 0)],
            errors: vec![],
        };
        let page = render(&report);
        assert!(page.contains("FAILED: 2 run(s) failed the suite"));
        assert!(page.contains(r#"<td class="n alarm">2</td>"#));
        assert!(page.contains(r#"<td class="v bug">FAILED</td>"#));
        assert!(page.contains(r#"<td class="v bug">DID NOT BREAK</td>"#));
        let empty = render(&FaultReport {
            runs: vec![],
            errors: vec![],
        });
        assert!(empty.contains("No phase produced a run."));
        assert!(empty.contains("PASSED"));
    }
}
