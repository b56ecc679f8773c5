//! The isolation-anomaly suite: Hermitage-style interleavings run against a real database.

pub mod cli;
