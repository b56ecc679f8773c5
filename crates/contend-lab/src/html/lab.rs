//! The lab's report as one self-contained HTML page (`contend lab --html FILE`): no script, no
//! stylesheet or font fetched from anywhere, the charts are inline SVG drawn with the building
//! blocks of [`super`].
//!
//! The page has, in order:
//! - a header: how many runs, how many failed, the backends, the summary of the terminal report;
//! - per backend x scenario, two charts side by side: throughput (ops/s) against workers and p99
//!   latency against workers, one line per strategy (safe strategies solid with filled points,
//!   unsafe baselines dashed with hollow points, a red ring on every point whose run violated an
//!   invariant), the workers axis on a log scale; numbered diamonds on the throughput chart mark
//!   where one strategy's throughput overtakes another's ([`crossings`]), listed under the charts;
//! - a timeline: one lane per backend x scenario x strategy, one bar per run from its start to its
//!   end (seconds since the lab started), red diamonds where violations were found, orange
//!   triangles where faults were injected ([`crate::report::RunEvent`]);
//! - the full table (every column of `--wide`), the lock table, the details of failed invariants
//!   and errors, and the skipped combinations.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{
    Frame, PAGE_END, Scale, color, dash, esc, facts, legend_item, num, page_start, ticks_to,
};
use crate::report::{EventKind, LabReport, RunReport, short_verdict};

/// Where one strategy's throughput overtakes another's, for one backend and scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Crossing {
    /// Backend of the runs.
    pub backend: String,
    /// Scenario of the runs.
    pub scenario: String,
    /// The strategy that is faster after the crossing.
    pub faster: String,
    /// The strategy that was faster before it.
    pub slower: String,
    /// The measured worker counts the crossing lies between: the last where the slower one
    /// led (by more than [`LEAD`]) and the first where the faster one does.
    pub between: (usize, usize),
    /// Where the two lines cross as the chart draws them: interpolated on the log scale of the
    /// workers axis, and of the throughput axis when that is logarithmic (values spanning more
    /// than 20x), else linearly in throughput.
    pub workers: f64,
    /// The throughput both lines have there (ops/s).
    pub throughput: f64,
}

/// One strategy's points in one chart: per worker count (ascending), the means over repeats.
#[derive(Debug, Clone)]
struct Series {
    strategy: String,
    expected_safe: bool,
    points: Vec<Point>,
}

#[derive(Debug, Clone, Copy)]
struct Point {
    workers: usize,
    throughput: f64,
    p99: f64,
    violations: u64,
    failed: bool,
}

/// The runs of one backend x scenario, one series per strategy in the order they ran.
#[derive(Debug, Clone)]
struct Group {
    backend: String,
    scenario: String,
    series: Vec<Series>,
}

impl Group {
    /// The vertical scale of the group's chart of `measure`: log when its values span more
    /// than 20x, else linear from 0.
    fn scale(&self, measure: Measure) -> Scale {
        let values: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.value(measure)))
            .collect();
        Scale::for_values(&values)
    }
}

impl Point {
    fn value(&self, measure: Measure) -> f64 {
        match measure {
            Measure::Throughput => self.throughput,
            Measure::P99 => self.p99,
        }
    }
}

/// Groups the runs that measured something (operations > 0) by backend x scenario x strategy,
/// averaging repeats, in the order the runs appear.
fn groups(report: &LabReport) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    // (group, series, workers) -> the sums over the repeats
    let mut acc: BTreeMap<(usize, usize, usize), Sums> = BTreeMap::new();
    for r in report.runs.iter().filter(|r| r.operations > 0) {
        let g = match out
            .iter()
            .position(|g| g.backend == r.backend && g.scenario == r.scenario)
        {
            Some(g) => g,
            None => {
                out.push(Group {
                    backend: r.backend.clone(),
                    scenario: r.scenario.clone(),
                    series: Vec::new(),
                });
                out.len() - 1
            }
        };
        let series = &mut out[g].series;
        let s = match series.iter().position(|s| s.strategy == r.strategy) {
            Some(s) => s,
            None => {
                series.push(Series {
                    strategy: r.strategy.clone(),
                    expected_safe: r.expected_safe,
                    points: Vec::new(),
                });
                series.len() - 1
            }
        };
        series[s].expected_safe &= r.expected_safe;
        let e = acc.entry((g, s, r.workers)).or_default();
        e.throughput += r.throughput_ops_s;
        e.p99 += r.latency_ms.p99;
        e.runs += 1;
        e.violations += r.violations;
        e.failed |= r.failed;
    }
    for ((g, s, workers), sums) in acc {
        out[g].series[s].points.push(Point {
            workers,
            throughput: sums.throughput / f64::from(sums.runs),
            p99: sums.p99 / f64::from(sums.runs),
            violations: sums.violations,
            failed: sums.failed,
        });
    }
    out
}

