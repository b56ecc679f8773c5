//! The lock services of the `redis`, `redlock` and `etcd` strategies: a Redis lock per key
//! (single node, or a Redlock quorum), as [`contend_redis::RedisLocks`], or an etcd lock
//! ([`contend_etcd::EtcdLocks`], [`etcd`]), with the service's lease and lock wait. The
//! strategy executor takes them in canonical order and checks each grant's fencing token in the
//! writing transaction ([`contend::fencing::fence`]), so that a holder whose lease ran out while
//! it was paused cannot overwrite the next holder's work.

use std::sync::Arc;
use std::time::Duration;

use contend::lock::LockService;
use contend_redis::{LockClient, LockOptions, Redlock};

use crate::engine::LOCK_WAIT;

/// How long a Redis lock lives if its holder dies without releasing it.
pub const LEASE: Duration = Duration::from_secs(15);

/// A connected Redis lock service (one node, or several for Redlock).
#[derive(Debug, Clone)]
pub struct RedisLocks {
    locks: Arc<contend_redis::RedisLocks>,
}

/// What every acquisition of the service uses: [`LEASE`], and [`LOCK_WAIT`] before 503.
fn options() -> LockOptions {
    LockOptions::new().lease(LEASE).wait(LOCK_WAIT)
}

impl RedisLocks {
    /// Connects to one Redis node; `namespace` prefixes every Redis key (instances that share
    /// data must share it).
    ///
    /// # Errors
    /// A bad URL or an unreachable server.
    ///
    /// # Cancel safety
    /// Safe to drop: nothing is held yet.
    pub async fn single(url: &str, namespace: &str) -> contend::Result<RedisLocks> {
        let client = LockClient::builder(url)
            .namespace(namespace)
            .connect()
            .await?;
        Ok(RedisLocks {
            locks: Arc::new(contend_redis::RedisLocks::single(client, options())),
        })
    }

    /// Connects to the Redlock nodes.
    ///
    /// # Errors
    /// Bad URLs, or too few reachable nodes.
    ///
    /// # Cancel safety
    /// Safe to drop: nothing is held yet.
    pub async fn redlock<S: AsRef<str>>(
        urls: &[S],
        namespace: &str,
    ) -> contend::Result<RedisLocks> {
        let redlock = Redlock::builder(urls)
            .namespace(namespace)
            .connect()
            .await?;
        Ok(RedisLocks {
            locks: Arc::new(contend_redis::RedisLocks::redlock(redlock, options())),
        })
    }

    /// The lock service, for the strategy executor.
    pub(crate) fn service(&self) -> Arc<dyn LockService> {
        self.locks.clone()
    }
}

/// Connects to the etcd cluster of the `etcd` strategy (client URLs of its members): the same
/// lease ([`LEASE`]) and lock wait ([`LOCK_WAIT`]) as the Redis locks; `namespace` prefixes
/// every etcd key (instances that share data must share it).
///
/// # Errors
/// Bad URLs, or a cluster that does not answer (no quorum reachable).
///
/// # Cancel safety
/// Safe to drop: nothing is held yet.
#[cfg(feature = "etcd")]
pub async fn etcd<S: AsRef<str>>(urls: &[S], namespace: &str) -> contend::Result<EtcdLocks> {
    let locks = contend_etcd::EtcdLocks::builder(urls)
        .namespace(namespace)
        .lease_ttl(LEASE)
        .wait(LOCK_WAIT)
        .connect()
        .await?;
    Ok(EtcdLocks(Arc::new(locks)))
}

/// The lock service of the `etcd` strategy: `contend_etcd::EtcdLocks` in a build with the
/// `etcd` feature (`etcd` connects it).
#[derive(Clone)]
pub struct EtcdLocks(pub Arc<dyn contend::lock::LockService>);

impl std::fmt::Debug for EtcdLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdLocks")
    }
}
