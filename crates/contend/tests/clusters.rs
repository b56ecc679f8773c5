//! The hazards of the distributed engines that `scripts/services` starts, shown with sqlx alone
//! (no contend code): what a strategy written for one server meets on a Galera cluster and behind
//! pgbouncer in transaction pooling mode. Each hazard is set against the same steps on a single
//! server, where the assertion about the cluster fails, so the tests can tell the two apart.
//!
//! The last tests are contend's own answer behind pgbouncer: a `Db` told it is behind a
//! transaction pooler (`?pgbouncer=true`) refuses session advisory locks and runs every
//! strategy of the executor under concurrent load, where the same `Db` without the setting fails.
//!
//! Servers: `CONTEND_GALERA_URLS` (the nodes, comma separated), `CONTEND_PGBOUNCER_URL` and
//! `CONTEND_PG_URL` (the PostgreSQL behind it), `CONTEND_MYSQL_URL` (the single-server baseline).
//! A test whose variables are unset prints "skipped: ..." unless servers are required
//! (`contend_test_support::servers_required`).

mod common;

use std::str::FromStr;
use std::time::{Duration, Instant};

use rand::Rng;
use sqlx::mysql::{MySqlConnection, MySqlDatabaseError};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection, Row};

/// How long a session waits for a row lock held by another session before giving up (1205).
const LOCK_WAIT_SECS: u64 = 2;

/// An upper bound for any single step, so that a broken server fails a test instead of hanging it.
const STEP: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Galera (MariaDB multi-primary cluster)
// ---------------------------------------------------------------------------------------------

/// The MySQL error number and SQLSTATE of a failed statement (`None`: not a database error).
fn mysql_error(e: &sqlx::Error) -> Option<(u16, String)> {
    let db = e.as_database_error()?;
    let my = db.try_downcast_ref::<MySqlDatabaseError>()?;
    Some((my.number(), my.code().unwrap_or_default().to_owned()))
}

async fn my_connect(url: &str) -> MySqlConnection {
    tokio::time::timeout(STEP, MySqlConnection::connect(url))
        .await
        .unwrap_or_else(|_| panic!("connect to {url}: timed out"))
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

async fn my_exec(conn: &mut MySqlConnection, sql: &str) -> Result<(), sqlx::Error> {
    tokio::time::timeout(STEP, sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn))
        .await
        .unwrap_or_else(|_| panic!("{sql}: no answer in {STEP:?}"))
        .map(|_| ())
}

async fn my_int(conn: &mut MySqlConnection, sql: &str) -> Result<Option<i64>, sqlx::Error> {
    tokio::time::timeout(
        STEP,
        sqlx::query_scalar::<_, Option<i64>>(AssertSqlSafe(sql)).fetch_one(conn),
    )
    .await
    .unwrap_or_else(|_| panic!("{sql}: no answer in {STEP:?}"))
}

/// The two sessions of a scenario: on two Galera nodes, or two connections to one server.
async fn two_sessions(first_url: &str, second_url: &str, galera: bool) -> [MySqlConnection; 2] {
    let mut sessions = [my_connect(first_url).await, my_connect(second_url).await];
    for s in &mut sessions {
        my_exec(
            s,
            &format!("SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_SECS}"),
        )
        .await
        .expect("set innodb_lock_wait_timeout");
        if galera {
            // Causal reads: a node's SELECT waits until it has applied what other nodes committed
            // before, so that each session sees the row the other created.
            my_exec(s, "SET SESSION wsrep_sync_wait = 1")
                .await
                .expect("set wsrep_sync_wait");
        }
    }
    sessions
}

/// What happened when two sessions both wanted the same row with `SELECT ... FOR UPDATE`.
#[derive(Debug)]
struct RowLockRace {
    /// The second session's `SELECT ... FOR UPDATE` while the first holds the row: the value it
    /// read, or the error number.
    second_lock: Result<i64, u16>,
    /// How long that statement took.
    second_lock_took: Duration,
    /// The second session's `UPDATE` + `COMMIT` when it got the row (`None`: it rolled back).
    second_commit: Option<Result<(), u16>>,
    /// The first session's `UPDATE` + `COMMIT` after that: the error number and SQLSTATE of the
    /// first statement that failed.
    first_commit: Result<(), (u16, String)>,
    /// The row's value afterwards: +1 for a second session's commit, +10 for the first's.
    final_value: i64,
}

