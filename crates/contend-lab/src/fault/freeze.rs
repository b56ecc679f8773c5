//! The `lock-freeze` fault: a separate `contend` process takes a Redis or etcd lock on two of
//! the run's accounts, announces it, and is frozen with SIGSTOP right there, before its
//! transaction, for longer than its lease; the run's workers take the expired lock and write
//! meanwhile; then it is resumed with SIGCONT and carries on with its write, as a process back
//! from a long GC pause or a VM migration does. Under `redis`, `redlock` and `etcd` its write
//! carries the old fencing token and must be rejected; under the unfenced `redis-spin` it is
//! applied although another client held the lock: the double write.
//!
//! etcd's leases are whole seconds and etcd raises a shorter TTL to its minimum (1.5 x the
//! election timeout, rounded up: 2 s with the default 1 s election timeout); it revokes expired
//! leases on a 500 ms tick, and the frozen holder's last keepalive may be a third of a TTL
//! old. So the etcd holder's lease is 2 s and it stays frozen for 4.5 s: its key is gone
//! 2-2.5 s into the freeze, which leaves the workers 2 s to take the lock and write.

use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use contend::BoxFuture;
use contend::lock::{HeldLock, LockService};
use contend::strategy::{Executor, Strategy};
use contend_redis::{LockClient, LockOptions, RedisLocks, Redlock, SpinLock};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::books::Books;
use super::ledger::Answer;
use super::run::{NAMESPACE, classify};
use crate::db_target::lab_executor;
use crate::scenario::Ctx;
use crate::scenario::transfer::apply_result;

/// The Redis holder's lease: short, so that the freeze outlasts it.
pub const HOLDER_LEASE: Duration = Duration::from_secs(1);
/// How long the Redis holder stays frozen.
pub const FREEZE: Duration = Duration::from_secs(3);
/// The etcd holder's lease: etcd's minimum TTL with its default election timeout (a shorter
/// one is raised to it).
pub const ETCD_HOLDER_LEASE: Duration = Duration::from_secs(2);
/// How long the etcd holder stays frozen: its lease, the 500 ms tick on which etcd revokes
/// expired leases, and 2 s for the workers to take the lock and write.
pub const ETCD_FREEZE: Duration = Duration::from_millis(4500);

/// The holder's lease under `strategy`.
pub fn holder_lease(strategy: Strategy) -> Duration {
    match strategy {
        Strategy::Etcd => ETCD_HOLDER_LEASE,
        _ => HOLDER_LEASE,
    }
}

/// How long the holder is kept frozen under `strategy`.
pub fn freeze_for(strategy: Strategy) -> Duration {
    match strategy {
        Strategy::Etcd => ETCD_FREEZE,
        _ => FREEZE,
    }
}

/// The lock strategies `lock-freeze` runs a holder for.
pub fn freezes(strategy: Strategy) -> bool {
    strategy.needs_lock_service()
}

/// When the holders are frozen: this fraction of the way through the load.
pub const FREEZE_AT: f64 = 0.2;

/// The shortest load of a `lock-freeze` phase with holders under `strategies`: they are frozen
/// [`FREEZE_AT`] of the way in, and the workers keep starting operations until half a second
/// after the longest freeze ends, so that they take the expired locks meanwhile.
pub fn phase_duration(strategies: &[Strategy]) -> Duration {
    let longest = strategies
        .iter()
        .filter(|s| freezes(**s))
        .map(|s| freeze_for(*s))
        .max()
        .unwrap_or_default();
    (longest + Duration::from_millis(500)).div_f64(1.0 - FREEZE_AT)
}
/// Operation ids of holders start here (the workers' ids stay far below).
pub const HOLDER_OP: u64 = 1_000_000_000;

/// A lock service that, once the operation's `keys` locks are all granted, prints `HOLDING` on
/// stdout and pauses briefly: the moment the suite freezes the process.
struct Announce {
    inner: Arc<dyn LockService>,
    keys: usize,
    granted: AtomicUsize,
    tokens: std::sync::Mutex<Vec<String>>,
}

impl LockService for Announce {
    fn acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        Box::pin(async move {
            let held = self.inner.acquire(key).await?;
            let token = held
                .fencing_token()
                .map_or("none".to_string(), |t| t.to_string());
            let token = {
                let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
                // `account 3: token 17` reads better than the whole lock key.
                let account = key.rsplit(':').next().unwrap_or(key);
                tokens.push(format!("account {account}: {token}"));
                tokens.join(", ")
            };
            if self.granted.fetch_add(1, Ordering::SeqCst) + 1 == self.keys {
                {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "HOLDING {token}");
                    let _ = out.flush();
                }
                // Frozen here by the suite; after SIGCONT the pause is long over.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(held)
        })
    }
}

