//! The lab's Redis side: the lock services behind the `redis`, `redis-spin` and `redlock`
//! strategies (the scenario seam's [`KeyLock`] over `contend-redis`), and the
//! `INFO commandstats` counter that measures how many commands each run sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use contend::BoxFuture;
use contend::strategy::Strategy;

use crate::config::LabConfig;
use crate::lockstats::commandstats_calls;
use crate::runner::{CommandCounter, LockServices, missing_redis_reason};

/// How long connecting to a Redis server may take before the lab gives up on it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Reads `INFO commandstats` from a set of Redis servers.
pub struct RedisCommandCounter {
    nodes: Vec<redis::aio::MultiplexedConnection>,
}

impl RedisCommandCounter {
    /// Connects to every server in `urls`.
    ///
    /// # Errors
    /// A bad URL or a server that cannot be reached within 3 s.
    ///
    /// # Cancel safety
    /// Safe to drop: nothing is left behind but a closed connection.
    pub async fn connect(urls: &[String]) -> anyhow::Result<Self> {
        let mut nodes = Vec::with_capacity(urls.len());
        for url in urls {
            let shown = contend::backend::redact_url(url);
            let client = redis::Client::open(url.as_str())
                .with_context(|| format!("invalid Redis URL {shown}"))?;
            let conn =
                tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| anyhow::anyhow!("cannot connect to Redis at {shown}: timed out"))?
                    .with_context(|| format!("cannot connect to Redis at {shown}"))?;
            nodes.push(conn);
        }
        Ok(RedisCommandCounter { nodes })
    }
}

impl CommandCounter for RedisCommandCounter {
    fn total(&self) -> BoxFuture<'_, anyhow::Result<u64>> {
        Box::pin(async move {
            let mut sum = 0;
            for node in &self.nodes {
                let mut conn = node.clone();
                let info: String = redis::cmd("INFO")
                    .arg("commandstats")
                    .query_async(&mut conn)
                    .await
                    .context("INFO commandstats failed")?;
                sum += commandstats_calls(&info);
            }
            Ok(sum)
        })
    }
}

/// The lock services for the Redis strategies `config` asks for: each one ready, or the reason
/// it is skipped.
///
/// # Errors
/// A Redis server given on the command line cannot be reached.
///
/// # Cancel safety
/// Safe to drop: connections made so far are closed.
pub async fn lock_services(config: &LabConfig) -> anyhow::Result<LockServices> {
    let mut services: LockServices = HashMap::new();
    for &strategy in config.strategies.iter().filter(|s| s.needs_redis()) {
        let urls: Vec<String> = match strategy {
            Strategy::Redlock => config.redlock_urls.clone(),
            _ => config.redis_url.iter().cloned().collect(),
        };
        if urls.is_empty() {
            services.insert(strategy, Err(missing_redis_reason(strategy)));
            continue;
        }
        // Reach the servers now, so that a wrong address stops the lab with a clear message.
        let _counter = Arc::new(RedisCommandCounter::connect(&urls).await?);
        services.insert(
            strategy,
            Err("the contend-redis lock API is not available in this build yet".to_string()),
        );
    }
    Ok(services)
}
