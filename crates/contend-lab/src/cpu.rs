//! Which CPUs the lab runs on (`contend lab --cpus`).
//!
//! On embedded SQLite the lab keeps to one CPU unless told otherwise. SQLite writes one
//! transaction at a time, and sqlx runs each SQLite connection on a thread of its own: every
//! statement hops from a tokio worker to that thread and back. On one CPU a hop is a switch
//! between two threads of that core. Spread over several CPUs, nearly every hop wakes another,
//! idle, CPU, and on a virtual machine that wake-up costs hundreds of microseconds: the hops, not
//! SQLite, then set the pace, and the lab would teach that locking strategies are several times
//! slower than they are.
//!
//! Measured on the 2-core dev VM (2026-11-30, release build, one run each of the default
//! `contend lab`: every scenario and strategy, 16 workers, 1,000 operations each): 9.6 s spread
//! over both CPUs, 3.1 s on one; `transfer`/`pessimistic` 3,400 against 15,500 ops/s with p99
//! 10.6 against 2.1 ms. The unsafe baselines broke exactly as often either way. Spread out but
//! with a busy loop keeping the other CPU awake, the same `transfer`/`pessimistic` run reached
//! 12,000 ops/s: what costs is waking an idle CPU. `bench/lab-cpus.sh` compares the two settings.
//!
//! A server database (PostgreSQL, MariaDB) does its work in processes of its own, which the lab's
//! client threads should not crowd, and the lab driving services over HTTP does not touch the
//! database at all: there the lab keeps every CPU it was given.

use serde::Serialize;

use crate::cli::LabArgs;
use contend::Backend;

/// The `--cpus` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Cpus {
    /// One CPU on embedded SQLite (in-process, one write at a time), every CPU otherwise.
    #[default]
    Auto,
    /// One CPU, whatever the database.
    One,
    /// Every CPU the process may use.
    All,
}

/// Where the lab keeps its threads when it keeps to fewer CPUs than it may use (reported with
/// the results: in the table's footer, the JSON document and the page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpuPlacement {
    /// The CPU the lab's threads run on.
    pub cpu: usize,
    /// How many CPUs the process could use before.
    pub of: usize,
    /// Why.
    pub reason: String,
}

impl CpuPlacement {
    /// One line for the table's footer and the page.
    ///
    /// ```
    /// use contend_lab::cpu::CpuPlacement;
    /// let p = CpuPlacement { cpu: 1, of: 2, reason: "embedded SQLite".into() };
    /// assert_eq!(p.line(), "Ran on CPU 1 only (of 2): embedded SQLite. `--cpus all` spreads the lab over every CPU.");
    /// ```
    pub fn line(&self) -> String {
        format!(
            "Ran on CPU {} only (of {}): {}. `--cpus all` spreads the lab over every CPU.",
            self.cpu, self.of, self.reason
        )
    }
}

static PLACED: std::sync::OnceLock<CpuPlacement> = std::sync::OnceLock::new();

/// Whether `args` ask for one CPU: `--cpus one`, or `auto` on SQLite driven in process (no
/// `--database-url`, or a `sqlite:` one) and not `--target`.
///
/// ```
/// use contend_lab::cli::LabArgs;
/// use contend_lab::cpu::{wants_one_cpu, Cpus};
/// assert!(wants_one_cpu(&LabArgs::default()).is_some());
/// let pg = LabArgs { database_url: Some("postgres://127.0.0.1/app".into()), ..LabArgs::default() };
/// assert!(wants_one_cpu(&pg).is_none());
/// let all = LabArgs { cpus: Cpus::All, ..LabArgs::default() };
/// assert!(wants_one_cpu(&all).is_none());
/// ```
pub fn wants_one_cpu(args: &LabArgs) -> Option<&'static str> {
    let over_http = args.target.as_deref().is_some_and(|t| !t.trim().is_empty());
    let url = args
        .database_url
        .as_deref()
        .filter(|u| !u.trim().is_empty());
    // A URL that does not parse is left to the lab's own check, which reports it.
    let embedded = url.is_none_or(|u| {
        crate::config::check_database_url(u).is_ok_and(|backend| backend == Backend::Sqlite)
    });
    match args.cpus {
        Cpus::All => None,
        Cpus::One => Some("--cpus one"),
        Cpus::Auto if embedded && !over_http => Some(
            "embedded SQLite writes one transaction at a time, and a statement's hop to sqlx's \
             SQLite thread on another CPU costs more than that CPU gives",
        ),
        Cpus::Auto => None,
    }
}