/// The repeats of one strategy at one worker count, summed.
#[derive(Debug, Default)]
struct Sums {
    throughput: f64,
    p99: f64,
    runs: u32,
    violations: u64,
    failed: bool,
}

/// Every place where one strategy's throughput overtakes another's, per backend x scenario:
/// for each pair of strategies, over the worker counts both ran (averaging repeats), wherever
/// the lead changes hands (a lead is a difference of more than [`LEAD`]; closer is a tie). The
/// crossing point is where the chart's straight segments meet ([`Crossing::workers`]). Runs
/// that measured nothing (operations = 0) are left out.
pub fn crossings(report: &LabReport) -> Vec<Crossing> {
    let mut out = Vec::new();
    for group in groups(report) {
        let log = matches!(group.scale(Measure::Throughput), Scale::Log { .. });
        let mut found = Vec::new();
        for (i, a) in group.series.iter().enumerate() {
            for b in &group.series[i + 1..] {
                found.extend(cross(&group, a, b, log));
            }
        }
        found.sort_by(|x, y| x.workers.total_cmp(&y.workers));
        out.extend(found);
    }
    out
}

/// How far ahead a strategy must be at a worker count to lead there: by more than this share
/// of the larger throughput. Closer than that is a tie (short runs are noisy), and a crossing is
/// where the lead changes hands.
pub const LEAD: f64 = 0.05;

/// The crossings of two series of `group`, interpolated where the chart's straight segments
/// meet: on the log scale of workers, and of throughput when `log` (the chart's scale).
fn cross(group: &Group, a: &Series, b: &Series, log: bool) -> Vec<Crossing> {
    // The worker counts both measured, ascending: (workers, a's, b's throughput).
    let common: Vec<(usize, f64, f64)> = a
        .points
        .iter()
        .filter_map(|p| {
            b.points
                .iter()
                .find(|q| q.workers == p.workers)
                .map(|q| (p.workers, p.throughput, q.throughput))
        })
        .collect();
    let d = |i: usize| common[i].1 - common[i].2;
    // The throughput as the chart places it (throughputs are positive: runs that measured
    // nothing are not in a series).
    let y = |t: f64| {
        if log {
            t.max(f64::MIN_POSITIVE).ln()
        } else {
            t
        }
    };
    let leads = |i: usize| d(i).abs() > LEAD * common[i].1.max(common[i].2);
    let mut out = Vec::new();
    // The last point where one of them led.
    let mut last: Option<usize> = None;
    for i in (0..common.len()).filter(|&i| leads(i)) {
        if let Some(j) = last
            && (d(j) < 0.0) != (d(i) < 0.0)
        {
            let (faster, slower) = if d(i) > 0.0 { (a, b) } else { (b, a) };
            // The lines cross on the first segment after j where the difference changes sign
            // (or reaches zero): interpolate there, on the log scale of workers.
            let k = (j + 1..=i)
                .find(|&k| d(k) == 0.0 || (d(k) < 0.0) != (d(j) < 0.0))
                .unwrap_or(i);
            let (w0, ta0, tb0) = common[k - 1];
            let (w1, ta1, tb1) = common[k];
            let (d0, d1) = (y(ta0) - y(tb0), y(ta1) - y(tb1));
            let f = d0 / (d0 - d1);
            let x = lg(w0) + (lg(w1) - lg(w0)) * f;
            let at = y(ta0) + (y(ta1) - y(ta0)) * f;
            out.push(Crossing {
                backend: group.backend.clone(),
                scenario: group.scenario.clone(),
                faster: faster.strategy.clone(),
                slower: slower.strategy.clone(),
                between: (common[j].0, common[i].0),
                workers: x.exp2(),
                throughput: if log { at.exp() } else { at },
            });
        }
        last = Some(i);
    }
    out
}

fn lg(workers: usize) -> f64 {
    (workers.max(1) as f64).log2()
}

/// The frame of the charts against workers.
const FRAME: Frame = Frame {
    width: 640.0,
    height: 330.0,
    left: 62.0,
    right: 18.0,
    top: 36.0,
    bottom: 46.0,
};

/// Which measure a chart shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    Throughput,
    P99,
}

