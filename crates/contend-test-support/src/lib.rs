//! Test support shared by every crate of the workspace (a dev-dependency only).
//!
//! Server tests read their server's URL from the environment (`CONTEND_PG_URL`,
//! `CONTEND_MYSQL_URL`, `CONTEND_REDIS_URL`, ...; `scripts/services env` prints them). Where a
//! URL is missing a test prints `skipped: ...` and passes, unless servers are required
//! (`CONTEND_REQUIRE_SERVERS` set to `1`, `true` or `yes`, as `scripts/test` does): then it fails,
//! so that no server test can be skipped silently in CI. This rule lives here once.
//!
//! [`TestDb`] opens a database per backend (SQLite in a temporary folder, the servers from
//! their URL) and makes tables no parallel run shares; [`on_backends!`] turns one async test
//! function into one test per backend.

use std::future::Future;
use std::time::Duration;

use contend::{Backend, Db, DbBuilder};

#[doc(hidden)]
pub use contend::Backend as __Backend;

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

/// A table name unique to this run: `test_<base>_<random>`.
pub fn table(base: &str) -> String {
    format!("test_{base}_{}", suffix())
}

/// The environment variable that holds a server URL for `backend` (`None` for SQLite).
pub fn url_var(backend: Backend) -> Option<&'static str> {
    match backend {
        Backend::Postgres => Some("CONTEND_PG_URL"),
        Backend::MySql => Some("CONTEND_MYSQL_URL"),
        _ => None,
    }
}

/// The server URL for `backend` (`CONTEND_PG_URL`, `CONTEND_MYSQL_URL`), or `None` as for
/// [`env_url`] (and for SQLite, which has no server).
///
/// # Panics
/// When the variable is unset and [`servers_required`].
pub fn server_url(backend: Backend) -> Option<String> {
    env_url(url_var(backend)?)
}

/// A database to test on, with what is needed to clean up after it.
pub struct TestDb {
    /// The handle under test.
    pub db: Db,
    /// The URL it was opened with (server backends: from the environment).
    pub url: String,
    /// Keeps a SQLite database's temporary folder alive.
    pub dir: Option<tempfile::TempDir>,
    tables: Vec<String>,
}

impl TestDb {
    /// Opens `backend` with default settings, or `None` when its server is not configured.
    ///
    /// # Panics
    /// When the server is not configured and [`servers_required`], or the connection fails.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future drops the half-opened pool.
    pub async fn open(backend: Backend) -> Option<TestDb> {
        TestDb::open_with(backend, |b| b).await
    }

    /// Opens `backend` with builder settings adjusted by `configure`.
    ///
    /// # Panics
    /// As [`TestDb::open`].
    ///
    /// # Cancel safety
    /// As [`TestDb::open`].
    pub async fn open_with(
        backend: Backend,
        configure: impl FnOnce(DbBuilder) -> DbBuilder,
    ) -> Option<TestDb> {
        let (url, dir) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary folder");
                let path = dir.path().join("test.db");
                (format!("sqlite:{}", path.display()), Some(dir))
            }
            _ => (server_url(backend)?, None),
        };
        let db = configure(Db::builder(&url).connect_timeout(Duration::from_secs(10)))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {backend}: {e}"));
        assert_eq!(db.backend(), backend);
        Some(TestDb {
            db,
            url,
            dir,
            tables: Vec::new(),
        })
    }

    /// Another handle on the same database, with builder settings adjusted by `configure`.
    ///
    /// # Panics
    /// When the connection fails.
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub async fn reopen(&self, configure: impl FnOnce(DbBuilder) -> DbBuilder) -> Db {
        configure(Db::builder(&self.url))
            .connect()
            .await
            .expect("reconnect")
    }

    /// The backend under test.
    pub fn backend(&self) -> Backend {
        self.db.backend()
    }

    /// Creates a table with a unique name from `columns` (`id INTEGER PRIMARY KEY, ...`), InnoDB
    /// on MariaDB, and remembers it for [`TestDb::cleanup`].
    ///
    /// # Panics
    /// When the statement fails.
    ///
    /// # Cancel safety
    /// Not cancel-safe: a table created before the cancellation is not remembered.
    pub async fn create_table(&mut self, base: &str, columns: &str) -> String {
        let name = table(base);
        let engine = if self.backend() == Backend::MySql {
            " ENGINE=InnoDB"
        } else {
            ""
        };
        self.db
            .execute_script(&format!("CREATE TABLE {name} ({columns}){engine}"))
            .await
            .unwrap_or_else(|e| panic!("create table {name}: {e}"));
        self.tables.push(name.clone());
        name
    }

    /// Drops the tables this test created (server backends; SQLite files go with their folder)
    /// and closes the pool.
    ///
    /// # Cancel safety
    /// Not cancel-safe: the tables not dropped yet stay.
    pub async fn cleanup(self) {
        for t in &self.tables {
            let _ = self
                .db
                .execute_script(&format!("DROP TABLE IF EXISTS {t}"))
                .await;
        }
        self.db.pool().close().await;
    }

    /// `SELECT COUNT(*)` of a table (autocommit).
    ///
    /// # Panics
    /// When the query fails.
    ///
    /// # Cancel safety
    /// Cancel-safe (a read).
    pub async fn count(&self, table: &str) -> i64 {
        self.db
            .query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(self.db.pool())
            .await
            .expect("count")
    }

    /// The ids of a table, sorted (autocommit).
    ///
    /// # Panics
    /// When the query fails.
    ///
    /// # Cancel safety
    /// Cancel-safe (a read).
    pub async fn ids(&self, table: &str) -> Vec<i64> {
        self.db
            .query_scalar(&format!("SELECT id FROM {table} ORDER BY id"))
            .fetch_all(self.db.pool())
            .await
            .expect("ids")
    }
}