/// Session 1 locks row 1 with `SELECT ... FOR UPDATE` in an open transaction; session 2 then
/// does the same and, if it gets the row, adds 1 and commits; session 1 then adds 10 and commits.
async fn row_lock_race(first_url: &str, second_url: &str, galera: bool) -> RowLockRace {
    let [mut first, mut second] = two_sessions(first_url, second_url, galera).await;
    let table = common::table("galera_rows");
    my_exec(
        &mut first,
        &format!("CREATE TABLE {table} (id INT PRIMARY KEY, v BIGINT NOT NULL) ENGINE=InnoDB"),
    )
    .await
    .expect("create table");
    my_exec(&mut first, &format!("INSERT INTO {table} VALUES (1, 0)"))
        .await
        .expect("insert");
    let lock = format!("SELECT v FROM {table} WHERE id = 1 FOR UPDATE");

    my_exec(&mut first, "BEGIN").await.expect("begin 1");
    let held = my_int(&mut first, &lock).await.expect("first lock");
    assert_eq!(held, Some(0), "the first session reads the row");

    my_exec(&mut second, "BEGIN").await.expect("begin 2");
    let started = Instant::now();
    let second_lock = match my_int(&mut second, &lock).await {
        Ok(v) => Ok(v.expect("the second session reads the row")),
        Err(e) => Err(mysql_error(&e)
            .unwrap_or_else(|| panic!("second lock: {e}"))
            .0),
    };
    let second_lock_took = started.elapsed();
    let second_commit = if second_lock.is_ok() {
        let update = format!("UPDATE {table} SET v = v + 1 WHERE id = 1");
        let r = match my_exec(&mut second, &update).await {
            Ok(()) => my_exec(&mut second, "COMMIT").await,
            Err(e) => Err(e),
        };
        Some(r.map_err(|e| {
            mysql_error(&e)
                .unwrap_or_else(|| panic!("second commit: {e}"))
                .0
        }))
    } else {
        my_exec(&mut second, "ROLLBACK").await.expect("rollback 2");
        None
    };

    let update = format!("UPDATE {table} SET v = v + 10 WHERE id = 1");
    let first_commit = match my_exec(&mut first, &update).await {
        Ok(()) => my_exec(&mut first, "COMMIT").await,
        Err(e) => Err(e),
    }
    .map_err(|e| mysql_error(&e).unwrap_or_else(|| panic!("first commit: {e}")));
    if first_commit.is_err() {
        let _ = my_exec(&mut first, "ROLLBACK").await;
    }

    let final_value = my_int(&mut first, &format!("SELECT v FROM {table} WHERE id = 1"))
        .await
        .expect("read back")
        .expect("the row");
    my_exec(&mut first, &format!("DROP TABLE {table}"))
        .await
        .expect("drop table");
    RowLockRace {
        second_lock,
        second_lock_took,
        second_commit,
        first_commit,
        final_value,
    }
}

/// The results of `GET_LOCK(name, 1)` in two sessions, the first still holding the lock when the
/// second asks.
async fn get_lock_twice(first_url: &str, second_url: &str, galera: bool) -> (i64, i64) {
    let [mut first, mut second] = two_sessions(first_url, second_url, galera).await;
    let name = format!("contend_test_{}", common::suffix());
    let get = format!("SELECT GET_LOCK('{name}', 1)");
    let a = my_int(&mut first, &get).await.expect("first GET_LOCK");
    let b = my_int(&mut second, &get).await.expect("second GET_LOCK");
    let release = format!("SELECT RELEASE_LOCK('{name}')");
    for s in [&mut first, &mut second] {
        my_int(s, &release).await.expect("RELEASE_LOCK");
    }
    (
        a.expect("GET_LOCK returns 0 or 1"),
        b.expect("GET_LOCK returns 0 or 1"),
    )
}

fn galera_nodes() -> Option<Vec<String>> {
    let nodes = contend_test_support::env_urls("CONTEND_GALERA_URLS")?;
    assert!(
        nodes.len() >= 2,
        "CONTEND_GALERA_URLS needs two nodes or more: {nodes:?}"
    );
    Some(nodes)
}

/// On one server the second `SELECT ... FOR UPDATE` waits for the first session's lock and gives
/// up (1205); the first session's write then commits. The baseline of the next test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_server_select_for_update_excludes_the_second_session() {
    let Some(url) = common::server_url(contend::Backend::MySql) else {
        return;
    };
    let race = row_lock_race(&url, &url, false).await;
    println!("single server: {race:?}");
    assert_eq!(race.second_lock, Err(1205), "lock wait timeout: {race:?}");
    assert!(
        race.second_lock_took >= Duration::from_secs(LOCK_WAIT_SECS) - Duration::from_millis(100)
    );
    assert_eq!(race.second_commit, None);
    assert_eq!(race.first_commit, Ok(()));
    assert_eq!(race.final_value, 10);
}

/// On Galera, `SELECT ... FOR UPDATE` locks the row on its own node only: node 2's lock returns at
/// once while node 1 holds the row, node 2 commits, and node 1's transaction is aborted by
/// certification, reported as a deadlock (1213, SQLSTATE 40001).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_select_for_update_locks_one_node_only() {
    let Some(nodes) = galera_nodes() else {
        return;
    };
    let race = row_lock_race(&nodes[0], &nodes[1], true).await;
    println!("galera: {race:?}");
    assert_eq!(
        race.second_lock,
        Ok(0),
        "node 2 locks the row node 1 holds: {race:?}"
    );
    assert!(
        race.second_lock_took < Duration::from_secs(LOCK_WAIT_SECS),
        "node 2 did not wait for node 1's lock: {race:?}"
    );
    assert_eq!(race.second_commit, Some(Ok(())), "node 2 commits: {race:?}");
    assert_eq!(
        race.first_commit,
        Err((1213, "40001".to_owned())),
        "node 1's transaction loses certification: {race:?}"
    );
    assert_eq!(race.final_value, 1, "only node 2's write is kept: {race:?}");
}

/// On one server `GET_LOCK` excludes: the second session gets 0 after its 1 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_server_get_lock_excludes_the_second_session() {
    let Some(url) = common::server_url(contend::Backend::MySql) else {
        return;
    };
    assert_eq!(get_lock_twice(&url, &url, false).await, (1, 0));
}

/// On Galera `GET_LOCK` is local to a node: node 1 and node 2 both get the same lock at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_get_lock_is_not_cluster_wide() {
    let Some(nodes) = galera_nodes() else {
        return;
    };
    assert_eq!(get_lock_twice(&nodes[0], &nodes[1], true).await, (1, 1));
}

// ---------------------------------------------------------------------------------------------
// Galera through contend: several nodes behind one Db, certification conflicts classified
// ---------------------------------------------------------------------------------------------

