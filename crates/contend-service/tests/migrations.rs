//! Two (or more) service instances started at once against one fresh database: every one of them
//! migrates successfully, and the schema is there once.

use contend::{Backend, Db};
use contend_test_support::{server_url, suffix};

/// A fresh database on the server of `backend` (dropped at the end by the caller).
async fn fresh_database(backend: Backend) -> Option<(Db, String, String)> {
    let admin_url = server_url(backend)?;
    let admin = Db::connect(&admin_url).await.expect("connect");
    let name = format!("mig_{}", suffix());
    admin
        .execute_script(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let (base, _) = admin_url.rsplit_once('/').expect("a URL with a database");
    Some((admin, name.clone(), format!("{base}/{name}")))
}

async fn concurrent_start(backend: Backend) {
    let Some((admin, name, url)) = fresh_database(backend).await else {
        return;
    };
    let mut starts = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        starts.push(tokio::spawn(async move {
            let db = Db::connect(&url).await.expect("connect");
            let migrated = contend_service::migrate::run(&db).await;
            db.pool().close().await;
            migrated
        }));
    }
    let mut failures = Vec::new();
    for start in starts {
        if let Err(e) = start.await.expect("no panic") {
            failures.push(format!("{e:#}"));
        }
    }
    let db = Db::connect(&url).await.expect("connect");
    let applied: i64 = db
        .query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(db.pool())
        .await
        .expect("the migrations table");
    db.pool().close().await;
    admin
        .execute_script(&format!("DROP DATABASE {name}"))
        .await
        .expect("drop database");
    assert!(
        failures.is_empty(),
        "instances failed to start: {failures:#?}"
    );
    assert_eq!(applied, 1, "each migration recorded once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_instances_starting_at_once_all_migrate() {
    concurrent_start(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_instances_starting_at_once_all_migrate() {
    concurrent_start(Backend::MySql).await;
}
