//! The HTML pages: self-contained (no script, no stylesheet or font fetched from anywhere), the
//! charts inline SVG drawn here. Two pages share this module's building blocks (escaping, the
//! strategies' colours, numbers, scales and axes, the stylesheet, the page's head and status):
//! - [`lab`]: the lab's report (`contend lab --html FILE`);
//! - [`faults`]: the fault suite's report (`contend faults --html FILE`).

pub mod faults;
pub mod lab;

use std::fmt::Write as _;

pub use lab::{Crossing, LEAD, crossings, render};

/// Escapes text for HTML and SVG content and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The colour of a strategy: fixed for the lab's strategies, so that a strategy has the same
/// colour in every chart; other names get one from the same palette by their bytes. The
/// baseline `none` is dark grey, so that red means a violation only.
pub(crate) fn color(strategy: &str) -> &'static str {
    const PALETTE: [&str; 10] = [
        "#444444", "#8c564b", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#e377c2",
        "#7f7f7f", "#bcbd22",
    ];
    let index = match strategy {
        "none" => 0,
        "mutex" => 1,
        "atomic" => 2,
        "pessimistic" => 3,
        "optimistic" => 4,
        "serializable" => 5,
        "advisory" => 6,
        "redis" => 7,
        "redis-spin" => 8,
        "redlock" => 9,
        other => other.bytes().map(usize::from).sum::<usize>() % PALETTE.len(),
    };
    PALETTE[index]
}

/// A short number: `12.3k` above 10,000, integers above 100, two decimals below 1.
pub(crate) fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        let k = v / 1000.0;
        if k.fract().abs() < 0.05 || a >= 100_000.0 {
            format!("{k:.0}k")
        } else {
            format!("{k:.1}k")
        }
    } else if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A vertical axis: linear from 0, or log10.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scale {
    Linear { max: f64, step: f64 },
    Log { lo: f64, hi: f64 },
}

impl Scale {
    /// A scale for `values`: log when the positive ones span more than 20x, else linear from 0.
    pub(crate) fn for_values(values: &[f64]) -> Scale {
        let max = values.iter().copied().fold(0.0_f64, f64::max);
        let min = values
            .iter()
            .copied()
            .filter(|v| *v > 0.0)
            .fold(f64::INFINITY, f64::min);
        if min.is_finite() && max / min > 20.0 {
            Scale::Log {
                lo: 10f64.powf(min.log10().floor()),
                hi: 10f64.powf(max.log10().ceil()),
            }
        } else {
            Scale::linear(max)
        }
    }

    /// A linear scale from 0 up to at least `max`, in round steps (about five).
    pub(crate) fn linear(max: f64) -> Scale {
        let step = nice_step(if max > 0.0 { max } else { 1.0 } / 5.0);
        Scale::Linear {
            max: ((max / step).ceil() * step).max(step),
            step,
        }
    }

    /// The position of `v` from 0 (bottom) to 1 (top).
    pub(crate) fn frac(self, v: f64) -> f64 {
        match self {
            Scale::Linear { max, .. } => v / max,
            Scale::Log { lo, hi } => {
                (v.max(lo * 0.5).log10() - lo.log10()) / (hi.log10() - lo.log10())
            }
        }
    }

    pub(crate) fn ticks(self) -> Vec<f64> {
        match self {
            Scale::Linear { max, step } => (0..)
                .map(|i| f64::from(i) * step)
                .take_while(|v| *v <= max * 1.000_001)
                .collect(),
            Scale::Log { lo, hi } => {
                let first = lo.log10().round() as i32;
                let decades = (hi / lo).log10().round() as i32;
                let mults: &[f64] = if decades <= 2 {
                    &[1.0, 2.0, 5.0]
                } else {
                    &[1.0]
                };
                let mut out = Vec::new();
                for d in 0..=decades {
                    for m in mults {
                        let v = 10f64.powi(first + d) * m;
                        if v <= hi * 1.000_001 {
                            out.push(v);
                        }
                    }
                }
                out
            }
        }
    }
}

/// The smallest of 1, 2, 5 x 10^n that is at least `raw`.
pub(crate) fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * 0.999_999)
        .unwrap_or(10.0 * mag)
}
/// The plot area of an SVG chart (its size and margins) and the drawing both pages' charts
/// share: the frame, horizontal grid lines with their ticks, vertical ticks, the axes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Frame {
    pub width: f64,
    pub height: f64,
    pub left: f64,
    pub right: f64,
    pub top: f64,
    pub bottom: f64,
}

impl Frame {
    /// Width of the plot area.
    pub(crate) fn pw(&self) -> f64 {
        self.width - self.left - self.right
    }

    /// Height of the plot area.
    pub(crate) fn ph(&self) -> f64 {
        self.height - self.top - self.bottom
    }

    /// The bottom of the plot area.
    pub(crate) fn base(&self) -> f64 {
        self.top + self.ph()
    }

