//! The `lock-freeze` fault: a separate `contend` process takes a Redis lock on two of the run's
//! accounts, announces it, and is frozen with SIGSTOP right there, before its transaction, for
//! longer than its lease; the run's workers take the expired lock and write meanwhile; then it
//! is resumed with SIGCONT and carries on with its write, as a process back from a long GC
//! pause or a VM migration does. Under `redis` (and `redlock`) its write carries the old
//! fencing token and must be rejected; under the unfenced `redis-spin` it is applied although
//! another client held the lock: the double write.

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

/// The holder's lease: short, so that the freeze outlasts it.
pub const HOLDER_LEASE: Duration = Duration::from_secs(1);
/// How long the holder stays frozen.
pub const FREEZE: Duration = Duration::from_secs(3);
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

/// Runs the holder (`contend faults --hold-lock STRATEGY ...`, started by the suite): one
/// transfer `op` on the tables tagged `tag`, under `strategy` with a lease of
/// [`HOLDER_LEASE`]; prints `HOLDING <token>` when its locks are granted and `RESULT ok` or
/// `RESULT <answer> <error>` at the end.
///
/// # Errors
/// The database or Redis cannot be reached.
///
/// # Cancel safety
/// Not cancel-safe (it holds locks until their lease ends).
pub async fn hold(
    strategy: Strategy,
    db_url: &str,
    redis_url: Option<&str>,
    redlock_urls: &[String],
    tag: &str,
    op: u64,
) -> anyhow::Result<()> {
    let db = contend::Db::connect(db_url).await?;
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
        other => anyhow::bail!("--hold-lock takes redis, redis-spin or redlock, not {other}"),
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

/// What happened to one holder.
#[derive(Debug, Clone)]
pub struct Frozen {
    /// The holder's operation id.
    pub op: u64,
    /// Its fencing tokens per lock key (`none` for the spin lock).
    pub token: String,
    /// When its lease ran out while it was frozen.
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
/// [`FREEZE`], resumes it, and reports what it was answered.
///
/// # Errors
/// The holder does not start, does not announce its locks within 15 s, or dies.
///
/// # Cancel safety
/// Not cancel-safe: dropped, the holder is killed (kill on drop), possibly while stopped.
#[allow(clippy::too_many_arguments)]
pub async fn freeze_holder(
    bin: &Path,
    strategy: Strategy,
    db_url: &str,
    redis_url: Option<&str>,
    redlock_urls: &[String],
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
    if let Some(url) = redis_url {
        cmd.args(["--redis-url", url]);
    }
    if !redlock_urls.is_empty() {
        cmd.args(["--redlock-urls", &redlock_urls.join(",")]);
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
    tokio::time::sleep_until((granted + FREEZE).into()).await;
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
        lease_over: granted + HOLDER_LEASE,
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
    fn the_state_of_a_running_process_is_read_from_proc() {
        let me = std::process::id();
        assert!(matches!(state(me), Some('R' | 'S')), "{:?}", state(me));
        assert_eq!(state(u32::MAX), None);
    }
}
