//! Test support shared by every crate of the workspace (a dev-dependency only).
//!
//! Server tests read their server's URL from the environment (`CONTEND_PG_URL`,
//! `CONTEND_MYSQL_URL`, `CONTEND_REDIS_URL`, ...; `scripts/services env` prints them). Where a
//! URL is missing a test prints `skipped: ...` and passes, unless servers are required
//! (`CONTEND_REQUIRE_SERVERS` set to `1`, `true` or `yes`, as `scripts/test` does): then it fails,
//! so that no server test can be skipped silently in CI. This rule lives here once.

/// The variable that makes missing servers fail tests instead of skipping them.
pub const REQUIRE_SERVERS: &str = "CONTEND_REQUIRE_SERVERS";

/// Whether a missing server must fail the test (`CONTEND_REQUIRE_SERVERS` = `1`, `true` or
/// `yes`, in any case).
///
/// ```
/// // Unset in doctests.
/// assert!(!contend_test_support::servers_required() || std::env::var("CONTEND_REQUIRE_SERVERS").is_ok());
/// ```
pub fn servers_required() -> bool {
    std::env::var(REQUIRE_SERVERS).is_ok_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        v == "1" || v == "true" || v == "yes"
    })
}

/// The value of `var` (a server URL), or `None` after printing `skipped: <var> not set` when
/// it is unset or empty.
///
/// # Panics
/// When `var` is unset and [`servers_required`].
pub fn env_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().to_string()),
        _ => {
            skip_or_fail(&format!("{var} not set"));
            None
        }
    }
}

/// The comma-separated URLs in `var` (the nodes of a cluster), or `None` as for [`env_url`].
///
/// # Panics
/// As [`env_url`].
pub fn env_urls(var: &str) -> Option<Vec<String>> {
    let urls: Vec<String> = env_url(var)?
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    Some(urls)
}

/// Prints `skipped: <why>`, or fails when servers are required. For prerequisites other than
/// a URL (a program such as `chromium` or `redis-server` that is not installed).
///
/// # Panics
/// When [`servers_required`].
pub fn skip_or_fail(why: &str) {
    assert!(
        !servers_required(),
        "{why}, but {REQUIRE_SERVERS} is set: run the tests with scripts/test"
    );
    println!("skipped: {why}");
}

/// A random lowercase suffix for names (tables, schemas, key namespaces) that must not collide
/// with parallel test runs.
pub fn suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..10)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn suffixes_differ() {
        let (a, b) = (super::suffix(), super::suffix());
        assert_eq!(a.len(), 10);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_lowercase()));
    }
}
