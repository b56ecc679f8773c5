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
    let (written_tx, written_rx) = tokio::sync::oneshot::channel::<()>();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = open_writer(
        db.db.clone(),
        books.clone(),
        op,
        commit,
        written_tx,
        finish_rx,
    );
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

/// Writes operation `op` (its account rows and ledger rows) in a transaction on `db`, signals
/// `written`, and once `finish` fires commits (or rolls back when not `commit`): the "lost"
/// transaction, still committing.
fn open_writer(
    db: contend::Db,
    books: Books,
    op: u64,
    commit: bool,
    written: tokio::sync::oneshot::Sender<()>,
    finish: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<contend::Result<()>> {
    let (from, to) = accounts_of(op);
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
                let _ = written.send(());
                let _ = finish.await;
                if commit {
                    Ok(())
                } else {
                    Err(contend::Error::Aborted("rolled back by the test".into()))
                }
            })
        })
        .await
    })
}

/// The lookup as it is on one server, read-only: the rows locked `FOR UPDATE`, then the ledger.
async fn read_only_lookup(db: &contend::Db, books: &Books, op: u64) -> contend::Result<bool> {
    let (from, to) = accounts_of(op);
    let lock = format!(
        "SELECT id FROM {} WHERE id IN (?, ?) FOR UPDATE",
        books.accounts
    );
    let count = format!("SELECT COUNT(*) FROM {} WHERE op = ?", books.ledger);
    let q = db.clone();
    let n = db
        .transaction(|tx| {
            Box::pin(async move {
                q.query(&lock)
                    .bind(from)
                    .bind(to)
                    .fetch_all(tx.conn())
                    .await?;
                q.query_scalar::<i64>(&count)
                    .bind(op as i64)
                    .fetch_one(tx.conn())
                    .await
                    .map_err(contend::Error::from)
            })
        })
        .await?;
    Ok(n > 0)
}

/// On a Galera cluster row locks are node-local: a lookup on node 2 does not wait for the lost
/// transaction still committing on node 1. Read-only, it says "absent" and the transaction
/// then commits: the client's retry would apply the operation twice. `Books::applied` also
/// writes the two rows, so its commit is certified against that transaction: when it says
/// "absent", the lost transaction can no longer commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_galera_a_lookup_that_says_absent_is_final() {
    let Some(urls) = contend_test_support::env_urls("CONTEND_GALERA_URLS") else {
        return;
    };
    assert!(
        urls.len() >= 2,
        "CONTEND_GALERA_URLS names the nodes: {urls:?}"
    );
    let cluster = contend::Db::connect(&urls.join(","))
        .await
        .expect("cluster");
    let node1 = contend::Db::connect(&urls[0]).await.expect("node 1");
    let node2 = contend::Db::connect(&urls[1]).await.expect("node 2");
    let books = Books::new(&format!("galera_lookup_{}", suffix()));
    books.setup(&cluster).await.expect("setup");
    cluster.catch_up().await.expect("catch up");

    for (op, certified) in [(11u64, false), (12, true)] {
        let (written_tx, written_rx) = tokio::sync::oneshot::channel();
        let (finish_tx, finish_rx) = tokio::sync::oneshot::channel();
        let writer = open_writer(
            node1.clone(),
            books.clone(),
            op,
            true,
            written_tx,
            finish_rx,
        );
        written_rx.await.expect("the writer wrote");
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            if certified {
                books.applied(&node2, op).await
            } else {
                read_only_lookup(&node2, &books, op).await
            }
        })
        .await
        .expect("node 2 does not wait for node 1's row locks")
        .expect("lookup");
        assert!(!found, "not committed yet: the lookup cannot see it");
        finish_tx.send(()).expect("the writer waits");
        let committed = writer.await.expect("writer task");
        cluster.catch_up().await.expect("catch up");
        let applied = books.applications(&cluster).await.expect("ledger");
        if certified {
            assert!(
                matches!(
                    committed,
                    Err(contend::Error::Conflict {
                        kind: contend::ConflictKind::Certification,
                        ..
                    })
                ),
                "the lookup's commit came first: the lost transaction fails certification, \
                 got {committed:?}"
            );
            assert!(!applied.contains_key(&op), "said absent, and stays absent");
        } else {
            assert!(committed.is_ok(), "{committed:?}");
            assert_eq!(
                applied.get(&op),
                Some(&1),
                "read-only, the lookup said absent and the operation was applied after it"
            );
        }
    }
    books.drop(&cluster).await.expect("drop");
}