/// One chart of a group: the measure against workers, one line per strategy; on the throughput
/// chart, numbered diamonds at `crossings`.
fn chart(group: &Group, measure: Measure, crossings: &[&Crossing]) -> String {
    let value = |p: &Point| p.value(measure);
    let scale = group.scale(measure);
    let mut workers: Vec<usize> = group
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.workers))
        .collect();
    workers.sort_unstable();
    workers.dedup();
    let (wlo, whi) = match (workers.first(), workers.last()) {
        (Some(&a), Some(&b)) if a != b => (lg(a), lg(b)),
        (Some(&a), _) => (lg(a) - 1.0, lg(a) + 1.0),
        _ => (0.0, 1.0),
    };
    let pad = (whi - wlo) * 0.06;
    let (xlo, xhi) = (wlo - pad, whi + pad);
    let x = |w: f64| FRAME.left + (w - xlo) / (xhi - xlo) * FRAME.pw();
    let y = |v: f64| FRAME.y(scale, v);

    let (title, unit) = match measure {
        Measure::Throughput => ("throughput", "ops/s"),
        Measure::P99 => ("p99 latency", "ms"),
    };
    let log_note = if matches!(scale, Scale::Log { .. }) {
        ", log scale"
    } else {
        ""
    };
    let mut s = String::new();
    FRAME.open(
        &mut s,
        "chart",
        &format!("{} {title} against workers", group.scenario),
        &format!("{title} ({unit}{log_note})"),
    );
    FRAME.y_grid(&mut s, scale);
    // Workers ticks: the measured counts.
    for &w in &workers {
        FRAME.x_tick(&mut s, x(lg(w)), &w.to_string());
    }
    FRAME.axes(&mut s, "workers (log scale)");
    // Lines, then points.
    for series in &group.series {
        let c = color(&series.strategy);
        let dash = dash(series.expected_safe);
        if series.points.len() > 1 {
            let pts: Vec<String> = series
                .points
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(lg(p.workers)), y(value(p))))
                .collect();
            let _ = write!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2.2"{dash}/>"#,
                pts.join(" ")
            );
        }
        for p in &series.points {
            let (px, py) = (x(lg(p.workers)), y(value(p)));
            let fill = if series.expected_safe { c } else { "#fff" };
            let tip = format!(
                "{} at {} workers: {} {unit}{}",
                series.strategy,
                p.workers,
                num(value(p)),
                if p.violations > 0 {
                    format!(", {} violations", p.violations)
                } else {
                    String::new()
                }
            );
            if p.violations > 0 || p.failed {
                let _ = write!(
                    s,
                    r##"<circle cx="{px:.1}" cy="{py:.1}" r="7.5" fill="none" stroke="#e00" stroke-width="2"/>"##
                );
            }
            let _ = write!(
                s,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="4" fill="{fill}" stroke="{c}" stroke-width="2"><title>{}</title></circle>"#,
                esc(&tip)
            );
        }
    }
    if measure == Measure::Throughput {
        for (i, c) in crossings.iter().enumerate() {
            let (cx, cy) = (x(c.workers.log2()), y(c.throughput));
            let _ = write!(
                s,
                r##"<g class="cross"><path d="M{cx:.1} {:.1} L{:.1} {cy:.1} L{cx:.1} {:.1} L{:.1} {cy:.1} Z" fill="#fff" stroke="#111" stroke-width="1.6"/><text x="{cx:.1}" y="{:.1}" class="cnum" text-anchor="middle">{}</text><title>{}</title></g>"##,
                cy - 7.0,
                cx + 7.0,
                cy + 7.0,
                cx - 7.0,
                cy - 10.0,
                i + 1,
                esc(&crossing_text(c))
            );
        }
    }
    s.push_str("</svg>");
    s
}

/// `optimistic overtakes pessimistic between 8 and 32 workers (at about 17, 1.2k ops/s)`.
fn crossing_text(c: &Crossing) -> String {
    format!(
        "{} overtakes {} between {} and {} workers (at about {:.0}, {} ops/s)",
        c.faster,
        c.slower,
        c.between.0,
        c.between.1,
        c.workers,
        num(c.throughput)
    )
}

