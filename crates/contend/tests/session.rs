//! `Session`: a worker's held connection is reused across transactions and autocommit work, and
//! a cancelled operation never leaves it behind in an unknown state.

mod common;

use std::time::Duration;

use common::{TestDb, on_backends};
use contend::{Error, Session};

on_backends!(session_reuses_and_replaces_its_connection only [postgres mysql]);
on_backends!(session_cancelled_transaction_leaves_nothing_behind);

async fn connection_id(session: &mut Session) -> i64 {
    let sql = match session.db().backend() {
        contend::Backend::Postgres => "SELECT CAST(pg_backend_pid() AS BIGINT)",
        _ => "SELECT CAST(CONNECTION_ID() AS SIGNED)",
    };
    let q = session.db().query(sql);
    session
        .autocommit(|conn| {
            Box::pin(async move {
                Ok::<_, contend::Error>(sqlx::Row::get::<i64, _>(&q.fetch_one(conn).await?, 0))
            })
        })
        .await
        .unwrap()
}

async fn session_reuses_and_replaces_its_connection(t: TestDb) {
    let mut session = t.db.session();
    let first = connection_id(&mut session).await;
    for _ in 0..5 {
        session
            .transaction(|_tx| Box::pin(async { Ok::<_, contend::Error>(()) }))
            .await
            .unwrap();
        assert_eq!(
            connection_id(&mut session).await,
            first,
            "kept after commit"
        );
    }
    let failed: contend::Result<()> = session
        .transaction(|_tx| Box::pin(async { Err(Error::aborted("no")) }))
        .await;
    assert!(failed.is_err());
    assert_eq!(
        connection_id(&mut session).await,
        first,
        "kept after a clean rollback"
    );

    // Cancelled inside the body: the connection is closed, the next operation gets another.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        session.transaction(|_tx| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<_, contend::Error>(())
            })
        }),
    )
    .await;
    assert!(cancelled.is_err(), "the body sleeps past the timeout");
    let second = connection_id(&mut session).await;
    assert_ne!(
        second, first,
        "a connection left inside a transaction must not be reused"
    );

    // Cancelled autocommit statement: replaced as well.
    let sleep = match t.backend() {
        contend::Backend::Postgres => "SELECT pg_sleep(5)",
        _ => "SELECT SLEEP(5)",
    };
    let q = t.db.query(sleep);
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        session.autocommit(|conn| {
            Box::pin(async move { Ok::<_, contend::Error>(q.execute(conn).await?) })
        }),
    )
    .await;
    assert!(cancelled.is_err());
    assert_ne!(connection_id(&mut session).await, second);
    drop(session); // gives its connection back, so that the pool can close
    t.cleanup().await;
}

async fn session_cancelled_transaction_leaves_nothing_behind(mut t: TestDb) {
    let table = t
        .create_table("session", "id INTEGER PRIMARY KEY, v INTEGER NOT NULL")
        .await;
    let mut session = t.db.session();
    let insert = format!("INSERT INTO {table} (id, v) VALUES (?, ?)");
    for round in 0..20_i64 {
        let sql = insert.clone();
        // Two rows per transaction; cancelled between them in every other round.
        let body = session.transaction(move |tx| {
            let a = tx.query(&sql).bind(2 * round).bind(round);
            let b = tx.query(&sql).bind(2 * round + 1).bind(round);
            Box::pin(async move {
                a.execute(tx.conn()).await?;
                if round % 2 == 1 {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                b.execute(tx.conn()).await?;
                Ok::<_, contend::Error>(())
            })
        });
        let _ = tokio::time::timeout(Duration::from_millis(200), body).await;
    }
    let ids = t.ids(&table).await;
    let expected: Vec<i64> = (0..20)
        .filter(|r| r % 2 == 0)
        .flat_map(|r| [2 * r, 2 * r + 1])
        .collect();
    assert_eq!(
        ids, expected,
        "only whole pairs of completed transactions are visible"
    );
    drop(session); // gives its connection back, so that the pool can close
    t.cleanup().await;
}
