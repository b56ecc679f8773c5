//! The HTML report in a real browser: a short lab on SQLite writes its page, headless Chromium
//! renders it to a PNG, and the PNG must show a page: mostly not blank, many colours, and the
//! colours of the strategies that ran (the chart lines, legends and table dots are inline SVG and
//! CSS, so a page whose SVG or styles broke loses them). The same check must reject a blank page
//! and Chromium's error page for a missing file, so it can fail.
//!
//! Chromium: `$CONTEND_CHROMIUM`, else `chromium`, `chromium-browser` or `google-chrome` on the
//! PATH (Debian: `apt-get install chromium`). Without one the test is skipped, unless servers
//! are required (`contend_test_support::servers_required`) or `CI` is set: then it fails. With
//! `CONTEND_REPORT_DIR` set, the page and the screenshots are kept there (`scripts/check-report`
//! does this).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use contend_lab::cli::{LabArgs, run_config};

/// The browser window: wide enough for two charts side by side, tall enough for the first
/// groups of charts and the timeline.
const WINDOW: (u32, u32) = (1400, 3000);

fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CONTEND_CHROMIUM").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Renders `url` to `png` with headless Chromium, killing it after a minute; `Err` with its
/// stderr when it wrote no screenshot.
fn screenshot(chromium: &Path, url: &str, png: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(png);
    let profile = tempfile::tempdir().expect("a temporary profile directory");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("--window-size={},{}", WINDOW.0, WINDOW.1))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display()));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish rendering {url} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read as _;
        let _ = e.read_to_string(&mut stderr);
    }
    if status.success() && png.is_file() {
        Ok(())
    } else {
        Err(format!("chromium failed on {url} ({status}):\n{stderr}"))
    }
}

/// What a screenshot shows, as far as the check needs.
#[derive(Debug)]
struct Picture {
    width: u32,
    height: u32,
    /// Share of pixels that are not (near) white.
    inked: f64,
    /// Distinct colours.
    colours: usize,
    /// Per wanted colour, the pixels of (nearly) that colour.
    found: Vec<(&'static str, usize)>,
}

fn rgb(hex: &str) -> [u8; 3] {
    let v = u32::from_str_radix(hex.trim_start_matches('#'), 16).expect("hex colour");
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

fn look(png_path: &Path, wanted: &[&'static str]) -> Picture {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).expect("open the screenshot"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut buf).expect("a PNG frame");
    assert_eq!(info.bit_depth, png::BitDepth::Eight, "8-bit screenshot");
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    let targets: Vec<[u8; 3]> = wanted.iter().map(|h| rgb(h)).collect();
    let mut found = vec![0usize; wanted.len()];
    let mut colours = std::collections::HashSet::new();
    let mut inked = 0u64;
    let mut pixels = 0u64;
    for row in buf[..info.buffer_size()].chunks(info.line_size) {
        for px in row.chunks(channels) {
            let p = [px[0], px[1], px[2]];
            pixels += 1;
            colours.insert(p);
            if p.iter().any(|&c| c < 235) {
                inked += 1;
            }
            for (t, n) in targets.iter().zip(found.iter_mut()) {
                if p.iter().zip(t).all(|(a, b)| a.abs_diff(*b) <= 6) {
                    *n += 1;
                }
            }
        }
    }
    Picture {
        width: info.width,
        height: info.height,
        inked: inked as f64 / pixels.max(1) as f64,
        colours: colours.len(),
        found: wanted.iter().copied().zip(found).collect(),
    }
}

/// Why `picture` is not a rendered report, if it is not.
fn broken(picture: &Picture) -> Option<String> {
    if (picture.width, picture.height) != WINDOW {
        return Some(format!(
            "{}x{} instead of {}x{}",
            picture.width, picture.height, WINDOW.0, WINDOW.1
        ));
    }
    if picture.inked < 0.02 {
        return Some(format!(
            "near blank: {:.2}% of the pixels are not white",
            picture.inked * 100.0
        ));
    }
    if picture.colours < 300 {
        return Some(format!("only {} distinct colours", picture.colours));
    }
    let missing: Vec<String> = picture
        .found
        .iter()
        .filter(|(_, n)| *n < 800)
        .map(|(c, n)| format!("{c} ({n} pixels)"))
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "the strategies' colours are missing: {}",
            missing.join(", ")
        ));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_report_renders_in_chromium() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "no chromium (set CONTEND_CHROMIUM or install Debian's `chromium`) and CI is set"
        );
        contend_test_support::skip_or_fail(
            "no chromium on the PATH (set CONTEND_CHROMIUM or install Debian's `chromium`)",
        );
        return;
    };
    let keep = std::env::var_os("CONTEND_REPORT_DIR").map(PathBuf::from);
    let temp = tempfile::tempdir().expect("a temporary directory");
    let dir = keep.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir).expect("the report directory");
    let dir = dir.canonicalize().expect("an absolute report directory");

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
    let html = dir.join("report.html");
    std::fs::write(&html, contend_lab::html::render(&report)).expect("write the page");

    // The colours of the safe strategies that ran: atomic, pessimistic, optimistic (the
    // baseline's dark grey is too close to the text's antialiasing to count).
    let wanted = ["#1f77b4", "#2ca02c", "#ff7f0e"];
    let png = dir.join("report.png");
    screenshot(&chromium, &format!("file://{}", html.display()), &png)
        .unwrap_or_else(|e| panic!("{e}"));
    let picture = look(&png, &wanted);
    eprintln!("report: {picture:?}");
    assert_eq!(
        broken(&picture),
        None,
        "the report did not render: {}",
        png.display()
    );

    // The check fails on a blank page and on the browser's error page.
    let blank = dir.join("blank.html");
    std::fs::write(
        &blank,
        "<!DOCTYPE html><html><head><title>x</title></head><body></body></html>",
    )
    .expect("write the blank page");
    let blank_png = dir.join("blank.png");
    screenshot(
        &chromium,
        &format!("file://{}", blank.display()),
        &blank_png,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let picture = look(&blank_png, &wanted);
    assert!(
        broken(&picture).is_some(),
        "a blank page passed: {picture:?}"
    );
    // The same page without its charts (every inline SVG cut out): the table's dots alone do
    // not carry enough of the strategies' colours.
    let page = std::fs::read_to_string(&html).expect("read the page");
    let mut stripped = String::new();
    let mut rest = page.as_str();
    while let Some(start) = rest.find("<svg") {
        stripped.push_str(&rest[..start]);
        let end = rest[start..].find("</svg>").expect("closed svg") + start + "</svg>".len();
        rest = &rest[end..];
    }
    stripped.push_str(rest);
    let no_charts = dir.join("no-charts.html");
    std::fs::write(&no_charts, stripped).expect("write the page without charts");
    let no_charts_png = dir.join("no-charts.png");
    screenshot(
        &chromium,
        &format!("file://{}", no_charts.display()),
        &no_charts_png,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let picture = look(&no_charts_png, &wanted);
    eprintln!("without charts: {picture:?}");
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
