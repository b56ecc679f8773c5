//! The `instance-kill` phase: two `contend serve` instances share one PostgreSQL; clients send
//! transfers to either and, when an answer does not come (connection reset, timeout, 5xx),
//! retry the same request on the other instance, as a client behind a load balancer does. Meanwhile
//! one instance at a time is killed with SIGKILL and started again. One group of clients sends
//! every request with an `Idempotency-Key` (the same key on every retry), the other without.
//!
//! Each transfer's amount is its operation id, unique in the run, so the final `transfers` table
//! tells how many times each operation was applied: a request that committed on the killed
//! instance just before it died, retried without a key, is applied twice.
//!
//! The instances' database link goes through the delaying proxy, answers delayed more than
//! requests, so that a kill finds requests between their commit and their answer.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use contend::Db;
use contend::strategy::Strategy;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use super::inject::{self, FaultLog};
use super::ledger::{self, Answer, OpRecord, Tracker};
use super::proxy::DelayProxy;
use super::run::{server_addr, through};
use super::timeline::Timeline;
use super::{RunRow, ledger::Counts};
use crate::scenario::pairs;

/// The `instance-kill` phase's settings.
#[derive(Debug, Clone)]
pub struct ServicePhase {
    /// The PostgreSQL (or MariaDB) the instances share (a throwaway server).
    pub url: String,
    /// The `contend` binary that runs `serve`.
    pub bin: PathBuf,
    /// The strategy of both instances.
    pub strategy: Strategy,
    /// Clients per group (with keys, without).
    pub clients: usize,
    /// How long operations are started.
    pub duration: Duration,
    /// How long a client may still retry its last operation after that.
    pub grace: Duration,
}

/// Accounts per group: enough that requests seldom wait for each other's row locks, so that a
/// kill finds them working (some between commit and answer) rather than queued.
const ACCOUNTS: usize = 32;
/// Their opening balance (transfers are never refused).
const OPENING: i64 = 1_000_000_000_000;
/// The admin token of the instances (they listen on 127.0.0.1 only, for this run only).
const ADMIN: &str = "faults-admin-token";
/// Request and answer delays on the instances' database link.
const UP: Duration = Duration::from_millis(2);
const DOWN: Duration = Duration::from_millis(25);

/// When the instances are killed, as fractions of the load (the last 40% shows the recovery).
const KILLS_AT: [f64; 6] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6];

/// How long a client keeps retrying one operation: past the instances' idempotency lease, so
/// that a key claimed by a killed instance is taken over by a retry and the operation settles.
const OP_BUDGET: Duration = Duration::from_millis(3500);

/// The instances' request timeout and idempotency lease (`--request-timeout-ms`,
/// `--idempotency-lease-secs`): a key claimed by an instance that was killed mid-request is
/// answered 409 `request_in_progress` until its lease ends.
const REQUEST_TIMEOUT_MS: u64 = 1000;
const LEASE_SECS: u64 = 2;

/// One `contend serve` process and its port.
struct Instance {
    port: u16,
    child: Option<Child>,
}

