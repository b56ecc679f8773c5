//! One Redis node as the locks see it: a reconnecting multiplexed connection with hard time
//! limits, script calls by SHA, and driver errors turned into [`contend::Error::LockService`].

use std::future::Future;
use std::time::Duration;

use contend::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script, ToRedisArgs};

use crate::options::LockKeys;
use crate::scripts;

/// Time limits for talking to Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeouts {
    /// Opening a TCP connection (and the handshake).
    pub connect: Duration,
    /// Waiting for one command's reply.
    pub response: Duration,
}

impl Timeouts {
    /// The longest one operation may take: a reconnect and then the command.
    pub fn op(&self) -> Duration {
        self.connect + self.response
    }
}

/// Why a Redis operation failed: the node's address and what happened. Carried inside
/// [`contend::Error::LockService`]; downcast the source to read it.
#[derive(Debug)]
pub struct NodeError {
    address: String,
    context: String,
    cause: Cause,
}

#[derive(Debug)]
enum Cause {
    Timeout(Duration),
    Redis(redis::RedisError),
    Other,
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "redis at {}: {}", self.address, self.context)?;
        match &self.cause {
            Cause::Timeout(t) => write!(f, ": no reply within {} ms", t.as_millis()),
            Cause::Redis(e) => write!(f, ": {e}"),
            Cause::Other => Ok(()),
        }
    }
}

impl std::error::Error for NodeError {}

impl NodeError {
    /// The node's address (`host:port`, password redacted).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// True when the node did not answer within the configured time.
    pub fn is_timeout(&self) -> bool {
        matches!(self.cause, Cause::Timeout(_))
    }

    /// The driver's error, when there was one.
    pub fn redis_error(&self) -> Option<&redis::RedisError> {
        match &self.cause {
            Cause::Redis(e) => Some(e),
            _ => None,
        }
    }
}

pub(crate) fn redis_failure(address: &str, context: &str, e: redis::RedisError) -> Error {
    node_error(address, context, Cause::Redis(e))
}

pub(crate) fn timeout_failure(address: &str, context: &str, after: Duration) -> Error {
    node_error(address, context, Cause::Timeout(after))
}

pub(crate) fn other_failure(address: &str, context: impl Into<String>) -> Error {
    node_error(address, &context.into(), Cause::Other)
}

fn node_error(address: &str, context: &str, cause: Cause) -> Error {
    Error::LockService(Box::new(NodeError {
        address: address.to_string(),
        context: context.to_string(),
        cause,
    }))
}

/// A connection to one node.
#[derive(Clone)]
pub(crate) struct Node {
    address: String,
    client: redis::Client,
    conn: ConnectionManager,
    timeouts: Timeouts,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("address", &self.address)
            .finish()
    }
}

/// Parses a Redis URL into a client, with a clear error for bad input.
pub(crate) fn open_client(url: &str) -> Result<(redis::Client, String)> {
    let redacted = contend::backend::redact_url(url);
    if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://"))
    {
        return Err(Error::InvalidUrl {
            url: redacted,
            reason: "expected a URL starting with redis://, rediss:// or unix://".into(),
        });
    }
    let client = redis::Client::open(url).map_err(|e| Error::InvalidUrl {
        url: redacted.clone(),
        reason: e.to_string(),
    })?;
    let address = match url.split_once("://") {
        Some((_, rest)) => {
            let rest = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
            rest.split(['/', '?']).next().unwrap_or(rest).to_string()
        }
        None => redacted,
    };
    Ok((client, address))
}

impl Node {
    /// Connects to `url` and loads the scripts. With `lazy`, no connection is made until the
    /// first command (a node that is down does not fail this call; Redlock tolerates a minority
    /// of those) and the scripts load on first use.
    pub async fn connect(url: &str, timeouts: Timeouts, lazy: bool) -> Result<Node> {
        let node = Node::open(url, timeouts, lazy).await?;
        if !lazy {
            node.load_scripts().await?;
        }
        Ok(node)
    }

    /// Connects to `url` without loading scripts (for statistics).
    pub async fn connect_plain(url: &str, timeouts: Timeouts) -> Result<Node> {
        Node::open(url, timeouts, false).await
    }

