//! The contend lab: fires concurrent operations at every strategy and backend, checks the
//! invariants afterwards, and reports throughput, latency, retries and violations.
//!
//! # Layout
//! - [`cli`]: the `contend lab` flags and entry point; [`config`]: their validated form;
//!   [`cpu`]: which CPUs the lab keeps to (one on embedded SQLite).
//! - [`runner`]: the one runner and its seam ([`runner::Target`]): per run, setup, W concurrent
//!   workers, the tally, what the target measures, the invariants read back, the verdict.
//! - [`db_target`]: the in-process target: the [`scenario`]s ([`scenario::Scenario`]: withdraw,
//!   transfer, ...) on a database.
//! - [`http_target`]: the target of running service instances, driven over HTTP.
//! - [`report`]: the table, the JSON document, verdicts and the exit status; [`html`]: the
//!   self-contained HTML page (charts, crossings, timeline, table).
//! - [`lockstats`]: the Redis lock services of the lock strategies and what they cost.
//! - [`fault`]: faults during load (`contend faults`): injectors, the workload's ledger, the
//!   run loop and its report.
//! - [`history`]: operation histories recorded under load (the `append` scenario) and their
//!   check for isolation anomalies (G0, G1a, G1b, G1c, G-single, G2), as Elle checks them.

pub mod cli;
pub mod config;
pub mod cpu;
pub mod db_target;
pub mod fault;
pub mod history;
pub mod html;
pub mod http_target;
pub mod lockstats;
pub mod report;
pub mod runner;
pub mod scenario;
