//! `contend serve`: arguments and entry point.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use contend::strategy::Strategy;

use crate::redis_locks::RedisLocks;
use crate::{AppState, Config};

/// Arguments of `contend serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Database URL: sqlite:PATH, postgres://..., mysql://... or mariadb://...; or the nodes of
    /// one Galera cluster, comma separated (connections are spread over them round robin, each
    /// node with its own pool of --max-connections). A PostgreSQL reached through a transaction
    /// pooler (pgbouncer `pool_mode = transaction`) takes `?pgbouncer=true` (see
    /// `contend::DbBuilder::transaction_pooler`) and --migrate-url.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite:contend-service.db"
    )]
    pub database_url: String,
    /// The URL the schema migrations are applied on (default: --database-url). Required when
    /// --database-url goes through a transaction pooler: the migrator holds a session
    /// advisory lock and runs statements outside transactions, which such a pooler cannot
    /// carry; give a direct URL of the same database.
    #[arg(long, env = "CONTEND_MIGRATE_URL")]
    pub migrate_url: Option<String>,
    /// Redis URL for the `redis` strategy.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Comma-separated Redis URLs for the `redlock` strategy.
    #[arg(long, env = "REDLOCK_URLS", value_delimiter = ',')]
    pub redlock_urls: Vec<String>,
    /// Comma-separated etcd client URLs (the members of one cluster) for the `etcd` strategy.
    #[arg(long, env = "ETCD_URLS", value_delimiter = ',')]
    pub etcd_urls: Vec<String>,
    /// Prefix of this service's Redis and etcd keys (instances that share a database must share
    /// it).
    #[arg(
        long,
        env = "CONTEND_REDIS_NAMESPACE",
        default_value = "contend-service"
    )]
    pub redis_namespace: String,
    /// Address to listen on.
    #[arg(long, env = "CONTEND_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Default concurrency strategy: none, mutex, atomic, pessimistic, optimistic, serializable,
    /// advisory, redis, redlock, etcd, batched.
    #[arg(long, env = "CONTEND_STRATEGY", default_value = "atomic")]
    pub strategy: String,
    /// Accept `X-Concurrency-Strategy` to pick a strategy per request.
    #[arg(long, env = "CONTEND_ALLOW_STRATEGY_HEADER")]
    pub allow_strategy_header: bool,
    /// Admin bearer token (a random one is generated and printed when unset).
    #[arg(long, env = "CONTEND_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Request timeout in milliseconds (503 after it).
    #[arg(long, default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,
    /// After SIGTERM, how long in-flight requests may take to finish, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// How long, in seconds, an Idempotency-Key claimed by a request that has not finished
    /// protects the key: a retry with the same key meanwhile is answered 409
    /// `request_in_progress`. It must outlast any request (more than --request-timeout-ms): a
    /// shorter lease would let a retry run while the first attempt still can commit. After an
    /// instance dies mid-request its keys stay claimed this long.
    #[arg(long, env = "CONTEND_IDEMPOTENCY_LEASE_SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idempotency_lease_secs: u64,
    /// Largest number of pooled database connections.
    #[arg(long, default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Test every pooled connection with a round trip when it is taken from the pool, not only
    /// when it is returned (sqlx always tests returned connections). Off by default: the test
    /// costs a round trip per request and only catches a connection the server dropped while it
    /// sat idle, which otherwise fails that one request with 503 and is replaced.
    #[arg(long, env = "CONTEND_TEST_BEFORE_ACQUIRE")]
    pub test_before_acquire: bool,
    /// How long, in seconds, a successful account-token lookup is remembered by this instance
    /// (0: look every token up on every request). No API removes an account or changes its
    /// token, so only rows deleted or changed by hand can make a remembered token stale.
    #[arg(long, env = "CONTEND_TOKEN_CACHE_SECS", default_value_t = 30)]
    pub token_cache_secs: u64,
    /// Longest time, in milliseconds, a client may take to send a request's head (request line
    /// and headers), from accept or from the first byte after an idle wait; then the
    /// connection is closed without an answer.
    #[arg(long, env = "CONTEND_HEADER_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_ms: u64,
    /// Longest time, in milliseconds, a request's body may take to arrive after its head; then
    /// 408 `body_timeout` and the connection is closed.
    #[arg(long, env = "CONTEND_BODY_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout_ms: u64,
    /// Longest time, in milliseconds, a keep-alive connection may stay open between requests
    /// (or take to read a response); then it is closed.
    #[arg(long, env = "CONTEND_IDLE_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_ms: u64,
    /// Most client connections open at once; beyond it a new connection is answered 503
    /// `too_many_connections` and closed. Keep it well below the open-file limit (`ulimit -n`).
    #[arg(long, env = "CONTEND_MAX_CLIENTS", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_clients: u64,
}

