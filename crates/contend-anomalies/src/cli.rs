//! `contend anomalies`: arguments, validation and entry point.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use contend::{Db, IsolationLevel};

use crate::model::{Anomaly, SqliteBegin};
use crate::{SuiteOptions, report, run_suite};

/// Arguments of `contend anomalies`.
#[derive(Debug, clap::Args)]
pub struct AnomaliesArgs {
    /// Database to test: postgres://..., mysql://..., mariadb://... or sqlite:PATH
    /// (default: embedded SQLite in a temporary file).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Isolation levels to run, comma-separated
    /// (read_uncommitted, read_committed, repeatable_read, serializable; default: all).
    #[arg(long, value_delimiter = ',')]
    pub level: Vec<String>,

    /// Anomalies to run, comma-separated (G0, G1a, G1b, G1c, OTV, PMP, P4, G-single, G2-item,
    /// G2; default: all).
    #[arg(long, value_delimiter = ',')]
    pub anomaly: Vec<String>,

    /// Print one JSON document instead of the matrix.
    #[arg(long)]
    pub json: bool,

    /// Run one anomaly at one level and print its interleaving, what each transaction saw and
    /// the verdict.
    #[arg(long, num_args = 2, value_names = ["ANOMALY", "LEVEL"])]
    pub explain: Option<Vec<String>>,

    /// How SQLite transactions begin: immediate (writers; read-only ones deferred, as contend
    /// does) or deferred (all).
    #[arg(long, value_enum, default_value_t = SqliteBegin::Immediate)]
    pub sqlite_begin: SqliteBegin,
}

/// What the arguments ask for, validated.
#[derive(Debug)]
struct Plan {
    options: SuiteOptions,
    explain: Option<(Anomaly, IsolationLevel)>,
}