/// The legend of a group: a swatch per strategy (solid or dashed), and what the marks mean.
fn legend(group: &Group) -> String {
    let mut s = String::from(r#"<div class="legend">"#);
    for series in &group.series {
        s.push_str(&legend_item(
            &series.strategy,
            color(&series.strategy),
            series.expected_safe,
        ));
    }
    s.push_str("</div>");
    s
}

/// The timeline: a lane per backend x scenario x strategy, a bar per run, event markers.
fn timeline(report: &LabReport) -> String {
    let runs: Vec<&RunReport> = report.runs.iter().collect();
    if runs.is_empty() {
        return String::new();
    }
    let mut lanes: Vec<(String, Vec<&RunReport>)> = Vec::new();
    for r in &runs {
        let name = format!("{} · {} · {}", r.backend, r.scenario, r.strategy);
        match lanes.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push(r),
            None => lanes.push((name, vec![r])),
        }
    }
    let end = runs
        .iter()
        .map(|r| r.started_s + r.duration_s)
        .fold(0.0_f64, f64::max)
        .max(0.001);
    let label_w = 250.0;
    let width = 1320.0;
    let lane_h = 18.0;
    let top = 24.0;
    let height = top + lane_h * lanes.len() as f64 + 40.0;
    let pw = width - label_w - 20.0;
    let x = |t: f64| label_w + t / end * pw;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="timeline" viewBox="0 0 {width} {height:.0}" width="{width}" height="{height:.0}" role="img" aria-label="timeline of the runs">"#
    );
    // Time ticks.
    for t in ticks_to(end, 8.0) {
        let tx = x(t);
        let _ = write!(
            s,
            r#"<line x1="{tx:.1}" x2="{tx:.1}" y1="{top}" y2="{:.1}" class="grid"/><text x="{tx:.1}" y="{:.1}" class="tick" text-anchor="middle">{}s</text>"#,
            top + lane_h * lanes.len() as f64,
            top + lane_h * lanes.len() as f64 + 16.0,
            num(t)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" class="label" text-anchor="middle">seconds since the lab started</text>"#,
        label_w + pw / 2.0,
        height - 6.0
    );
    for (i, (name, lane)) in lanes.iter().enumerate() {
        let ly = top + lane_h * i as f64;
        if i % 2 == 0 {
            let _ = write!(
                s,
                r##"<rect x="0" y="{ly:.1}" width="{width}" height="{lane_h}" fill="#f6f7f9"/>"##
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" class="lane" text-anchor="end">{}</text>"#,
            label_w - 8.0,
            ly + 13.0,
            esc(name)
        );
        for r in lane {
            let x0 = x(r.started_s);
            let w = (r.duration_s / end * pw).max(2.5);
            let c = color(&r.strategy);
            let stroke = if r.failed { "#e00" } else { c };
            let tip = format!(
                "{}/{} on {}, {} workers: {:.2}s from {:.2}s, {} ops, {} violations; {}",
                r.scenario,
                r.strategy,
                r.backend,
                r.workers,
                r.duration_s,
                r.started_s,
                r.operations,
                r.violations,
                r.verdict
            );
            let _ = write!(
                s,
                r#"<rect x="{x0:.1}" y="{:.1}" width="{w:.1}" height="{:.1}" fill="{c}" fill-opacity="0.55" stroke="{stroke}" stroke-width="{}"><title>{}</title></rect>"#,
                ly + 3.0,
                lane_h - 6.0,
                if r.failed { 2 } else { 1 },
                esc(&tip)
            );
            if w > 26.0 {
                let _ = write!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" class="bar">{}w</text>"#,
                    x0 + 3.0,
                    ly + 13.0,
                    r.workers
                );
            }
            for e in &r.events {
                let ex = x(r.started_s + e.at_s.clamp(0.0, r.duration_s.max(0.0)));
                let cy = ly + lane_h / 2.0;
                let tip = esc(&format!(
                    "{} at +{:.2}s in {}/{} {}w: {}",
                    match e.kind {
                        EventKind::Fault => "fault",
                        EventKind::Violation => "violation",
                    },
                    e.at_s,
                    r.scenario,
                    r.strategy,
                    r.workers,
                    e.label
                ));
                match e.kind {
                    EventKind::Violation => {
                        let _ = write!(
                            s,
                            r##"<path d="M{ex:.1} {:.1} L{:.1} {cy:.1} L{ex:.1} {:.1} L{:.1} {cy:.1} Z" fill="#e00" stroke="#fff" stroke-width="1"><title>{tip}</title></path>"##,
                            cy - 7.0,
                            ex + 6.0,
                            cy + 7.0,
                            ex - 6.0
                        );
                    }
                    EventKind::Fault => {
                        let _ = write!(
                            s,
                            r##"<line x1="{ex:.1}" x2="{ex:.1}" y1="{ly:.1}" y2="{:.1}" stroke="#f80" stroke-width="1.5"/><path d="M{:.1} {ly:.1} L{:.1} {ly:.1} L{ex:.1} {:.1} Z" fill="#f80"><title>{tip}</title></path>"##,
                            ly + lane_h,
                            ex - 6.0,
                            ex + 6.0,
                            ly + 9.0
                        );
                    }
                }
            }
        }
    }
    s.push_str("</svg>");
    s
}

