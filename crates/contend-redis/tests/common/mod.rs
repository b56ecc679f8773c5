//! Test support: server URLs from the environment (skip or require), unique names, and
//! throwaway redis-server processes of our own (started on a free port, killed on drop).

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use contend_test_support::env_url;

/// A lock client on `url` in the namespace `ns`; panics when Redis cannot be reached.
pub async fn client(url: &str, ns: &str) -> contend_redis::LockClient {
    contend_redis::LockClient::builder(url)
        .namespace(ns)
        .connect()
        .await
        .expect("connect to redis")
}

/// Deletes `key` on the Redis at `url` (as a restart without persistence loses it): how many
/// keys were deleted.
pub async fn forget(url: &str, key: &str) -> i64 {
    let mut conn = redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    redis::cmd("DEL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("DEL")
}

/// `CONTEND_REDIS_URL`.
pub fn redis_url() -> Option<String> {
    env_url("CONTEND_REDIS_URL")
}

/// `CONTEND_REDLOCK_URLS`, split.
pub fn redlock_urls() -> Option<Vec<String>> {
    contend_test_support::env_urls("CONTEND_REDLOCK_URLS")
}

/// A namespace no other test run uses.
pub fn unique_namespace(test: &str) -> String {
    format!("test-redis-lock-{test}-{:016x}", rand::random::<u64>())
}

/// A local port nobody listens on (bound and released at once).
pub fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// A redis-server of our own, killed when dropped.
pub struct OwnRedis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl OwnRedis {
    /// Starts a redis-server without persistence on a free port, or `None` (after printing
    /// "skipped") when the binary is missing and servers are not required.
    pub fn start() -> Option<OwnRedis> {
        let binary = std::env::var("CONTEND_REDIS_SERVER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from("redis-server"));
        let mut dir = tempfile::tempdir().expect("temp dir");
        for _ in 0..5 {
            let port = closed_port();
            let child = Command::new(&binary)
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                ])
                .args(["--appendonly", "no", "--dir"])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match child {
                Ok(c) => c,
                Err(e) => {
                    contend_test_support::skip_or_fail(&format!("cannot start redis-server ({e})"));
                    return None;
                }
            };
            let mut own = OwnRedis {
                child: Some(child),
                port,
                dir,
            };
            if own.wait_ready(Duration::from_secs(5)) {
                return Some(own);
            }
            own.kill();
            dir = tempfile::tempdir().expect("temp dir");
        }
        panic!("redis-server did not start");
    }

    /// Starts again on the same port (after [`OwnRedis::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart redis-server");
        self.child = Some(child);
        assert!(
            self.wait_ready(Duration::from_secs(5)),
            "redis-server did not restart"
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                return false; // exited (port taken?)
            }
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200))
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