    /// Where `v` lies on `scale`, clamped to the plot area.
    pub(crate) fn y(&self, scale: Scale, v: f64) -> f64 {
        self.base() - scale.frac(v).clamp(0.0, 1.0) * self.ph()
    }

    /// Opens the `<svg>` element of class `class` and writes the chart's title above the plot.
    pub(crate) fn open(&self, s: &mut String, class: &str, aria: &str, title: &str) {
        let (w, h) = (self.width, self.height);
        let _ = write!(
            s,
            r#"<svg class="{class}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{}"><text x="{}" y="20" class="ctitle">{}</text>"#,
            esc(aria),
            self.left,
            esc(title)
        );
    }

    /// Horizontal grid lines at the ticks of `scale`, labelled on the left.
    pub(crate) fn y_grid(&self, s: &mut String, scale: Scale) {
        for t in scale.ticks() {
            let ty = self.y(scale, t);
            let _ = write!(
                s,
                r#"<line x1="{}" x2="{:.1}" y1="{ty:.1}" y2="{ty:.1}" class="grid"/><text x="{:.1}" y="{:.1}" class="tick" text-anchor="end">{}</text>"#,
                self.left,
                self.left + self.pw(),
                self.left - 6.0,
                ty + 4.0,
                num(t)
            );
        }
    }

    /// A vertical grid line at `x`, labelled `label` under the plot.
    pub(crate) fn x_tick(&self, s: &mut String, x: f64, label: &str) {
        let _ = write!(
            s,
            r#"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{:.1}" class="grid"/><text x="{x:.1}" y="{:.1}" class="tick" text-anchor="middle">{}</text>"#,
            self.top,
            self.base(),
            self.base() + 16.0,
            esc(label)
        );
    }

    /// The two axes and the horizontal axis' label.
    pub(crate) fn axes(&self, s: &mut String, x_label: &str) {
        let _ = write!(
            s,
            r#"<line x1="{l}" x2="{l}" y1="{}" y2="{b:.1}" class="axis"/><line x1="{l}" x2="{:.1}" y1="{b:.1}" y2="{b:.1}" class="axis"/><text x="{:.1}" y="{:.1}" class="label" text-anchor="middle">{}</text>"#,
            self.top,
            self.left + self.pw(),
            self.left + self.pw() / 2.0,
            self.height - 8.0,
            esc(x_label),
            l = self.left,
            b = self.base(),
        );
    }
}

/// Round ticks from 0 to `end` (about `n` of them): for a time axis in seconds.
pub(crate) fn ticks_to(end: f64, n: f64) -> Vec<f64> {
    let step = nice_step((end / n).max(f64::MIN_POSITIVE));
    (0..)
        .map(|i| f64::from(i) * step)
        .take_while(|t| *t <= end * 1.000_001)
        .collect()
}

/// A legend entry: a swatch of the strategy's line (solid for a strategy expected to be safe,
/// dashed for an unsafe baseline) and its name.
pub(crate) fn legend_item(name: &str, color: &str, safe: bool) -> String {
    let (dash, fill, kind) = if safe {
        ("", color, "safe")
    } else {
        (r#" stroke-dasharray="7 4""#, "#fff", "unsafe")
    };
    format!(
        r#"<span class="item"><svg width="34" height="14" viewBox="0 0 34 14"><line x1="1" x2="33" y1="7" y2="7" stroke="{color}" stroke-width="3"{dash}/><rect x="12" y="2" width="10" height="10" rx="5" fill="{fill}" stroke="{color}" stroke-width="2"/></svg>{} <small>({kind})</small></span>"#,
        esc(name)
    )
}

/// The dash pattern of an unsafe baseline's line (empty for a safe strategy).
pub(crate) fn dash(safe: bool) -> &'static str {
    if safe {
        ""
    } else {
        r#" stroke-dasharray="7 4""#
    }
}

/// The page's start: doctype, head with the stylesheet, `<h1>`, and the pass/fail badge.
pub(crate) fn page_start(title: &str, passed: bool, status: &str) -> String {
    let class = if passed { "pass" } else { "fail" };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t}</title><style>{STYLE}</style></head><body><main><h1>{t}</h1>\
         <span class=\"status {class}\">{}</span>",
        esc(status),
        t = esc(title),
    )
}