/// The verdict's class in the table: `bug`, `safe`, `broke` (baseline, expected) or `held`.
fn verdict_class(r: &RunReport) -> &'static str {
    if r.failed {
        "bug"
    } else if r.expected_safe {
        "safe"
    } else if r.violations > 0 {
        "broke"
    } else {
        "held"
    }
}

fn table(report: &LabReport) -> String {
    // Anomalies of checked histories (part of the violations), shown when a run has one.
    let histories = report.runs.iter().any(|r| r.history.is_some());
    let mut s = String::from(
        "<table><thead><tr><th>scenario</th><th>strategy</th><th>backend</th><th>workers</th>\
         <th>ops</th><th>succeeded</th><th>refused</th><th>retries</th><th>conflicts</th>\
         <th>errors</th><th>gave up</th><th>ops/s</th><th>p50 ms</th><th>p99 ms</th><th>violations</th>",
    );
    if histories {
        s.push_str("<th>anomalies</th>");
    }
    s.push_str("<th>verdict</th></tr></thead><tbody>");
    for r in &report.runs {
        let conflicts = r.conflicts_text();
        let anomalies = if histories {
            format!(r#"<td class="n">{}</td>"#, r.anomalies_text())
        } else {
            String::new()
        };
        let _ = write!(
            s,
            r#"<tr><td>{}</td><td><span class="dot" style="background:{}"></span>{}</td><td>{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td>{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{:.0}</td><td class="n">{:.2}</td><td class="n">{:.2}</td><td class="n">{}</td>{anomalies}<td class="v {}" title="{}">{}</td></tr>"#,
            esc(&r.scenario),
            color(&r.strategy),
            esc(&r.strategy),
            esc(&r.backend),
            r.workers,
            r.operations,
            r.succeeded,
            r.refused,
            r.retries,
            esc(&conflicts),
            r.errors,
            r.gave_up,
            r.throughput_ops_s,
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.violations,
            verdict_class(r),
            esc(&r.verdict),
            esc(short_verdict(&r.verdict))
        );
    }
    s.push_str("</tbody></table>");
    let locked: Vec<&RunReport> = report.runs.iter().filter(|r| r.lock.is_some()).collect();
    if !locked.is_empty() {
        s.push_str(
            "<h3>Distributed locks</h3><table><thead><tr><th>scenario</th><th>strategy</th>\
             <th>workers</th><th>acquisitions</th><th>redis cmds</th><th>cmds/acq</th>\
             <th>handoff p50 ms</th><th>fenced rejections</th></tr></thead><tbody>",
        );
        for r in locked {
            if let Some(l) = &r.lock {
                let _ = write!(
                    s,
                    r#"<tr><td>{}</td><td>{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{:.2}</td><td class="n">{:.3}</td><td class="n">{}</td></tr>"#,
                    esc(&r.scenario),
                    esc(&r.strategy),
                    r.workers,
                    l.acquisitions,
                    l.redis_commands,
                    l.commands_per_acquisition,
                    l.handoff_p50_ms,
                    l.fenced_rejections
                );
            }
        }
        s.push_str("</tbody></table>");
    }
    let mut details = String::new();
    for r in &report.runs {
        let head = format!(
            "{}/{}/{}w on {}",
            r.scenario, r.strategy, r.workers, r.backend
        );
        for inv in r.invariants.iter().filter(|i| !i.ok) {
            let _ = write!(
                details,
                "<li><b>{}</b>: {} violated: {}</li>",
                esc(&head),
                esc(&inv.name),
                esc(&inv.detail)
            );
        }
        if let Some(h) = r.history.as_ref().filter(|h| h.anomalies > 0) {
            let _ = write!(
                details,
                "<li><b>{}</b>: history anomalies: {}",
                esc(&head),
                esc(&h.kinds_text())
            );
            for w in &h.witnesses {
                let _ = write!(details, "<pre>{}</pre>", esc(w));
            }
            details.push_str("</li>");
        }
        for e in &r.error_samples {
            let _ = write!(details, "<li><b>{}</b>: error: {}</li>", esc(&head), esc(e));
        }
    }
    if !details.is_empty() {
        let _ = write!(s, "<h3>Details</h3><ul class=\"details\">{details}</ul>");
    }
    if !report.skipped.is_empty() {
        s.push_str("<h3>Skipped</h3><ul class=\"details\">");
        for line in report.skipped_lines() {
            let _ = write!(s, "<li>{}</li>", esc(&line));
        }
        s.push_str("</ul>");
    }
    if let Some(cpus) = &report.cpus {
        let _ = write!(s, "<p>{}</p>", esc(&cpus.line()));
    }
    s
}

/// The page: header, charts per backend x scenario with their crossings, timeline, table.
pub fn render(report: &LabReport) -> String {
    let groups = groups(report);
    let all_crossings = crossings(report);
    let failed = report.runs.iter().filter(|r| r.failed).count();
    let mut backends: Vec<&str> = report.runs.iter().map(|r| r.backend.as_str()).collect();
    backends.sort_unstable();
    backends.dedup();
    let status = if failed > 0 {
        format!("FAILED: {failed} run(s) of safe strategies broke")
    } else {
        "PASSED: every safe strategy held".to_string()
    };
    let mut s = String::with_capacity(64 * 1024);
    s.push_str(&page_start("contend lab report", failed == 0, &status));
    let violated = report.runs.iter().filter(|r| r.violations > 0).count();
    s.push_str(&facts(&[
        (report.runs.len().to_string(), "runs"),
        (failed.to_string(), "failed"),
        (violated.to_string(), "with violations"),
        (report.skipped.len().to_string(), "skipped"),
        (all_crossings.len().to_string(), "crossings"),
        (backends.join(", "), "backend(s)"),
    ]));
    let _ = write!(
        s,
        r#"<div class="summary">{}</div>"#,
        esc(report.summary().trim())
    );

    s.push_str("<h2>Throughput and p99 against workers</h2>");
    let _ = write!(
        s,
        r#"<p class="marks">One line per strategy; solid lines with filled points are strategies expected to be safe, dashed lines with hollow points unsafe baselines. A red ring marks a run that violated an invariant (or failed). Numbered diamonds mark where one strategy's throughput overtakes another's (where the drawn lines meet). A vertical axis turns logarithmic when its values span more than 20x. Hover a point for its value.</p>"#
    );
    if groups.is_empty() {
        s.push_str("<p>No run measured anything.</p>");
    }
    for group in &groups {
        let here: Vec<&Crossing> = all_crossings
            .iter()
            .filter(|c| c.backend == group.backend && c.scenario == group.scenario)
            .collect();
        let _ = write!(
            s,
            r#"<section class="group"><h3>{} on {}</h3>{}<div class="charts">{}{}</div>"#,
            esc(&group.scenario),
            esc(&group.backend),
            legend(group),
            chart(group, Measure::Throughput, &here),
            chart(group, Measure::P99, &here)
        );
        let measured = group
            .series
            .iter()
            .map(|x| x.points.len())
            .max()
            .unwrap_or(0);
        if here.is_empty() {
            let why = if measured < 2 {
                "one worker count measured: run with e.g. --workers 1,8,32,64 to see where strategies cross"
            } else {
                "no strategy overtakes another over the measured worker counts"
            };
            let _ = write!(s, r#"<p class="marks">Crossings: none ({why}).</p>"#);
        } else {
            s.push_str(r#"<ol class="crossings">"#);
            for c in &here {
                let _ = write!(s, "<li>{}</li>", esc(&crossing_text(c)));
            }
            s.push_str("</ol>");
        }
        s.push_str("</section>");
    }

    s.push_str("<h2>Timeline</h2>");
    s.push_str(r#"<p class="marks">One lane per backend · scenario · strategy, one bar per run (its load phase; labelled with its workers when wide enough), in seconds since the lab started. Red diamonds: invariant violations found (the lab checks after the load, so at the end of the run); orange triangles and lines: faults injected; a red outline: a run that failed the lab.</p>"#);
    s.push_str(&timeline(report));

    s.push_str("<h2>Runs</h2>");
    s.push_str(&table(report));
    s.push_str(PAGE_END);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Latency, RunEvent};

    fn run(strategy: &str, workers: usize, throughput: f64, p99: f64) -> RunReport {
        let safe = strategy != "none";
        let mut r = RunReport::empty("withdraw", strategy, "sqlite", workers, safe, None);
        r.operations = 100;
        r.succeeded = 100;
        r.duration_s = 0.5;
        r.throughput_ops_s = throughput;
        r.latency_ms = Latency {
            p50: p99 / 2.0,
            p90: p99,
            p99,
            max: p99,
        };
        r.verdict = "SAFE".into();
        r
    }

    fn report(runs: Vec<RunReport>) -> LabReport {
        LabReport {
            runs,
            ..LabReport::default()
        }
    }

    #[test]
    fn a_crossing_between_two_worker_counts() {
        // atomic: 100, 200, 300; pessimistic: 150, 250, 250: atomic overtakes between 8 and 32.
        let r = report(vec![
            run("atomic", 1, 100.0, 1.0),
            run("atomic", 8, 200.0, 1.0),
            run("atomic", 32, 300.0, 1.0),
            run("pessimistic", 1, 150.0, 1.0),
            run("pessimistic", 8, 250.0, 1.0),
            run("pessimistic", 32, 250.0, 1.0),
        ]);
        let c = crossings(&r);
        assert_eq!(c.len(), 1, "{c:?}");
        let c = &c[0];
        assert_eq!(
            (c.faster.as_str(), c.slower.as_str()),
            ("atomic", "pessimistic")
        );
        assert_eq!(c.between, (8, 32));
        // d = -50 at 8, +50 at 32: halfway in log2 between 8 (3) and 32 (5) is 16.
        assert!((c.workers - 16.0).abs() < 1e-9, "{}", c.workers);
        assert!((c.throughput - 250.0).abs() < 1e-9, "{}", c.throughput);
        assert_eq!(
            (c.backend.as_str(), c.scenario.as_str()),
            ("sqlite", "withdraw")
        );
    }

    #[test]
    fn no_crossing_when_one_stays_ahead_and_back_and_forth_counts_twice() {
        let ahead = report(vec![
            run("atomic", 1, 300.0, 1.0),
            run("atomic", 8, 400.0, 1.0),
            run("optimistic", 1, 100.0, 1.0),
            run("optimistic", 8, 399.0, 1.0),
        ]);
        assert!(crossings(&ahead).is_empty());
        // Only one worker count: nothing to cross.
        let single = report(vec![run("atomic", 8, 1.0, 1.0), run("none", 8, 2.0, 1.0)]);
        assert!(crossings(&single).is_empty());
        // none overtakes atomic after 1, atomic takes the lead back after 8.
        let twice = report(vec![
            run("atomic", 1, 200.0, 1.0),
            run("atomic", 8, 200.0, 1.0),
            run("atomic", 64, 200.0, 1.0),
            run("none", 1, 100.0, 1.0),
            run("none", 8, 300.0, 1.0),
            run("none", 64, 100.0, 1.0),
        ]);
        let c = crossings(&twice);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!((c[0].faster.as_str(), c[0].between), ("none", (1, 8)));
        assert_eq!((c[1].faster.as_str(), c[1].between), ("atomic", (8, 64)));
        assert!(c[0].workers < c[1].workers);
    }

    #[test]
    fn ties_are_not_leads_and_repeats_are_averaged() {
        let r = report(vec![
            run("atomic", 1, 100.0, 1.0),
            run("atomic", 4, 200.0, 1.0),
            run("atomic", 16, 300.0, 1.0),
            run("optimistic", 1, 150.0, 1.0),
            run("optimistic", 4, 200.0, 1.0),
            run("optimistic", 16, 250.0, 1.0),
        ]);
        let c = crossings(&r);
        assert_eq!(c.len(), 1, "{c:?}");
        // Tied at 4: the lead changes hands between 1 and 16, the lines meet at 4.
        assert_eq!(c[0].between, (1, 16));
        assert_eq!((c[0].workers, c[0].throughput), (4.0, 200.0));
        // Within 5% is a tie, not a lead: noise that wobbles across is no crossing.
        let r = report(vec![
            run("atomic", 1, 100.0, 1.0),
            run("atomic", 8, 103.0, 1.0),
            run("optimistic", 1, 102.0, 1.0),
            run("optimistic", 8, 100.0, 1.0),
        ]);
        assert!(crossings(&r).is_empty());
        // Repeats: atomic at 8 averages (100 + 300) / 2 = 200 > 150, so it overtakes optimistic
        // between 1 and 8; a single repeat would have said otherwise.
        let r = report(vec![
            run("atomic", 1, 100.0, 1.0),
            run("atomic", 8, 100.0, 1.0),
            run("atomic", 8, 300.0, 1.0),
            run("optimistic", 1, 120.0, 1.0),
            run("optimistic", 8, 150.0, 1.0),
        ]);
        let c = crossings(&r);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!((c[0].faster.as_str(), c[0].between), ("atomic", (1, 8)));
        // Runs that measured nothing do not count.
        let mut dead = run("optimistic", 8, 0.0, 0.0);
        dead.operations = 0;
        let r = report(vec![
            run("atomic", 1, 100.0, 1.0),
            run("atomic", 8, 100.0, 1.0),
            run("optimistic", 1, 120.0, 1.0),
            dead,
        ]);
        assert!(crossings(&r).is_empty());
    }

    #[test]
    fn on_a_log_throughput_axis_the_crossing_is_where_the_drawn_lines_meet() {
        // 10 to 1000 ops/s spans 100x: the throughput chart is logarithmic.
        let r = report(vec![
            run("atomic", 1, 1000.0, 1.0),
            run("atomic", 8, 100.0, 1.0),
            run("redlock", 1, 10.0, 1.0),
            run("redlock", 8, 200.0, 1.0),
        ]);
        let c = crossings(&r);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!((c[0].faster.as_str(), c[0].between), ("redlock", (1, 8)));
        // ln(1000/10) = 2 ln 10 at 1 worker, ln(100/200) = -ln 2 at 8.
        let f = 2.0 * 10f64.ln() / (2.0 * 10f64.ln() + 2f64.ln());
        assert!((c[0].workers - (3.0 * f).exp2()).abs() < 1e-9, "{c:?}");
        let on_atomic = (1000f64.ln() + (100f64.ln() - 1000f64.ln()) * f).exp();
        let on_redlock = (10f64.ln() + (200f64.ln() - 10f64.ln()) * f).exp();
        assert!((c[0].throughput - on_atomic).abs() < 1e-6, "{c:?}");
        assert!((c[0].throughput - on_redlock).abs() < 1e-6, "{c:?}");
        // Linear interpolation would have put it elsewhere (f = 990 / 1090).
        assert!((c[0].workers - (3.0 * 990.0 / 1090.0f64).exp2()).abs() > 0.3);
        let page = render(&r);
        assert!(page.contains("throughput (ops/s, log scale)"), "{page}");
    }

    #[test]
    fn crossings_stay_within_backend_and_scenario() {
        let mut other = run("pessimistic", 8, 250.0, 1.0);
        other.backend = "postgres".into();
        let r = report(vec![
            run("atomic", 1, 100.0, 1.0),
            run("atomic", 8, 300.0, 1.0),
            run("pessimistic", 1, 150.0, 1.0),
            other,
        ]);
        assert!(crossings(&r).is_empty());
    }

    #[test]
    fn page_is_self_contained_escaped_and_has_every_part() {
        let mut broken = run("none", 8, 500.0, 3.0);
        broken.violations = 4;
        broken.expected_safe = false;
        broken.started_s = 1.0;
        broken.events.push(RunEvent {
            at_s: 0.5,
            kind: EventKind::Violation,
            label: "balance <0> & \"gone\"".into(),
        });
        broken.events.push(RunEvent {
            at_s: 0.2,
            kind: EventKind::Fault,
            label: "pg_terminate_backend".into(),
        });
        broken
            .error_samples
            .push("<script>alert(1)</script>".into());
        let r = report(vec![
            run("atomic", 1, 100.0, 1.0),
            run("atomic", 8, 300.0, 4.0),
            run("pessimistic", 1, 150.0, 1.0),
            run("pessimistic", 8, 250.0, 200.0),
            run("none", 1, 600.0, 0.5),
            broken,
        ]);
        let page = render(&r);
        assert!(page.starts_with("<!DOCTYPE html>"));
        // Self-contained: nothing to fetch, no script at all.
        for needle in ["<script", "src=", "href=", "@import", "url("] {
            assert!(!page.contains(needle), "page contains {needle}");
        }
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("balance &lt;0&gt; &amp; &quot;gone&quot;"));
        // Two charts (throughput, p99) for the one group, plus the timeline.
        assert_eq!(page.matches(r#"<svg class="chart""#).count(), 2);
        assert_eq!(page.matches(r#"<svg class="timeline""#).count(), 1);
        assert_eq!(page.matches("<svg").count(), page.matches("</svg>").count());
        // p99 from 0.5 to 200 ms spans more than 20x: log scale.
        assert!(page.contains("p99 latency (ms, log scale)"));
        // The crossing, in text and as a marker.
        assert!(page.contains("atomic overtakes pessimistic between 1 and 8 workers"));
        assert_eq!(page.matches(r#"<g class="cross">"#).count(), 1);
        // Unsafe baseline dashed, violation ring, both event markers, the table's verdicts.
        assert!(page.contains(r#"stroke-dasharray="7 4""#));
        assert!(page.contains(r##"r="7.5" fill="none" stroke="#e00""##));
        assert!(page.contains("violation at +0.50s"));
        assert!(page.contains("fault at +0.20s"));
        assert!(page.contains(r#"<td class="v safe" title="SAFE">SAFE</td>"#));
        assert!(page.contains("PASSED"));
    }

    #[test]
    fn page_of_an_empty_report_and_a_failed_run() {
        let page = render(&LabReport::default());
        assert!(page.contains("No run measured anything."));
        let mut failed = RunReport::empty("withdraw", "atomic", "sqlite", 8, true, None)
            .fail("setup failed: no table".into());
        failed.started_s = 0.1;
        let page = render(&report(vec![failed]));
        assert!(page.contains("FAILED: 1 run(s)"));
        assert!(page.contains(r#"<td class="v bug""#));
        assert!(page.contains("setup failed: no table"));
    }
}