/// A table `(id INT PRIMARY KEY, v BIGINT)` with rows 1 and 2 at 0, made through `db`, applied on
/// every node before it returns.
async fn galera_rows(db: &contend::Db) -> String {
    let table = common::table("galera_cert");
    db.execute_script(&format!(
        "CREATE TABLE {table} (id INT PRIMARY KEY, v BIGINT NOT NULL) ENGINE=InnoDB; \
         INSERT INTO {table} VALUES (1, 0), (2, 0)"
    ))
    .await
    .expect("create table");
    db.catch_up().await.expect("catch up");
    table
}

/// `execute_script` runs on the first node; the other nodes apply its DDL and rows a little
/// later. When it returns, every node must have them: the next acquisitions take the other nodes
/// in turn, and a write there before the table reached it fails with 1146 "doesn't exist" (seen
/// once in CI in the lab's setup: `CREATE TABLE` by script, then the first row on node 2). A
/// script that loads 20,000 rows makes the lag long enough to see on every run: read at once on
/// each node (no causal wait), the rows must all be there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_script_is_on_every_node_when_it_returns() {
    let Some(nodes) = galera_nodes() else {
        return;
    };
    let db = contend::Db::connect(&nodes.join(","))
        .await
        .expect("connect the nodes");
    let table = common::table("galera_script");
    for round in 0..3 {
        db.execute_script(&format!(
            "DROP TABLE IF EXISTS {table}; \
             CREATE TABLE {table} (id INT PRIMARY KEY) ENGINE=InnoDB; \
             INSERT INTO {table} SELECT seq FROM seq_1_to_20000"
        ))
        .await
        .expect("create and load the table");
        for node in 0..nodes.len() {
            let mut conn = db.acquire().await.expect("acquire");
            let n: i64 = db
                .query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(&mut *conn)
                .await
                .unwrap_or_else(|e| panic!("round {round}, acquisition {node}: {e}"));
            assert_eq!(n, 20_000, "round {round}, acquisition {node}");
        }
    }
    db.execute_script(&format!("DROP TABLE {table}"))
        .await
        .expect("drop table");
    db.close().await;
}

/// A comma-separated list of the nodes is one `Db` over all of them: recognised as a Galera
/// cluster, each acquisition on the next node in turn. A list that adds a server outside the
/// cluster is refused, naming that server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_nodes_are_one_db_taken_in_turn() {
    let Some(nodes) = galera_nodes() else {
        return;
    };
    let db = contend::Db::connect(&nodes.join(","))
        .await
        .expect("connect");
    let n = nodes.len();
    assert_eq!(
        db.cluster(),
        &contend::nodes::Cluster::Galera {
            nodes: n,
            size: n as u32
        }
    );
    let mut ports = Vec::new();
    for _ in 0..2 * n {
        let mut conn = db.acquire().await.expect("acquire");
        let port: i64 = sqlx::query_scalar("SELECT CAST(@@port AS SIGNED)")
            .fetch_one(&mut *conn)
            .await
            .expect("port");
        ports.push(port);
    }
    let first: Vec<i64> = ports[..n].to_vec();
    let mut distinct = first.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), n, "each node once per round: {ports:?}");
    assert_eq!(ports[n..], first[..], "the same order again: {ports:?}");
    db.close().await;

    // A server of its own (the single MariaDB) in the list is refused, by its URL.
    if let Some(single) = common::server_url(contend::Backend::MySql) {
        let list = format!("{},{single}", nodes[0]);
        let e = contend::Db::connect(&list)
            .await
            .expect_err("not one cluster");
        let text = e.to_string();
        assert!(
            text.contains(&contend::backend::redact_url(&single))
                && text.contains("wsrep_on = OFF"),
            "{text}"
        );
    }
}

/// Node 2 adds 1 to row 1 of `table` and commits (causal reads and writes on its session), then
/// `settle` passes so that node 1 has applied it: a node-1 transaction holding the row is then
/// brute-force aborted.
async fn node2_writes_row_1(
    node2: &tokio::sync::Mutex<MySqlConnection>,
    table: &str,
    settle: Duration,
) {
    let mut node2 = node2.lock().await;
    my_exec(
        &mut node2,
        &format!("UPDATE {table} SET v = v + 1 WHERE id = 1"),
    )
    .await
    .expect("node 2 commits first");
    tokio::time::sleep(settle).await;
}

