//! Schema migrations, embedded in the binary (one folder per backend under `migrations/`) and
//! applied at start with sqlx's migrator.

use std::borrow::Cow;

use contend::{Backend, Db};
use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

/// `(version, description, sql)` of every migration of `backend`.
fn sources(backend: Backend) -> &'static [(i64, &'static str, &'static str)] {
    match backend {
        Backend::Postgres => &[(
            1,
            "schema",
            include_str!("../migrations/postgres/0001_schema.sql"),
        )],
        Backend::MySql => &[(
            1,
            "schema",
            include_str!("../migrations/mysql/0001_schema.sql"),
        )],
        _ => &[(
            1,
            "schema",
            include_str!("../migrations/sqlite/0001_schema.sql"),
        )],
    }
}

/// The migrator of `backend`.
pub fn migrator(backend: Backend) -> Migrator {
    let migrations = sources(backend)
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(
                *version,
                Cow::Borrowed(*description),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )
        })
        .collect();
    Migrator::with_migrations(migrations)
}

/// Applies the migrations that `db` has not seen yet.
///
/// # Errors
/// A migration that fails, or one already applied whose text changed.
///
/// # Cancel safety
/// Each migration runs in its own transaction; dropped midway, the running one is rolled back.
pub async fn run(db: &Db) -> anyhow::Result<()> {
    let migrator = migrator(db.backend());
    migrator
        .run(db.pool())
        .await
        .map_err(|e| anyhow::anyhow!("migrations failed on {}: {e}", db.url()))?;
    // The fencing table of the `redis` and `redlock` strategies (owned by `contend::fencing`).
    contend::fencing::ensure_schema(db)
        .await
        .map_err(|e| anyhow::anyhow!("creating the fencing table failed on {}: {e}", db.url()))
}
