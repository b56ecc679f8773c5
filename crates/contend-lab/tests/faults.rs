//! The fault suite's lookup after a lost answer (`Books::applied`) must be final: while the
//! transaction that wrote the operation is still committing (a connection the server killed
//! mid-COMMIT, bytes a proxy still holds), "not applied" would make the client try again and
//! apply the operation twice.

use std::time::Duration;

use contend_lab::fault::books::{Books, accounts_of};
use contend_test_support::{TestDb, on_backends, suffix};

/// Holds a transaction that has written operation `op` (its two account rows and its ledger
/// rows) open until `finish` says whether to commit, while `Books::applied` runs beside it.
async fn lookup_waits_for(db: &TestDb, books: &Books, op: u64, commit: bool) -> (bool, bool) {
    let (from, to) = accounts_of(op);
    let (written_tx, written_rx) = tokio::sync::oneshot::channel::<()>();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = {
        let (db, books) = (db.db.clone(), books.clone());
        tokio::spawn(async move {
            let body_db = db.clone();
            db.transaction(|tx| {
                Box::pin(async move {
                    for (id, delta) in [(from, -1i64), (to, 1)] {
                        body_db
                            .query(&format!(
                                "UPDATE {} SET balance = balance + ? WHERE id = ?",
                                books.accounts
                            ))
                            .bind(delta)
                            .bind(id)
                            .execute(tx.conn())
                            .await?;
                        body_db
                            .query(&format!(
                                "INSERT INTO {} (op, account, delta) VALUES (?, ?, ?)",
                                books.ledger
                            ))
                            .bind(op as i64)
                            .bind(id)
                            .bind(delta)
                            .execute(tx.conn())
                            .await?;
                    }
                    let _ = written_tx.send(());
                    let _ = finish_rx.await;
                    if commit {
                        Ok(())
                    } else {
                        Err(contend::Error::Aborted("rolled back by the test".into()))
                    }
                })
            })
            .await
        })
    };
    written_rx.await.expect("the writer wrote");
    let lookup = {
        let (db, books) = (db.db.clone(), books.clone());
        tokio::spawn(async move { books.applied(&db, op).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answered_early = lookup.is_finished();
    finish_tx.send(()).expect("the writer waits");
    let written = writer.await.expect("writer task");
    assert_eq!(written.is_ok(), commit, "{written:?}");
    let found = lookup.await.expect("lookup task").expect("lookup");
    (answered_early, found)
}

async fn lookup_is_final(db: TestDb) {
    let books = Books::new(&format!("lookup_{}", suffix()));
    books.setup(&db.db).await.expect("setup");

    let (early, found) = lookup_waits_for(&db, &books, 7, true).await;
    assert!(
        !early,
        "the lookup answered while the operation's transaction was still open"
    );
    assert!(found, "committed while the lookup waited: it must be found");

    let (early, found) = lookup_waits_for(&db, &books, 8, false).await;
    assert!(!early, "the lookup answered while the transaction was open");
    assert!(!found, "rolled back: it must not be found");

    // Nothing in flight: the lookup answers at once, from the ledger.
    assert!(books.applied(&db.db, 7).await.expect("lookup"));
    assert!(!books.applied(&db.db, 9).await.expect("lookup"));
    books.drop(&db.db).await.expect("drop");
}

on_backends!(lookup_after_lost_answer => lookup_is_final only [postgres mysql]);
