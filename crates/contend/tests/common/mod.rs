//! Shared harness of the core's integration tests: all of it lives in `contend_test_support`
//! (servers from the environment, `TestDb`, unique tables, the `on_backends!` macro).
#![allow(unused_imports)] // each test binary uses a different part of the harness

pub use contend_test_support::{TestDb, env_url, on_backends, server_url, suffix, table, url_var};
