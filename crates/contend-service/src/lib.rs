//! The contend reference HTTP service.

pub mod cli;
