//! `contend lab` as a user runs it: bad flag values exit with status 2 and a message naming the
//! flag; a small run on the embedded SQLite writes its JSON document to stdout and exits 0.

use std::process::Command;

fn contend(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_contend"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("REDLOCK_URLS")
        .output()
        .expect("the contend binary runs")
}

#[test]
fn bad_lab_flags_exit_2_with_a_message() {
    for (args, expected) in [
        (&["lab", "--workers", "0"][..], "--workers"),
        (&["lab", "--strategy", "optimstic"][..], "optimstic"),
        (&["lab", "--duration", "soon"][..], "--duration"),
        (
            &["lab", "--scenario", "nope"][..],
            "unknown scenario `nope`",
        ),
        (
            &["lab", "--database-url", "oracle://x"][..],
            "--database-url",
        ),
        (&["lab", "--operations", "many"][..], "--operations"),
        (
            &["lab", "--html", "/nonexistent-dir/report.html"][..],
            "--html",
        ),
        (&["lab", "--html", "/tmp"][..], "--html"),
        (
            &["lab", "--output", "/nonexistent-dir/runs.json"][..],
            "--output",
        ),
        (&["lab", "--output", "/tmp"][..], "--output"),
        (
            &[
                "lab",
                "--strategy",
                "redlock",
                "--redlock-urls",
                "redis://127.0.0.1:1,redis://127.0.0.1:2,redis://127.0.0.1:3",
            ][..],
            "--redlock-urls: 0 of 3 servers answer",
        ),
    ] {
        let out = contend(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: {stderr:?} lacks {expected:?}"
        );
    }
}

#[test]
fn lab_json_goes_to_stdout_and_exits_0() {
    let out = contend(&[
        "lab",
        "--scenario",
        "withdraw",
        "--strategy",
        "none,atomic",
        "--workers",
        "8",
        "--operations",
        "200",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.trim_start().starts_with('{'), "{stdout}");
    assert!(stdout.contains("\"runs\"") && stdout.contains("\"throughput_ops_s\""));
    assert!(
        !stdout.contains("How to read this"),
        "--json prints no table: {stdout}"
    );
}

#[test]
fn lab_keeps_to_one_cpu_on_embedded_sqlite_unless_told_otherwise() {
    let run = |cpus: &str| {
        let out = contend(&[
            "lab",
            "--scenario",
            "withdraw",
            "--strategy",
            "atomic",
            "--workers",
            "4",
            "--operations",
            "100",
            "--json",
            "--cpus",
            cpus,
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
        json.get("cpus").cloned()
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let auto = run("auto");
    if cpus >= 2 {
        let auto = auto.expect("auto keeps to one CPU on SQLite");
        assert_eq!(auto["of"], cpus, "{auto}");
        assert!(
            auto["reason"]
                .as_str()
                .is_some_and(|r| r.contains("SQLite")),
            "{auto}"
        );
    } else {
        assert_eq!(auto, None, "nothing to keep to on one CPU");
    }
    assert_eq!(run("all"), None, "--cpus all keeps every CPU");
    let out = contend(&["lab", "--cpus", "two"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cpus"));
}

#[test]
fn lab_prints_the_compact_table_and_writes_the_html_page() {
    let html = std::env::temp_dir().join(format!("contend-lab-cli-{}.html", std::process::id()));
    let html_arg = html.to_str().expect("a UTF-8 path");
    let base = [
        "lab",
        "--scenario",
        "withdraw",
        "--strategy",
        "none,atomic",
        "--workers",
        "1,8",
        "--operations",
        "200",
    ];
    let out = contend(&[&base[..], &["--html", html_arg]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The compact table by default: within 120 columns, the shortened verdicts.
    assert!(!stdout.contains("(unsafe baseline"), "{stdout}");
    assert!(stdout.starts_with("Backend: sqlite\n"), "{stdout}");
    assert!(stdout.contains("ok/ref/err"), "{stdout}");
    for line in stdout.lines().take_while(|l| !l.is_empty()) {
        assert!(line.chars().count() <= 120, "too wide: {line}\n{stdout}");
    }
    // The page: self-contained, both charts of the one scenario, the table.
    let page = std::fs::read_to_string(&html).expect("the HTML page is written");
    let _ = std::fs::remove_file(&html);
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    assert_eq!(page.matches(r#"<svg class="chart""#).count(), 2);
    assert!(page.contains("withdraw on sqlite") && page.contains("<table>"));
    assert!(!page.contains("<script") && !page.contains("src="));

    // --wide: today's full table.
    let out = contend(&[&base[..], &["--wide"]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("succeeded") && stdout.contains("conflicts"),
        "{stdout}"
    );
    // The baseline's verdicts in full (the compact table shortens them).
    assert!(stdout.contains("(unsafe baseline"), "{stdout}");
}
