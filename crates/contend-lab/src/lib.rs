//! The contend lab: fires concurrent operations at every strategy and backend, checks the
//! invariants afterwards, and reports throughput, latency, retries and violations.

pub mod cli;
pub mod scenario;