/// Where the holder takes its locks: the lock servers' URLs.
#[derive(Debug, Clone, Copy, Default)]
pub struct LockServers<'a> {
    /// The Redis node of `redis` and `redis-spin`.
    pub redis: Option<&'a str>,
    /// The Redis nodes of `redlock`.
    pub redlock: &'a [String],
    /// The etcd members of `etcd`.
    pub etcd: &'a [String],
}

/// Runs the holder (`contend faults --hold-lock STRATEGY ...`, started by the suite): one
/// transfer `op` on the tables tagged `tag`, under `strategy` with a lease of
/// [`holder_lease`]; prints `HOLDING <token>` when its locks are granted and `RESULT ok` or
/// `RESULT <answer> <error>` at the end.
///
/// # Errors
/// The database or the lock servers cannot be reached; `etcd` in a build without the `etcd`
/// feature.
///
/// # Cancel safety
/// Not cancel-safe (it holds locks until their lease ends).
pub async fn hold(
    strategy: Strategy,
    db_url: &str,
    servers: LockServers<'_>,
    tag: &str,
    op: u64,
) -> anyhow::Result<()> {
    let db = contend::Db::connect(db_url).await?;
    let (redis_url, redlock_urls) = (servers.redis, servers.redlock);
    let options = LockOptions::new()
        .lease(HOLDER_LEASE)
        .wait(Duration::from_secs(10));
    let inner: Arc<dyn LockService> = match strategy {
        Strategy::Redis | Strategy::RedisSpin => {
            let url = redis_url.ok_or_else(|| anyhow::anyhow!("--redis-url needed"))?;
            let client = LockClient::builder(url)
                .namespace(NAMESPACE)
                .connect()
                .await?;
            if strategy == Strategy::Redis {
                Arc::new(RedisLocks::single(client, options))
            } else {
                Arc::new(RedisLocks::spin(
                    SpinLock::new(&client).retry_interval(Duration::from_millis(10)),
                    options,
                ))
            }
        }
        Strategy::Redlock => {
            let quorum = Redlock::builder(redlock_urls)
                .namespace(NAMESPACE)
                .connect()
                .await?;
            Arc::new(RedisLocks::redlock(quorum, options))
        }
        Strategy::Etcd => etcd_locks(servers.etcd).await?,
        other => {
            anyhow::bail!("--hold-lock takes redis, redis-spin, redlock or etcd, not {other}")
        }
    };
    let books = Books::new(tag);
    let announce = Arc::new(Announce {
        inner,
        keys: 2,
        granted: AtomicUsize::new(0),
        tokens: std::sync::Mutex::new(Vec::new()),
    });
    let executor: Executor = lab_executor()
        .lock_wait(Duration::from_secs(10))
        .lock_service(strategy, announce);
    let ctx = Ctx {
        db: db.clone(),
        strategy,
        workers: 1,
        operations: 1,
        executor,
        run_id: books.accounts.clone(),
        history: None,
    };
    let mut session = db.session();
    let (result, _) = apply_result(&ctx, &mut session, books.plan(op)).await;
    match &result {
        Ok(()) => println!("RESULT ok"),
        Err(e) => println!("RESULT {:?} {e}", classify(&result)),
    }
    Ok(())
}

/// The etcd holder's locks: a lease of [`ETCD_HOLDER_LEASE`].
#[cfg(feature = "etcd")]
async fn etcd_locks(urls: &[String]) -> anyhow::Result<Arc<dyn LockService>> {
    anyhow::ensure!(!urls.is_empty(), "--etcd-urls needed");
    let locks = contend_etcd::EtcdLocks::builder(urls)
        .namespace(NAMESPACE)
        .lease_ttl(ETCD_HOLDER_LEASE)
        .wait(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(Arc::new(locks))
}

#[cfg(not(feature = "etcd"))]
async fn etcd_locks(_urls: &[String]) -> anyhow::Result<Arc<dyn LockService>> {
    anyhow::bail!(crate::lockstats::NO_ETCD)
}

/// What happened to one holder.
#[derive(Debug, Clone)]
pub struct Frozen {
    /// The holder's operation id.
    pub op: u64,
    /// Its fencing tokens per lock key (`none` for the spin lock).
    pub token: String,
    /// When its lease ran out while it was frozen (its grant plus [`holder_lease`]).
    pub lease_over: Instant,
    /// When it was resumed.
    pub resumed: Instant,
    /// Whether the process was seen stopped (`T` in /proc) while frozen.
    pub seen_stopped: bool,
    /// What it was answered.
    pub answer: Answer,
    /// Its own words (`RESULT ...`).
    pub said: String,
}

/// The process state letter of `pid` (`T` when stopped).
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the command name, which is in parentheses.
    stat.rsplit_once(") ")?.1.chars().next()
}

async fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill {sig} {pid} failed");
    Ok(())
}

/// Starts a holder on `books`' tables, freezes it once it holds its locks, keeps it frozen for
/// [`freeze_for`] its strategy, resumes it, and reports what it was answered.
///
/// # Errors
/// The holder does not start, does not announce its locks within 15 s, or dies.
///
/// # Cancel safety
/// Not cancel-safe: dropped, the holder is killed (kill on drop), possibly while stopped.
pub async fn freeze_holder(
    bin: &Path,
    strategy: Strategy,
    db_url: &str,
    servers: LockServers<'_>,
    books: &Books,
    op: u64,
) -> anyhow::Result<Frozen> {
    let tag = books
        .accounts
        .strip_prefix("fault_acc_")
        .unwrap_or(&books.accounts);
    let mut cmd = Command::new(bin);
    cmd.args([
        "faults",
        "--hold-lock",
        strategy.as_str(),
        "--pg-url",
        db_url,
    ])
    .args(["--hold-tag", tag, "--hold-op", &op.to_string()])
    .env("RUST_LOG", "error")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    if let Some(url) = servers.redis {
        cmd.args(["--redis-url", url]);
    }
    if !servers.redlock.is_empty() {
        cmd.args(["--redlock-urls", &servers.redlock.join(",")]);
    }
    if !servers.etcd.is_empty() {
        cmd.args(["--etcd-urls", &servers.etcd.join(",")]);
    }
    let mut child = cmd.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("the holder has no pid"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let holding = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("the {strategy} holder did not take its locks within 15 s"))??
        .ok_or_else(|| anyhow::anyhow!("the {strategy} holder ended before taking its locks"))?;
    let granted = Instant::now();
    signal(pid, "-STOP").await?;
    let token = holding
        .strip_prefix("HOLDING ")
        .ok_or_else(|| anyhow::anyhow!("the holder said `{holding}`"))?
        .to_string();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen_stopped = state(pid) == Some('T');
    tokio::time::sleep_until((granted + freeze_for(strategy)).into()).await;
    signal(pid, "-CONT").await?;
    let resumed = Instant::now();
    let said = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("the resumed {strategy} holder did not finish within 20 s"))??
        .unwrap_or_default();
    let _ = child.wait().await;
    let answer = match said.strip_prefix("RESULT ") {
        Some("ok") => Answer::Ok,
        Some(rest) if rest.starts_with("Transient") => Answer::Transient,
        Some(rest) if rest.starts_with("Unknown") => Answer::Unknown,
        Some(_) => Answer::Rejected,
        None => Answer::Unknown,
    };
    Ok(Frozen {
        op,
        token,
        lease_over: granted + holder_lease(strategy),
        resumed,
        seen_stopped,
        answer,
        said,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_outlasts_the_longest_freeze() {
        let redis = phase_duration(&[Strategy::Redis, Strategy::RedisSpin]);
        let etcd = phase_duration(&[Strategy::Redis, Strategy::Etcd]);
        assert_eq!(redis, Duration::from_millis(4375));
        assert_eq!(etcd, Duration::from_millis(6250));
        for (d, freeze) in [(redis, FREEZE), (etcd, ETCD_FREEZE)] {
            // Frozen at FREEZE_AT, resumed half a second before the last operation starts.
            assert!(d.mul_f64(FREEZE_AT) + freeze + Duration::from_millis(500) <= d);
        }
        // The etcd holder stays frozen past its lease, the revocation tick and a 500 ms margin.
        assert!(ETCD_FREEZE >= ETCD_HOLDER_LEASE + Duration::from_millis(2000));
        assert_eq!(
            phase_duration(&[Strategy::Atomic]),
            Duration::from_millis(625)
        );
    }

    #[test]
    fn the_state_of_a_running_process_is_read_from_proc() {
        let me = std::process::id();
        assert!(matches!(state(me), Some('R' | 'S')), "{:?}", state(me));
        assert_eq!(state(u32::MAX), None);
    }
}