/// A transaction on node 1 updates a row and, while it is open, node 2 updates the same row and
/// commits. Node 1's `COMMIT` then fails with 1213 / 40001 (certification, or the brute-force
/// abort of node 1's transaction surfacing at `COMMIT`), which contend classifies as a
/// certification conflict, not a deadlock. The baseline below shows a real InnoDB deadlock on a
/// Galera node still classified as a deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_commit_conflict_is_a_certification_conflict() {
    let Some(nodes) = galera_nodes() else {
        return;
    };
    let db = contend::Db::connect(&nodes[0])
        .await
        .expect("connect node 1");
    assert!(
        matches!(db.cluster(), contend::nodes::Cluster::Galera { nodes: 1, size } if *size >= 2),
        "one node of a cluster: {:?}",
        db.cluster()
    );
    let table = galera_rows(&db).await;
    let mut other = my_connect(&nodes[1]).await;
    // Causal reads and writes (1 + 2): node 2's UPDATE first waits until node 2 has applied
    // everything the cluster committed before it, the table and rows node 1 just created
    // included (`catch_up` on node 1's `Db` waits for node 1 only; without this the UPDATE
    // once met "Table ... doesn't exist").
    my_exec(&mut other, "SET SESSION wsrep_sync_wait = 3")
        .await
        .expect("causal reads and writes");
    let node2 = std::sync::Arc::new(tokio::sync::Mutex::new(other));
    let t = table.clone();
    let run = tokio::time::timeout(
        STEP,
        db.run(&contend::TxOptions::new(), move |tx| {
            let (t, node2) = (t.clone(), node2.clone());
            Box::pin(async move {
                tx.query(&format!("UPDATE {t} SET v = v + 10 WHERE id = 1"))
                    .execute(tx.conn())
                    .await?;
                // Node 2 writes the same row and commits while node 1's transaction is open.
                node2_writes_row_1(&node2, &t, Duration::from_millis(200)).await;
                Ok::<_, contend::Error>(())
            })
        }),
    )
    .await
    .expect("node 1's transaction ends");
    let error = run.result.expect_err("node 1 cannot commit");
    assert_eq!(
        error.conflict(),
        Some(contend::ConflictKind::Certification),
        "{error}"
    );
    assert_eq!(run.conflicts, vec![contend::ConflictKind::Certification]);
    db.catch_up().await.expect("catch up");
    let v: i64 = db
        .query_scalar(&format!("SELECT v FROM {table} WHERE id = 1"))
        .fetch_one(db.pool())
        .await
        .expect("read back");
    assert_eq!(v, 1, "only node 2's write is kept");

    // Baseline: two transactions of node 1 lock rows 1 and 2 in opposite orders. InnoDB picks
    // a victim at its second UPDATE: a deadlock, on the same node, with the same error number.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let tx_in_order = |first: i32, second: i32| {
        let (db, table, barrier) = (db.clone(), table.clone(), barrier.clone());
        async move {
            db.run(&contend::TxOptions::new(), move |tx| {
                let (table, barrier) = (table.clone(), barrier.clone());
                Box::pin(async move {
                    tx.query(&format!("UPDATE {table} SET v = v + 1 WHERE id = {first}"))
                        .execute(tx.conn())
                        .await?;
                    barrier.wait().await;
                    tx.query(&format!("UPDATE {table} SET v = v + 1 WHERE id = {second}"))
                        .execute(tx.conn())
                        .await?;
                    Ok::<_, contend::Error>(())
                })
            })
            .await
        }
    };
    let (a, b) = tokio::time::timeout(STEP, async {
        tokio::join!(tx_in_order(1, 2), tx_in_order(2, 1))
    })
    .await
    .expect("the deadlock is resolved");
    let kinds: Vec<_> = [a.result, b.result]
        .into_iter()
        .filter_map(|r| r.err())
        .map(|e| e.conflict())
        .collect();
    assert_eq!(
        kinds,
        vec![Some(contend::ConflictKind::Deadlock)],
        "one victim, a deadlock"
    );
    db.execute_script(&format!("DROP TABLE {table}"))
        .await
        .expect("drop table");
    db.close().await;
}

/// A brute-force abort: node 2 commits a write to a row that node 1's open transaction has
/// written; applied on node 1, it rolls that transaction back. MariaDB reports it on the
/// victim's next statement, but not always: under `contend faults` (kill-connections) a
/// transfer's balance updates were rolled back while its ledger `INSERT` and the `COMMIT` after
/// them answered success, and the `INSERT` had committed by itself. Here the body swallows the
/// report and goes on, which is what the unreported case looks like from the client. contend's
/// commit guard must keep everything the body runs after the abort from committing, and turn
/// the attempt into a certification conflict, which the retry policy runs again: the first
/// attempt writes after the abort, the second only reads and returns `Ok` (in both, what ran
/// after the abort ran in a new transaction without the guard's savepoint, so the `COMMIT`'s
/// release of it fails and that transaction is rolled back), the third commits. Without the
/// guard the first attempt commits ledger row 101 alone and ends there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_statements_after_a_brute_force_abort_never_commit() {
    let Some(nodes) = galera_nodes() else {
        return;
    };
    let db = contend::Db::connect(&nodes[0])
        .await
        .expect("connect node 1");
    let table = galera_rows(&db).await;
    let ledger = common::table("galera_bf_ledger");
    db.execute_script(&format!(
        "CREATE TABLE {ledger} (id INT PRIMARY KEY) ENGINE=InnoDB"
    ))
    .await
    .expect("create ledger");
    db.catch_up().await.expect("catch up");
    let mut other = my_connect(&nodes[1]).await;
    my_exec(&mut other, "SET SESSION wsrep_sync_wait = 3")
        .await
        .expect("causal reads and writes");
    let node2 = std::sync::Arc::new(tokio::sync::Mutex::new(other));
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (t, l, a) = (table.clone(), ledger.clone(), attempts.clone());
    let options = contend::TxOptions::new().retry(
        contend::RetryPolicy::new()
            .max_attempts(4)
            .base_delay(Duration::from_millis(1)),
    );
    let run = tokio::time::timeout(
        STEP,
        db.run(&options, move |tx| {
            let (t, l, a, node2) = (t.clone(), l.clone(), a.clone(), node2.clone());
            Box::pin(async move {
                let attempt = a.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                tx.query(&format!("UPDATE {t} SET v = v + 10 WHERE id = 1"))
                    .execute(tx.conn())
                    .await?;
                let insert = format!("INSERT INTO {l} (id) VALUES (?)");
                if attempt <= 2 {
                    // Applied on node 1 meanwhile: this transaction is rolled back.
                    node2_writes_row_1(&node2, &t, Duration::from_millis(300)).await;
                    let reported = tx.query(&insert).bind(1_i32).execute(tx.conn()).await;
                    assert!(
                        reported.is_err(),
                        "the abort is reported here: {reported:?}"
                    );
                    // ... and swallowed: what runs next runs after the abort.
                    if attempt == 1 {
                        tx.query(&insert).bind(101_i32).execute(tx.conn()).await?;
                    } else {
                        tx.query(&format!("SELECT v FROM {t} WHERE id = 1"))
                            .fetch_one(tx.conn())
                            .await?;
                    }
                } else {
                    tx.query(&insert)
                        .bind(attempt as i32)
                        .execute(tx.conn())
                        .await?;
                }
                Ok::<_, contend::Error>(())
            })
        }),
    )
    .await
    .expect("the transaction ends");
    run.result.expect("the third attempt commits");
    assert_eq!(
        run.conflicts,
        vec![contend::ConflictKind::Certification; 2],
        "both aborted attempts end as certification conflicts"
    );
    assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 3);
    db.catch_up().await.expect("catch up");
    let ids: Vec<i32> = db
        .query_scalar(&format!("SELECT id FROM {ledger} ORDER BY id"))
        .fetch_all(db.pool())
        .await
        .expect("read ledger");
    assert_eq!(
        ids,
        [3],
        "only the last attempt's row; nothing of the aborted ones"
    );
    let v: i64 = db
        .query_scalar(&format!("SELECT v FROM {table} WHERE id = 1"))
        .fetch_one(db.pool())
        .await
        .expect("read back");
    assert_eq!(v, 12, "node 2's two +1 and the last attempt's +10");
    // Every connection went back to the pool writable outside transactions.
    db.execute_script(&format!("INSERT INTO {ledger} (id) VALUES (4), (5), (6)"))
        .await
        .expect("autocommit writes after the guard");
    db.execute_script(&format!("DROP TABLE {table}; DROP TABLE {ledger}"))
        .await
        .expect("drop tables");
    db.close().await;
}