fn plan(args: &AnomaliesArgs) -> anyhow::Result<Plan> {
    let parse_list = |items: &[String]| -> Vec<String> {
        items
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    // A flag given with nothing in it (`--level ''`, `--anomaly ,`) is a mistake, not "all".
    for (flag, given, example) in [
        ("--level", &args.level, "read_committed,serializable"),
        ("--anomaly", &args.anomaly, "G0,G2"),
    ] {
        if !given.is_empty() && parse_list(given).is_empty() {
            anyhow::bail!(
                "{flag}: empty list (give names such as {example}, or leave it out for all)"
            );
        }
    }
    let mut levels = Vec::new();
    for name in parse_list(&args.level) {
        let level: IsolationLevel = name.parse()?;
        if !levels.contains(&level) {
            levels.push(level);
        }
    }
    let mut anomalies = Vec::new();
    for name in parse_list(&args.anomaly) {
        let anomaly: Anomaly = name.parse()?;
        if !anomalies.contains(&anomaly) {
            anomalies.push(anomaly);
        }
    }
    let explain = match args.explain.as_deref() {
        Some([anomaly, level]) => Some((
            anomaly.parse::<Anomaly>()?,
            level.parse::<IsolationLevel>()?,
        )),
        Some(_) => anyhow::bail!("--explain takes two values: ANOMALY LEVEL"),
        None => None,
    };
    if let Some((anomaly, level)) = explain {
        levels = vec![level];
        anomalies = vec![anomaly];
    }
    let defaults = SuiteOptions::default();
    Ok(Plan {
        options: SuiteOptions {
            levels: if levels.is_empty() {
                defaults.levels
            } else {
                levels
            },
            anomalies: if anomalies.is_empty() {
                defaults.anomalies
            } else {
                anomalies
            },
            sqlite_begin: args.sqlite_begin,
        },
        explain,
    })
}

/// Writes the output to `out` (stdout): a reader that went away (`contend anomalies | head`) is
/// not an error, and not a panic as with `print!`.
fn print_out(out: &mut impl std::io::Write, text: &str) -> anyhow::Result<()> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

/// Runs the suite and prints the matrix, the JSON document or one cell's explanation.
///
/// Exit status: 0 when every cell was judged; 2 when a cell could not be (an unexpected error or
/// a statement that never finished; the output says which), or on bad usage or a database that
/// cannot be used.
///
/// # Errors
/// Bad arguments, or a database that cannot be reached or used.
///
/// # Cancel safety
/// As [`crate::run_suite`]; a temporary SQLite database is deleted when the future is dropped.
pub async fn run(args: AnomaliesArgs) -> anyhow::Result<ExitCode> {
    let plan = plan(&args)?;
    let (url, _tempdir) = match &args.database_url {
        Some(url) if !url.trim().is_empty() => (url.clone(), None),
        _ => {
            let dir =
                tempfile::tempdir().context("cannot create a temporary directory for SQLite")?;
            let path = dir.path().join("anomalies.db");
            (format!("sqlite:{}", path.display()), Some(dir))
        }
    };
    let db = Db::builder(&url)
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let started = Instant::now();
    let report = run_suite(&db, &plan.options).await?;
    eprintln!(
        "ran {} cell(s) on {} in {:.1} s",
        report.results.len(),
        db.url(),
        started.elapsed().as_secs_f64()
    );
    let explained = plan
        .explain
        .and_then(|(anomaly, level)| report.cell(level, anomaly));
    let text = if args.json {
        format!("{}\n", report::json(&report, explained)?)
    } else if let Some(cell) = explained {
        report::explain(&report, cell)
    } else {
        report::matrix(&report)
    };
    print_out(&mut std::io::stdout().lock(), &text)?;
    db.pool().close().await;
    Ok(if report.has_errors() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: AnomaliesArgs,
    }

    fn parse(argv: &[&str]) -> anyhow::Result<Plan> {
        let cli = Cli::try_parse_from(std::iter::once("anomalies").chain(argv.iter().copied()))?;
        plan(&cli.args)
    }

    #[test]
    fn lists_and_explain() {
        let p = parse(&[
            "--level",
            "read_committed,serializable",
            "--anomaly",
            "p4,G2-item",
        ])
        .unwrap();
        assert_eq!(
            p.options.levels,
            vec![IsolationLevel::ReadCommitted, IsolationLevel::Serializable]
        );
        assert_eq!(p.options.anomalies, vec![Anomaly::P4, Anomaly::G2Item]);
        let p = parse(&["--explain", "G-single", "repeatable_read"]).unwrap();
        assert_eq!(
            p.explain,
            Some((Anomaly::GSingle, IsolationLevel::RepeatableRead))
        );
        assert_eq!(p.options.anomalies, vec![Anomaly::GSingle]);
        let p = parse(&[]).unwrap();
        assert_eq!(p.options.levels.len(), 4);
        assert_eq!(p.options.anomalies.len(), 10);
    }

    /// A writer whose reader went away, as stdout piped into `head` that exited.
    struct ClosedPipe;

    impl std::io::Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_stdout_is_not_an_error() {
        assert!(print_out(&mut ClosedPipe, "matrix\n").is_ok());
        let mut buf = Vec::new();
        print_out(&mut buf, "matrix\n").unwrap();
        assert_eq!(buf, b"matrix\n");
    }

    #[test]
    fn bad_names_are_clear_errors() {
        let e = parse(&["--level", "snapshot"]).unwrap_err().to_string();
        assert!(e.contains("unknown isolation level `snapshot`"), "{e}");
        let e = parse(&["--anomaly", "G3"]).unwrap_err().to_string();
        assert!(e.contains("unknown anomaly `G3`"), "{e}");
        assert!(parse(&["--explain", "P4"]).is_err());
        // Given, but empty: an error, not every level or anomaly.
        for argv in [
            ["--level", ""],
            ["--level", " , "],
            ["--anomaly", ""],
            ["--anomaly", ","],
        ] {
            let e = parse(&argv).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{}: empty list", argv[0])),
                "{argv:?}: {e}"
            );
        }
    }
}