/// Whether `token` can be sent as `Authorization: Bearer <token>`: visible ASCII, no spaces
/// (the header is trimmed and split at the first space, and must be ASCII).
fn bearer_token_ok(token: &str) -> bool {
    token.bytes().all(|b| b.is_ascii_graphic())
}

/// What `strategy` needs besides the database (a lock service flag) or what the database's
/// backend cannot do, from the flags alone: refused before anything is opened or created.
fn check_strategy_flags(args: &ServeArgs, strategy: Strategy) -> anyhow::Result<()> {
    let urls = contend::nodes::split_urls(&args.database_url);
    let backend = contend::nodes::check_urls(&urls).context("--database-url")?;
    if let Some(url) = &args.migrate_url {
        contend::nodes::check_urls(&contend::nodes::split_urls(url)).context("--migrate-url")?;
    }
    let has_lock_service = match strategy {
        Strategy::Redis => args.redis_url.is_some(),
        Strategy::Redlock => !args.redlock_urls.is_empty(),
        Strategy::Etcd => args.etcd_urls.iter().any(|u| !u.trim().is_empty()),
        _ => true,
    };
    match crate::engine::unmet(strategy, backend, has_lock_service) {
        Some(why) => anyhow::bail!("--strategy {strategy}: {why}"),
        None => Ok(()),
    }
}