    async fn open(url: &str, timeouts: Timeouts, lazy: bool) -> Result<Node> {
        let (client, address) = open_client(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeouts.connect))
            .set_response_timeout(Some(timeouts.response))
            .set_number_of_retries(0)
            .set_min_delay(Duration::from_millis(5))
            .set_max_delay(Duration::from_millis(50));
        let conn = if lazy {
            ConnectionManager::new_lazy_with_config(client.clone(), config)
                .map_err(|e| redis_failure(&address, "cannot set up the connection", e))?
        } else {
            let connect = ConnectionManager::new_with_config(client.clone(), config);
            match tokio::time::timeout(timeouts.op(), connect).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(redis_failure(&address, "cannot connect", e)),
                Err(_) => return Err(timeout_failure(&address, "cannot connect", timeouts.op())),
            }
        };
        Ok(Node {
            address,
            client,
            conn,
            timeouts,
        })
    }

    /// `host:port` of the node.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The driver client (for the pub/sub connection).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Loads every script, so that later calls hit `EVALSHA` at once.
    pub async fn load_scripts(&self) -> Result<()> {
        for script in scripts::all() {
            let mut conn = self.conn.clone();
            self.bounded(async move { script.prepare_invoke().load_async(&mut conn).await })
                .await?;
        }
        Ok(())
    }

    /// Runs `script` with `keys` and `args` by SHA (loading it on `NOSCRIPT`).
    pub async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&dyn ToRedisArgsDyn],
    ) -> Result<T> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            arg.push_to(&mut invocation);
        }
        let mut conn = self.conn.clone();
        self.bounded(async move { invocation.invoke_async(&mut conn).await })
            .await
    }

    /// Runs one plain command.
    pub async fn cmd<T: FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T> {
        let mut conn = self.conn.clone();
        self.bounded(async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Runs the extend script: resets the lease of `keys` to `lease` if the lock still carries
    /// `token`. Returns the script's reply: 1 extended, 0 not ours.
    pub async fn extend_script(
        &self,
        keys: &LockKeys,
        token: &str,
        lease: Duration,
    ) -> Result<i64> {
        let lease_ms = lease.as_millis() as u64;
        self.eval(&scripts::EXTEND, &[&keys.lock], &[&token, &lease_ms])
            .await
    }

    /// Runs the raise script: raises the fencing counter of `keys` to at least `value` if the
    /// lock still carries `token`. Returns the script's reply: 1 ours (raised if it was lower),
    /// 0 not ours.
    pub async fn raise_script(&self, keys: &LockKeys, token: &str, value: u64) -> Result<i64> {
        self.eval(
            &scripts::RAISE,
            &[&keys.lock, &keys.fence],
            &[&token, &value],
        )
        .await
    }

    /// Runs the release script: deletes the lock of `keys` if it still carries `token`, and
    /// with `notify` publishes on the release channel so that waiters wake. Returns the
    /// script's reply: 1 released, 0 not ours.
    pub async fn release_script(&self, keys: &LockKeys, token: &str, notify: bool) -> Result<i64> {
        if notify {
            self.eval(&scripts::RELEASE, &[&keys.lock], &[&token, &keys.channel])
                .await
        } else {
            self.eval(&scripts::RELEASE_QUIET, &[&keys.lock], &[&token])
                .await
        }
    }

    /// Bounds `op` by the connect + response timeouts and maps its errors.
    async fn bounded<T>(&self, op: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeouts.op(), op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(redis_failure(&self.address, "command failed", e)),
            Err(_) => Err(timeout_failure(
                &self.address,
                "command failed",
                self.timeouts.op(),
            )),
        }
    }
}

/// An argument of a script call (object-safe wrapper over [`ToRedisArgs`]).
pub(crate) trait ToRedisArgsDyn: Sync {
    fn push_to(&self, invocation: &mut redis::ScriptInvocation<'_>);
}

impl<T: ToRedisArgs + Sync> ToRedisArgsDyn for T {
    fn push_to(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        invocation.arg(self);
    }
}
