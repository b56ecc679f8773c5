//! The injectors: each runs next to the load of one phase, injects its fault while operations
//! are in flight, and reports what it did and what it observed ([`FaultLog`]): a fault counts
//! as injected only when its effect was seen (connections the server says it terminated, a
//! server whose start time changed, a Redis node with a new run id, bytes the proxy really
//! held back), never because a command was sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use contend::{Backend, Db};
use tokio::time::sleep_until;

use super::proxy::{DelayProxy, ProxyStats};

/// What an injector did during one phase.
#[derive(Debug, Clone, Default)]
pub struct FaultLog {
    /// When each injection hit (for recovery times).
    pub injected: Vec<Instant>,
    /// Operations in flight (started, not yet answered) at each injection, over all runs of
    /// the phase.
    pub in_flight: Vec<u64>,
    /// What was injected and what was observed, in words and numbers.
    pub effect: String,
    /// Whether the fault's effect was observed (else the phase fails: nothing was tested).
    pub observed: bool,
    /// Whether a recovery time means something for this fault (a discrete event the system
    /// must come back from).
    pub recovers: bool,
    /// The frozen lock holders of `lock-freeze`, per strategy (or why one failed).
    pub holders: Vec<(
        contend::strategy::Strategy,
        Result<super::freeze::Frozen, String>,
    )>,
}

/// When the load runs, and the counter of operations in flight.
#[derive(Debug, Clone)]
pub struct Window {
    /// The load starts.
    pub start: Instant,
    /// No operation starts after this.
    pub end: Instant,
    /// Operations in flight, over all runs of the phase.
    pub in_flight: Arc<AtomicU64>,
}

impl Window {
    /// The moment `fraction` of the way through the load.
    pub fn at(&self, fraction: f64) -> Instant {
        self.start + (self.end - self.start).mul_f64(fraction)
    }

    fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A connection for the injector itself (one at most, short timeouts).
///
/// # Cancel safety
/// Cancel-safe.
pub async fn admin(url: &str) -> anyhow::Result<Db> {
    Ok(Db::builder(url)
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await?)
}

/// Terminates every other client connection of the database on the server, every `every`
/// during the first four fifths of the load: `pg_terminate_backend` on PostgreSQL, `KILL
/// CONNECTION` on MariaDB; on every node of a Galera cluster (`url` a comma-separated list of
/// the nodes), each round on all of them.
///
/// # Cancel safety
/// Cancel-safe: a dropped call stops killing.
pub async fn kill_connections(url: &str, window: &Window, every: Duration) -> FaultLog {
    let mut log = FaultLog {
        recovers: true,
        ..FaultLog::default()
    };
    let mut dbs = Vec::new();
    for node in contend::nodes::split_urls(url) {
        match admin(&node).await {
            Ok(db) => dbs.push(db),
            Err(e) => {
                log.effect = format!("cannot connect to kill connections: {e:#}");
                return log;
            }
        }
    }
    let mut next = window.start + every / 2;
    let (mut killed, mut errors, mut took) = (0u64, Vec::new(), Vec::new());
    // The last fifth of the load is left alone: it shows whether the operations recover (a
    // round that overran does not push the next one into it).
    while next < window.at(0.8) && Instant::now() < window.at(0.8) {
        sleep_until(next.into()).await;
        let in_flight = window.in_flight();
        let begun = Instant::now();
        let rounds = futures_util::future::join_all(dbs.iter().map(kill_once)).await;
        took.push(begun.elapsed());
        let mut hit = false;
        for round in rounds {
            match round {
                Ok(n) => {
                    hit = true;
                    killed += n;
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        if hit {
            // The fault hits when the round begins: a KILL on a busy MariaDB or Galera node
            // can take most of a second, and the round's end may come after the load's.
            log.injected.push(begun);
            log.in_flight.push(in_flight);
        }
        next += every;
    }
    let how = match dbs.first().map(Db::backend) {
        Some(Backend::MySql) => "KILL CONNECTION",
        _ => "pg_terminate_backend",
    };
    let nodes = if dbs.len() > 1 {
        format!(" on each of the {} nodes", dbs.len())
    } else {
        String::new()
    };
    log.observed = killed > 0;
    let ms = |d: Option<&Duration>| d.map_or(0, Duration::as_millis);
    log.effect = format!(
        "{how} of every other client connection{nodes} every {} ms for 80% of the load: {} \
         rounds ({}-{} ms each), {killed} connections terminated (server's count){}",
        every.as_millis(),
        log.injected.len(),
        ms(took.iter().min()),
        ms(took.iter().max()),
        if errors.is_empty() {
            String::new()
        } else {
            format!("; {} rounds failed: {}", errors.len(), errors[0])
        }
    );
    log
}

/// One round of kills: how many connections the server terminated.
async fn kill_once(db: &Db) -> anyhow::Result<u64> {
    match db.backend() {
        Backend::Postgres => {
            let n: i64 = db
                .query_scalar(
                    "SELECT CAST(COALESCE(SUM(CASE WHEN pg_terminate_backend(pid) THEN 1 ELSE 0 END), 0) AS BIGINT) \
                     FROM pg_stat_activity WHERE datname = current_database() \
                     AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                )
                .fetch_one(db.pool())
                .await?;
            Ok(n as u64)
        }
        Backend::MySql => {
            let mut conn = db.acquire().await?;
            let ids: Vec<i64> = db
                .query_scalar(
                    // `system user`: a Galera node's replication appliers.
                    "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST \
                     WHERE ID <> CONNECTION_ID() AND DB = DATABASE() AND COMMAND <> 'Daemon' \
                     AND USER <> 'system user'",
                )
                .fetch_all(&mut *conn)
                .await?;
            let mut n = 0;
            for id in ids {
                // A connection that ended since the list was read: "Unknown thread id".
                let kill = sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}"));
                if sqlx::query(kill).execute(&mut *conn).await.is_ok() {
                    n += 1;
                }
            }
            Ok(n)
        }
        other => anyhow::bail!("{other} has no server connections to kill"),
    }
}

/// Adds `delay` in each direction to the database link (the proxies the workers connect
/// through: one per server, one in front of each node of a cluster) from a quarter of the way
/// through the load to its end.
///
/// # Cancel safety
/// Cancel-safe.
pub async fn latency(proxies: &[DelayProxy], window: &Window, delay: Duration) -> FaultLog {
    let mut log = FaultLog::default();
    if proxies.is_empty() {
        log.effect = "no proxy".into();
        return log;
    }
    let total = || {
        proxies
            .iter()
            .map(DelayProxy::stats)
            .fold(ProxyStats::default(), |a, b| ProxyStats {
                connections: a.connections + b.connections,
                delayed_chunks: a.delayed_chunks + b.delayed_chunks,
                delayed_micros: a.delayed_micros + b.delayed_micros,
            })
    };
    let on = window.at(0.25);
    sleep_until(on.into()).await;
    log.in_flight.push(window.in_flight());
    for proxy in proxies {
        proxy.set_delay(delay);
    }
    log.injected.push(Instant::now());
    let before = total();
    sleep_until(window.end.into()).await;
    let stats = total();
    let chunks = stats.delayed_chunks - before.delayed_chunks;
    let mean = stats.mean_delay();
    log.observed = chunks > 0 && mean >= delay.mul_f64(0.9);
    let between = if proxies.len() > 1 {
        format!("each of the {} nodes", proxies.len())
    } else {
        "the database".to_string()
    };
    log.effect = format!(
        "a TCP proxy between the workers and {between} held every chunk {} ms each way \
         from {:.1} s on: {chunks} chunks held, mean {:.1} ms (measured), {} connections",
        delay.as_millis(),
        (on - window.start).as_secs_f64(),
        mean.as_secs_f64() * 1e3,
        stats.connections
    );
    log
}

/// When the database server last started, in milliseconds since the epoch (PostgreSQL) or
/// seconds (MariaDB, from its uptime): a restart changes it.
/// The start time of the server at `url` ([`server_started`]), on a connection of its own.
async fn started_at(url: &str) -> anyhow::Result<i64> {
    let db = admin(url).await?;
    server_started(&db).await.context("reading the start time")
}

async fn server_started(db: &Db) -> anyhow::Result<i64> {
    let sql = match db.backend() {
        Backend::Postgres => {
            "SELECT CAST(EXTRACT(EPOCH FROM pg_postmaster_start_time()) * 1000 AS BIGINT)"
        }
        Backend::MySql => {
            "SELECT CAST(UNIX_TIMESTAMP() - CAST(VARIABLE_VALUE AS SIGNED) AS SIGNED) \
             FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'UPTIME'"
        }
        other => anyhow::bail!("{other} is not a server"),
    };
    Ok(db.query_scalar(sql).fetch_one(db.pool()).await?)
}

/// Runs `command` (through `sh -c`), returning whether it succeeded and its output's tail.
pub(crate) async fn shell(command: &str) -> (bool, String) {
    match tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .output()
        .await
    {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            (
                out.status.success(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            )
        }
        Err(e) => (false, format!("cannot run `{command}`: {e}")),
    }
}

/// Polls `probe` until it answers or `within` passes.
async fn until_ok<T, F, Fut>(within: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let end = Instant::now() + within;
    loop {
        if let Ok(v) = probe().await {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Restarts the database server with `command` a quarter of the way through the load, and
/// checks that the server's start time changed.
///
/// # Cancel safety
/// Not cancel-safe: a dropped call may leave the restart command running.
pub async fn restart_db(url: &str, window: &Window, command: &str) -> FaultLog {
    let mut log = FaultLog {
        recovers: true,
        ..FaultLog::default()
    };
    let before = match started_at(url).await {
        Ok(t) => t,
        Err(e) => {
            log.effect = format!("cannot read the server's start time: {e:#}");
            return log;
        }
    };
    sleep_until(window.at(0.25).into()).await;
    log.in_flight.push(window.in_flight());
    let t0 = Instant::now();
    let (ok, output, outage) = run_watching(command, || db_answers(url)).await;
    log.injected.push(outage.map_or(t0, |(down, _)| down));
    let took = t0.elapsed();
    let after = until_ok(Duration::from_secs(30), || started_at(url)).await;
    log.observed = ok && after.is_some_and(|a| a > before);
    log.effect = match after {
        Some(a) if a > before => format!(
            "`{command}` took {:.1} s; {}; a new server process (its start time moved on by {:.1} s)",
            took.as_secs_f64(),
            outage_text(outage),
            (a - before) as f64
                / if url_backend(url) == Some(Backend::MySql) {
                    1.0
                } else {
                    1000.0
                }
        ),
        Some(_) => format!(
            "`{command}` (ok: {ok}) took {:.1} s but the server's start time did not change: \
             not restarted. {output}",
            took.as_secs_f64()
        ),
        None => {
            format!("`{command}` (ok: {ok}): the server did not come back within 30 s. {output}")
        }
    };
    log
}

/// Restarts node `node` (1-based) of a Galera cluster, at `url`, with `command` a quarter of
/// the way through the load, while the workers keep using every node of `cluster_url`; the
/// command returns once the node has rejoined. Checks that the node's start time changed and
/// that it is a synced member of the whole cluster again; the outage is how long a probe
/// every 20 ms found it refusing connections or not synced.
///
/// # Cancel safety
/// Not cancel-safe: a dropped call may leave the restart command running.
pub async fn restart_node(
    url: &str,
    node: usize,
    cluster_url: &str,
    window: &Window,
    command: &str,
) -> FaultLog {
    let mut log = FaultLog {
        recovers: true,
        ..FaultLog::default()
    };
    let nodes = contend::nodes::split_urls(cluster_url).len();
    let before = match started_at(url).await {
        Ok(t) => t,
        Err(e) => {
            log.effect = format!("cannot read node {node}'s start time: {e:#}");
            return log;
        }
    };
    sleep_until(window.at(0.25).into()).await;
    log.in_flight.push(window.in_flight());
    let t0 = Instant::now();
    let (ok, output, outage) = run_watching(command, || node_synced(url)).await;
    log.injected.push(outage.map_or(t0, |(down, _)| down));
    let took = t0.elapsed();
    let after = until_ok(Duration::from_secs(60), || async {
        node_synced(url).await?;
        let db = admin(url).await?;
        let started = server_started(&db).await?;
        let size: String = db
            .query_scalar(
                "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS \
                 WHERE VARIABLE_NAME = 'WSREP_CLUSTER_SIZE'",
            )
            .fetch_one(db.pool())
            .await?;
        db.close().await;
        anyhow::Ok((started, size.parse::<usize>().unwrap_or(0)))
    })
    .await;
    log.observed = ok && after.is_some_and(|(started, size)| started > before && size == nodes);
    log.effect = match after {
        Some((started, size)) if started > before => format!(
            "`{command}` took {:.1} s; node {node} {}; a new server process (its start time \
             moved on by {} s), synced again in a cluster of {size} of {nodes} nodes",
            took.as_secs_f64(),
            match outage {
                Some((down, up)) => format!(
                    "was out (refusing connections or not synced, probed every 20 ms) for {:.2} s",
                    (up - down).as_secs_f64()
                ),
                None => "was never seen out by the probe".into(),
            },
            started - before
        ),
        Some(_) => format!(
            "`{command}` (ok: {ok}) took {:.1} s but node {node}'s start time did not change: \
             not restarted. {output}",
            took.as_secs_f64()
        ),
        None => format!(
            "`{command}` (ok: {ok}): node {node} was not a synced member within 60 s. {output}"
        ),
    };
    log
}

/// Whether a fresh connection to the Galera node at `url` finds it a synced member of a
/// primary component (within 1 s).
async fn node_synced(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    sqlx::any::install_default_drivers();
    tokio::time::timeout(Duration::from_secs(1), async {
        let mut conn = sqlx::AnyConnection::connect(url).await?;
        // SHOW is answered while the node is joining, when other statements are refused.
        let (_, state): (String, String) =
            sqlx::query_as("SHOW STATUS LIKE 'wsrep_local_state_comment'")
                .fetch_one(&mut conn)
                .await?;
        let _ = conn.close().await;
        anyhow::ensure!(state == "Synced", "node state {state}");
        anyhow::Ok(())
    })
    .await?
}

/// Whether a fresh connection to the database at `url` answers a query (within 1 s).
async fn db_answers(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    sqlx::any::install_default_drivers();
    tokio::time::timeout(Duration::from_secs(1), async {
        let mut conn = sqlx::AnyConnection::connect(url).await?;
        sqlx::query("SELECT 1").execute(&mut conn).await?;
        let _ = conn.close().await;
        anyhow::Ok(())
    })
    .await?
}

/// Runs `command` while probing the server every 20 ms: whether the command succeeded, its
/// output's tail, and the outage the probe saw (first refusal, first answer after it), if any.
/// The outage, not the command's start, is when the fault hit.
async fn run_watching<F, Fut>(command: &str, probe: F) -> (bool, String, Option<(Instant, Instant)>)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let run = shell(command);
    tokio::pin!(run);
    let mut result = None;
    let mut down: Option<Instant> = None;
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        if result.is_none() {
            tokio::select! {
                r = &mut run => result = Some(r),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let up = probe().await.is_ok();
        let now = Instant::now();
        match (down, up) {
            (None, false) => down = Some(now),
            (Some(d), true) => {
                if result.is_none() {
                    result = Some((&mut run).await);
                }
                let (ok, output) = result.unwrap_or_default();
                return (ok, output, Some((d, now)));
            }
            _ => {}
        }
        // Done, and the probe never saw it down (or it never came back): no outage to report.
        if let Some((ok, output)) = &result
            && (down.is_none() || now >= give_up)
        {
            return (*ok, output.clone(), None);
        }
    }
}

fn outage_text(outage: Option<(Instant, Instant)>) -> String {
    match outage {
        Some((down, up)) => format!(
            "the server refused connections for {:.2} s (probed every 20 ms)",
            (up - down).as_secs_f64()
        ),
        None => "the probe never saw it refuse a connection".into(),
    }
}

fn url_backend(url: &str) -> Option<Backend> {
    Backend::from_url(url).ok()
}

/// The run id of the Redis server at `url` (new for every server start).
async fn redis_run_id(url: &str) -> anyhow::Result<String> {
    let client = redis::Client::open(url)?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await??;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|s| s.trim().to_string())
        .context("INFO server has no run_id")
}

/// Kills and restarts the Redis node at `url` with `command` a quarter of the way through the
/// load, and checks that its run id changed.
///
/// # Cancel safety
/// Not cancel-safe: a dropped call may leave the command running.
pub async fn restart_redis(url: &str, window: &Window, command: &str) -> FaultLog {
    let mut log = FaultLog {
        recovers: true,
        ..FaultLog::default()
    };
    let before = match redis_run_id(url).await {
        Ok(id) => id,
        Err(e) => {
            log.effect = format!("cannot read the Redis node's run id: {e:#}");
            return log;
        }
    };
    sleep_until(window.at(0.25).into()).await;
    log.in_flight.push(window.in_flight());
    let t0 = Instant::now();
    let (ok, output, outage) =
        run_watching(command, || async { redis_run_id(url).await.map(|_| ()) }).await;
    log.injected.push(outage.map_or(t0, |(down, _)| down));
    let took = t0.elapsed();
    let after = until_ok(Duration::from_secs(20), || redis_run_id(url)).await;
    log.observed = ok && after.as_ref().is_some_and(|a| *a != before);
    log.effect = match &after {
        Some(a) if *a != before => format!(
            "`{command}` took {:.1} s; {}; a new Redis process (run id changed), its keys and \
             fence counters gone (no persistence)",
            took.as_secs_f64(),
            outage_text(outage)
        ),
        Some(_) => format!("`{command}` (ok: {ok}): same run id, not restarted. {output}"),
        None => format!("`{command}` (ok: {ok}): Redis did not come back within 20 s. {output}"),
    };
    log
}
