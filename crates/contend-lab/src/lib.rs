//! The contend lab: fires concurrent operations at every strategy and backend, checks the
//! invariants afterwards, and reports throughput, latency, retries and violations.
//!
//! # Layout
//! - [`cli`]: the `contend lab` flags and entry point; [`config`]: their validated form.
//! - [`scenario`]: the seam ([`scenario::Scenario`]) and the scenarios (withdraw, transfer, ...).
//! - [`runner`]: setup, W concurrent workers, measurement, invariant checks, per run.
//! - [`report`]: the table, the JSON document, verdicts and the exit status.
//! - [`http_target`]: the same kind of load against running service instances over HTTP.
//! - [`redis_locks`] and [`lockstats`]: the Redis lock strategies and what they cost.

pub mod cli;
pub mod config;
pub mod http_target;
pub mod lockstats;
pub mod redis_locks;
pub mod report;
pub mod runner;
pub mod scenario;