/// The row of key figures under the title: `(value, what)` each.
pub(crate) fn facts(items: &[(String, &str)]) -> String {
    let mut s = String::from(r#"<div class="facts">"#);
    for (value, what) in items {
        let _ = write!(
            s,
            r#"<div class="fact"><b>{}</b>{}</div>"#,
            esc(value),
            esc(what)
        );
    }
    s.push_str("</div>");
    s
}

/// The page's end.
pub(crate) const PAGE_END: &str = "</main></body></html>\n";

pub(crate) const STYLE: &str = r#"
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1b1f24; background: #fff; margin: 0; }
main { max-width: 1340px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 8px; border-bottom: 2px solid #e3e6ea; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 22px 0 6px; }
.status { display: inline-block; padding: 3px 10px; border-radius: 4px; font-weight: 600; color: #fff; }
.status.pass { background: #1a7f37; } .status.fail { background: #cf222e; }
.facts { display: flex; gap: 12px; flex-wrap: wrap; margin: 12px 0; }
.fact { background: #f6f8fa; border: 1px solid #d8dee4; border-radius: 6px; padding: 8px 14px; min-width: 110px; }
.fact b { display: block; font-size: 22px; }
.summary { white-space: pre-wrap; background: #f6f8fa; border-left: 4px solid #8c959f; padding: 8px 12px; }
.group { margin: 18px 0 26px; }
.charts { display: flex; gap: 12px; flex-wrap: wrap; }
svg.chart { background: #fff; border: 1px solid #d8dee4; border-radius: 6px; }
svg.timeline { border: 1px solid #d8dee4; border-radius: 6px; background: #fff; }
.grid { stroke: #e6e9ed; stroke-width: 1; }
.axis { stroke: #57606a; stroke-width: 1.2; }
.tick { font-size: 11px; fill: #57606a; }
.label { font-size: 12px; fill: #333; }
.ctitle { font-size: 14px; font-weight: 600; fill: #1b1f24; }
.cnum { font-size: 10px; font-weight: 700; fill: #111; }
.lane { font-size: 11px; fill: #333; }
.bar { font-size: 10px; fill: #111; }
.legend { display: flex; gap: 16px; flex-wrap: wrap; margin: 6px 0; }
.legend .item { display: inline-flex; align-items: center; gap: 5px; }
.legend svg { vertical-align: middle; }
.marks { color: #57606a; font-size: 12.5px; }
ol.crossings { margin: 4px 0; font-size: 13px; }
table { border-collapse: collapse; font-size: 12.5px; margin: 8px 0; }
th, td { border: 1px solid #d8dee4; padding: 3px 7px; text-align: left; white-space: nowrap; }
th { background: #f6f8fa; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.v.safe { color: #1a7f37; font-weight: 600; } td.v.bug { color: #fff; background: #cf222e; font-weight: 600; }
td.v.broke { color: #9a6700; background: #fff8c5; } td.v.held { color: #57606a; }
.dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin-right: 5px; }
ul.details { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
td.alarm { color: #cf222e; font-weight: 700; }
svg.faultline { background: #fff; border: 1px solid #d8dee4; border-radius: 6px; max-width: 100%; height: auto; }
.injl { font-size: 11px; font-weight: 600; fill: #b35900; paint-order: stroke; stroke: #fff; stroke-width: 3px; }
.markn { font-size: 11px; font-weight: 700; fill: #e00; paint-order: stroke; stroke: #fff; stroke-width: 3px; }
.fok { font-size: 12px; fill: #1a7f37; } .fbad { font-size: 12px; font-weight: 700; fill: #cf222e; }
.vtag { font-size: 11.5px; padding: 1px 6px; border-radius: 3px; margin: 0 10px 0 -2px; }
.vtag.safe { color: #1a7f37; background: #dafbe1; } .vtag.broke { color: #9a6700; background: #fff8c5; }
.vtag.bug { color: #fff; background: #cf222e; }
p.injected { font-size: 13px; margin: 6px 0; }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_and_numbers() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(130.0), 200.0);
        assert_eq!(nice_step(400.0), 500.0);
        let scale = Scale::for_values(&[100.0, 1234.0]);
        let Scale::Linear { max, step } = scale else {
            panic!("linear expected")
        };
        assert_eq!((max, step), (1500.0, 500.0));
        assert_eq!(scale.ticks(), vec![0.0, 500.0, 1000.0, 1500.0]);
        let Scale::Linear { max, step } = Scale::for_values(&[0.0, 0.0]) else {
            panic!("linear expected")
        };
        assert_eq!((max, step), (0.2, 0.2));
        let Scale::Log { lo, hi } = Scale::for_values(&[0.3, 120.0]) else {
            panic!("log expected")
        };
        assert_eq!((lo, hi), (0.1, 1000.0));
        // Four decades: a tick per decade.
        assert_eq!(Scale::Log { lo, hi }.ticks().len(), 5);
        assert_eq!(num(12_345.0), "12.3k");
        assert_eq!(num(250.0), "250");
        assert_eq!(num(0.25), "0.25");
        assert_eq!(num(0.1), "0.1");
        assert_eq!(num(2.5), "2.5");
    }

    #[test]
    fn time_ticks_are_round_and_cover_the_axis() {
        assert_eq!(ticks_to(3.0, 8.0), vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);
        assert_eq!(ticks_to(20.0, 8.0), vec![0.0, 5.0, 10.0, 15.0, 20.0]);
        assert_eq!(ticks_to(0.0, 8.0), vec![0.0]);
    }
}