/// Runs the service until SIGTERM or Ctrl-C, then finishes in-flight requests and exits 0.
///
/// Every flag is checked, and the lock services and the listening socket are set up, before
/// the database is opened: a bad flag, an unreachable Redis or a port in use creates and
/// migrates nothing.
///
/// # Errors
/// Bad arguments, an unreachable database or lock service, failed migrations, a port in use.
pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if !crate::extract::STRATEGY_NAMES.contains(&args.strategy.as_str()) {
        anyhow::bail!(
            "unknown strategy `{}` (expected one of: {})",
            args.strategy,
            crate::extract::STRATEGY_NAMES.join(", ")
        );
    }
    let strategy: Strategy = args.strategy.parse()?;
    let lease = Duration::from_secs(args.idempotency_lease_secs);
    let request_timeout = Duration::from_millis(args.request_timeout_ms);
    anyhow::ensure!(
        lease > request_timeout,
        "--idempotency-lease-secs {} must be longer than --request-timeout-ms {} ({} s): a key \
         must stay claimed for as long as its request may still commit",
        args.idempotency_lease_secs,
        args.request_timeout_ms,
        request_timeout.as_secs_f64()
    );
    if let Some(token) = args.admin_token.as_deref().filter(|t| !t.is_empty())
        && !bearer_token_ok(token)
    {
        anyhow::bail!(
            "--admin-token must be visible ASCII characters without spaces (it is sent as \
             `Authorization: Bearer <token>`)"
        );
    }
    check_strategy_flags(&args, strategy)?;
    // Generated here, printed once the service is about to serve (a refused start prints only
    // why).
    let (admin_token, generated) = match args.admin_token {
        Some(t) if !t.is_empty() => (t, false),
        _ => (
            crate::auth::new_token().replacen("acct_", "admin_", 1),
            true,
        ),
    };
    let mut redis = None;
    if let Some(url) = &args.redis_url {
        redis = Some(
            RedisLocks::single(url, &args.redis_namespace)
                .await
                .with_context(|| format!("--redis-url {}", contend::backend::redact_url(url)))?,
        );
    }
    let mut redlock = None;
    if !args.redlock_urls.is_empty() {
        redlock = Some(
            RedisLocks::redlock(&args.redlock_urls, &args.redis_namespace)
                .await
                .context("--redlock-urls")?,
        );
    }
    let etcd_urls: Vec<&str> = args
        .etcd_urls
        .iter()
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
        .collect();
    #[cfg(feature = "etcd")]
    let etcd = if etcd_urls.is_empty() {
        None
    } else {
        Some(
            crate::redis_locks::etcd(&etcd_urls, &args.redis_namespace)
                .await
                .context("--etcd-urls")?,
        )
    };
    #[cfg(not(feature = "etcd"))]
    if !etcd_urls.is_empty() {
        anyhow::bail!(
            "--etcd-urls: this contend was built without etcd support: build it with \
             `--features etcd` (needs protoc: Debian `protobuf-compiler`)"
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let db = contend::Db::builder(&args.database_url)
        .max_connections(args.max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(args.test_before_acquire)
        .connect()
        .await?;
    match &args.migrate_url {
        Some(url) => {
            let direct = contend::Db::builder(url)
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(3))
                .connect()
                .await
                .context("--migrate-url")?;
            let migrated = crate::migrate::run(&direct).await;
            direct.pool().close().await;
            migrated?;
        }
        None if db.transaction_pooler() => anyhow::bail!(
            "--database-url goes through a transaction pooler (pgbouncer=true): the migrations \
             need a direct connection to the same database, give it with --migrate-url"
        ),
        None => crate::migrate::run(&db).await?,
    }
    let mut config = Config::new(db, &admin_token);
    config.redis = redis;
    config.redlock = redlock;
    #[cfg(feature = "etcd")]
    {
        config.etcd = etcd;
    }
    config.strategy = strategy;
    config.allow_strategy_header = args.allow_strategy_header;
    config.request_timeout = request_timeout;
    config.idempotency_lease = lease;
    config.shutdown_grace = Duration::from_millis(args.shutdown_grace_ms);
    config.token_cache_ttl = Duration::from_secs(args.token_cache_secs);
    config.limits = crate::Limits {
        header_timeout: Duration::from_millis(args.header_timeout_ms),
        body_timeout: Duration::from_millis(args.body_timeout_ms),
        idle_timeout: Duration::from_millis(args.idle_timeout_ms),
        max_clients: args.max_clients as usize,
    };
    let state = AppState::new(config);
    crate::engine::check_supported(&state, strategy)
        .map_err(|e| anyhow::anyhow!("--strategy {strategy}: {}", e.message))?;
    if generated {
        eprintln!(
            "contend serve: no --admin-token / CONTEND_ADMIN_TOKEN given; generated admin token: {admin_token}"
        );
    }
    eprintln!(
        "contend serve: listening on http://{} (database {}, strategy {strategy})",
        listener.local_addr()?,
        state.db().url()
    );
    crate::serve(listener, state, shutdown_signal()).await?;
    eprintln!("contend serve: stopped");
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[tokio::test]
    async fn a_lease_shorter_than_the_request_timeout_is_refused_before_anything_opens() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("service.db");
        let url = format!("sqlite:{}", file.display());
        let cli = Cli::parse_from([
            "serve",
            "--database-url",
            &url,
            "--idempotency-lease-secs",
            "5",
            "--request-timeout-ms",
            "5000",
        ]);
        let err = run(cli.serve).await.unwrap_err().to_string();
        assert!(err.contains("--idempotency-lease-secs 5"), "{err}");
        assert!(
            err.contains("longer than --request-timeout-ms 5000"),
            "{err}"
        );
        assert!(!file.exists(), "nothing may be created on bad flags");
        let zero = Cli::try_parse_from(["serve", "--idempotency-lease-secs", "0"]);
        assert!(zero.is_err());
    }

    /// Flags that cannot work are refused (an `Err`: exit 2) before the database is opened:
    /// no SQLite file is created or migrated, and nothing starts serving.
    #[tokio::test]
    async fn bad_flags_are_refused_before_the_database_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("service.db");
        let url = format!("sqlite:{}", file.display());
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = taken.local_addr().unwrap().to_string();
        let cases: [(&[&str], &str); 8] = [
            (
                &["--strategy", "redis"],
                "needs the server to run with --redis-url",
            ),
            (
                &["--strategy", "redlock"],
                "needs the server to run with --redlock-urls",
            ),
            (
                &["--strategy", "etcd"],
                "needs the server to run with --etcd-urls",
            ),
            (&["--strategy", "advisory"], "is not supported here"),
            // Tokens a client can never send as `Authorization: Bearer <token>`.
            (
                &["--admin-token", "two words"],
                "--admin-token must be visible ASCII",
            ),
            (
                &["--admin-token", "s\u{e9}cret"],
                "--admin-token must be visible ASCII",
            ),
            (&["--listen", &taken], "cannot listen on"),
            (
                &["--migrate-url", "garbage"],
                "--migrate-url: invalid database URL",
            ),
        ];
        for (flags, expected) in cases {
            let mut argv = vec!["serve", "--database-url", &url];
            if flags[0] != "--listen" {
                argv.extend(["--listen", "127.0.0.1:0"]);
            }
            argv.extend_from_slice(flags);
            let cli = Cli::parse_from(&argv);
            let ran = tokio::time::timeout(Duration::from_secs(20), run(cli.serve)).await;
            let err = match ran {
                Ok(Err(e)) => format!("{e:#}"),
                Ok(Ok(_)) => panic!("{flags:?}: ran"),
                Err(_) => panic!("{flags:?}: started serving instead of refusing"),
            };
            assert!(err.contains(expected), "{flags:?}: {err}");
            assert!(!file.exists(), "{flags:?}: the database was created: {err}");
        }
        for (flag, value) in [("--request-timeout-ms", "0"), ("--max-connections", "0")] {
            assert!(
                Cli::try_parse_from(["serve", flag, value]).is_err(),
                "{flag} {value} accepted"
            );
        }
    }
}
