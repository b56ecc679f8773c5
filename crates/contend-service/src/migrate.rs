//! Schema migrations, embedded in the binary (one folder per backend under `migrations/`) and
//! applied at start with sqlx's migrator.

use std::borrow::Cow;

use std::time::Duration;

use contend::strategy::advisory::SessionLock;
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

/// How long an instance waits for another one that is migrating the same database.
const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(120);

/// Applies the migrations that `db` has not seen yet. Several instances may start at once
/// against one database: one migrates, the others wait for it and then find nothing to do.
///
/// sqlx's migrator serialises them itself on PostgreSQL (`pg_advisory_lock`), but on MariaDB its
/// `GET_LOCK(name, -1)` does not wait (MariaDB takes a negative timeout as none): two instances
/// both applied migration 1 (`Duplicate entry '1' for key 'PRIMARY'`, "migration 1 is
/// partially applied"). On MySQL/MariaDB the run is therefore held under a session advisory
/// lock of contend's own ([`SessionLock`]).
///
/// # Errors
/// A migration that fails, or one already applied whose text changed; on MySQL/MariaDB, another
/// instance migrating for longer than two minutes.
///
/// # Cancel safety
/// Each migration runs in its own transaction; dropped midway, the running one is rolled back
/// (and the migration lock's connection closed, which releases it).
pub async fn run(db: &Db) -> anyhow::Result<()> {
    let lock = match db.backend() {
        Backend::MySql => Some(
            // One lock per database (the URL names it; the lock name is hashed to fit).
            SessionLock::acquire(
                db,
                &format!("contend-service:migrate:{}", db.url()),
                MIGRATION_LOCK_WAIT,
            )
            .await
            .map_err(|e| anyhow::anyhow!("waiting to migrate {}: {e}", db.url()))?,
        ),
        _ => None,
    };
    let migrator = migrator(db.backend());
    let migrated = migrator
        .run(db.pool())
        .await
        .map_err(|e| anyhow::anyhow!("migrations failed on {}: {e}", db.url()));
    if let Some(lock) = lock {
        lock.release().await?;
    }
    migrated?;
    // The fencing table of the `redis` and `redlock` strategies (owned by `contend::fencing`).
    contend::fencing::ensure_schema(db)
        .await
        .map_err(|e| anyhow::anyhow!("creating the fencing table failed on {}: {e}", db.url()))
}