// ---------------------------------------------------------------------------------------------
// pgbouncer (transaction pooling) in front of PostgreSQL
// ---------------------------------------------------------------------------------------------

/// A client of pgbouncer as sqlx opens it, without a named-statement cache (pgbouncer 1.18 cannot
/// carry named statements across server connections). Statements below use the simple query
/// protocol (`raw_sql`), one transaction each unless inside `BEGIN` ... `COMMIT`.
async fn pg_connect(url: &str) -> PgConnection {
    let options = PgConnectOptions::from_str(url)
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .statement_cache_capacity(0);
    tokio::time::timeout(STEP, PgConnection::connect_with(&options))
        .await
        .unwrap_or_else(|_| panic!("connect to {url}: timed out"))
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// The first row of `sql`, run with the simple query protocol.
async fn pg_row(conn: &mut PgConnection, sql: &str) -> sqlx::postgres::PgRow {
    tokio::time::timeout(STEP, sqlx::raw_sql(AssertSqlSafe(sql)).fetch_one(conn))
        .await
        .unwrap_or_else(|_| panic!("{sql}: no answer in {STEP:?}"))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn pg_exec(conn: &mut PgConnection, sql: &str) {
    tokio::time::timeout(STEP, sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn))
        .await
        .unwrap_or_else(|_| panic!("{sql}: no answer in {STEP:?}"))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// `(value of column 0, pg_backend_pid())` of `SELECT <expr>, pg_backend_pid()`: which server
/// connection ran the statement.
async fn pg_bool_and_pid(conn: &mut PgConnection, expr: &str) -> (bool, i32) {
    let row = pg_row(conn, &format!("SELECT {expr}, pg_backend_pid()")).await;
    (row.get(0), row.get(1))
}

/// A random advisory-lock key in 1..2^31, so that pg_locks shows it as (classid 0, objid key).
fn lock_key() -> i64 {
    rand::rng().random_range(1..i64::from(i32::MAX))
}

/// The server processes (pids) holding the advisory lock on `key` (session or transaction level),
/// seen on a direct connection to PostgreSQL, with the state of each backend (`idle`: no
/// transaction is open).
async fn advisory_holders(direct: &mut PgConnection, key: i64) -> Vec<(i32, String)> {
    let sql = format!(
        "SELECT l.pid, COALESCE(a.state, '?') FROM pg_locks l \
         LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = {key} \
         AND l.objsubid = 1 ORDER BY l.pid"
    );
    tokio::time::timeout(STEP, sqlx::raw_sql(AssertSqlSafe(sql)).fetch_all(direct))
        .await
        .expect("pg_locks: no answer")
        .expect("pg_locks")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The server processes that hold advisory lock `key`.
async fn holder_pids(direct: &mut PgConnection, key: i64) -> Vec<i32> {
    advisory_holders(direct, key)
        .await
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// Opens pgbouncer clients, each in an open transaction, until one of them runs on the server
/// connection `pid`; returns it (still in its transaction) and commits and closes the others.
/// Possible only where pgbouncer hands a server connection to any client between transactions.
async fn client_on_server_connection(url: &str, pid: i32) -> PgConnection {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tried = 0;
    let mut others = Vec::new();
    let found = loop {
        assert!(
            Instant::now() < deadline,
            "no pgbouncer client got server connection {pid} in 20 s ({tried} transactions): \
             it is not handed to other clients"
        );
        tried += 1;
        let mut client = pg_connect(url).await;
        // pgbouncer assigns a server connection at BEGIN and keeps it until the transaction ends.
        let row = tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::raw_sql("BEGIN; SELECT pg_backend_pid()").fetch_one(&mut client),
        )
        .await;
        match row {
            Ok(row) => {
                let got: i32 = row.expect("pg_backend_pid").get(0);
                if got == pid {
                    break client;
                }
                others.push(client);
            }
            // The pool is exhausted (its server connections are in our open transactions) and the
            // one we want is busy elsewhere: drop the waiting client, release ours, try again.
            Err(_) => {
                drop(client);
                for mut c in others.drain(..) {
                    pg_exec(&mut c, "COMMIT").await;
                    let _ = c.close().await;
                }
            }
        }
    };
    for mut c in others {
        pg_exec(&mut c, "COMMIT").await;
        let _ = c.close().await;
    }
    found
}

fn pgbouncer_urls() -> Option<(String, String)> {
    let bouncer = common::env_url("CONTEND_PGBOUNCER_URL")?;
    let direct = common::server_url(contend::Backend::Postgres)?;
    Some((bouncer, direct))
}

/// On a direct connection a session advisory lock belongs to the client's session: it is released
/// when the client goes away. The baseline of the next test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_session_advisory_lock_ends_with_its_client() {
    let Some(url) = common::server_url(contend::Backend::Postgres) else {
        return;
    };
    let key = lock_key();
    let mut observer = pg_connect(&url).await;
    let mut taker = pg_connect(&url).await;
    let pid: i32 = pg_row(
        &mut taker,
        &format!("SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock({key})) AS taken"),
    )
    .await
    .get(0);
    assert_eq!(
        advisory_holders(&mut observer, key).await,
        [(pid, "idle".to_owned())]
    );
    taker.close().await.expect("close");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !advisory_holders(&mut observer, key).await.is_empty() {
        assert!(Instant::now() < deadline, "the lock outlived its client");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Through pgbouncer in transaction pooling mode a session advisory lock belongs to the pooled
/// server connection that ran `pg_advisory_lock`, not to the client: another client handed that
/// server connection acquires the "held" lock too, the taker cannot release it (its unlock runs
/// on another server connection), and the lock outlives both clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_session_advisory_lock_belongs_to_a_pooled_server_connection() {
    let Some((bouncer, direct)) = pgbouncer_urls() else {
        return;
    };
    let key = lock_key();
    let mut observer = pg_connect(&direct).await;

    // Client A takes the lock; pgbouncer returns the server connection to the pool afterwards.
    let mut a = pg_connect(&bouncer).await;
    let holder: i32 = pg_row(
        &mut a,
        &format!("SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock({key})) AS taken"),
    )
    .await
    .get(0);
    // (Only the holder's pid is compared: tests running at the same time may be using that
    // server connection through pgbouncer right now.)
    assert_eq!(
        holder_pids(&mut observer, key).await,
        [holder],
        "held by server connection {holder}, not by a transaction of A's"
    );
    let (direct_got, _) =
        pg_bool_and_pid(&mut observer, &format!("pg_try_advisory_lock({key})")).await;
    assert!(!direct_got, "the lock is held");

    // Client B, handed that server connection for its transaction, acquires the same lock while A
    // still believes it holds it: two holders.
    let mut b = client_on_server_connection(&bouncer, holder).await;
    let (b_got, b_pid) = pg_bool_and_pid(&mut b, &format!("pg_try_advisory_lock({key})")).await;
    assert_eq!(b_pid, holder);
    assert!(b_got, "B acquires the lock A holds");

    // A's unlock runs on another server connection (B's transaction has A's): it releases nothing.
    let (a_released, a_pid) = pg_bool_and_pid(&mut a, &format!("pg_advisory_unlock({key})")).await;
    assert_ne!(a_pid, holder);
    assert!(!a_released, "A cannot release its own lock");

    // Both clients leave; the lock stays, on an idle pooled server connection.
    pg_exec(&mut b, "COMMIT").await;
    a.close().await.expect("close A");
    b.close().await.expect("close B");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        holder_pids(&mut observer, key).await,
        [holder],
        "the lock outlives its clients"
    );
    let (direct_got, _) =
        pg_bool_and_pid(&mut observer, &format!("pg_try_advisory_lock({key})")).await;
    assert!(
        !direct_got,
        "the orphaned lock still excludes everybody else"
    );

    // Clean up: a client handed that server connection releases its session's advisory locks
    // (A's and B's). Not `pg_terminate_backend`: a test running at the same time may be in a
    // transaction on that server connection through pgbouncer, and would fail with 57P01.
    let mut c = client_on_server_connection(&bouncer, holder).await;
    pg_exec(&mut c, "SELECT pg_advisory_unlock_all()").await;
    pg_exec(&mut c, "COMMIT").await;
    c.close().await.expect("close the cleaning client");
    assert!(
        advisory_holders(&mut observer, key).await.is_empty(),
        "the orphaned lock is released"
    );
}

/// Through pgbouncer in transaction pooling mode `pg_advisory_xact_lock` is safe: the lock lives
/// as long as the client's transaction, which pins the server connection, excludes other clients
/// meanwhile, and leaves nothing behind at commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_transaction_advisory_lock_is_safe() {
    let Some((bouncer, direct)) = pgbouncer_urls() else {
        return;
    };
    let key = lock_key();
    let mut observer = pg_connect(&direct).await;
    let mut a = pg_connect(&bouncer).await;
    let mut b = pg_connect(&bouncer).await;

    pg_exec(&mut a, "BEGIN").await;
    let a_pid: i32 = pg_row(
        &mut a,
        &format!("SELECT pg_backend_pid() FROM (SELECT pg_advisory_xact_lock({key})) AS taken"),
    )
    .await
    .get(0);
    assert_eq!(advisory_holders(&mut observer, key).await.len(), 1);

    let (b_got, b_pid) =
        pg_bool_and_pid(&mut b, &format!("pg_try_advisory_xact_lock({key})")).await;
    assert_ne!(b_pid, a_pid, "A's transaction keeps its server connection");
    assert!(!b_got, "B is excluded while A's transaction holds the lock");

    pg_exec(&mut a, "COMMIT").await;
    assert_eq!(
        advisory_holders(&mut observer, key).await.len(),
        0,
        "nothing is left at commit"
    );
    let (b_got, _) = pg_bool_and_pid(&mut b, &format!("pg_try_advisory_xact_lock({key})")).await;
    assert!(b_got, "B acquires the lock once A committed");
    assert_eq!(
        advisory_holders(&mut observer, key).await.len(),
        0,
        "B's autocommit transaction released it"
    );
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

// ---------------------------------------------------------------------------------------------
// contend behind pgbouncer: `DbBuilder::transaction_pooler` (`?pgbouncer=true`)
// ---------------------------------------------------------------------------------------------

/// `url` with `pgbouncer=true` appended.
fn pooled_url(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}pgbouncer=true")
}

async fn contend_db(url: &str, pooler: bool) -> contend::Db {
    tokio::time::timeout(
        STEP,
        contend::Db::builder(url)
            .transaction_pooler(pooler)
            .max_connections(16)
            .connect(),
    )
    .await
    .unwrap_or_else(|_| panic!("connect to {url}: timed out"))
    .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// The hazard of `pgbouncer_session_advisory_lock_belongs_to_a_pooled_server_connection` is what
/// contend refuses: on a `Db` behind a transaction pooler `SessionLock::acquire` fails with a
/// clear error (and takes nothing), while the same call on a direct connection takes the lock.
/// `lock_xact`, the transaction-scoped lock, works through the pooler and excludes a second
/// client while the first transaction holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_contend_refuses_session_locks_and_keeps_transaction_locks() {
    use contend::strategy::advisory::{self, SessionLock};
    let Some((bouncer, direct)) = pgbouncer_urls() else {
        return;
    };
    let key = format!("pgbouncer-{}", lock_key());
    let wait = Duration::from_millis(200);

    // Baseline: directly, a session lock is the client's.
    let direct_db = contend_db(&direct, false).await;
    let lock = SessionLock::acquire(&direct_db, &key, wait)
        .await
        .expect("a session lock on a direct connection");
    lock.release().await.expect("release");

    // Behind pgbouncer, with the pooler setting (from the URL): refused, clearly.
    let pooled = contend::Db::connect(&pooled_url(&bouncer))
        .await
        .expect("connect through pgbouncer");
    assert!(pooled.transaction_pooler());
    let err = SessionLock::acquire(&pooled, &key, wait)
        .await
        .expect_err("a session lock behind a transaction pooler");
    let message = err.to_string();
    assert!(
        matches!(err, contend::Error::Unsupported { .. })
            && message.contains("transaction pooler")
            && message.contains("lock_xact"),
        "{message}"
    );
    // Nothing was taken: the direct client gets the lock at once.
    let lock = SessionLock::acquire(&direct_db, &key, wait)
        .await
        .expect("nothing held after the refusal");
    lock.release().await.expect("release");

    // The transaction-scoped lock through the pooler: A holds it, B waits in vain, then gets it.
    let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let a = {
        let (pooled, key) = (pooled.clone(), key.clone());
        tokio::spawn(async move {
            pooled
                .transaction(|tx| {
                    Box::pin(async move {
                        advisory::lock_xact(tx, &key, None).await?;
                        let _ = held_tx.send(());
                        let _ = done_rx.await;
                        Ok::<_, contend::Error>(())
                    })
                })
                .await
        })
    };
    held_rx.await.expect("A took the lock");
    let b = {
        let key = key.clone();
        pooled
            .transaction(|tx| {
                Box::pin(async move { advisory::lock_xact(tx, &key, Some(wait)).await })
            })
            .await
    };
    assert_eq!(
        b.expect_err("B must not get the lock A holds").conflict(),
        Some(contend::ConflictKind::LockTimeout)
    );
    let _ = done_tx.send(());
    a.await.expect("A panicked").expect("A's transaction");
    let key2 = key.clone();
    pooled
        .transaction(|tx| Box::pin(async move { advisory::lock_xact(tx, &key2, Some(wait)).await }))
        .await
        .expect("B gets the lock once A committed");
}

/// Withdraw 1 from a hot account: the executor's operation for the pgbouncer runs below, with
/// a one-statement form so that `atomic` runs in autocommit (inside `BEGIN` ... `COMMIT` behind
/// the pooler).
struct HotWithdraw {
    table: String,
}

#[derive(Debug)]
enum Refusal {
    Insufficient,
    Db(contend::Error),
}

impl From<contend::Error> for Refusal {
    fn from(e: contend::Error) -> Self {
        Refusal::Db(e)
    }
}

impl From<sqlx::Error> for Refusal {
    fn from(e: sqlx::Error) -> Self {
        Refusal::Db(e.into())
    }
}

impl contend::TxError for Refusal {
    fn conflict(&self) -> Option<contend::ConflictKind> {
        match self {
            Refusal::Db(e) => e.conflict(),
            Refusal::Insufficient => None,
        }
    }
}

impl contend::strategy::Operation for HotWithdraw {
    type State = (i64, i64);
    type Output = ();
    type Error = Refusal;

    fn keys(&self) -> Vec<String> {
        vec![format!("{}:1", self.table)]
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut sqlx::AnyConnection,
        lock: &'static str,
    ) -> contend::BoxFuture<'c, Result<(i64, i64), Refusal>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT balance, version FROM {} WHERE id = $1{lock}",
                self.table
            );
            let row = sqlx::query(AssertSqlSafe(sql))
                .bind(1_i64)
                .fetch_one(conn)
                .await?;
            tokio::task::yield_now().await;
            Ok((row.try_get(0)?, row.try_get(1)?))
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut contend::Tx,
        &(balance, version): &'c (i64, i64),
        checked: bool,
    ) -> contend::BoxFuture<'c, Result<(), Refusal>> {
        Box::pin(async move {
            if balance < 1 {
                return Err(Refusal::Insufficient);
            }
            let sql = format!(
                "UPDATE {} SET balance = $1, version = version + 1 \
                 WHERE id = 1 AND (NOT $2 OR version = $3)",
                self.table
            );
            let done = sqlx::query(AssertSqlSafe(sql))
                .bind(balance - 1)
                .bind(checked)
                .bind(version)
                .execute(tx.conn())
                .await?;
            contend::strategy::optimistic::check(done.rows_affected())?;
            Ok(())
        })
    }

    fn atomic_statement<'c>(
        &'c self,
        conn: &'c mut sqlx::AnyConnection,
    ) -> Option<contend::BoxFuture<'c, Result<(), Refusal>>> {
        Some(Box::pin(async move {
            let sql = format!(
                "UPDATE {} SET balance = balance - 1 WHERE id = 1 AND balance >= $1",
                self.table
            );
            let done = sqlx::query(AssertSqlSafe(sql))
                .bind(1_i64)
                .execute(conn)
                .await?;
            if done.rows_affected() == 0 {
                return Err(Refusal::Insufficient);
            }
            Ok(())
        }))
    }
}