/// Keeps the calling thread, and every thread it starts from now on, to the CPU it is running
/// on when `args` ask for one CPU ([`wants_one_cpu`]). Call it before the async runtime starts:
/// threads already running are not moved.
///
/// Returns where the lab now runs (also kept for [`placed`]); `None` when it keeps every CPU, or
/// when the system would not pin it (a warning is logged; the lab then runs spread out).
pub fn place(args: &LabArgs) -> Option<CpuPlacement> {
    let reason = wants_one_cpu(args)?;
    let allowed = core_affinity::get_core_ids().unwrap_or_default();
    if allowed.len() <= 1 {
        // Already on one CPU (or the system does not say): nothing to do or report.
        return None;
    }
    let here = current_cpu();
    let core = allowed
        .iter()
        .copied()
        .find(|c| Some(c.id) == here)
        .unwrap_or(allowed[0]);
    if !core_affinity::set_for_current(core) {
        tracing::warn!(
            cpu = core.id,
            "could not keep the lab to one CPU; it runs on every CPU"
        );
        return None;
    }
    let placement = CpuPlacement {
        cpu: core.id,
        of: allowed.len(),
        reason: reason.to_string(),
    };
    let _ = PLACED.set(placement.clone());
    Some(placement)
}

/// Where [`place`] put this process, if it did.
pub fn placed() -> Option<&'static CpuPlacement> {
    PLACED.get()
}

/// The CPU this thread last ran on (field 39 of `/proc/thread-self/stat`), on Linux.
fn current_cpu() -> Option<usize> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(39 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_keeps_one_cpu_only_for_sqlite_in_process() {
        let with = |url: Option<&str>, target: Option<&str>, cpus: Cpus| LabArgs {
            database_url: url.map(String::from),
            target: target.map(String::from),
            cpus,
            ..LabArgs::default()
        };
        assert!(wants_one_cpu(&with(None, None, Cpus::Auto)).is_some());
        assert!(wants_one_cpu(&with(Some("sqlite:/tmp/x.db"), None, Cpus::Auto)).is_some());
        assert!(wants_one_cpu(&with(Some("  "), None, Cpus::Auto)).is_some());
        assert!(wants_one_cpu(&with(Some("mysql://127.0.0.1/app"), None, Cpus::Auto)).is_none());
        assert!(
            wants_one_cpu(&with(None, Some("http://127.0.0.1:8080"), Cpus::Auto)).is_none(),
            "driving services over HTTP"
        );
        assert!(wants_one_cpu(&with(Some("postgres://h/app"), None, Cpus::One)).is_some());
        assert!(wants_one_cpu(&with(None, None, Cpus::All)).is_none());
        assert!(
            wants_one_cpu(&with(Some("nonsense"), None, Cpus::Auto)).is_none(),
            "a bad URL is the lab's to report"
        );
    }

    /// `Cpus_allowed_list` of the calling thread.
    fn allowed_here() -> String {
        let status = std::fs::read_to_string("/proc/thread-self/status").expect("Linux");
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("the status names the allowed CPUs")
            .trim()
            .to_string()
    }

    #[test]
    fn place_keeps_the_thread_and_the_threads_it_starts_to_one_cpu() {
        let allowed = core_affinity::get_core_ids().map_or(0, |c| c.len());
        if allowed < 2 {
            eprintln!("skipped: this process may use only {allowed} CPU");
            return;
        }
        // In a thread of its own, so that the test harness's threads keep every CPU.
        std::thread::spawn(move || {
            let placement = place(&LabArgs::default()).expect("embedded SQLite keeps to one CPU");
            assert_eq!(placement.of, allowed);
            assert_eq!(allowed_here(), placement.cpu.to_string());
            let child = std::thread::spawn(allowed_here)
                .join()
                .expect("the child runs");
            assert_eq!(
                child,
                placement.cpu.to_string(),
                "a thread started later inherits"
            );
            assert_eq!(placed(), Some(&placement));
        })
        .join()
        .expect("the placing thread passes");
        assert_eq!(
            core_affinity::get_core_ids().map(|c| c.len()),
            Some(allowed),
            "threads that were running are not moved"
        );
        // `all` leaves the thread where it was.
        std::thread::spawn(move || {
            let all = LabArgs {
                cpus: Cpus::All,
                ..LabArgs::default()
            };
            assert_eq!(place(&all), None);
            assert_eq!(
                core_affinity::get_core_ids().map(|c| c.len()),
                Some(allowed)
            );
        })
        .join()
        .expect("the second thread passes");
    }

    #[test]
    fn the_current_cpu_is_one_this_process_may_use() {
        let Some(allowed) = core_affinity::get_core_ids() else {
            return;
        };
        let cpu = current_cpu().expect("/proc/thread-self/stat names the CPU");
        assert!(
            allowed.iter().any(|c| c.id == cpu),
            "{cpu} not in {allowed:?}"
        );
    }
}