/// What a test function made by [`on_backends!`] takes: opened for one backend, or `None` when
/// that backend is not available (its server's URL is unset and servers are not required).
pub trait OnBackend: Sized {
    /// The argument for a test on `backend`, or `None` to skip it.
    ///
    /// # Cancel safety
    /// Up to the implementation.
    fn open(backend: Backend) -> impl Future<Output = Option<Self>>;
}

impl OnBackend for TestDb {
    fn open(backend: Backend) -> impl Future<Output = Option<Self>> {
        TestDb::open(backend)
    }
}

/// Opens `T` for `backend` and runs `test` on it, or does nothing when it is not available
/// ([`OnBackend::open`] gave `None`). What [`on_backends!`] expands to.
///
/// # Cancel safety
/// As `T`'s [`OnBackend::open`] and `test`.
pub async fn run_on<T, F>(backend: Backend, test: impl FnOnce(T) -> F)
where
    T: OnBackend,
    F: Future<Output = ()>,
{
    if let Some(arg) = T::open(backend).await {
        test(arg).await;
    }
}

/// Turns async test functions into one test per backend: `name::sqlite`, `name::postgres` and
/// `name::mysql`, each on a multi-threaded runtime. The function takes anything that is
/// [`OnBackend`] (a [`TestDb`], or a test suite's own type); a server test prints
/// "skipped: ..." and passes when its URL is not set, unless [`servers_required`].
///
/// - `on_backends!(a, b, c);` tests `async fn a(db: TestDb)`, ... as `a::sqlite`, ...
/// - `on_backends!(a only [postgres mysql]);` on those backends only.
/// - `on_backends!(name => run);` tests `async fn run(..)` as `name::sqlite`, ...; it takes
///   `only [...]` too, and `threads N` after it for N runtime workers (default 2).
///
/// The calling crate needs `tokio` (with `macros` and `rt-multi-thread`).
#[macro_export]
macro_rules! on_backends {
    ($($name:ident),+ $(,)?) => {
        $( $crate::on_backends!(@one $name $name [sqlite postgres mysql] 2); )+
    };
    ($name:ident only [$($backend:ident)+]) => {
        $crate::on_backends!(@one $name $name [$($backend)+] 2);
    };
    ($name:ident => $run:ident) => {
        $crate::on_backends!(@one $name $run [sqlite postgres mysql] 2);
    };
    ($name:ident => $run:ident only [$($backend:ident)+]) => {
        $crate::on_backends!(@one $name $run [$($backend)+] 2);
    };
    ($name:ident => $run:ident only [$($backend:ident)+] threads $threads:literal) => {
        $crate::on_backends!(@one $name $run [$($backend)+] $threads);
    };
    (@one $name:ident $run:ident [$($backend:ident)+] $threads:literal) => {
        mod $name {
            $( $crate::on_backends!(@test $run $backend $threads); )+
        }
    };
    (@test $run:ident sqlite $threads:literal) => {
        $crate::on_backends!(@fn $run sqlite Sqlite $threads);
    };
    (@test $run:ident postgres $threads:literal) => {
        $crate::on_backends!(@fn $run postgres Postgres $threads);
    };
    (@test $run:ident mysql $threads:literal) => {
        $crate::on_backends!(@fn $run mysql MySql $threads);
    };
    (@fn $run:ident $test:ident $variant:ident $threads:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
        async fn $test() {
            $crate::run_on($crate::__Backend::$variant, super::$run).await;
        }
    };
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
