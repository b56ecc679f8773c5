//! Headless Chromium for the HTML reports' tests (`tests/report_browser.rs`): find the browser,
//! render a page to a PNG, measure what the PNG shows, and judge whether it is a rendered report
//! (not blank, not the browser's error page, not a page whose charts broke).
//!
//! Chromium: `$CONTEND_CHROMIUM`, else `chromium`, `chromium-browser` or `google-chrome` on the
//! PATH (Debian: `apt-get install chromium`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The browser window: wide enough for two charts side by side, tall enough for the first
/// groups of charts and the timeline.
pub const WINDOW: (u32, u32) = (1400, 3000);

pub fn chromium() -> Option<PathBuf> {
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
pub fn screenshot(chromium: &Path, url: &str, png: &Path) -> Result<(), String> {
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
pub struct Picture {
    pub width: u32,
    pub height: u32,
    /// Share of pixels that are not (near) white.
    pub inked: f64,
    /// Distinct colours.
    pub colours: usize,
    /// Per wanted colour, the pixels of (nearly) that colour.
    pub found: Vec<(&'static str, usize)>,
}

pub fn rgb(hex: &str) -> [u8; 3] {
    let v = u32::from_str_radix(hex.trim_start_matches('#'), 16).expect("hex colour");
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

pub fn look(png_path: &Path, wanted: &[&'static str]) -> Picture {
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
pub fn broken(picture: &Picture) -> Option<String> {
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

/// Chromium, or `None` after saying why the test is skipped; fails instead when servers are
/// required (`contend_test_support::servers_required`) or `CI` is set.
pub fn chromium_or_skip() -> Option<PathBuf> {
    let found = chromium();
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no chromium (set CONTEND_CHROMIUM or install Debian's `chromium`) and CI is set"
        );
        contend_test_support::skip_or_fail(
            "no chromium on the PATH (set CONTEND_CHROMIUM or install Debian's `chromium`)",
        );
    }
    found
}

/// The directory for pages and screenshots: `$CONTEND_REPORT_DIR` (kept), else `temp`.
pub fn report_dir(temp: &Path) -> PathBuf {
    let keep = std::env::var_os("CONTEND_REPORT_DIR").map(PathBuf::from);
    let dir = keep.unwrap_or_else(|| temp.to_path_buf());
    std::fs::create_dir_all(&dir).expect("the report directory");
    dir.canonicalize().expect("an absolute report directory")
}

/// `page` with every inline SVG (the charts, the legends' swatches) cut out.
pub fn without_svg(page: &str) -> String {
    let mut stripped = String::new();
    let mut rest = page;
    while let Some(start) = rest.find("<svg") {
        stripped.push_str(&rest[..start]);
        let end = rest[start..].find("</svg>").expect("closed svg") + start + "</svg>".len();
        rest = &rest[end..];
    }
    stripped.push_str(rest);
    stripped
}

/// Writes `page` as `dir/name.html`, renders it to `dir/name.png` and measures the colours
/// `wanted` in it.
pub fn render(
    chromium: &Path,
    dir: &Path,
    name: &str,
    page: &str,
    wanted: &[&'static str],
) -> Picture {
    let html = dir.join(format!("{name}.html"));
    std::fs::write(&html, page).expect("write the page");
    let png = dir.join(format!("{name}.png"));
    screenshot(chromium, &format!("file://{}", html.display()), &png)
        .unwrap_or_else(|e| panic!("{e}"));
    let picture = look(&png, wanted);
    eprintln!("{name}: {picture:?}");
    picture
}