/// What a run of [`hot_withdrawals`] ended with.
#[derive(Debug)]
struct HotRun {
    succeeded: u64,
    errors: Vec<String>,
    /// Start balance minus the final balance: equal to `succeeded` unless updates were lost.
    withdrawn: i64,
}

/// `workers` tasks, each with a session of its own, withdraw 1 `per_worker` times from one
/// account holding more than enough, under `strategy`, through `db`.
async fn hot_withdrawals(
    db: &contend::Db,
    direct: &str,
    strategy: contend::strategy::Strategy,
    workers: usize,
    per_worker: u64,
) -> HotRun {
    use contend::strategy::Executor;
    use std::sync::Arc;
    let table = common::table("pgb_hot");
    let start = (workers as i64) * (per_worker as i64) * 2;
    // Setup and the final read run on a direct connection: only the load goes through pgbouncer.
    let mut admin = pg_connect(direct).await;
    pg_exec(
        &mut admin,
        &format!(
            "CREATE TABLE {table} (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL, \
             version BIGINT NOT NULL); INSERT INTO {table} VALUES (1, {start}, 0)"
        ),
    )
    .await;
    let executor: Executor = Executor::new().lock_wait(Duration::from_secs(10));
    let op = Arc::new(HotWithdraw {
        table: table.clone(),
    });
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (db, executor, op) = (db.clone(), executor.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut session = db.session();
            let (mut ok, mut errors) = (0, Vec::new());
            for _ in 0..per_worker {
                let done = executor.run(strategy, &mut session, op.clone()).await;
                match done.result {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        errors.push(format!("{e:?}"));
                        session.release();
                    }
                }
            }
            (ok, errors)
        }));
    }
    let mut run = HotRun {
        succeeded: 0,
        errors: Vec::new(),
        withdrawn: 0,
    };
    for task in tasks {
        let (ok, errors) = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("a worker hung")
            .expect("a worker panicked");
        run.succeeded += ok;
        run.errors.extend(errors);
    }
    let left: i64 = pg_row(
        &mut admin,
        &format!("SELECT balance FROM {table} WHERE id = 1"),
    )
    .await
    .get(0);
    run.withdrawn = start - left;
    pg_exec(&mut admin, &format!("DROP TABLE {table}")).await;
    run
}