/// A port that was free a moment ago (the system picked it).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn spawn(phase: &ServicePhase, db_url: &str, port: u16) -> anyhow::Result<Child> {
    let child = Command::new(&phase.bin)
        .args(["serve", "--database-url", db_url, "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "--strategy",
            phase.strategy.as_str(),
            "--admin-token",
            ADMIN,
        ])
        .args(["--max-connections", "32"])
        .args(["--request-timeout-ms", &REQUEST_TIMEOUT_MS.to_string()])
        .args(["--idempotency-lease-secs", &LEASE_SECS.to_string()])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let http = reqwest::Client::new();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return Ok(child);
        }
        anyhow::ensure!(
            Instant::now() < end,
            "`contend serve` on 127.0.0.1:{port} did not answer /healthz within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A group of clients: its accounts (id, token) and whether it sends keys.
#[derive(Debug, Clone)]
struct Group {
    keys: bool,
    accounts: Vec<(i64, String)>,
}

async fn create_accounts(
    http: &reqwest::Client,
    port: u16,
    tag: &str,
) -> anyhow::Result<Vec<(i64, String)>> {
    let one = |i: usize| async move {
        let body: Value = http
            .post(format!("http://127.0.0.1:{port}/accounts"))
            .bearer_auth(ADMIN)
            .json(&json!({"owner": format!("{tag}{i}"), "balance": OPENING}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = body["id"]
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("no id in {body}"))?;
        let token = body["token"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no token in {body}"))?;
        anyhow::Ok((id, token.to_string()))
    };
    futures_util::future::try_join_all((0..ACCOUNTS).map(one)).await
}

/// What one HTTP attempt's answer tells the client.
fn classify(answer: Result<(reqwest::StatusCode, String), reqwest::Error>) -> Answer {
    match answer {
        Err(_) => Answer::Unknown,
        Ok((status, _)) if status.is_success() => Answer::Ok,
        // The key is held by a request still running (or by an instance that died holding it):
        // nothing was done by this attempt; try again later.
        Ok((status, body)) if status.as_u16() == 409 && body.contains("request_in_progress") => {
            Answer::Transient
        }
        Ok((status, _)) if status.is_server_error() => Answer::Unknown,
        Ok((status, _)) if status.as_u16() == 409 => Answer::Refused,
        Ok(_) => Answer::Rejected,
    }
}

/// One client: operations until `end`, each retried on the other instance until settled, for
/// [`OP_BUDGET`] at most and not after `give_up`.
#[allow(clippy::too_many_arguments)]
async fn client(
    http: reqwest::Client,
    ports: Arc<[u16; 2]>,
    group: Group,
    ids: Arc<AtomicU64>,
    in_flight: Arc<[AtomicU64; 2]>,
    end: Instant,
    give_up: Instant,
) -> (Vec<OpRecord>, BTreeMap<String, u64>) {
    let mut out = Vec::new();
    let mut errors = BTreeMap::new();
    let n = group.accounts.len() as u64;
    while Instant::now() < end {
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let from = (id % n) as usize;
        let to = ((id % n + 1 + (id / n) % (n - 1)) % n) as usize;
        let (from_id, token) = &group.accounts[from];
        let body = json!({"from": from_id, "to": group.accounts[to].0, "amount": id});
        let mut op = Tracker::new(id);
        let mut instance = (id % 2) as usize;
        // A client's patience with one operation: after it, the operation is left unknown
        // (or failed) and the client moves on, as a caller with a deadline does.
        let deadline = give_up.min(Instant::now() + OP_BUDGET);
        while !op.settled() && Instant::now() < deadline {
            let mut request = http
                .post(format!("http://127.0.0.1:{}/transfers", ports[instance]))
                .bearer_auth(token)
                .timeout(Duration::from_secs(3))
                .json(&body);
            if group.keys {
                request = request.header("Idempotency-Key", format!("faults-{id}-{from_id}"));
            }
            let started = Instant::now();
            in_flight[instance].fetch_add(1, Ordering::Relaxed);
            let answer = match request.send().await {
                Ok(r) => {
                    let status = r.status();
                    Ok((status, r.text().await.unwrap_or_default()))
                }
                Err(e) => Err(e),
            };
            in_flight[instance].fetch_sub(1, Ordering::Relaxed);
            let kind = match &answer {
                Err(e) if e.is_timeout() => Some("timeout".to_string()),
                Err(_) => Some("connection lost".to_string()),
                Ok((status, _)) if status.is_success() => None,
                Ok((status, body)) => Some(format!(
                    "HTTP {} {}",
                    status.as_u16(),
                    serde_json::from_str::<Value>(body)
                        .ok()
                        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
                        .unwrap_or_default()
                )),
            };
            if let Some(kind) = kind {
                *errors.entry(kind).or_insert(0) += 1;
            }
            let answer = classify(answer);
            op.answer(answer, started, Instant::now());
            match answer {
                Answer::Unknown => instance = 1 - instance,
                Answer::Transient => {
                    instance = 1 - instance;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => {}
            }
        }
        out.push(op.finish());
    }
    (out, errors)
}

/// Runs the phase: two rows, the group with keys (expected safe) and the one without.
///
/// # Errors
/// An instance does not start, or the final state cannot be read.
///
/// # Cancel safety
/// Not cancel-safe: dropped, it kills its instances (kill on drop) but leaves their tables.
pub async fn run_instance_kill(
    phase: &ServicePhase,
    on_progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<Vec<RunRow>> {
    let backend = contend::Backend::from_url(&phase.url)?;
    let proxy = DelayProxy::start(server_addr(&phase.url).await?).await?;
    proxy.set_delays(UP, DOWN);
    let db_url = through(&phase.url, proxy.addr())?;
    let ports = [free_port()?, free_port()?];
    // One after the other: the first runs the migrations.
    let mut instances = Vec::new();
    for port in ports {
        instances.push(Instance {
            port,
            child: Some(spawn(phase, &db_url, port).await?),
        });
    }
    let http = reqwest::Client::new();
    let groups = [
        Group {
            keys: true,
            accounts: create_accounts(&http, ports[0], "faults-keyed-").await?,
        },
        Group {
            keys: false,
            accounts: create_accounts(&http, ports[0], "faults-plain-").await?,
        },
    ];
    on_progress(&format!(
        "instance-kill on {backend}: 2 `contend serve` instances ({}), {} clients with keys + {} without, for {:.1} s",
        phase.strategy,
        phase.clients,
        phase.clients,
        phase.duration.as_secs_f64()
    ));

    let start = Instant::now();
    let end = start + phase.duration;
    let give_up = end + phase.grace;
    let in_flight: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let shared_ports = Arc::new(ports);
    let mut tasks = Vec::new();
    for group in &groups {
        let ids = Arc::new(AtomicU64::new(1));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..phase.clients {
            set.spawn(client(
                http.clone(),
                shared_ports.clone(),
                group.clone(),
                ids.clone(),
                in_flight.clone(),
                end,
                give_up,
            ));
        }
        tasks.push(set);
    }

    // The killer: SIGKILL at 10, 20, ... 60 % of the load, alternating instances, each
    // started again on its port at once (the rest of the load shows the recovery).
    let instances = Arc::new(Mutex::new(instances));
    let mut log = FaultLog {
        recovers: true,
        ..FaultLog::default()
    };
    let mut signalled = 0;
    let mut problems = Vec::new();
    for (k, fraction) in KILLS_AT.into_iter().enumerate() {
        tokio::time::sleep_until((start + phase.duration.mul_f64(fraction)).into()).await;
        let i = k % 2;
        let mut all = instances.lock().await;
        let inst = &mut all[i];
        let Some(mut child) = inst.child.take() else {
            continue;
        };
        log.in_flight.push(in_flight[i].load(Ordering::Relaxed));
        log.injected.push(Instant::now());
        let _ = child.start_kill(); // SIGKILL
        match child.wait().await {
            Ok(status) if status.signal() == Some(9) => signalled += 1,
            Ok(status) => problems.push(format!("instance {i} ended with {status}")),
            Err(e) => problems.push(format!("instance {i}: {e}")),
        }
        match spawn(phase, &db_url, inst.port).await {
            Ok(child) => inst.child = Some(child),
            Err(e) => problems.push(format!("restart of instance {i}: {e:#}")),
        }
    }
    let mut results = Vec::new();
    for mut set in tasks {
        let mut records = Vec::new();
        let mut errors = BTreeMap::new();
        while let Some(done) = set.join_next().await {
            let (ops, errs) = done?;
            records.extend(ops);
            for (k, n) in errs {
                *errors.entry(k).or_insert(0) += n;
            }
        }
        results.push((records, errors));
    }
    log.observed = signalled == KILLS_AT.len() && problems.is_empty();
    log.effect = format!(
        "SIGKILL of one of two `contend serve` instances ({}, shared {backend}, their database \
         link delayed {} ms each request and {} ms each answer), {} times alternating, each \
         started again at once: {signalled} of {} ended by signal 9{}",
        phase.strategy,
        UP.as_millis(),
        DOWN.as_millis(),
        KILLS_AT.len(),
        KILLS_AT.len(),
        if problems.is_empty() {
            String::new()
        } else {
            format!("; {}", problems.join("; "))
        }
    );

    // The books as a live instance sees them, then the final state.
    let audit: Value = http
        .get(format!("http://127.0.0.1:{}/audit", ports[0]))
        .bearer_auth(ADMIN)
        .send()
        .await?
        .json()
        .await?;
    let consistent = audit["consistent"].as_bool() == Some(true);
    let admin: Db = inject::admin(&phase.url).await?;
    let mut rows = Vec::new();
    for (group, (records, errors)) in groups.iter().zip(results) {
        let ids: Vec<String> = group
            .accounts
            .iter()
            .map(|(id, _)| id.to_string())
            .collect();
        let applied: HashMap<u64, u64> = pairs(
            &admin,
            &format!(
                "SELECT amount, COUNT(*) FROM transfers WHERE from_id IN ({}) GROUP BY amount",
                ids.join(", ")
            ),
        )
        .await?
        .into_iter()
        .map(|(amount, n)| (amount as u64, n as u64))
        .collect();
        let counts: Counts = ledger::account(&records, &applied);
        let acked: Vec<(Instant, Instant)> = records.iter().filter_map(|r| r.acked).collect();
        let recovery = ledger::recovery_after(&log.injected, &acked);
        let mut details = Vec::new();
        if !consistent {
            details.push(format!("audit: the books are inconsistent: {audit}"));
        }
        if counts.failed_but_applied > 0 {
            details.push(format!(
                "failed_but_applied: {} operations answered 4xx were applied",
                counts.failed_but_applied
            ));
        }
        let violations = u64::from(!consistent) + counts.failed_but_applied + counts.unexpected;
        rows.push(RunRow {
            fault: "instance-kill".into(),
            strategy: if group.keys {
                format!("{}+keys", phase.strategy)
            } else {
                format!("{} (no keys)", phase.strategy)
            },
            backend: super::backend_name(backend).into(),
            expected_safe: group.keys,
            violations,
            violation_details: details,
            recovered: recovery.is_some(),
            errors,
            timeline: Timeline::build(start, phase.duration, &records, &applied, &log.injected),
            ..RunRow::measured(&counts, &log, recovery)
        });
    }
    // The instances are killed when dropped (kill on drop); their tables stay (throwaway server).
    drop(instances);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_answers_are_classified_as_a_careful_client_reads_them() {
        let status = |code: u16, body: &str| {
            classify(Ok((
                reqwest::StatusCode::from_u16(code).unwrap(),
                body.to_string(),
            )))
        };
        assert_eq!(status(201, "{}"), Answer::Ok);
        assert_eq!(
            status(409, r#"{"error":{"code":"request_in_progress"}}"#),
            Answer::Transient
        );
        assert_eq!(
            status(409, r#"{"error":{"code":"insufficient_funds"}}"#),
            Answer::Refused
        );
        assert_eq!(status(503, "{}"), Answer::Unknown);
        assert_eq!(status(422, "{}"), Answer::Rejected);
    }
}
