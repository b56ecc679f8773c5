//! Shared harness of the core's integration tests: which backends are available (SQLite always;
//! PostgreSQL and MariaDB from `CONTEND_PG_URL` / `CONTEND_MYSQL_URL`), unique table names, and
//! the `on_backends!` macro that turns one async test function into one test per backend.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::time::Duration;

use contend::{Backend, Db, DbBuilder};

/// The environment variable that holds a server URL for `backend` (`None` for SQLite).
pub fn url_var(backend: Backend) -> Option<&'static str> {
    match backend {
        Backend::Postgres => Some("CONTEND_PG_URL"),
        Backend::MySql => Some("CONTEND_MYSQL_URL"),
        _ => None,
    }
}

pub use contend_test_support::{env_url, suffix};

/// The server URL for `backend`, or `None` after printing "skipped: ..." when it is not set.
///
/// # Panics
/// When the variable is unset and servers are required
/// ([`contend_test_support::servers_required`]).
pub fn server_url(backend: Backend) -> Option<String> {
    env_url(url_var(backend)?)
}

/// A table name unique to this run: `core_<base>_<random>`.
pub fn table(base: &str) -> String {
    format!("core_{base}_{}", suffix())
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
    pub async fn open(backend: Backend) -> Option<TestDb> {
        TestDb::open_with(backend, |b| b).await
    }

    /// Opens `backend` with builder settings adjusted by `configure`.
    pub async fn open_with(
        backend: Backend,
        configure: impl FnOnce(DbBuilder) -> DbBuilder,
    ) -> Option<TestDb> {
        let (url, dir) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary folder");
                let path = dir.path().join("core.db");
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

    /// Drops the tables this test created (server backends; SQLite files go with their folder).
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
    pub async fn count(&self, table: &str) -> i64 {
        self.db
            .query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(self.db.pool())
            .await
            .expect("count")
    }

    /// The ids of a table, sorted (autocommit).
    pub async fn ids(&self, table: &str) -> Vec<i64> {
        self.db
            .query_scalar(&format!("SELECT id FROM {table} ORDER BY id"))
            .fetch_all(self.db.pool())
            .await
            .expect("ids")
    }
}

/// Turns `async fn name(db: TestDb)` functions into the tests `name::sqlite`, `name::postgres` and
/// `name::mysql`. A server test prints "skipped: ..." and passes when its URL is not set, unless
/// `CONTEND_REQUIRE_SERVERS=1`. A list after `only` limits the backends.
#[macro_export]
macro_rules! on_backends {
    ($($name:ident),+ $(,)?) => {
        $( $crate::on_backends!(@one $name [sqlite postgres mysql]); )+
    };
    ($name:ident only [$($backend:ident)+]) => {
        $crate::on_backends!(@one $name [$($backend)+]);
    };
    (@one $name:ident [$($backend:ident)+]) => {
        mod $name {
            $( $crate::on_backends!(@test $name $backend); )+
        }
    };
    (@test $name:ident sqlite) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn sqlite() {
            $crate::on_backends!(@run $name Sqlite);
        }
    };
    (@test $name:ident postgres) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn postgres() {
            $crate::on_backends!(@run $name Postgres);
        }
    };
    (@test $name:ident mysql) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn mysql() {
            $crate::on_backends!(@run $name MySql);
        }
    };
    (@run $name:ident $variant:ident) => {
        if let Some(db) = $crate::common::TestDb::open(contend::Backend::$variant).await {
            super::$name(db).await;
        }
    };
}