/// Every strategy the executor runs without a lock service works through pgbouncer on a `Db`
/// told it is behind a transaction pooler: 16 workers on one hot row, no errors, and every
/// success withdrew exactly 1 (no lost update; `none`, the unsafe baseline, is only required
/// to run). The same load on a `Db` without the setting fails: sqlx's named prepared
/// statements meet other clients' on the pooled server connections ("prepared statement
/// \"sqlx_s_1\" already exists" / "does not exist").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_executor_runs_every_strategy_with_the_pooler_setting() {
    use contend::strategy::Strategy;
    let Some((bouncer, direct)) = pgbouncer_urls() else {
        return;
    };
    const WORKERS: usize = 16;
    const PER_WORKER: u64 = 15;
    let executor: contend::strategy::Executor = contend::strategy::Executor::new();

    let unaware = contend_db(&bouncer, false).await;
    let mut failures = 0;
    for strategy in [Strategy::Pessimistic, Strategy::Atomic] {
        let run = hot_withdrawals(&unaware, &direct, strategy, WORKERS, PER_WORKER).await;
        failures += run.errors.len();
    }
    eprintln!(
        "without the pooler setting: {failures} of {} operations failed",
        2 * WORKERS as u64 * PER_WORKER
    );
    assert!(
        failures > 0,
        "without the pooler setting every operation went through pgbouncer: the test cannot \
         tell the setting's effect"
    );
    unaware.pool().close().await;

    let pooled = contend_db(&bouncer, true).await;
    for strategy in Strategy::ALL {
        if strategy.needs_redis() {
            continue; // lock services are tested through the lab (contend-lab)
        }
        if executor.check(strategy, pooled.backend()).is_err() {
            continue;
        }
        let run = hot_withdrawals(&pooled, &direct, strategy, WORKERS, PER_WORKER).await;
        assert!(
            run.errors.is_empty(),
            "{strategy} through pgbouncer: {} errors, first {:?}",
            run.errors.len(),
            run.errors.first()
        );
        assert_eq!(run.succeeded, WORKERS as u64 * PER_WORKER, "{strategy}");
        if strategy.expected_safe() {
            assert_eq!(
                run.withdrawn, run.succeeded as i64,
                "{strategy} through pgbouncer lost updates"
            );
        }
    }
    pooled.pool().close().await;
}
