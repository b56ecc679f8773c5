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
